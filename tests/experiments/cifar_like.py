"""CIFAR-10-like data for the experiment tests: a class colour plus noise per image."""

from __future__ import annotations

import numpy as np
import torch

from alexnet.data.cifar import ArraySplit

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
