"""The paper's augmentation and test-time patches, as batched tensor operations.

Input is always a uint8 batch (B, 3, S, S) of the fixed-size images from images.py, on the
device that trains (GPU or CPU); output is float32, mean-subtracted, ready for the
network. Doing this per batch on the device rather than per image in PIL keeps the
data path off the critical path (the airbench approach).

Section 4.1 of the paper:
* random crop_size x crop_size patches of the S x S image and their horizontal reflections;
* "PCA colour": to every pixel of an image add P (alpha * lambda), with P the
  eigenvectors and lambda the eigenvalues of the RGB covariance over the training set,
  alpha ~ N(0, 0.1) drawn once per image each time it is used. The paper does not give
  the pixel scale of lambda; we take the covariance of pixels scaled to [0, 1] and add
  the shift in those units (x 255 here), which moves pixels by a few grey levels
  (ImageNet: lambda_1 ~ 0.2).
Section 2: subtract the mean image (per pixel, over the training set), cropped at the
same place as the patch.
Test (section 4.1): the four corner patches and the centre patch, and their reflections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from alexnet.errors import AlexNetError

# torchvision's ImageNet normalisation, in 0-255 units, for the "imagenet" mode.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclass
class Preprocess:
    """What turns uint8 images into network input; stored in every checkpoint."""

    mean: Tensor  # (3, S, S) 0-255, subtracted at the patch's position
    std: Tensor  # (3,) divisor; ones for the paper
    eigvals: Tensor  # (3,)
    eigvecs: Tensor  # (3, 3), columns
    crop_size: int

    @property
    def image_size(self) -> int:
        return self.mean.shape[-1]

    def to(self, device: torch.device | str) -> Preprocess:
        return Preprocess(
            self.mean.to(device), self.std.to(device), self.eigvals.to(device), self.eigvecs.to(device), self.crop_size
        )

    def state_dict(self) -> dict[str, Tensor | int]:
        return {
            "mean": self.mean.cpu(),
            "std": self.std.cpu(),
            "eigvals": self.eigvals.cpu(),
            "eigvecs": self.eigvecs.cpu(),
            "crop_size": self.crop_size,
        }

    @classmethod
    def from_state_dict(cls, d: dict) -> Preprocess:
        """From :meth:`state_dict`'s form; a malformed one (a checkpoint from a stranger)
        raises AlexNetError naming the field, before anything is allocated from it."""
        check_preprocess_state(d)
        return cls(d["mean"].float(), d["std"].float(), d["eigvals"].float(), d["eigvecs"].float(), int(d["crop_size"]))


# The largest mean image (image side S) a preprocess may hold. Inputs are resized to S x S
# before the crop, so S bounds what is allocated per image: 3 * 4096**2 float32 = 201 MB
# for the resized image (50 MB as uint8), whatever a checkpoint's metadata claims; the
# paper uses 256, imported weights 256.
MAX_IMAGE_SIZE = 4096


def check_preprocess_state(d: Any) -> None:
    """Types, shapes, ranges and finiteness of a preprocess state_dict; AlexNetError naming the field."""
    if not isinstance(d, dict):
        raise AlexNetError(f"'preprocess' should be a mapping, found {type(d).__name__}")
    expected = {"mean": 3, "std": 1, "eigvals": 1, "eigvecs": 2}
    for key, ndim in expected.items():
        value = d.get(key)
        if not isinstance(value, Tensor) or value.ndim != ndim or not value.is_floating_point():
            raise AlexNetError(f"preprocess '{key}' should be a {ndim}-d float tensor")
    mean, crop = d["mean"], d.get("crop_size")
    if (
        mean.shape[0] != 3
        or mean.shape[1] != mean.shape[2]
        or tuple(d["std"].shape) != (3,)
        or tuple(d["eigvals"].shape) != (3,)
        or tuple(d["eigvecs"].shape) != (3, 3)
        or not isinstance(crop, int)
        or isinstance(crop, bool)
        or not 0 < crop <= mean.shape[-1]
    ):
        raise AlexNetError(
            "preprocess should hold a (3, S, S) mean image, (3,) std and eigenvalues, (3, 3) "
            f"eigenvectors and a crop size of at most S (an integer); found mean {tuple(mean.shape)}, "
            f"crop_size {crop!r}"
        )
    if mean.shape[-1] > MAX_IMAGE_SIZE:
        raise AlexNetError(f"preprocess 'mean' is {mean.shape[-1]} px square; at most {MAX_IMAGE_SIZE} is accepted")
    for key in expected:
        if not bool(torch.isfinite(d[key]).all()):
            raise AlexNetError(f"preprocess '{key}' holds NaN or infinite values")
    if not bool((d["std"] > 0).all()):
        raise AlexNetError(f"preprocess 'std' must be positive; found {d['std'].tolist()}")


def make_preprocess(
    mode: str, image_size: int, crop_size: int, mean_image: Tensor, pixel_std: Tensor, eigvals: Tensor, eigvecs: Tensor
) -> Preprocess:
    """``mode``: "mean-image" (paper), "mean-image-std" (also divide by the per-channel std,
    for kaiming-initialised nets), or "imagenet" (torchvision's per-channel mean/std)."""
    if crop_size > image_size:
        raise ValueError(f"crop_size {crop_size} is larger than image_size {image_size}")
    if mode == "mean-image":
        return Preprocess(mean_image, torch.ones(3), eigvals, eigvecs, crop_size)
    if mode == "mean-image-std":
        return Preprocess(mean_image, pixel_std, eigvals, eigvecs, crop_size)
    if mode == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, image_size, image_size).contiguous()
        return Preprocess(mean, torch.tensor(IMAGENET_STD), eigvals, eigvecs, crop_size)
    raise ValueError(f"unknown normalize mode {mode!r}")


def _gather_patches(images: Tensor, mean: Tensor, top: Tensor, left: Tensor, flip: Tensor, crop: int) -> Tensor:
    """Per-image patches (and reflections) of images minus the mean image: (B, 3, crop, crop) float.

    One gather for the whole batch: row and column indices per image, columns reversed
    for reflected images. The result is channels-last in memory, which convolutions prefer.
    """
    ar = torch.arange(crop, device=images.device)
    rows = top[:, None] + ar  # (B, crop)
    cols = torch.where(flip[:, None], left[:, None] + (crop - 1 - ar), left[:, None] + ar)  # (B, crop)
    b = torch.arange(images.shape[0], device=images.device)[:, None, None]
    hwc = images.permute(0, 2, 3, 1)  # (B, S, S, 3), a view
    patch = hwc[b, rows[:, :, None], cols[:, None, :]].float()  # (B, crop, crop, 3)
    patch -= mean.permute(1, 2, 0)[rows[:, :, None], cols[:, None, :]]
    return patch.permute(0, 3, 1, 2)


def lighting_shift(n: int, eigvals: Tensor, eigvecs: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    """(n, 3) RGB shifts in 0-255 units: 255 * P (alpha * lambda), alpha ~ N(0, std)."""
    alpha = torch.randn(n, 3, generator=generator, device=eigvals.device) * std
    return 255.0 * (alpha * eigvals) @ eigvecs.T


def train_batch(
    images: Tensor,
    pre: Preprocess,
    *,
    flip: bool = True,
    lighting_std: float = 0.1,
    generator: torch.Generator | None = None,
    draws: int | None = None,
    offset: int = 0,
) -> Tensor:
    """Random patches, reflections and PCA lighting of a uint8 batch, mean subtracted and scaled.

    ``draws``/``offset``: the random parameters are drawn for ``draws`` images (default: the
    batch) and images take rows offset.. of them. A rank holding one share of a global
    batch draws for the whole global batch and keeps its slice, so every sample gets the
    same augmentation whatever the number of ranks (train/distributed.py).
    """
    n, s, crop, dev = images.shape[0], images.shape[-1], pre.crop_size, images.device
    total = n if draws is None else draws
    if not 0 <= offset <= total - n:
        raise ValueError(f"a batch of {n} at offset {offset} does not fit in {total} draws")
    rows = slice(offset, offset + n)
    top = torch.randint(0, s - crop + 1, (total,), generator=generator, device=dev)[rows]
    left = torch.randint(0, s - crop + 1, (total,), generator=generator, device=dev)[rows]
    if flip:
        flips = (torch.rand(total, generator=generator, device=dev) < 0.5)[rows]
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=dev)
    x = _gather_patches(images, pre.mean, top, left, flips, crop)
    if lighting_std > 0:
        x = x + lighting_shift(total, pre.eigvals, pre.eigvecs, lighting_std, generator)[rows, :, None, None]
    return x / pre.std.view(1, 3, 1, 1)


def patch_offsets(size: int, crop: int) -> list[tuple[int, int]]:
    """(top, left) of the centre patch and the four corners, in that order."""
    c, e = (size - crop) // 2, size - crop
    return [(c, c), (0, 0), (0, e), (e, 0), (e, e)]


def eval_patches(images: Tensor, pre: Preprocess, ten: bool = True) -> Tensor:
    """(B, P, 3, crop, crop): the centre patch only (P=1), or the paper's ten patches (P=10:
    centre, four corners, then the same five reflected)."""
    n, dev = images.shape[0], images.device
    offsets = patch_offsets(images.shape[-1], pre.crop_size)[: 5 if ten else 1]
    views = []
    for mirrored in (False, True) if ten else (False,):
        for top, left in offsets:
            t = torch.full((n,), top, device=dev)
            l_ = torch.full((n,), left, device=dev)
            f = torch.full((n,), mirrored, device=dev)
            views.append(_gather_patches(images, pre.mean, t, l_, f, pre.crop_size) / pre.std.view(1, 3, 1, 1))
    return torch.stack(views, 1)
