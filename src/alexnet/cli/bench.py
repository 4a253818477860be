"""``alexnet bench``: images/s and MFU against the reference pipeline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from alexnet.errors import AlexNetError


def register(sub: Any) -> None:
    b = sub.add_parser(
        "bench",
        help="images/s and MFU of the data path, the model step and end to end, against the reference pipeline",
    )
    b.add_argument("--data", help="an ImageFolder root (train/, val/); default: generated ImageNet-sized JPEGs")
    b.add_argument("--store", help="where its prepared store is or goes (default: beside the data)")
    b.add_argument("--images", type=int, default=2000, help="generated training images (default 2000)")
    b.add_argument(
        "--source-size", default="500x375", help="WxH of the generated JPEGs (default 500x375, ImageNet-like)"
    )
    b.add_argument("--image-size", type=int, default=256)
    b.add_argument("--crop-size", type=int, default=224)
    b.add_argument("--batch-size", type=int, default=128)
    b.add_argument("--batch-sizes", default="", help="more batch sizes for the model step, e.g. 256,512")
    b.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    b.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement")
    b.add_argument("--model", choices=("paper", "torchvision"), default="paper")
    b.add_argument("--device", default="auto")
    b.add_argument(
        "--workers", type=int, default=-1, help="processes for prepare and the reference loader (default: cores)"
    )
    b.add_argument(
        "--set", metavar="speed.KEY=VALUE", action="append", default=[], help="a speed option, e.g. speed.compile=off"
    )
    b.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: a table, or a CPU estimate)")
    b.add_argument("--no-baseline", action="store_true", help="skip the reference pipeline")
    b.add_argument("--json", metavar="FILE", help="write all results as JSON")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(handler=cmd_bench)


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
