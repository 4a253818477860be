"""Shared test fixtures: a private statistics cache, and writers of small JPEG files and ImageFolder trees."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep data.compute_stats' cache out of ~/.cache (and out of each test's tmp_path)."""
    cache = tmp_path_factory.mktemp("alexnet-cache")
    monkeypatch.setenv("ALEXNET_CACHE", str(cache))
    return cache


def write_jpeg(
    path: Path,
    pixels: np.ndarray | tuple[int, int, int] = (128, 128, 128),
    size: tuple[int, int] = (24, 16),
    quality: int = 95,
) -> Path:
    """Write ``pixels`` ((H, W, 3) or (H, W) uint8 array, or an RGB colour filling ``size`` = (w, h)) as a JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(pixels, tuple):
        img = Image.new("RGB", size, pixels)
    else:
        img = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    img.save(path, "JPEG", quality=quality)
    return path


@pytest.fixture(autouse=True)
def _denormals_back_on() -> Iterator[None]:
    """A CPU TrainStep flushes denormals for the whole process (step.py); keep that out of other tests."""
    yield
    import torch

    torch.set_flush_denormal(False)


def write_tree(root: Path, train: int = 5, val: int = 2, classes: tuple[str, ...] = ("ant", "bee", "cat")) -> Path:
    """root/{train,val}/<class>/<i>.jpg of random pixels in two shapes (landscape and portrait)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in classes:
            for i in range(n):
                h, w = (20, 30) if i % 2 else (34, 22)
                write_jpeg(root / split / c / f"{i}.jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return root


@pytest.fixture
def make_jpeg() -> Callable[..., Path]:
    return write_jpeg
