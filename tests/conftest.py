"""Shared test fixtures: a private statistics cache, writers of small JPEG files and ImageFolder trees, and CIFAR-like data."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import alexnet
from alexnet.data.cifar import ArraySplit

# For `python -m alexnet` in a subprocess: this checkout's sources first, and one OpenMP
# thread (several such processes share the two cores of the development machine).
SUBPROCESS_ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(Path(alexnet.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
    "OMP_NUM_THREADS": "1",
}

# A network small enough to train in a second: 32 px images, 28 px crops.
# Command-line options shared by the end-to-end tests (test_cli, test_distributed).
TINY = [
    "--set", "data.image_size=32",
    "--set", "data.crop_size=28",
    "--set", "model.width=0.125",
    "--set", "model.fc_width=32",
    "--set", "model.conv1_kernel=5",
    "--set", "model.conv1_stride=1",
    "--set", "model.init=kaiming",
    "--set", "data.normalize=mean-image-std",
    "--batch-size", "16",
    "--workers", "0",
    "--no-progress",
]  # fmt: skip


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


def write_tiny_checkpoint(
    path: Path,
    classes: list[str],
    names: list[str] | None = None,
    seed: int = 0,
    image_size: int = 32,
    crop_size: int = 28,
) -> Path:
    """An untrained but complete checkpoint of a small paper-pattern network (no training needed).

    Written the way train.py writes one, so evaluate/predict/features/export/serve see an
    ordinary checkpoint; ``names`` adds readable class names.
    """
    import torch

    from alexnet.checkpoint import save_checkpoint
    from alexnet.config import Config
    from alexnet.data.augment import make_preprocess
    from alexnet.models.alexnet import ModelConfig, build_model

    torch.manual_seed(seed)
    cfg = Config()
    cfg.data.image_size, cfg.data.crop_size, cfg.data.normalize = image_size, crop_size, "mean-image-std"
    cfg.model = ModelConfig(
        num_classes=len(classes),
        width=0.125,
        fc_width=32,
        conv1_kernel=5,
        conv1_stride=1,
        init="kaiming",
        input_size=crop_size,
    )
    model = build_model(cfg.model)
    mean = torch.rand(3, image_size, image_size) * 40 + 100
    pre = make_preprocess(
        "mean-image-std", image_size, crop_size, mean, torch.full((3,), 60.0), torch.ones(3) * 0.01, torch.eye(3)
    )
    state = {
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "preprocess": pre.state_dict(),
        "classes": list(classes),
    }
    if names is not None:
        state["class_names"] = list(names)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, state)
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A 6-class small checkpoint with readable names (ids c0..c5, names 'class zero'...)."""
    ids = [f"c{i}" for i in range(6)]
    names = ["class zero", "class one", "class two", "class three", "class four", "class five"]
    return write_tiny_checkpoint(tmp_path / "tiny.pt", ids, names)


# CIFAR-10-like data for the experiment tests: a class colour plus noise per image.

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def class_images(label: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 32, 32, 3): a class colour plus noise, so a small net can learn the classes."""
    colour = np.array([(label * 70) % 256, (label * 130 + 60) % 256, (label * 200 + 120) % 256])
    noise = rng.integers(-40, 41, (n, 32, 32, 3))
    return np.clip(colour + noise, 0, 255).astype(np.uint8)


def make_split(n_per_class: int, classes: int = 2, seed: int = 0) -> ArraySplit:
    rng = np.random.default_rng(seed)
    imgs = np.concatenate([class_images(c, n_per_class, rng) for c in range(classes)])
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return ArraySplit(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), labels, CLASSES[:classes])


@pytest.fixture(scope="module")
def cifar_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-10-shaped ImageFolder tree: 10 classes, 12 training and 4 test PNGs each."""
    root = tmp_path_factory.mktemp("cifar-like")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i, img in enumerate(class_images(label, n, rng)):
                Image.fromarray(img).save(root / split / name / f"{i:04d}.png")
    return root
