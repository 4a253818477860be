"""``alexnet make-dataset`` (the built-in shapes) and ``alexnet prepare`` (a store)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from alexnet.errors import AlexNetError


def register(sub: Any) -> None:
    m = sub.add_parser("make-dataset", help="write the built-in shapes dataset")
    m.add_argument("root", nargs="?", help="where (default: the cache folder train uses)")
    m.add_argument("--image-size", type=int, default=64)
    m.add_argument("--train-per-class", type=int, default=500)
    m.add_argument("--val-per-class", type=int, default=100)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(handler=cmd_make_dataset)

    s = sub.add_parser(
        "prepare",
        help="decode a dataset once into a store of fixed-size uint8 images (train from it with --data STORE)",
        description="alexnet prepare SRC DEST writes the store; alexnet prepare --verify STORE checks one.",
    )
    s.add_argument(
        "paths",
        nargs="+",
        metavar="SRC DEST",
        help="an ImageFolder root or a folder of the ILSVRC-2012 or -2010 archives, and the store folder",
    )
    s.add_argument("--image-size", type=int, default=256, help="side of the stored images (default 256, the paper's)")
    s.add_argument("--workers", type=int, default=-1, help="decoding processes (default: one per core)")
    s.add_argument("--chunk-size", type=int, default=64, help="images per unit of work and of resume (default 64)")
    s.add_argument(
        "--format",
        choices=("raw", "jpeg"),
        default="raw",
        help="raw uint8 pixels (default; S*S*3 bytes an image) or JPEG-encoded (4-13x smaller, decoded by the loader)",
    )
    s.add_argument(
        "--quality", type=int, default=None, help="JPEG quality 1-100 with --format jpeg (default 96: PSNR >= 40 dB)"
    )
    s.add_argument("--verify", action="store_true", help="check every chunk's checksum (reads the whole store)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(handler=cmd_prepare)


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
    from alexnet.data.verify import verify_store

    if len(args.paths) > 2 or (len(args.paths) == 1 and not args.verify):
        raise AlexNetError("usage: alexnet prepare SRC DEST [--verify], or alexnet prepare --verify STORE")
    if args.quality is not None and args.format != "jpeg":
        raise AlexNetError("--quality applies to --format jpeg only")
    dest = args.paths[-1]
    if len(args.paths) == 2:
        from alexnet.data.jpegstore import DEFAULT_QUALITY

        report = prepare(
            args.paths[0],
            dest,
            image_size=args.image_size,
            workers=args.workers,
            chunk_size=args.chunk_size,
            progress=not args.no_progress,
            encoding=args.format,
            quality=DEFAULT_QUALITY if args.quality is None else args.quality,
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
