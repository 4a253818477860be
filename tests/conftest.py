"""Shared test fixtures: a private statistics cache and a writer of small JPEG files."""

from __future__ import annotations

from collections.abc import Callable
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


@pytest.fixture
def make_jpeg() -> Callable[..., Path]:
    return write_jpeg
