"""The named baseline: torchvision's AlexNet trained the way pytorch/examples' ImageNet script does.

Data: torchvision ImageFolder, PIL decoding with RandomResizedCrop, RandomHorizontalFlip,
ToTensor and Normalize in DataLoader workers, pinned memory on CUDA. Step:
torchvision.models.alexnet in float32 eager, torch.optim.SGD, and the ``loss.item()``
that loop calls every step (a device synchronisation it pays for). Nothing here is tuned:
it is the pipeline this project's numbers are ratios to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alexnet.bench.flops import device_peak, fp32_kind, step_flops
from alexnet.bench.measure import Arm, BenchConfig, Measurement, Windows, endless, from_windows
from alexnet.data.loader import die_with_parent_init
from alexnet.errors import AlexNetError

log = logging.getLogger("alexnet")


def reference_loader(root: Path, batch: int, crop: int, workers: int, device: torch.device) -> tuple[Any, Any]:
    """pytorch/examples/imagenet's training loader for torchvision's alexnet (crop 224 there)."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    normalize = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    transform = T.Compose([T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    dataset = ImageFolder(str(root / "train"), transform)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0, drop_last=True,
        worker_init_fn=die_with_parent_init() if workers > 0 else None,
    )  # fmt: skip
    return loader, dataset


def reference_step(
    classes: int, device: torch.device
) -> tuple[Callable[[torch.Tensor, torch.Tensor], float], torch.nn.Module]:
    """pytorch/examples' loop body: torchvision alexnet, float32 eager, SGD, a loss.item() per step."""
    import torchvision

    torch.manual_seed(0)
    # pytorch/examples' imagenet/main.py sets cudnn.benchmark = True too; set here so the
    # reference does not depend on whether our TrainStep (which also sets it) ran first.
    torch.backends.cudnn.benchmark = True
    model = torchvision.models.alexnet(num_classes=classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()

    def step(images: torch.Tensor, target: torch.Tensor) -> float:
        output = model(images)
        loss = criterion(output, target)
        value = loss.item()  # losses.update(loss.item(), images.size(0)) in pytorch/examples
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return value

    return step, model


@dataclass
class Reference:
    """The reference pipeline's three arms (data, step, end to end) for :func:`measure.interleaved`,
    with its step's FLOPs per image and peak; ``close`` stops the loader's workers."""

    data: Arm
    step: Arm
    end_to_end: Arm
    flops_per_image: float
    kind: str
    peak: float | None
    peak_source: str | None
    close: Callable[[], None]

    def measurement(self, name: str, windows: Windows, with_flops: bool) -> Measurement:
        if not with_flops:
            return from_windows(name, windows)
        return from_windows(name, windows, self.flops_per_image, (self.kind, self.peak, self.peak_source))


def reference_arms(root: Path, classes: int, bc: BenchConfig, workers: int, device: torch.device) -> Reference:
    """The reference's loader and step, as arms. Before each data or end-to-end window the arm
    takes (untimed) as many batches as the loader prefetches, workers x prefetch_factor: while
    the other side ran, the workers filled that queue, and a window fed from it measures the
    workers' idle time, not their rate (its end to end, 2,948 images/s, beat its own data path,
    2,525, on an H100 on 2026-11-24)."""
    b = bc.batch_size
    loader, dataset = reference_loader(root, b, bc.crop_size, workers, device)
    if len(dataset) < b:
        raise AlexNetError(f"{root}/train has fewer than {b} images")
    batches = endless(loader)
    queued = workers * (loader.prefetch_factor or 2) if workers > 0 else 0

    def drain() -> None:
        for _ in range(queued):
            next(batches)

    def data_only() -> None:
        images, target = next(batches)
        images.to(device, non_blocking=True), target.to(device, non_blocking=True)

    step, model = reference_step(classes, device)
    x = torch.randn(b, 3, bc.crop_size, bc.crop_size, device=device)
    y = torch.randint(0, classes, (b,), device=device)
    flops = step_flops(model, x, y) / b
    kind = fp32_kind(device)
    peak, source = device_peak(device, kind, bc.peak_tflops)

    def end_to_end() -> None:
        images, target = next(batches)
        step(images.to(device, non_blocking=True), target.to(device, non_blocking=True))

    return Reference(
        Arm(data_only, b, drain), Arm(lambda: step(x, y), b), Arm(end_to_end, b, drain),
        flops, kind, peak, source, batches.close,
    )  # fmt: skip
