"""``alexnet train | evaluate | predict | prepare | bench | make-dataset | config``: argument parsing and dispatch only."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .errors import AlexNetError


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, help="decoding processes (default: one per core)")
    p.add_argument("--batch-size", type=int)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        help="a packaged preset (paper, small, shapes) or a YAML file; default: paper with --data, shapes without",
    )
    p.add_argument("--data", help="ImageFolder root holding train/<class>/ and val/<class>/, or a store (alexnet prepare)")
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], help="override any config key")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alexnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a network (the paper's recipe by default)")
    _config_args(t)
    _add_runtime(t)
    t.add_argument("--out", help="run directory (default: runs/<time>)")
    t.add_argument("--model", choices=("paper", "torchvision"))
    t.add_argument("--epochs", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")

    e = sub.add_parser("evaluate", help="top-1/top-5 error, centre patch and ten patches; several checkpoints: ensemble")
    e.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="a .pt file or a run directory")
    e.add_argument(
        "--data", required=True, help="a dataset root (its val/ split is used), a folder of class folders, or a store"
    )
    _add_runtime(e)
    e.add_argument("--centre-only", action="store_true", help="skip the ten-patch evaluation")
    e.add_argument("--json", metavar="FILE", help="also write the results as JSON")

    pr = sub.add_parser("predict", help="top-5 classes for image files")
    pr.add_argument("checkpoint", metavar="CHECKPOINT")
    pr.add_argument("images", nargs="+", metavar="IMAGE")
    pr.add_argument("--topk", type=int, default=5)
    pr.add_argument("--ten-crop", action="store_true", help="average the ten patches, as the paper's test")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--json", action="store_true", help="print JSON instead of text")

    m = sub.add_parser("make-dataset", help="write the built-in shapes dataset")
    m.add_argument("root", nargs="?", help="where (default: the cache folder train uses)")
    m.add_argument("--image-size", type=int, default=64)
    m.add_argument("--train-per-class", type=int, default=500)
    m.add_argument("--val-per-class", type=int, default=100)
    m.add_argument("--seed", type=int, default=0)

    s = sub.add_parser(
        "prepare",
        help="decode a dataset once into a store of fixed-size uint8 images (train from it with --data STORE)",
        description="alexnet prepare SRC DEST writes the store; alexnet prepare --verify STORE checks one.",
    )
    s.add_argument("paths", nargs="+", metavar="SRC DEST", help="an ImageFolder root or a folder of the ILSVRC-2012 archives, and the store folder")
    s.add_argument("--image-size", type=int, default=256, help="side of the stored images (default 256, the paper's)")
    s.add_argument("--workers", type=int, default=-1, help="decoding processes (default: one per core)")
    s.add_argument("--chunk-size", type=int, default=64, help="images per unit of work and of resume (default 64)")
    s.add_argument("--verify", action="store_true", help="check every chunk's checksum (reads the whole store)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")

    b = sub.add_parser(
        "bench",
        help="images/s and MFU of the data path, the model step and end to end, against the reference pipeline",
    )
    b.add_argument("--data", help="an ImageFolder root (train/, val/); default: generated ImageNet-sized JPEGs")
    b.add_argument("--store", help="where its prepared store is or goes (default: beside the data)")
    b.add_argument("--images", type=int, default=2000, help="generated training images (default 2000)")
    b.add_argument("--source-size", default="500x375", help="WxH of the generated JPEGs (default 500x375, ImageNet-like)")
    b.add_argument("--image-size", type=int, default=256)
    b.add_argument("--crop-size", type=int, default=224)
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--batch-sizes", default="", help="more batch sizes for the model step, e.g. 256,512")
    b.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    b.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement")
    b.add_argument("--model", choices=("paper", "torchvision"), default="paper")
    b.add_argument("--device", default="auto")
    b.add_argument("--workers", type=int, default=-1, help="processes for prepare and the reference loader (default: cores)")
    b.add_argument("--set", metavar="speed.KEY=VALUE", action="append", default=[], help="a speed option, e.g. speed.compile=off")
    b.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: a table, or a CPU estimate)")
    b.add_argument("--no-baseline", action="store_true", help="skip the reference pipeline")
    b.add_argument("--json", metavar="FILE", help="write all results as JSON")
    b.add_argument("--no-progress", action="store_true")

    c = sub.add_parser("config", help="print the resolved configuration as YAML")
    _config_args(c)
    return parser


def _resolve_config(args: argparse.Namespace):
    from . import config as config_lib

    overrides: dict[str, object] = {}
    if args.data:
        overrides["data.root"] = args.data
    preset = args.preset or ("paper" if args.data else "shapes")
    for flag, key in [
        ("model", "model.name"),
        ("epochs", "optim.epochs"),
        ("lr", "optim.lr"),
        ("batch_size", "optim.batch_size"),
        ("seed", "run.seed"),
        ("device", "run.device"),
        ("workers", "data.workers"),
        ("out", "run.out"),
    ]:
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "no_progress", False):
        overrides["run.progress"] = False
    overrides.update(config_lib.parse_assignments(args.set))
    return config_lib.resolve(preset, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import resume, train

    if args.resume:
        # A resumed run keeps its saved recipe: refuse flags that would silently not apply.
        fixed = [f"--{name.replace('_', '-')}" for name in ("data", "preset", "model", "lr", "batch_size", "seed", "out")]
        given = [flag for flag in fixed if getattr(args, flag[2:].replace("-", "_")) is not None] + (["--set"] if args.set else [])
        if given:
            from .checkpoint import load_checkpoint

            saved = load_checkpoint(Path(args.resume) / "last.pt")["config"]["model"]
            if args.model and args.model != saved["name"]:
                raise AlexNetError(
                    f"the checkpoint in {args.resume} is a '{saved['name']}' model with {saved['num_classes']} "
                    f"classes; --model {args.model} cannot change a run being resumed"
                )
            raise AlexNetError(
                f"--resume continues {args.resume} with its saved config; {', '.join(given)} cannot change it "
                "(only --epochs, --device, --workers and --no-progress can)"
            )
        run_dir = resume(
            args.resume,
            epochs=args.epochs,
            device=args.device,
            workers=args.workers,
            progress=False if args.no_progress else None,
        )
    else:
        cfg = _resolve_config(args)
        if not args.out and not any(s.startswith("run.out=") for s in args.set):
            cfg.run.out = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        run_dir = train(cfg)
    print(f"run directory: {run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import load_for_inference
    from .data import EpochBatchSampler, ImageFolderDataset, make_loader, scan_image_folder
    from .evaluate import evaluate
    from .store import StoreLoader, is_store, open_store
    from .train import resolve_device

    device = resolve_device(args.device or "auto")
    loaded = [load_for_inference(c, device) for c in args.checkpoints]
    models, pres, class_lists = zip(*loaded)
    classes = class_lists[0]
    for path, other, pre in zip(args.checkpoints, class_lists, pres):
        if other != classes:
            raise AlexNetError(f"{path} has other classes than {args.checkpoints[0]}: an ensemble needs the same classes")
        if pre.image_size != pres[0].image_size:
            raise AlexNetError(f"{path} expects {pre.image_size}px images, {args.checkpoints[0]} {pres[0].image_size}px")
    root = Path(args.data)
    if is_store(root):
        store = open_store(root, pres[0].image_size)
        if store.classes != classes:
            raise AlexNetError(f"store {root} has other classes than {args.checkpoints[0]}")
        folder, split = root, store.split("val")
        loader = StoreLoader(split, EpochBatchSampler(len(split), args.batch_size or 64, shuffle=False), device)
    else:
        folder = next((root / s for s in ("val", "validation", "test") if (root / s).is_dir()), root)
        images = scan_image_folder(folder, classes=classes)
        sampler = EpochBatchSampler(len(images), args.batch_size or 64, shuffle=False)
        loader = make_loader(ImageFolderDataset(images, pres[0].image_size), sampler, -1 if args.workers is None else args.workers)
    evaluated, skipped = evaluate(models, pres, loader, device, ten=not args.centre_only)
    if skipped:
        logging.getLogger("alexnet").warning("skipped %d unreadable images, e.g. %s", len(skipped), skipped[0])
    results = {name: r.as_dict() for name, r in evaluated.items()}
    what = "ensemble of %d" % len(models) if len(models) > 1 else "1 model"
    print(f"{folder}: {results['centre']['images']} images, {len(classes)} classes, {what}")
    print(f"{'':14s}{'top-1 err':>10s}{'top-5 err':>10s}")
    for name, r in results.items():
        print(f"{name:14s}{100 * r['top1_error']:9.2f}%{100 * r['top5_error']:9.2f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"checkpoints": args.checkpoints, "data": str(folder), **results}, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict
    from .train import resolve_device

    results = predict(args.checkpoint, args.images, args.topk, args.ten_crop, resolve_device(args.device))
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
    else:
        for r in results:
            print(r.path)
            if r.error:
                print(f"  cannot read: {r.error}")
            for name, p in r.top:
                print(f"  {p:6.3f}  {name}")
    return 1 if any(r.error for r in results) else 0


def cmd_make_dataset(args: argparse.Namespace) -> int:
    from .synthetic import ensure_shapes_dataset

    root = ensure_shapes_dataset(
        args.root,
        image_size=args.image_size,
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        seed=args.seed,
        progress=True,
    )
    print(root)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare
    from .store import verify_store

    if len(args.paths) > 2 or (len(args.paths) == 1 and not args.verify):
        raise AlexNetError("usage: alexnet prepare SRC DEST [--verify], or alexnet prepare --verify STORE")
    dest = args.paths[-1]
    if len(args.paths) == 2:
        report = prepare(
            args.paths[0],
            dest,
            image_size=args.image_size,
            workers=args.workers,
            chunk_size=args.chunk_size,
            progress=not args.no_progress,
        )
        print(json.dumps(report.as_dict()))
    if args.verify:
        problems = verify_store(dest, args.workers, progress=not args.no_progress)
        for line in problems:
            print(f"damaged: {line}")
        if problems:
            raise AlexNetError(f"{len(problems)} chunk(s) of {dest} do not match their checksums; prepare it again")
        print(f"{dest}: every chunk matches its checksum")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import config as config_lib
    from .bench import BenchConfig, format_report, run_bench

    overrides = config_lib.parse_assignments(args.set)
    if any(not key.startswith("speed.") for key in overrides):
        raise AlexNetError("alexnet bench --set takes speed options only (speed.amp, speed.channels_last, ...)")
    try:
        batch_sizes = tuple(int(x) for x in args.batch_sizes.split(",") if x.strip())
    except ValueError:
        raise AlexNetError(f"--batch-sizes takes integers separated by commas; got {args.batch_sizes!r}") from None
    try:
        source_size = tuple(int(x) for x in args.source_size.lower().split("x"))
        if len(source_size) != 2:
            raise ValueError
    except ValueError:
        raise AlexNetError(f"--source-size takes WIDTHxHEIGHT, e.g. 500x375; got {args.source_size!r}") from None
    bc = BenchConfig(
        data=args.data,
        store=args.store,
        images=args.images,
        source_size=source_size,
        image_size=args.image_size,
        crop_size=args.crop_size,
        batch_size=args.batch_size,
        batch_sizes=batch_sizes,
        steps=args.steps,
        warmup=args.warmup,
        model=args.model,
        device=args.device,
        workers=args.workers,
        speed=config_lib.resolve(None, overrides).speed,
        peak_tflops=args.peak_tflops,
        baseline=not args.no_baseline,
        progress=not args.no_progress,
    )
    result = run_bench(bc)
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(_resolve_config(args).to_dict(), sort_keys=False), end="")
    return 0


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "prepare": cmd_prepare,
    "bench": cmd_bench,
    "make-dataset": cmd_make_dataset,
    "config": cmd_config,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("alexnet").setLevel(logging.INFO)
    try:
        return COMMANDS[args.command](args)
    except AlexNetError as e:
        print(f"alexnet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alexnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
