"""The CIFAR-like ImageFolder tree the end-to-end experiment tests train on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cifar_like import CLASSES, class_images
from PIL import Image


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
