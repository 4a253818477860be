"""The inference tools: ``predict``, ``import-weights``, ``features``, ``retrieve``, ``visualize``, ``export``, ``serve``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from alexnet.cli.common import add_runtime, print_per_image
from alexnet.errors import AlexNetError


def register(sub: Any) -> None:
    pr = sub.add_parser("predict", help="top-5 classes for image files")
    pr.add_argument("checkpoint", metavar="CHECKPOINT")
    pr.add_argument("images", nargs="+", metavar="IMAGE")
    pr.add_argument("--topk", type=int, default=5)
    pr.add_argument("--ten-crop", action="store_true", help="average the ten patches, as the paper's test")
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--json", action="store_true", help="print JSON instead of text")
    pr.set_defaults(handler=cmd_predict)

    _add_import_weights(sub)

    f = sub.add_parser("features", help="fc7 (4096-d) vectors for every image under a folder, as an .npz index")
    f.add_argument("checkpoint", metavar="CHECKPOINT")
    f.add_argument("folder", metavar="FOLDER", help="images, searched recursively")
    f.add_argument("--out", required=True, help="the .npz index to write")
    add_runtime(f)
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(handler=cmd_features)

    r = sub.add_parser("retrieve", help="nearest index images in fc7 space (the paper's Figure 4), drawn as a grid")
    r.add_argument("checkpoint", metavar="CHECKPOINT")
    r.add_argument("queries", nargs="+", metavar="QUERY", help="query images")
    r.add_argument("--index", required=True, help="an .npz from 'alexnet features' with the same checkpoint")
    r.add_argument("--k", type=int, default=6, help="neighbours per query (the paper shows 6)")
    r.add_argument("--out", help="PNG grid to write: one row per query, nearest first")
    r.add_argument("--device", default="cpu")
    r.add_argument("--json", action="store_true", help="print JSON instead of text")
    r.set_defaults(handler=cmd_retrieve)

    _add_visualize(sub)

    x = sub.add_parser("export", help="ONNX, TorchScript or safetensors, checked against PyTorch")
    x.add_argument("checkpoint", metavar="CHECKPOINT")
    x.add_argument("--format", required=True, choices=("onnx", "torchscript", "safetensors"))
    x.add_argument("--out", required=True, help="file to write (.onnx, .pt, .safetensors)")
    x.add_argument("--tolerance", type=float, default=1e-4, help="allowed max |diff| per unit of the largest logit")
    x.set_defaults(handler=cmd_export)

    sv = sub.add_parser("serve", help="HTTP service: JSON POST /predict and an upload page at /")
    sv.add_argument("checkpoint", metavar="CHECKPOINT")
    sv.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--max-upload-mb", type=float, default=10.0, help="larger uploads get 413")
    sv.set_defaults(handler=cmd_serve)


def _add_import_weights(sub: Any) -> None:
    w = sub.add_parser("import-weights", help="turn torchvision or Caffe AlexNet weights into an alexnet checkpoint")
    w.add_argument(
        "source",
        metavar="SRC",
        help="torchvision:IMAGENET1K_V1 (downloaded once into torch.hub's cache), or a file: "
        "alexnet-owt-*.pth, bvlc_alexnet.caffemodel or bvlc_alexnet.npy",
    )
    w.add_argument("out_path", nargs="?", metavar="OUT", help="checkpoint to write (same as --out)")
    w.add_argument("--format", choices=("torchvision", "caffe-npy", "caffemodel"), help="the file's format")
    w.add_argument(
        "--out", help="checkpoint to write: .pt, or .safetensors (named weights: default torchvision-NAME.pt)"
    )
    w.add_argument(
        "--classes",
        metavar="FILE",
        help="one class per line (id or id<TAB>name); default: the 1000 ILSVRC-2012 classes",
    )
    w.add_argument(
        "--mean",
        metavar="FILE",
        help="Caffe mean image (.binaryproto or .npy, BGR); default: per-channel 104, 117, 123",
    )
    w.set_defaults(handler=cmd_import_weights)


def _add_visualize(sub: Any) -> None:
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
    v.set_defaults(handler=cmd_visualize)


def cmd_predict(args: argparse.Namespace) -> int:
    from alexnet.runtime import resolve_device
    from alexnet.tools.predict import predict

    results = predict(args.checkpoint, args.images, args.topk, args.ten_crop, resolve_device(args.device))
    print_per_image(
        results,
        args.json,
        lambda r: r.path,
        lambda r: [
            f"{p:6.3f}  {name}" + (f"  ({cid})" if cid != name else "") for (name, p), cid in zip(r.top, r.classes)
        ],
    )
    return 1 if any(r.error for r in results) else 0


def cmd_import_weights(args: argparse.Namespace) -> int:
    from alexnet.tools import named_weights
    from alexnet.tools.weights import import_weights, write_checkpoint

    if args.out_path and args.out and args.out_path != args.out:
        raise AlexNetError(f"two outputs given: {args.out_path} and --out {args.out}")
    out_arg = args.out_path or args.out
    if named_weights.is_named(args.source):
        if args.format or args.classes or args.mean:
            raise AlexNetError(f"{args.source} names published weights: --format, --classes and --mean apply to files")
        member = named_weights.resolve(args.source)
        state = named_weights.named_checkpoint_state(member, progress=True)
        out_arg = out_arg or f"torchvision-{member.name}.pt"
    else:
        if not args.format or not out_arg:
            raise AlexNetError("a weights file needs --format and an output (OUT or --out)")
        state = import_weights(args.source, args.format, args.classes, args.mean)
    out = write_checkpoint(state, out_arg)
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
    print_per_image(results, args.json, lambda r: r.query, lambda r: [f"{d:10.4f}  {path}" for path, d in r.neighbours])
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
        print(
            f"{out}: {weight.shape[0]} conv1 kernels {weight.shape[2]}x{weight.shape[3]}, {towers} tower(s), {grid.shape[1]}x{grid.shape[0]} px"
        )
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
    if not 1 <= args.port <= 65535:
        raise AlexNetError(f"--port must be in 1..65535; got {args.port}")
    try:
        from alexnet.tools.serve import serve
    except ImportError as e:
        raise AlexNetError(
            f"alexnet serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'alexnet[serve]'"
        ) from None
    from alexnet.runtime import resolve_device

    if args.max_upload_mb <= 0:
        raise AlexNetError(f"--max-upload-mb must be positive; got {args.max_upload_mb}")
    serve(args.checkpoint, args.host, args.port, resolve_device(args.device), int(args.max_upload_mb * 2**20))
    return 0
