"""What one benchmark run measures and how: its settings, one timed measurement, the timing itself.

Timing brackets every measured region with device synchronisation, after warm-up calls
(which absorb torch.compile, cuDNN autotuning and worker start-up), so a CUDA
measurement times the work and not only its queueing.
"""

from __future__ import annotations

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
