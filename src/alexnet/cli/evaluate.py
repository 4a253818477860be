"""``alexnet evaluate``: top-1/top-5 error of one checkpoint or an ensemble, centre and ten patches."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from alexnet.cli.common import add_runtime
from alexnet.errors import AlexNetError


def register(sub: Any) -> None:
    e = sub.add_parser(
        "evaluate", help="top-1/top-5 error, centre patch and ten patches; several checkpoints: ensemble"
    )
    e.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="a .pt file or a run directory")
    e.add_argument(
        "--data", required=True, help="a dataset root (its val/ split is used), a folder of class folders, or a store"
    )
    add_runtime(e)
    e.add_argument(
        "--split",
        choices=("val", "test"),
        help="the split of a store or dataset root: val (the default) or test (ILSVRC-2010's, whose labels are public)",
    )
    e.add_argument("--centre-only", action="store_true", help="skip the ten-patch evaluation")
    e.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    e.set_defaults(handler=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from alexnet.checkpoint import load_for_inference
    from alexnet.data.source import open_eval_data
    from alexnet.evaluate import evaluate
    from alexnet.runtime import resolve_device

    device = resolve_device(args.device or "auto")
    loaded = [load_for_inference(c, device) for c in args.checkpoints]
    models, pres, class_lists = zip(*loaded)
    classes = class_lists[0]
    for path, other, pre in zip(args.checkpoints, class_lists, pres):
        if other != classes:
            raise AlexNetError(
                f"{path} has other classes than {args.checkpoints[0]}: an ensemble needs the same classes"
            )
        if pre.image_size != pres[0].image_size:
            raise AlexNetError(
                f"{path} expects {pre.image_size}px images, {args.checkpoints[0]} {pres[0].image_size}px"
            )
    folder, loader = open_eval_data(
        args.data,
        classes,
        pres[0].image_size,
        args.batch_size or 64,
        -1 if args.workers is None else args.workers,
        device,
        classes_from=args.checkpoints[0],
        split=args.split,
    )
    from alexnet.data.loader import closing_loaders

    # However evaluation ends (an error included), the decoding workers are stopped here,
    # not left to an exit that would wait on them.
    with closing_loaders(loader):
        evaluated, skipped = evaluate(models, pres, loader, device, ten=not args.centre_only)
    if skipped:
        logging.getLogger("alexnet").warning("skipped %d unreadable images, e.g. %s", len(skipped), skipped[0])
    results = {name: r.as_dict() for name, r in evaluated.items()}
    what = f"ensemble of {len(models)}" if len(models) > 1 else "1 model"
    where = f"{folder} ({args.split} split)" if args.split else folder
    print(f"{where}: {results['centre']['images']} images, {len(classes)} classes, {what}")
    print(f"{'':14s}{'top-1 err':>10s}{'top-5 err':>10s}")
    for name, r in results.items():
        print(f"{name:14s}{100 * r['top1_error']:9.2f}%{100 * r['top5_error']:9.2f}%")
    if args.json:
        from alexnet.files import write_json

        write_json(
            Path(args.json),
            {"checkpoints": args.checkpoints, "data": str(folder), "split": args.split, **results},
            indent=2,
        )
    return 0
