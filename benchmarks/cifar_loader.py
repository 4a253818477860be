"""CIFAR-10's data path: load time, and training batches per second from memory and from JPEGs.

    python benchmarks/cifar_loader.py --benchmark DATA    # DATA: the JPEG tree, a .tar.gz, or the python batches
    python benchmarks/cifar_loader.py DATA                # the split shapes and class names only

Batches of random 28x28 patches with reflections and PCA lighting are made from the
in-memory uint8 tensors (alexnet.data.cifar + augment.py), and, for an extracted JPEG
tree, from a DataLoader decoding the files with 0 and 2 workers. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from alexnet.data.augment import make_preprocess, train_batch
from alexnet.data.cifar import IMAGE_SIZE, TRAIN_BATCHES, load_cifar10
from alexnet.data.images import ImageFolderDataset, find_splits, scan_image_folder
from alexnet.data.loader import EpochBatchSampler, make_loader
from alexnet.data.stats import StatsAccumulator


def benchmark(path: Path, batches: int = 40, batch_size: int = 128) -> dict[str, float]:
    """Images/s of training batches: from memory (gather + augment.py) and from a JPEG DataLoader."""
    start = time.perf_counter()
    train, _ = load_cifar10(path)
    load_s = time.perf_counter() - start
    acc = StatsAccumulator(IMAGE_SIZE)
    acc.add(train.images[:5000])
    stats = acc.result()
    pre = make_preprocess("mean-image-std", 32, 28, stats.mean_image, stats.pixel_std, stats.eigvals, stats.eigvecs)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(batches):
        idx = torch.randint(0, len(train), (batch_size,), generator=g)
        train_batch(train.images[idx], pre, generator=g)
    memory = batches * batch_size / (time.perf_counter() - start)
    result = {"load_seconds": load_s, "memory_images_per_s": memory}
    if path.is_dir() and not (path / TRAIN_BATCHES[0]).exists():
        train_dir, _ = find_splits(path)
        listing = scan_image_folder(train_dir)
        for workers in (0, 2):
            sampler = EpochBatchSampler(len(listing), batch_size, shuffle=True, seed=0)
            loader = make_loader(ImageFolderDataset(listing, IMAGE_SIZE), sampler, workers)
            it = iter(loader)
            next(it)  # worker start-up is not throughput
            start = time.perf_counter()
            for _ in range(batches):
                b = next(it)
                train_batch(b.images, pre, generator=g)
            result[f"jpeg_loader_{workers}_workers_images_per_s"] = batches * batch_size / (time.perf_counter() - start)
            del it, loader
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="CIFAR-10 loading: sizes, and a data-path benchmark")
    parser.add_argument("data")
    parser.add_argument("--benchmark", action="store_true")
    args = parser.parse_args()
    if args.benchmark:
        print(json.dumps(benchmark(Path(args.data)), indent=2))
    else:
        tr, te = load_cifar10(args.data)
        print(json.dumps({"train": list(tr.images.shape), "test": list(te.images.shape), "classes": tr.classes}))


if __name__ == "__main__":
    main()
