"""One training step, built once per run: augmentation, forward, loss, backward, the paper's update.

The switches of ``speed`` (config.SpeedConfig) change how the step is computed, not what:

* ``amp``: autocast to bf16 (or fp16 with loss scaling, for GPUs without bf16). Weights,
  optimizer state, the loss and the update stay float32.
* ``channels_last``: NHWC memory for weights and input. The augmented batch is already
  NHWC (augment.py gathers HWC patches), so "off" costs an explicit transpose.
* ``compile``: ``torch.compile`` of the model (forward and backward) and of the optimizer
  step, whose foreach updates then fuse into a few kernels. Compiled dropout draws its
  masks from Inductor's generator (seeded from torch's): a compiled run is reproducible,
  but its masks are not those of an eager run.
* ``tower_convs``: the paper net's two-tower convolutions as grouped convolutions or as
  two convolutions per layer (model.TowerConv2d); same parameters, same function.
* ``conv1``: the paper net's conv1 direct or as space-to-depth (models/conv1.py); same
  parameters, same function. "auto" is direct until a GPU measurement says otherwise.
* ``compile_mode=reduce-overhead``: CUDA graphs for the compiled forward, backward and
  update (static shapes). The epoch's last, smaller batch runs eagerly instead: one batch an
  epoch does not pay for another compilation and graph recording, and its loss and errors
  are exactly those of the same batch through the eager step (tests/train/test_step.py).
* ``flush_denormal``: on the CPU, treat denormal floats (below 1.2e-38) as zero
  (torch.set_flush_denormal, for the whole process). Arithmetic on denormals is
  microcoded and about 100x slower; some oneDNN paths produce them during training and
  the shapes preset's training slowed several times over without flushing
  (benchmarks/RESULTS.md, "Denormal floats"). TensorFlow flushes denormals by default too.

With several ranks (distributed.py) the forward runs through DistributedDataParallel,
which averages gradients over ranks during backward; with ``accumulate`` > 1 the rank's
share is split into micro-batches whose gradients add up (DDP's ``no_sync`` on all but
the last, so ranks communicate once per update).

"auto" resolves per device. On CUDA: bf16 (fp16 before compute capability 8.0),
channels_last, compiled, grouped tower convolutions (not yet measured against split on a
GPU: `alexnet bench` times both). On the CPU: bf16 where the CPU has AMX-BF16 tiles
(float32 otherwise: bf16 without them is emulated), eager, grouped, denormals flushed,
and channels_last for torchvision's network only (it is slower for the paper net in
bf16). Each choice is the faster one in the paired measurements of benchmarks/RESULTS.md
(section 2, "The speed switches on the CPU": the 2-core development CPU, torch 2.14.1,
2026-11-23, each configuration's images/s over the reference step's in the same round);
split towers were within noise of grouped ones there.

torch.compile is off on the CPU although it helps the paper net about 1.6x there: it
needs a C++ toolchain at run time and compiles before the first step of each model and
batch shape (22.6 s for the paper net at batch 64, measured; Inductor caches it for later
runs), a large share of the minutes-long CPU runs this project makes. Long CPU runs should
set speed.compile=on.

Nothing in the step reads a value back to the host: the loss and the count of errors
come back as device tensors, summed by the caller. The one exception is fp16, whose
GradScaler checks for inf/NaN gradients on the host once per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alexnet.config import SpeedConfig
from alexnet.data.augment import Preprocess, train_batch
from alexnet.errors import AlexNetError
from alexnet.evaluate import topk_errors
from alexnet.models.alexnet import set_tower_convs
from alexnet.models.conv1 import set_conv1
from alexnet.train.distributed import SINGLE, Dist

log = logging.getLogger("alexnet")


@dataclass(frozen=True)
class StepOptions:
    """SpeedConfig with every "auto" decided for one device."""

    amp: str  # "bf16" | "fp16" | "off"
    channels_last: bool
    compile: bool
    tower_convs: str  # "grouped" | "split"
    flush_denormal: bool = False
    compile_mode: str = "default"  # torch.compile(mode=...)
    conv1: str = "direct"  # "direct" | "space-to-depth"

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_options(cfg: SpeedConfig, device: torch.device, model: str = "paper") -> StepOptions:
    """Decide every "auto" for ``device`` and the model variant ("paper" or "torchvision")."""
    cuda = device.type == "cuda"
    amp = cfg.amp
    if amp == "auto":
        if cuda:
            amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            # AMX tiles multiply bf16 matrices; without them bf16 is emulated and slower than float32.
            amp = "bf16" if "amx_bf16" in cpu_flags() else "off"
    if amp == "fp16" and not cuda:
        raise AlexNetError("speed.amp=fp16 needs a CUDA device (loss scaling); use bf16 or off on the CPU")
    if amp == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise AlexNetError(f"{torch.cuda.get_device_name(device)} has no bf16; use speed.amp=fp16")
    # On the CPU channels_last helped torchvision's network and slowed the paper net in
    # bf16 (its LRN, probably); see the module docstring.
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and (cuda or model == "torchvision"))
    compile_ = cfg.compile == "on" or (cfg.compile == "auto" and cuda and compile_available())
    if cfg.compile == "on" and not compile_available():
        raise AlexNetError("speed.compile=on needs torch.compile's backend (Triton on CUDA, a C++ compiler on CPU)")
    tower_convs = "grouped" if cfg.tower_convs == "auto" else cfg.tower_convs
    flush = cfg.flush_denormal == "on" or (cfg.flush_denormal == "auto" and not cuda)
    # conv1: direct until a GPU measures space-to-depth faster (benchmarks/gpu.sh times both).
    conv1 = "direct" if cfg.conv1 == "auto" else cfg.conv1
    return StepOptions(amp, channels_last, compile_, tower_convs, flush, cfg.compile_mode, conv1)


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
        set_conv1(model, options.conv1)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.amp)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if options.amp == "fp16" else None
        if device.type == "cuda":
            # Every step has the same shapes, so cuDNN's one-off timing of its convolution
            # algorithms pays back from the second step on (grouped and 11x11/4 convs
            # especially, whose heuristic choice is not always the fastest).
            torch.backends.cudnn.benchmark = True
        if options.flush_denormal and not torch.set_flush_denormal(True):
            log.warning("this CPU cannot flush denormal floats to zero; training may slow down when they appear")
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        wrapped: nn.Module = model
        if dist.active:
            # Built after the layout change: DDP broadcasts rank 0's parameters and buffers
            # here, so every rank starts from the same weights whatever its seed.
            ids = [device.index] if device.type == "cuda" else None
            self.ddp = wrapped = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        # dynamic=False: one graph per batch shape (the epoch's last, smaller batch compiles
        # once more) rather than a shape-generic graph, which is slower.
        compile_ = functools.partial(torch.compile, dynamic=False, mode=options.compile_mode)
        self.forward = compile_(wrapped) if options.compile else wrapped
        self.update = compile_(optimizer.step) if options.compile and self.scaler is None else optimizer.step
        self.eager_forward, self.eager_update = wrapped, optimizer.step
        self.graphs = options.compile and options.compile_mode == "reduce-overhead"
        self.static_batch: int | None = None  # the batch size the CUDA graphs were recorded for

    def __call__(
        self, images: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
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
        forward, update = self.forward, self.update
        if self.graphs:
            # CUDA graphs hold static shapes: the first batch size is the graphs'; any other
            # (the epoch's partial last batch) runs eagerly, the same function.
            self.static_batch = self.static_batch or len(labels)
            if len(labels) != self.static_batch:
                forward, update = self.eager_forward, self.eager_update
            else:
                # A new iteration: the previous step's graph outputs may be overwritten now.
                torch.compiler.cudagraph_mark_step_begin()
        micro = [
            (xi, yi) for xi, yi in zip(x.tensor_split(self.accumulate), labels.tensor_split(self.accumulate)) if len(yi)
        ]
        loss, wrong = torch.zeros((), device=x.device), torch.zeros((), dtype=torch.long, device=x.device)
        for i, (xi, yi) in enumerate(micro):
            # Gradients of all micro-batches add up locally; ranks average them once, at the last.
            sync = self.ddp is None or i == len(micro) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with self.autocast():
                    logits = forward(xi)
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
                update()
        return loss, wrong


def _all_finite(loss: Tensor, optimizer: torch.optim.Optimizer) -> bool:
    grads = [p.grad.isfinite().all() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    return bool(torch.stack([loss.isfinite(), *grads]).all())
