"""``alexnet bench``: images/s and MFU against the reference pipeline."""

from __future__ import annotations

import argparse
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
    b.add_argument("--images", type=int, help="generated training images (default 2000; 256 on the CPU)")
    b.add_argument(
        "--source-size", default="500x375", help="WxH of the generated JPEGs (default 500x375, ImageNet-like)"
    )
    b.add_argument("--image-size", type=int, default=256)
    b.add_argument("--crop-size", type=int, default=224)
    b.add_argument("--batch-size", type=int, help="default 128; 16 on the CPU")
    b.add_argument("--batch-sizes", default="", help="more batch sizes for the model step, e.g. 256,512")
    b.add_argument("--steps", type=int, help="least timed steps per window (default 20; 2 on the CPU)")
    b.add_argument("--warmup", type=int, help="untimed steps before each measurement (default 5; 1 on the CPU)")
    b.add_argument("--repeats", type=int, help="windows per figure, interleaved with the reference's (3)")
    b.add_argument("--min-window", type=float, help="shortest window in seconds (default 2)")
    b.add_argument(
        "--towers", action=argparse.BooleanOptionalAction, help="also time split towers (default: on a GPU only)"
    )
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
    from alexnet.bench.measure import CPU_DEFAULTS
    from alexnet.files import write_json
    from alexnet.runtime import resolve_device

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
    # Sizes not given come from the device: the GPU-sized ones ran over ten minutes on a 2-core CPU.
    cpu = resolve_device(args.device).type == "cpu"
    sizes = {"images": 2000, "batch_size": 128, "steps": 20, "warmup": 5, "towers": True, "repeats": 3}
    sizes |= CPU_DEFAULTS if cpu else {}
    sizes |= {k: getattr(args, k) for k in sizes if getattr(args, k) is not None}
    bc = BenchConfig(
        data=args.data,
        store=args.store,
        images=sizes["images"],
        source_size=source_size,
        image_size=args.image_size,
        crop_size=args.crop_size,
        batch_size=sizes["batch_size"],
        batch_sizes=batch_sizes,
        steps=sizes["steps"],
        warmup=sizes["warmup"],
        model=args.model,
        device=args.device,
        workers=args.workers,
        speed=config_lib.resolve(None, overrides).speed,
        peak_tflops=args.peak_tflops,
        baseline=not args.no_baseline,
        progress=not args.no_progress,
        towers=sizes["towers"],
        repeats=sizes["repeats"],
        min_window_s=args.min_window,
    )
    # The JSON is rewritten after each part: a run stopped by a time limit keeps what it measured.
    result = run_bench(bc, (lambda part: write_json(Path(args.json), part, indent=2)) if args.json else None)
    print(format_report(result))
    if args.json:
        write_json(Path(args.json), result, indent=2)
    return 0
