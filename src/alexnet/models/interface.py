"""What users of torchvision and timm expect of a pretrained model: ``.transforms()`` and ``.meta``.

torchvision hangs these on its weights enum (``AlexNet_Weights.IMAGENET1K_V1.transforms()``
and ``.meta``); here they hang on the model itself, filled in from the checkpoint it was
loaded from (:func:`attach_inference`, called by ``load_model`` and the named weights), so a
model always carries the preprocessing it was trained with.

The transform is the evaluation path of this package, not a re-implementation: a PIL image
goes through images.square_image (RGB, shorter side to the image size, central square) as
``alexnet predict`` decodes files, a tensor is resized the same way with antialiased
bilinear interpolation, and augment.eval_patches cuts the centre patch and subtracts the
checkpoint's mean (a per-pixel mean image for the paper's recipe, or a per-channel mean)
and divides by its std.

A model built by ``create_model`` without a checkpoint has no statistics of its own; it
gets ImageNet's: per-channel mean and std (torchvision's normalisation) for
``"torchvision"``, the per-channel mean alone (the paper subtracts a mean and divides by
nothing) for ``"paper"``, resizing to 256/224 of the crop size (256 for 224).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from alexnet.data.augment import IMAGENET_MEAN, IMAGENET_STD, Preprocess, eval_patches
from alexnet.data.images import resized_shape, square_image
from alexnet.errors import AlexNetError


@dataclass
class _Inference:
    preprocess: Preprocess  # on the CPU: the transform runs where the data is decoded
    meta: dict[str, Any]


class ImageTransform:
    """Image (PIL, or a (3, H, W) / (B, 3, H, W) uint8 tensor or float tensor in [0, 1]) ->
    the normalised float32 centre patch the network expects: (3, crop, crop) or (B, 3, crop, crop)."""

    def __init__(self, preprocess: Preprocess) -> None:
        self.preprocess = preprocess

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        size = self.preprocess.image_size
        if isinstance(image, Image.Image):
            square = torch.from_numpy(square_image(image, size)).permute(2, 0, 1)[None]  # (1, 3, S, S) uint8
            return self._patch(square.float())[0]
        if not isinstance(image, Tensor) or image.ndim not in (3, 4) or image.shape[-3] != 3:
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise AlexNetError(
                f"transforms() takes a PIL image or an RGB tensor (3, H, W) or (B, 3, H, W); got {shape}"
            )
        batch = image if image.ndim == 4 else image[None]
        if batch.dtype == torch.uint8:
            pixels = batch.float()
        elif batch.is_floating_point():
            pixels = batch.float() * 255.0  # torchvision's convention: float images are in [0, 1]
        else:
            raise AlexNetError(f"transforms() takes uint8 or float tensors; got {image.dtype}")
        out = self._patch(_square(pixels, size))
        return out if image.ndim == 4 else out[0]

    def _patch(self, square: Tensor) -> Tensor:
        return eval_patches(square, self.preprocess, ten=False)[:, 0].contiguous()  # centre patch, normalised

    def __repr__(self) -> str:
        p = self.preprocess
        return f"ImageTransform(resize={p.image_size}, crop={p.crop_size}, {describe_normalisation(p)})"


def _square(pixels: Tensor, size: int) -> Tensor:
    """(B, 3, H, W) float 0-255 -> (B, 3, size, size): shorter side to size (images.resized_shape,
    as square_image), antialiased bilinear, then the central square."""
    h, w = pixels.shape[-2:]
    nh, nw = resized_shape(h, w, size)
    if (nh, nw) != (h, w):
        pixels = F.interpolate(pixels, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return pixels[:, :, top : top + size, left : left + size].clamp(0, 255)


def describe_normalisation(pre: Preprocess) -> str:
    varies = bool((pre.mean - pre.mean.mean((1, 2), keepdim=True)).abs().max() > 1e-3)
    mean = "mean image" if varies else "mean " + ", ".join(f"{v:.3f}" for v in (pre.mean.mean((1, 2)) / 255).tolist())
    return f"{mean}, std " + ", ".join(f"{v:.3f}" for v in (pre.std / 255).tolist())


def default_preprocess(name: str, input_size: int) -> Preprocess:
    """ImageNet statistics for a network without a checkpoint (see the module docstring)."""
    image_size = round(input_size * 256 / 224)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, image_size, image_size).contiguous()
    std = torch.tensor(IMAGENET_STD) if name == "torchvision" else torch.ones(3)
    return Preprocess(mean, std, torch.zeros(3), torch.eye(3), input_size)


def build_meta(
    model: torch.nn.Module,
    pre: Preprocess,
    classes: list[str] | None,
    names: list[str] | None,
    source: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """torchvision-style metadata: categories, sizes, normalisation (0-1 units, as torchvision
    writes them), parameter count, where the weights came from, and what the source publishes
    (``extra``: e.g. ``_metrics`` with the accuracy, ``recipe``)."""
    channel_mean = pre.mean.mean((1, 2))
    meta: dict[str, Any] = {
        "categories": names,
        "classes": classes,
        "num_params": sum(p.numel() for p in model.parameters()),
        "input_size": (3, pre.crop_size, pre.crop_size),
        "resize_size": pre.image_size,
        "mean": tuple(round(v, 6) for v in (channel_mean / 255).tolist()),
        "std": tuple(round(v, 6) for v in (pre.std / 255).tolist()),
        # The paper subtracts a per-pixel mean image; "mean" is then its per-channel average.
        "mean_image": bool((pre.mean - channel_mean.view(3, 1, 1)).abs().max() > 1e-3),
        "source": source,
    }
    meta.update(extra or {})
    return meta


def attach_inference(
    model: torch.nn.Module,
    pre: Preprocess,
    classes: list[str] | None,
    names: list[str] | None,
    source: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """Give model the ``.transforms()`` and ``.meta`` of the checkpoint it was loaded from."""
    cpu = pre.to("cpu")
    # A plain attribute (not a buffer): it is no part of the state_dict.
    object.__setattr__(model, "_inference", _Inference(cpu, build_meta(model, cpu, classes, names, source, extra)))


class InferenceInterface:
    """Mixed into both networks: ``transforms()`` and ``meta`` as torchvision's weights give them."""

    def _inference_info(self) -> _Inference:
        info = self.__dict__.get("_inference")
        if info is None:
            cfg = self.config  # type: ignore[attr-defined]
            pre = default_preprocess(cfg.name, cfg.input_size)
            info = _Inference(
                pre, build_meta(self, pre, None, None, "create_model (no checkpoint: ImageNet statistics)")
            )  # type: ignore[arg-type]
        return info

    def transforms(self) -> ImageTransform:
        return ImageTransform(self._inference_info().preprocess)

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self._inference_info().meta)
