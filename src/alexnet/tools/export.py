"""Export a checkpoint to ONNX, TorchScript or safetensors, each checked against PyTorch.

ONNX and TorchScript files hold the network together with its test-time normalisation
(:class:`Deployable`): the input is the float RGB centre patch in 0-255, (B, 3, crop,
crop), of an image whose shorter side was rescaled to ``image_size`` and centre-cropped
square -- exactly what ``alexnet predict`` feeds the network -- and the output is the
logits. The class names and sizes travel inside the file (ONNX ``metadata_props``,
TorchScript ``extra_files``), so a deployment needs nothing else.

ONNX uses the TorchScript-based exporter (``dynamo=False``): it needs no onnxscript,
gives the same graph on torch 2.5 to 2.14, and exports the LRN layers as plain
Pow/AveragePool/Div ops (opset 17). The batch axis is dynamic.

Every export is written to a temporary file and compared with the PyTorch model it came
from on random inputs at two batch sizes (onnxruntime for ONNX, the reloaded module for
TorchScript, the reloaded checkpoint for safetensors). Only a file within tolerance is
moved to the requested path; otherwise the command fails with the measured difference.
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from alexnet.checkpoint import (
    LoadedModel,
    load_checkpoint,
    load_model,
    save_safetensors,
)
from alexnet.data.augment import Preprocess, patch_offsets
from alexnet.errors import AlexNetError
from alexnet.extras import require
from alexnet.files import replace_durably, temporary_name

FORMATS = ("onnx", "torchscript", "safetensors")
ONNX_OPSET = 17
PARITY_BATCHES = (1, 3)  # two sizes, so a batch axis fixed by mistake shows up


class Deployable(nn.Module):
    """Network plus test-time normalisation: RGB 0-255 centre patches (B, 3, c, c) -> logits (B, classes)."""

    def __init__(self, model: nn.Module, pre: Preprocess) -> None:
        super().__init__()
        self.model = model
        top, left = patch_offsets(pre.image_size, pre.crop_size)[0]
        c = pre.crop_size
        # The mean image at the centre patch's place, as eval_patches subtracts it.
        self.register_buffer("mean", pre.mean[:, top : top + c, left : left + c].clone()[None])  # (1, 3, c, c)
        self.register_buffer("std", pre.std.view(1, 3, 1, 1).clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean) / self.std)


@dataclass
class ExportReport:
    path: Path
    format: str
    max_abs_diff: float  # over PARITY_BATCHES random batches
    tolerance: float
    logit_scale: float  # max |logit| of the PyTorch reference

    def summary(self) -> str:
        return (
            f"{self.path}: {self.format}; parity with PyTorch on random batches of {', '.join(map(str, PARITY_BATCHES))}: "
            f"max |diff| {self.max_abs_diff:.3g} (logits up to {self.logit_scale:.3g}, tolerance {self.tolerance:.3g})"
        )


def metadata(loaded: LoadedModel) -> dict[str, str]:
    """What a deployment needs besides the graph, as strings."""
    pre = loaded.preprocess
    return {
        "alexnet.input": "float32 RGB 0-255 centre patch (B, 3, crop, crop) of the image rescaled so its "
        "shorter side is image_size and centre-cropped square; output: logits",
        "alexnet.image_size": str(pre.image_size),
        "alexnet.crop_size": str(pre.crop_size),
        "alexnet.classes": json.dumps(loaded.classes),
        "alexnet.class_names": json.dumps(loaded.names),
        "alexnet.model": json.dumps(loaded.config.get("model", {})),
    }


def random_patches(batch: int, crop: int, seed: int) -> Tensor:
    """Inputs in the range real ones have: uniform RGB values in [0, 255]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, crop, crop, generator=g) * 255.0


@torch.no_grad()
def parity(reference: nn.Module, candidate: Callable[[Tensor], Tensor], crop: int) -> tuple[float, float]:
    """(max |candidate - reference|, max |reference|) over the parity batches."""
    diff, scale = 0.0, 0.0
    for i, batch in enumerate(PARITY_BATCHES):
        x = random_patches(batch, crop, seed=i)
        ref = reference(x)
        out = candidate(x)
        if tuple(out.shape) != tuple(ref.shape):
            raise AlexNetError(
                f"the exported model returned shape {tuple(out.shape)} for batch {batch}; expected {tuple(ref.shape)}"
            )
        diff = max(diff, (out.double() - ref.double()).abs().max().item())
        scale = max(scale, ref.abs().max().item())
    return diff, scale


def _onnx_modules() -> tuple[Any, Any]:
    return require("onnx", "ONNX export"), require("onnxruntime", "ONNX export")


def _write_onnx(net: Deployable, loaded: LoadedModel, tmp: Path) -> Callable[[Tensor], Tensor]:
    onnx, ort = _onnx_modules()
    crop = loaded.preprocess.crop_size
    kwargs: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False  # the TorchScript-based exporter: no onnxscript needed (see module docstring)
    with warnings.catch_warnings():
        # F.local_response_norm's empty-input check and the Slice folding notes are
        # harmless at fixed channel counts; keep the command's output readable.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*[Cc]onstant folding.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.onnx.export(
            net,
            (random_patches(2, crop, seed=99),),
            str(tmp),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=ONNX_OPSET,
            **kwargs,
        )
    model = onnx.load(str(tmp))
    for key, value in metadata(loaded).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp))
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["logits"], {"image": x.numpy()})[0])


def _write_torchscript(net: Deployable, loaded: LoadedModel, tmp: Path) -> Callable[[Tensor], Tensor]:
    with warnings.catch_warnings():
        # torch.jit is deprecated upstream in favour of torch.export, but TorchScript is
        # still what LibTorch (C++) loads; the trace is checked below rather than trusted.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(net, random_patches(2, loaded.preprocess.crop_size, seed=99), check_trace=False)
        torch.jit.save(traced, str(tmp), _extra_files={"alexnet.json": json.dumps(metadata(loaded))})
        reloaded = torch.jit.load(str(tmp), map_location="cpu")
    return lambda x: reloaded(x)


def export(checkpoint: str | Path, fmt: str, out: str | Path, tolerance: float = 1e-4) -> ExportReport:
    """Write ``out`` in format ``fmt`` and check it against PyTorch.

    ``tolerance`` is relative to the largest reference logit (float32 kernels of different
    libraries sum in different orders; 1e-4 of the logit scale is far below what changes
    a top-5 list, and far above the ~1e-6 they normally differ by).
    """
    if fmt not in FORMATS:
        raise AlexNetError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    loaded = load_model(checkpoint, "cpu")
    net = Deployable(loaded.model, loaded.preprocess).eval()
    tmp = temporary_name(out)
    try:
        if fmt == "onnx":
            candidate = _write_onnx(net, loaded, tmp)
        elif fmt == "torchscript":
            candidate = _write_torchscript(net, loaded, tmp)
        else:
            save_safetensors(tmp.with_suffix(".safetensors"), load_checkpoint(checkpoint))
            tmp = tmp.with_suffix(".safetensors")
            again = load_model(tmp, "cpu")
            candidate = Deployable(again.model, again.preprocess).eval()
        diff, scale = parity(net, candidate, loaded.preprocess.crop_size)
        allowed = tolerance * scale + 1e-6  # 1e-6: float32 rounding when logits are near 0
        if not np.isfinite(diff) or diff > allowed:
            raise AlexNetError(
                f"{fmt} export of {checkpoint} differs from PyTorch: max |diff| {diff:.3g} > tolerance {allowed:.3g} "
                f"(logits up to {scale:.3g}); nothing written to {out}"
            )
        replace_durably(tmp, out)  # fsynced, then renamed: only a checked export ever has the name
    finally:
        tmp.unlink(missing_ok=True)
    return ExportReport(out, fmt, diff, allowed, scale)
