"""What one benchmark run measures and how: its settings, one timed measurement, the timing itself.

Timing brackets every measured region with device synchronisation, after warm-up calls
(which absorb torch.compile, cuDNN autotuning and worker start-up), so a CUDA
measurement times the work and not only its queueing.

A figure is the median of ``repeats`` windows, and figures meant to be compared are timed
window by window in turn (ours, reference, ours, ...: :func:`interleaved`), so a machine
that speeds up or slows down mid-run moves both sides. On a GPU a window lasts at least
2 s (50-step windows took 0.17-0.48 s on an H100 and the same code measured 21k and 37k
images/s three minutes apart, 2026-11-24); the window's step count is set once from the
warm-up's pace. Each arm may drain before each of its windows (the reference's DataLoader
fills its prefetch queue while the other side runs; timing from a full queue measured its
end to end above its own data path).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from alexnet.config import SpeedConfig
from alexnet.data.loader import Batch, EpochBatchSampler
from alexnet.errors import AlexNetError


@dataclass
class BenchConfig:
    data: str | None = None  # an ImageFolder root; None: generated JPEGs
    store: str | None = None  # the prepared store of data; None: beside the data
    images: int = 2000  # generated training images
    source_size: tuple[int, int] = (500, 375)  # width, height of the generated JPEGs
    image_size: int = 256
    crop_size: int = 224
    batch_size: int = 128
    batch_sizes: tuple[int, ...] = ()  # extra batch sizes for the model step (the best is reported)
    steps: int = 20
    warmup: int = 5
    model: str = "paper"
    device: str = "auto"
    workers: int = -1
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    peak_tflops: float | None = None
    baseline: bool = True
    towers: bool = True  # also time the paper net's split tower convolutions
    progress: bool = True
    repeats: int = 3  # windows per figure (median and spread reported)
    min_window_s: float | None = None  # None: 2 s

    def __post_init__(self) -> None:
        # Refused before anything is generated or prepared: zero steps would divide by zero
        # seconds, and a crop cannot be larger than the stored images it is cut from.
        sizes = {"images": self.images, "image_size": self.image_size, "crop_size": self.crop_size}
        sizes |= {"batch_size": self.batch_size, "steps": self.steps}
        sizes |= {f"batch_sizes[{i}]": b for i, b in enumerate(self.batch_sizes)}
        sizes |= {"source_size width": self.source_size[0], "source_size height": self.source_size[1]}
        for name, value in sizes.items():
            if value < 1:
                raise AlexNetError(f"bench {name} must be 1 or more; got {value}")
        if self.repeats < 1:
            raise AlexNetError(f"bench repeats must be 1 or more; got {self.repeats}")
        if self.warmup < 0:
            raise AlexNetError(f"bench warmup must be 0 or more; got {self.warmup}")
        if self.crop_size > self.image_size:
            raise AlexNetError(f"bench crop_size {self.crop_size} is larger than image_size {self.image_size}")


@dataclass
class Measurement:
    """One timed region: images/s, and for a model step its FLOPs per image and the device's peak."""

    name: str
    images_per_s: float
    seconds: float
    images: int
    flops_per_image: float | None = None
    dtype: str | None = None
    peak_flops: float | None = None
    peak_source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mfu(self) -> float | None:
        """Model FLOPs utilisation: FLOPs per image x images/s / peak; None without FLOPs or a peak."""
        if not self.flops_per_image or not self.peak_flops:
            return None
        return self.flops_per_image * self.images_per_s / self.peak_flops

    def as_dict(self) -> dict[str, Any]:
        return {
            "images_per_s": self.images_per_s,
            "seconds": self.seconds,
            "images": self.images,
            "flops_per_image": self.flops_per_image,
            "dtype": self.dtype,
            "peak_flops": self.peak_flops,
            "peak_source": self.peak_source,
            "mfu": self.mfu,
            **self.extra,
        }


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timing brackets); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of run after ``warmup`` calls, synchronised at both ends."""
    for _ in range(warmup):
        run()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    sync(device)
    return time.perf_counter() - start


def cycle(loader: Any, sampler: EpochBatchSampler) -> Iterator[Batch]:
    """Batches over as many epochs as asked for (each epoch a new order)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def endless(loader: Any) -> Iterator[Any]:
    """A loader's batches, epoch after epoch (a DataLoader with shuffle reshuffles each time)."""
    while True:
        yield from loader


# `alexnet bench` on a 2-core CPU: the paper net's step at batch 128 takes ~25 s there, so
# the GPU-sized defaults ran over ten minutes; these finish in about two (benchmarks/RESULTS.md).
# Windows of at least 2 s there too, three of them per figure: 41 s in all on the 2-core AMX
# Xeon once the JPEGs exist (2026-12-02, machine idle).
CPU_DEFAULTS: dict[str, Any] = {"images": 256, "batch_size": 16, "steps": 2, "warmup": 1, "towers": False, "repeats": 3}
MIN_WINDOW_S = 2.0


@dataclass
class Arm:
    """One side of an interleaved timing: ``run`` does one step of ``images`` images; ``drain``
    (untimed) runs before each window."""

    run: Callable[[], Any]
    images: int
    drain: Callable[[], Any] | None = None


@dataclass
class Windows:
    """The windows of one arm: images/s of each, their median and spread (max - min over median)."""

    images_per_s: list[float]
    steps: int
    seconds: float = 0.0
    images: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.images_per_s)

    @property
    def spread(self) -> float:
        return (max(self.images_per_s) - min(self.images_per_s)) / self.median

    def as_dict(self) -> dict[str, Any]:
        return {
            "windows_images_per_s": [round(v, 3) for v in self.images_per_s],
            "window_steps": self.steps,
            "spread": self.spread,
        }


def from_windows(
    name: str, w: Windows, flops: float | None = None, peak: tuple = (None, None, None), **extra: Any
) -> Measurement:
    """A figure from its windows: the median images/s, all the windows' seconds and images;
    ``peak`` is (dtype, peak FLOP/s, its source)."""
    dtype, peak_flops, source = peak
    return Measurement(name, w.median, w.seconds, w.images, flops, dtype, peak_flops, source, {**w.as_dict(), **extra})


def window_steps(seconds_per_step: float, min_steps: int, min_seconds: float, max_steps: int = 100_000) -> int:
    """Steps per window: at least ``min_steps``, and enough to last ``min_seconds`` at the measured pace."""
    if min_seconds <= 0 or seconds_per_step <= 0:
        return min_steps
    return min(max_steps, max(min_steps, math.ceil(min_seconds / seconds_per_step)))


def interleaved(
    arms: dict[str, Arm],
    steps: int,
    warmup: int,
    repeats: int,
    device: torch.device,
    min_seconds: float = 0.0,
    clock: Callable[[], float] = time.perf_counter,
    on_window: Callable[[str, float], None] | None = None,
) -> dict[str, Windows]:
    """Time the arms window by window in rotation (round r starts at arm r mod len): the median of
    ``repeats`` windows each. Warm-up calls also set each arm's window length (:func:`window_steps`)."""
    names = list(arms)
    per_window: dict[str, int] = {}
    for name, arm in arms.items():
        for _ in range(max(warmup - 1, 0)):
            arm.run()
        sync(device)
        start = clock()
        arm.run()  # the last warm-up call, timed: the pace that sizes the window
        sync(device)
        per_window[name] = window_steps(clock() - start, steps, min_seconds)
    out = {name: Windows([], per_window[name]) for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            arm, n = arms[name], per_window[name]
            if arm.drain is not None:
                arm.drain()
            sync(device)
            start = clock()
            for _ in range(n):
                arm.run()
            sync(device)
            seconds = clock() - start
            out[name].images_per_s.append(arm.images * n / seconds)
            out[name].seconds += seconds
            out[name].images += arm.images * n
            if on_window is not None:
                on_window(name, out[name].images_per_s[-1])
    return out


def min_window(bc: BenchConfig) -> float:
    """The shortest window: ``bc.min_window_s``, else 2 s (a window of a few CPU steps, or of
    a few hundred GPU steps, is shorter than the noise it should average over)."""
    if bc.min_window_s is not None:
        return bc.min_window_s
    return MIN_WINDOW_S
