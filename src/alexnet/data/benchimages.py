"""The benchmark's images: ImageNet-sized JPEGs for timing.

Smooth random colour fields with pixel noise at ImageNet's size and file size, so that
the reference pipeline of ``alexnet bench`` pays a realistic JPEG decode.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from alexnet.data.loader import resolve_workers
from alexnet.files import atomic_write_text

log = logging.getLogger("alexnet")


def _write_bench_image(args: tuple[Path, int, int, int, int]) -> None:
    path, seed, index, width, height = args
    rng = np.random.default_rng((seed, index))
    # A smooth random colour field plus pixel noise: about 90 KB per 500x375 JPEG at
    # quality 90, near ImageNet's average file (~110 KB at ~400x350).
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    img = np.asarray(low.resize((width, height), Image.BICUBIC), dtype=np.float32)
    img = img + rng.normal(0, 16, img.shape).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)


def make_bench_images(
    root: Path, images: int, classes: int = 10, size: tuple[int, int] = (500, 375), seed: int = 0, workers: int = -1
) -> Path:
    """``root/{train,val}/<class>/*.jpg``: ``images`` training JPEGs and a tenth as many for val; reused if complete."""
    marker = root / "bench-images.json"
    params = {"images": images, "classes": classes, "size": list(size), "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    tasks = []
    for split, n in (("train", images), ("val", max(classes, images // 10))):
        for i in range(n):
            tasks.append((root / split / f"c{i % classes:02d}" / f"{i:07d}.jpg", seed + (split == "val"), i, *size))
    workers = resolve_workers(workers)
    log.info("writing %d benchmark JPEGs (%dx%d) to %s", len(tasks), size[0], size[1], root)
    if workers:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_bench_image, tasks, chunksize=16))
    else:
        list(map(_write_bench_image, tasks))
    atomic_write_text(marker, json.dumps(params))
    return root
