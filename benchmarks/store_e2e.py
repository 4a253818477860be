"""End to end from the JPEG store against the raw store (issue 14's target: within 10%), interleaved.

    python benchmarks/store_e2e.py [--images 20000] [--rounds 3] [--steps 30] [--device auto]

Generates ImageNet-sized bench JPEGs (benchimages.make_bench_images, 500x375), prepares a
raw and a JPEG store of them (beside the JPEGs, in the cache folder), then times, in
rounds alternating raw/JPEG: the data path (store batches onto the device through the
paper's augmentation, alexnet bench's "ours: data") and end to end (the same plus the
paper network's training step, "ours: end to end"). Prints one JSON line: the medians
and the median ratio JPEG/raw of each. On CUDA a JPEG batch is decoded by nvJPEG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from alexnet.bench.measure import BenchConfig
from alexnet.bench.run import _ours_data, _ours_end_to_end, measure_model_step, our_step
from alexnet.data.augment import make_preprocess
from alexnet.data.prepare import prepare
from alexnet.data.store import open_store
from alexnet.data.benchimages import make_bench_images
from alexnet.files import cache_dir
from alexnet.runtime import describe_device, resolve_device
from alexnet.train.step import resolve_options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--crop-size", type=int, default=224)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    bc = BenchConfig(
        images=args.images,
        image_size=args.image_size,
        crop_size=args.crop_size,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=5,
        device=args.device,
        progress=False,
    )
    device = resolve_device(bc.device)
    root = make_bench_images(cache_dir() / f"bench-{bc.images}-500x375", bc.images)
    splits = {}
    for fmt in ("raw", "jpeg"):
        dest = root.with_name(root.name + f".{fmt}{bc.image_size}")
        prepare(root, dest, image_size=bc.image_size, progress=False, encoding=fmt)
        splits[fmt] = open_store(dest, bc.image_size).split("train")
    stats = open_store(root.with_name(root.name + f".raw{bc.image_size}")).stats()
    pre = make_preprocess(
        "mean-image", bc.image_size, bc.crop_size, stats.mean_image, stats.pixel_std, stats.eigvals, stats.eigvecs
    ).to(device)
    options = resolve_options(bc.speed, device, bc.model)
    step = our_step(
        bc.model, len(open_store(root.with_name(root.name + f".raw{bc.image_size}")).classes), bc, options, pre, device
    )
    like = measure_model_step(bc.model, "ours: step", step, bc, bc.batch_size, 10, device, options, None)
    rows: dict[str, list[float]] = {f"{fmt} {what}": [] for fmt in splits for what in ("data", "end to end")}
    for r in range(args.rounds):
        for fmt in ("raw", "jpeg") if r % 2 == 0 else ("jpeg", "raw"):
            rows[f"{fmt} data"].append(_ours_data(splits[fmt], pre, bc, device).images_per_s)
            rows[f"{fmt} end to end"].append(_ours_end_to_end(splits[fmt], step, bc, device, like).images_per_s)
            print(
                f"round {r} {fmt}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rows.items() if k.startswith(fmt)),
                file=sys.stderr,
            )
    result = {k: statistics.median(v) for k, v in rows.items()}
    for what in ("data", "end to end"):
        ratios = [j / r for j, r in zip(rows[f"jpeg {what}"], rows[f"raw {what}"])]
        result[f"jpeg/raw {what}"] = statistics.median(ratios)
    result.update(
        model_step=like.images_per_s,
        device=describe_device(device),
        torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"),
        command=" ".join(sys.argv),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
