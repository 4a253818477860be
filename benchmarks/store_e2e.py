"""End to end from the JPEG store against the raw store (issue 14's target: within 10%), interleaved.

    python benchmarks/store_e2e.py [--images 20000] [--rounds 3] [--steps 30] [--device auto]

Generates ImageNet-sized bench JPEGs (benchimages.make_bench_images, 500x375), prepares a
raw and a JPEG store of them (beside the JPEGs, in the cache folder), then times, in windows
interleaved in rotation (bench.measure.interleaved): the data path (store batches onto the device through the
paper's augmentation, alexnet bench's "ours: data") and end to end (the same plus the
paper network's training step, "ours: end to end"). Prints one JSON line: the medians
and the median ratio JPEG/raw of each. On CUDA a JPEG batch is decoded by nvJPEG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from alexnet.bench.measure import BenchConfig, interleaved, min_window
from alexnet.bench.run import _ours_data_arm, _ours_end_to_end_arm, measure_model_step, our_step
from alexnet.data.augment import make_preprocess
from alexnet.data.benchimages import make_bench_images
from alexnet.data.prepare import prepare
from alexnet.data.store import open_store
from alexnet.files import cache_dir
from alexnet.runtime import environment, resolve_device
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
    arms = {}
    for fmt, split in splits.items():
        arms[f"{fmt} data"], _ = _ours_data_arm(split, pre, bc, device)
        arms[f"{fmt} end to end"], _ = _ours_end_to_end_arm(split, step, bc, device)

    def show(name: str, rate: float) -> None:
        print(f"{name}: {rate:.0f} img/s", file=sys.stderr)

    windows = interleaved(arms, bc.steps, bc.warmup, args.rounds, device, min_window(bc, device), on_window=show)
    rows = {name: w.images_per_s for name, w in windows.items()}
    result = {k: statistics.median(v) for k, v in rows.items()}
    for what in ("data", "end to end"):
        ratios = [j / r for j, r in zip(rows[f"jpeg {what}"], rows[f"raw {what}"])]
        result[f"jpeg/raw {what}"] = statistics.median(ratios)
    result.update(
        model_step=like.images_per_s,
        environment=environment(device, " ".join(sys.argv)),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
