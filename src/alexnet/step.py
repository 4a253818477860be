"""One training step, built once per run: augmentation, forward, loss, backward, the paper's update.

The switches of ``speed`` (config.SpeedConfig) change how the step is computed, not what:

* ``amp``: autocast to bf16 (or fp16 with loss scaling, for GPUs without bf16). Weights,
  optimizer state, the loss and the update stay float32.
* ``channels_last``: NHWC memory for weights and input. The augmented batch is already
  NHWC (augment.py gathers HWC patches), so "off" costs an explicit transpose.
* ``compile``: ``torch.compile`` of the model (forward and backward) and of the optimizer
  step, whose foreach updates then fuse into a few kernels.
* ``tower_convs``: the paper net's two-tower convolutions as grouped convolutions or as
  two convolutions per layer (model.TowerConv2d); same parameters, same function.

With several ranks (distributed.py) the forward runs through DistributedDataParallel,
which averages gradients over ranks during backward; with ``accumulate`` > 1 the rank's
share is split into micro-batches whose gradients add up (DDP's ``no_sync`` on all but
the last, so ranks communicate once per update).

"auto" resolves per device. On CUDA: bf16 (fp16 before compute capability 8.0),
channels_last, compiled, grouped tower convolutions until `alexnet bench` on the GPU
says otherwise (its ``towers`` section measures both). On the CPU: float32, channels_last
and grouped convolutions, eager. Measured on the 2-core development CPU (Xeon with AMX,
torch 2.14.1, 2026-11-23; benchmarks/RESULTS.md); the numbers and the reasons for each
default are recorded there.

Nothing in the step reads a value back to the host: the loss and the count of errors
come back as device tensors, summed by the caller. The one exception is fp16, whose
GradScaler checks for inf/NaN gradients on the host once per step.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import Preprocess, train_batch
from .config import SpeedConfig
from .distributed import SINGLE, Dist
from .errors import AlexNetError
from .evaluate import topk_errors
from .model import set_tower_convs

log = logging.getLogger("alexnet")


@dataclass(frozen=True)
class StepOptions:
    """SpeedConfig with every "auto" decided for one device."""

    amp: str  # "bf16" | "fp16" | "off"
    channels_last: bool
    compile: bool
    tower_convs: str  # "grouped" | "split"

    def as_dict(self) -> dict[str, Any]:
        return {"amp": self.amp, "channels_last": self.channels_last, "compile": self.compile, "tower_convs": self.tower_convs}


def compile_available() -> bool:
    """torch.compile needs Triton on CUDA and a C++ compiler on the CPU; without them it would fail at the first step."""
    try:
        from torch._inductor import config as _  # noqa: F401
    except ImportError:
        return False
    if torch.cuda.is_available():
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
    import shutil

    return shutil.which("c++") is not None or shutil.which("g++") is not None or shutil.which("cl") is not None


def resolve_options(cfg: SpeedConfig, device: torch.device) -> StepOptions:
    cuda = device.type == "cuda"
    amp = cfg.amp
    if amp == "auto":
        amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "off"
    if amp == "fp16" and not cuda:
        raise AlexNetError("speed.amp=fp16 needs a CUDA device (loss scaling); use bf16 or off on the CPU")
    if amp == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise AlexNetError(f"{torch.cuda.get_device_name(device)} has no bf16; use speed.amp=fp16")
    channels_last = cfg.channels_last == "on" or cfg.channels_last == "auto"
    compile_ = cfg.compile == "on" or (cfg.compile == "auto" and cuda and compile_available())
    if cfg.compile == "on" and not compile_available():
        raise AlexNetError("speed.compile=on needs torch.compile's backend (Triton on CUDA, a C++ compiler on CPU)")
    tower_convs = "grouped" if cfg.tower_convs == "auto" else cfg.tower_convs
    return StepOptions(amp, channels_last, compile_, tower_convs)


class TrainStep:
    """``step(images_uint8, labels, generator) -> (loss, wrong)``: one SGD step on a uint8 batch on the device.

    ``loss`` is the batch's mean cross-entropy and ``wrong`` its count of top-1 errors, both
    device tensors (no host synchronisation). The model and optimizer are updated in place;
    ``model`` stays the plain module (checkpoints never see the compile wrapper).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        pre: Preprocess,
        options: StepOptions,
        device: torch.device,
        *,
        flip: bool = True,
        lighting_std: float = 0.1,
        skip_nonfinite: bool = False,
        dist: Dist = SINGLE,
        accumulate: int = 1,
    ) -> None:
        self.model, self.optimizer, self.pre, self.options = model, optimizer, pre, options
        self.dist, self.accumulate = dist, accumulate
        self.flip, self.lighting_std = flip, lighting_std
        # optim.skip_nonfinite: deciding before the update needs the answer on the host,
        # one sync per step, which is why skipping is opt-in. `skipped` tells the caller.
        self.skip_nonfinite, self.skipped = skip_nonfinite, False
        self.memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
        model.to(memory_format=self.memory_format)  # in place: parameters keep their identity
        set_tower_convs(model, options.tower_convs)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.amp)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if options.amp == "fp16" else None
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        wrapped: nn.Module = model
        if dist.active:
            # Built after the layout change: DDP broadcasts rank 0's parameters and buffers
            # here, so every rank starts from the same weights whatever its seed.
            ids = [device.index] if device.type == "cuda" else None
            self.ddp = wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.forward = torch.compile(wrapped) if options.compile else wrapped
        self.update = torch.compile(optimizer.step) if options.compile and self.scaler is None else optimizer.step

    def __call__(self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        # Ranks hold equal shares of a global batch (the sampler drops a partial last one),
        # so the global batch is len * world_size and this rank's share starts at rank * len.
        n, d = images.shape[0], self.dist
        x = train_batch(
            images, self.pre, flip=self.flip, lighting_std=self.lighting_std, generator=generator,
            draws=n * d.world_size, offset=n * d.rank,
        )  # fmt: skip
        return self.model_step(x.contiguous(memory_format=self.memory_format), labels)

    def model_step(self, x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The step on an already augmented float batch (what `alexnet bench` times as "model step")."""
        self.optimizer.zero_grad(set_to_none=True)
        micro = [(xi, yi) for xi, yi in zip(x.tensor_split(self.accumulate), labels.tensor_split(self.accumulate)) if len(yi)]
        loss, wrong = torch.zeros((), device=x.device), torch.zeros((), dtype=torch.long, device=x.device)
        for i, (xi, yi) in enumerate(micro):
            # Gradients of all micro-batches add up locally; ranks average them once, at the last.
            sync = self.ddp is None or i == len(micro) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with self.autocast():
                    logits = self.forward(xi)
                if len(micro) == 1:
                    part = F.cross_entropy(logits.float(), yi)
                else:  # each micro-batch weighted by its size: the mean over the whole share
                    part = F.cross_entropy(logits.float(), yi, reduction="sum") / len(labels)
                if self.scaler is not None:
                    self.scaler.scale(part).backward()
                else:
                    part.backward()
            loss += part.detach()
            wrong += topk_errors(logits.detach(), yi, (1,))[1]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.skipped = self.skip_nonfinite and not _all_finite(loss, self.optimizer)
            if self.skipped:
                self.optimizer.zero_grad(set_to_none=True)
            else:
                self.update()
        return loss, wrong


def _all_finite(loss: Tensor, optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad.isfinite().all() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return bool(torch.stack([loss.isfinite(), *grads]).all())
