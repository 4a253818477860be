"""``alexnet train | evaluate | predict | make-dataset | config | experiment``: argument parsing and dispatch only."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
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
    p.add_argument("--data", help="ImageFolder root holding train/<class>/ and val/<class>/")
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
    e.add_argument("--data", required=True, help="a dataset root (its val/ split is used) or a folder of class folders")
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

    c = sub.add_parser("config", help="print the resolved configuration as YAML")
    _config_args(c)

    x = sub.add_parser(
        "experiment",
        help="the paper's claims on CIFAR-10: relu-vs-tanh (Figure 1) or ablations",
        description="Reproduce Figure 1 (relu-vs-tanh) or the architecture ablations (ablations) on CIFAR-10. "
        "Unset options take the full-size defaults, or the --reduced ones.",
    )
    x.add_argument("name", choices=("relu-vs-tanh", "ablations"))
    x.add_argument(
        "--data",
        help="CIFAR-10: an ImageFolder tree (train/, test/), its .tar.gz, or cifar-10-python.tar.gz "
        "(default: ../shared/data/cifar10-jpeg.tar.gz if present)",
    )
    x.add_argument("--out", help="run directory (default: runs/<name>-<time>); an existing one with the same settings is continued")
    x.add_argument("--reduced", action="store_true", help="a quick check: 500 training images, 1-3 epochs, small nets")
    x.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    x.add_argument("--epochs", type=int, help="epochs per run (relu-vs-tanh: the most a final run may take)")
    x.add_argument("--subset", type=int, help="training images, balanced over classes (0: all)")
    x.add_argument("--seeds", type=int, help="runs per activation or variant")
    x.add_argument("--batch-size", type=int)
    x.add_argument("--lrs", help="relu-vs-tanh: comma-separated learning rates to sweep")
    x.add_argument("--sweep-epochs", type=int, help="relu-vs-tanh: epochs per learning-rate trial")
    x.add_argument("--test-subset", type=int, help="ablations: test images (0: all 10,000)")
    x.add_argument("--variants", help="ablations: comma-separated variants (default: all)")
    x.add_argument("--width", type=float, help="ablations: conv width relative to the paper's 96-256-384-384-256")
    x.add_argument("--fc-width", type=int, help="ablations: fc6 and fc7 units")
    x.add_argument("--lr", type=float, help="ablations: learning rate")
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
        run_dir = resume(
            args.resume, epochs=args.epochs, device=args.device, progress=False if args.no_progress else None
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


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(_resolve_config(args).to_dict(), sort_keys=False), end="")
    return 0


def _comma_list(text: str | None, convert: type, flag: str) -> tuple | None:
    if text is None:
        return None
    try:
        return tuple(convert(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise AlexNetError(f"{flag} expects a comma-separated list, e.g. {flag} 0.01,0.03; got {text!r}") from None


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiments import resolve_settings, run_experiment
    from .train import resolve_device

    overrides = {
        "epochs": args.epochs,
        "subset": args.subset,
        "seeds": args.seeds,
        "batch_size": args.batch_size,
        "lrs": _comma_list(args.lrs, float, "--lrs"),
        "sweep_epochs": args.sweep_epochs,
        "test_subset": args.test_subset,
        "variants": _comma_list(args.variants, str, "--variants"),
        "width": args.width,
        "fc_width": args.fc_width,
        "lr": args.lr,
    }
    settings = resolve_settings(args.name, args.reduced, overrides)
    out = args.out or str(Path("runs") / f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = run_experiment(args.name, args.data, out, settings, resolve_device(args.device), args.command_line)
    print((run_dir / "summary.md").read_text(), end="")
    print(f"run directory: {run_dir}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "make-dataset": cmd_make_dataset,
    "config": cmd_config,
    "experiment": cmd_experiment,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["alexnet", *(sys.argv[1:] if argv is None else argv)])  # recorded with results
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
