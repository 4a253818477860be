"""``alexnet train | evaluate | predict | prepare | bench | import-weights | features | retrieve | visualize |
export | serve | experiment | make-dataset | config``: argument parsing and dispatch only."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alexnet.errors import AlexNetError, Stopped


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
    parser = argparse.ArgumentParser(
        prog="alexnet",
        description="AlexNet (Krizhevsky, Sutskever & Hinton 2012): train, evaluate, inspect and deploy.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train a network (the paper's recipe by default)",
        epilog="exit status: 0 finished; 2 error (one line, also in RUN/log.txt); 130 or 143 stopped by SIGINT or "
        "SIGTERM after writing a checkpoint: continue with --resume RUN",
    )
    _config_args(t)
    _add_runtime(t)
    t.add_argument("--out", help="run directory (default: runs/<time>)")
    t.add_argument("--model", choices=("paper", "torchvision"))
    t.add_argument("--epochs", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument(
        "--nproc", type=int, metavar="N",
        help="data-parallel training in N processes on this machine (runs torchrun --standalone --nproc-per-node N)",
    )  # fmt: skip
    t.add_argument("--max-restarts", type=int, default=0, metavar="K", help="with --nproc: torchrun restarts after a failure")

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

    w = sub.add_parser("import-weights", help="turn torchvision or Caffe AlexNet weights into an alexnet checkpoint")
    w.add_argument("source", metavar="SRC", help="alexnet-owt-*.pth, bvlc_alexnet.caffemodel or bvlc_alexnet.npy")
    w.add_argument("--format", required=True, choices=("torchvision", "caffe-npy", "caffemodel"))
    w.add_argument("--out", required=True, help="checkpoint to write: .pt, or .safetensors")
    w.add_argument("--classes", metavar="FILE", help="one class per line (id or id<TAB>name); default: the 1000 ILSVRC-2012 classes")
    w.add_argument("--mean", metavar="FILE", help="Caffe mean image (.binaryproto or .npy, BGR); default: per-channel 104, 117, 123")

    f = sub.add_parser("features", help="fc7 (4096-d) vectors for every image under a folder, as an .npz index")
    f.add_argument("checkpoint", metavar="CHECKPOINT")
    f.add_argument("folder", metavar="FOLDER", help="images, searched recursively")
    f.add_argument("--out", required=True, help="the .npz index to write")
    _add_runtime(f)
    f.add_argument("--no-progress", action="store_true")

    r = sub.add_parser("retrieve", help="nearest index images in fc7 space (the paper's Figure 4), drawn as a grid")
    r.add_argument("checkpoint", metavar="CHECKPOINT")
    r.add_argument("queries", nargs="+", metavar="QUERY", help="query images")
    r.add_argument("--index", required=True, help="an .npz from 'alexnet features' with the same checkpoint")
    r.add_argument("--k", type=int, default=6, help="neighbours per query (the paper shows 6)")
    r.add_argument("--out", help="PNG grid to write: one row per query, nearest first")
    r.add_argument("--device", default="cpu")
    r.add_argument("--json", action="store_true", help="print JSON instead of text")

    v = sub.add_parser("visualize", help="the paper's figures: conv1 kernels, top-5 predictions; training curves")
    vsub = v.add_subparsers(dest="figure", required=True)
    vf = vsub.add_parser("filters", help="conv1 kernels as an image grid (Figure 3)")
    vf.add_argument("checkpoint", metavar="CHECKPOINT")
    vf.add_argument("--out", required=True, help="PNG to write")
    vf.add_argument("--columns", type=int, default=16)
    vf.add_argument("--scale", type=int, default=4, help="pixels per kernel weight")
    vp = vsub.add_parser("predictions", help="images with their top-5 classes (Figure 4, left)")
    vp.add_argument("checkpoint", metavar="CHECKPOINT")
    vp.add_argument("images", nargs="+", metavar="IMAGE")
    vp.add_argument("--out", required=True, help="PNG to write")
    vp.add_argument("--ten-crop", action="store_true")
    vp.add_argument("--device", default="cpu")
    vc = vsub.add_parser("curves", help="loss, error and learning rate per epoch of one or more runs")
    vc.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or metrics.jsonl files)")
    vc.add_argument("--out", required=True, help="PNG to write")

    x = sub.add_parser("export", help="ONNX, TorchScript or safetensors, checked against PyTorch")
    x.add_argument("checkpoint", metavar="CHECKPOINT")
    x.add_argument("--format", required=True, choices=("onnx", "torchscript", "safetensors"))
    x.add_argument("--out", required=True, help="file to write (.onnx, .pt, .safetensors)")
    x.add_argument("--tolerance", type=float, default=1e-4, help="allowed max |diff| per unit of the largest logit")

    sv = sub.add_parser("serve", help="HTTP service: JSON POST /predict and an upload page at /")
    sv.add_argument("checkpoint", metavar="CHECKPOINT")
    sv.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--max-upload-mb", type=float, default=10.0, help="larger uploads get 413")

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
    x.add_argument(
        "--init",
        choices=("he", "paper"),
        help="relu-vs-tanh: He-normal weights on unit-scale input (default), or the paper's N(0, 0.01) on raw pixels",
    )
    x.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="training runs at once, each in its own process (default 1); small nets leave a GPU idle, "
        "so several runs at once finish sooner",
    )
    x.add_argument("--lr", type=float, help="ablations: learning rate")
    return parser


def _resolve_config(args: argparse.Namespace):
    from alexnet import config as config_lib

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


def _launch_torchrun(args: argparse.Namespace) -> int:
    """``alexnet train --nproc N ...`` is ``torchrun --standalone --nproc-per-node N -m alexnet train ...``."""
    if args.nproc < 1 or args.max_restarts < 0:
        raise AlexNetError(f"--nproc must be 1 or more and --max-restarts 0 or more; got {args.nproc} and {args.max_restarts}")
    rest, skip = [], False
    for word in args.argv:  # the same command without the launcher's own options
        if skip:
            skip = False
        elif word in ("--nproc", "--max-restarts"):
            skip = True
        elif not word.startswith(("--nproc=", "--max-restarts=")):
            rest.append(word)
    if not args.resume and not args.out and not any(s.startswith("run.out=") for s in args.set):
        rest += ["--out", str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))]  # one name for all ranks
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
        f"--max-restarts={args.max_restarts}", "-m", "alexnet", *rest,
    ]  # fmt: skip
    print("alexnet: running " + shlex.join(command), file=sys.stderr)
    return subprocess.run(command).returncode


def cmd_train(args: argparse.Namespace) -> int:
    from alexnet.train.distributed import from_env
    from alexnet.train.run import resume, train

    if args.nproc is not None:
        if from_env().active:
            raise AlexNetError("--nproc starts torchrun itself; under torchrun leave it out")
        return _launch_torchrun(args)
    if args.resume:
        # A resumed run keeps its saved recipe: refuse flags that would silently not apply.
        fixed = [f"--{name.replace('_', '-')}" for name in ("data", "preset", "model", "lr", "batch_size", "seed", "out")]
        given = [flag for flag in fixed if getattr(args, flag[2:].replace("-", "_")) is not None] + (["--set"] if args.set else [])
        if given:
            from alexnet.checkpoint import load_checkpoint

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
            if from_env().active:  # the default name is a time stamp: ranks would disagree
                raise AlexNetError("with several processes give the run directory explicitly: --out RUN_DIR")
            cfg.run.out = str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        run_dir = train(cfg)
    print(f"run directory: {run_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from alexnet.checkpoint import load_for_inference
    from alexnet.data.images import ImageFolderDataset, scan_image_folder
    from alexnet.data.loader import EpochBatchSampler, make_loader
    from alexnet.data.store import StoreLoader, is_store, open_store
    from alexnet.evaluate import evaluate
    from alexnet.runtime import resolve_device

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
    from alexnet.runtime import resolve_device
    from alexnet.tools.predict import predict

    results = predict(args.checkpoint, args.images, args.topk, args.ten_crop, resolve_device(args.device))
    _print_per_image(
        results,
        args.json,
        lambda r: r.path,
        lambda r: [f"{p:6.3f}  {name}" + (f"  ({cid})" if cid != name else "") for (name, p), cid in zip(r.top, r.classes)],
    )
    return 1 if any(r.error for r in results) else 0


def _print_per_image(results: list[Any], as_json: bool, title: Callable[[Any], str], lines: Callable[[Any], list[str]]) -> None:
    """predict and retrieve: all results as JSON, or per image its name, its read error and its lines."""
    if as_json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
        return
    for r in results:
        print(title(r))
        if r.error:
            print(f"  cannot read: {r.error}")
        for line in lines(r):
            print(f"  {line}")


def cmd_import_weights(args: argparse.Namespace) -> int:
    from alexnet.tools.weights import import_weights, write_checkpoint

    state = import_weights(args.source, args.format, args.classes, args.mean)
    out = write_checkpoint(state, args.out)
    model = state["config"]["model"]
    print(f"{out}: {model['name']} variant, {len(state['classes'])} classes, from {state['source']}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from alexnet.checkpoint import load_model
    from alexnet.runtime import resolve_device
    from alexnet.tools.features import extract_features, save_index

    device = resolve_device(args.device or "auto")
    index = extract_features(
        load_model(args.checkpoint, device),
        args.folder,
        batch_size=args.batch_size or 64,
        workers=0 if args.workers is None else args.workers,
        device=device,
        progress=not args.no_progress,
    )
    save_index(index, args.out)
    for reason in index.skipped:
        logging.getLogger("alexnet").warning("skipped %s", reason)
    n, d = index.features.shape
    print(f"{args.out}: {n} images x {d} features" + (f", {len(index.skipped)} skipped" if index.skipped else ""))
    return 0


def cmd_retrieve(args: argparse.Namespace) -> int:
    from alexnet.runtime import resolve_device
    from alexnet.tools.retrieve import draw_grid, retrieve, save_png

    if args.k < 1:
        raise AlexNetError(f"--k must be at least 1; got {args.k}")
    results, _ = retrieve(args.checkpoint, args.index, args.queries, args.k, resolve_device(args.device))
    _print_per_image(results, args.json, lambda r: r.query, lambda r: [f"{d:10.4f}  {path}" for path, d in r.neighbours])
    if args.out:
        save_png(draw_grid(results), args.out)
        if not args.json:
            print(f"grid: {args.out}")
    return 1 if any(r.error for r in results) else 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from alexnet.checkpoint import load_model
    from alexnet.runtime import resolve_device
    from alexnet.tools import visualize as vis

    if args.figure == "filters":
        if args.columns < 1 or args.scale < 1:
            raise AlexNetError(f"--columns and --scale must be at least 1; got {args.columns} and {args.scale}")
        weight, towers = vis.conv1_weight(load_model(args.checkpoint))
        grid = vis.filter_grid(weight, towers, columns=args.columns, scale=args.scale)
        out = vis.save_image(grid, args.out)
        print(f"{out}: {weight.shape[0]} conv1 kernels {weight.shape[2]}x{weight.shape[3]}, {towers} tower(s), {grid.shape[1]}x{grid.shape[0]} px")
    elif args.figure == "predictions":
        loaded = load_model(args.checkpoint, resolve_device(args.device))
        out = vis.save_figure(vis.predictions_figure(vis.predictions(loaded, args.images, ten=args.ten_crop)), args.out)
        print(f"{out}: top-5 of {len(args.images)} image(s)")
    else:
        runs = {Path(r).name if Path(r).is_dir() else Path(r).parent.name: vis.read_metrics(r) for r in args.runs}
        out = vis.save_figure(vis.curves_figure(runs), args.out)
        print(f"{out}: {', '.join(f'{k} ({len(v)} epochs)' for k, v in runs.items())}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from alexnet.tools.export import export

    print(export(args.checkpoint, args.format, args.out, args.tolerance).summary())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from alexnet.tools.serve import serve
    except ImportError as e:
        raise AlexNetError(f"alexnet serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'alexnet[serve]'") from None
    from alexnet.runtime import resolve_device

    if args.max_upload_mb <= 0:
        raise AlexNetError(f"--max-upload-mb must be positive; got {args.max_upload_mb}")
    serve(args.checkpoint, args.host, args.port, resolve_device(args.device), int(args.max_upload_mb * 2**20))
    return 0


def cmd_make_dataset(args: argparse.Namespace) -> int:
    from alexnet.data.synthetic import ensure_shapes_dataset

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
    from alexnet.data.prepare import prepare
    from alexnet.data.store import verify_store

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
    from alexnet import config as config_lib
    from alexnet.bench import BenchConfig, format_report, run_bench

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


def _comma_list(text: str | None, convert: type, flag: str) -> tuple | None:
    if text is None:
        return None
    try:
        return tuple(convert(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise AlexNetError(f"{flag} expects a comma-separated list, e.g. {flag} 0.01,0.03; got {text!r}") from None


def cmd_experiment(args: argparse.Namespace) -> int:
    from alexnet.experiments import resolve_settings, run_experiment
    from alexnet.runtime import resolve_device

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
        "init": args.init,
    }
    if args.jobs < 1:
        raise AlexNetError(f"--jobs must be at least 1; got {args.jobs}")
    settings = resolve_settings(args.name, args.reduced, overrides)
    out = args.out or str(Path("runs") / f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = run_experiment(
        args.name, args.data, out, settings, resolve_device(args.device), args.command_line, workers=args.jobs
    )
    print((run_dir / "summary.md").read_text(), end="")
    print(f"run directory: {run_dir}")
    return 0


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "prepare": cmd_prepare,
    "bench": cmd_bench,
    "import-weights": cmd_import_weights,
    "features": cmd_features,
    "retrieve": cmd_retrieve,
    "visualize": cmd_visualize,
    "export": cmd_export,
    "serve": cmd_serve,
    "make-dataset": cmd_make_dataset,
    "config": cmd_config,
    "experiment": cmd_experiment,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.command_line = shlex.join(["alexnet", *args.argv])  # recorded with results
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("alexnet").setLevel(logging.INFO)
    try:
        return COMMANDS[args.command](args)
    except AlexNetError as e:
        print(f"alexnet: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"alexnet: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("alexnet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
