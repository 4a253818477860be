"""``alexnet bench``: this project's training path against the reference PyTorch pipeline, in one process.

Three measurements for each side, on the same images:

* **data**: batches from disk to network input on the device, nothing else.
  Ours: the prepared store (store.StoreLoader) plus the paper's augmentation as batched
  tensor ops on the device (augment.train_batch). Reference: what pytorch/examples'
  ImageNet script does for torchvision's alexnet -- torchvision ImageFolder, PIL decoding
  with RandomResizedCrop(224), RandomHorizontalFlip, ToTensor and Normalize in DataLoader
  workers (one per core), pinned memory on CUDA.
* **step**: one training step on a batch already on the device (random values), nothing
  else. Ours: step.TrainStep with the speed options (bf16, channels_last, torch.compile,
  the fused update). Reference: torchvision.models.alexnet, float32 eager,
  torch.optim.SGD, and the per-step ``loss.item()`` of pytorch/examples' loop.
* **end to end**: both together, as in training.

Model FLOPs utilisation = FLOPs of one training step (forward and backward, counted by
torch.utils.flop_counter.FlopCounterMode: convolutions and matrix products) x steps/s /
the device's dense peak for the dtype the step computes in (table below; CPU peaks are
estimates from core count, clock and vector width, and say so).

Timing brackets every measured region with device synchronisation, after warm-up steps
(which absorb torch.compile, cuDNN autotuning and worker start-up).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from alexnet import __version__
from alexnet.config import SpeedConfig
from alexnet.data.augment import make_preprocess, train_batch
from alexnet.data.loader import Batch, EpochBatchSampler, resolve_workers
from alexnet.data.store import StoreLoader, is_store, open_store
from alexnet.errors import AlexNetError
from alexnet.files import cache_dir
from alexnet.models.alexnet import build_model, count_parameters, model_config
from alexnet.runtime import resolve_device
from alexnet.train.optim import PaperSGD, param_groups
from alexnet.train.step import StepOptions, TrainStep, cpu_flags, resolve_options

log = logging.getLogger("alexnet")

IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012 training set
PAPER_EPOCHS = 90

# Dense peak FLOP/s per GPU and dtype, from NVIDIA's datasheets (no sparsity).
# "tf32" is what cuDNN uses for float32 convolutions by default (torch.backends.cudnn.allow_tf32).
GPU_PEAKS: dict[str, dict[str, float]] = {
    "H100 SXM": {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
    "H100 NVL": {"fp32": 60.0e12, "tf32": 417.5e12, "bf16": 835.0e12, "fp16": 835.0e12},
    "H100 PCIe": {"fp32": 51.2e12, "tf32": 378.0e12, "bf16": 756.0e12, "fp16": 756.0e12},
    "H200": {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
    "A100": {"fp32": 19.5e12, "tf32": 156.0e12, "bf16": 312.0e12, "fp16": 312.0e12},
}


def gpu_peak_key(name: str) -> str | None:
    """The GPU_PEAKS row for a CUDA device name such as 'NVIDIA H100 80GB HBM3'."""
    if "H200" in name:
        return "H200"
    if "H100" in name:
        return "H100 PCIe" if "PCIe" in name else "H100 NVL" if "NVL" in name else "H100 SXM"
    if "A100" in name:
        return "A100"
    return None


def cpu_peak(dtype: str) -> tuple[float, str]:
    """An estimate of the CPU's dense peak: cores x clock x FLOPs per cycle for its widest unit.

    Per core and cycle: two FMA ports of 16 float32 lanes (AVX-512) = 64 FLOPs, or 32 with
    AVX2. bf16: AMX tiles do 1024 bf16 FLOPs per cycle (16x AVX-512 float32), AVX512-BF16
    doubles float32. Clock from /proc/cpuinfo (the nominal, not the turbo, frequency).
    """
    flags, mhz = cpu_flags(), 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":", 1)[1])
                break
    except (OSError, ValueError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ghz = mhz / 1000 if mhz else 2.0
    fp32 = 64 if "avx512f" in flags else 32 if "fma" in flags else 8
    per_cycle = fp32
    if dtype == "bf16":
        per_cycle = 16 * fp32 if "amx_bf16" in flags else 2 * fp32 if "avx512_bf16" in flags else fp32
    unit = {64: "AVX-512", 32: "AVX2 FMA", 8: "SSE"}[fp32]
    if dtype == "bf16" and "amx_bf16" in flags:
        unit = "AMX-BF16"
    return cores * ghz * 1e9 * per_cycle, f"estimate: {cores} cores x {ghz:.2f} GHz x {per_cycle} FLOPs/cycle ({unit})"


def device_peak(device: torch.device, dtype: str, override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "given with --peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = gpu_peak_key(name)
        if key is None:
            return None, f"unknown peak for {name}: pass --peak-tflops"
        return GPU_PEAKS[key][dtype], f"{key} datasheet, dense {dtype}"
    return cpu_peak(dtype)


# --------------------------------------------------------------------------------------
# Benchmark images: ImageNet-sized JPEGs, so that the reference pays a realistic decode


def _write_image(args: tuple[Path, int, int, int, int]) -> None:
    from PIL import Image

    path, seed, index, width, height = args
    rng = np.random.default_rng((seed, index))
    # A smooth random colour field plus pixel noise: about 90 KB per 500x375 JPEG at
    # quality 90, near ImageNet's average file (~110 KB at ~400x350).
    low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    img = np.asarray(low.resize((width, height), Image.BICUBIC), dtype=np.float32)
    img = img + rng.normal(0, 16, img.shape).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)


def make_bench_images(
    root: Path, images: int, classes: int = 10, size: tuple[int, int] = (500, 375), seed: int = 0, workers: int = -1
) -> Path:
    """``root/{train,val}/<class>/*.jpg``: ``images`` training JPEGs and a tenth as many for val; reused if complete."""
    marker = root / "bench-images.json"
    params = {"images": images, "classes": classes, "size": list(size), "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return root
    tasks = []
    for split, n in (("train", images), ("val", max(classes, images // 10))):
        for i in range(n):
            tasks.append((root / split / f"c{i % classes:02d}" / f"{i:07d}.jpg", seed + (split == "val"), i, *size))
    workers = resolve_workers(workers)
    log.info("writing %d benchmark JPEGs (%dx%d) to %s", len(tasks), size[0], size[1], root)
    if workers:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_write_image, tasks, chunksize=16))
    else:
        list(map(_write_image, tasks))
    marker.write_text(json.dumps(params))
    return root


# --------------------------------------------------------------------------------------
# Timing


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


def _conv_backward_flops(
    grad_out_shape: Any, x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """torch.utils.flop_counter's convolution backward, with grouped weight gradients counted once.

    torch (2.14) counts the weight gradient of a grouped convolution as if it were not
    grouped: ``groups`` times too many (for the paper net: +17% FLOPs, a flattered MFU).
    For an ordinary convolution each of the two gradients costs what the forward does,
    2 * batch * output pixels * weight elements; transposed ones keep torch's formula.
    """
    from torch.utils import flop_counter

    transposed, groups, output_mask = args[4], args[6], args[7]
    if transposed or groups == 1:
        formula = getattr(flop_counter.conv_backward_flop, "__wrapped__", flop_counter.conv_backward_flop)
        return formula(grad_out_shape, x_shape, w_shape, *args, out_shape=out_shape, **kwargs)
    per_gradient = 2 * grad_out_shape[0] * math.prod(grad_out_shape[2:]) * math.prod(w_shape)
    return per_gradient * (int(output_mask[0]) + int(output_mask[1]))


def step_flops(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> int:
    """FLOPs of a forward and backward pass (convolutions and matrix products), counted by PyTorch.

    Run on "meta" copies of the parameters and inputs: shapes only, so counting costs no
    compute and no device memory, and the model's own gradients are left alone.
    """
    from torch.utils.flop_counter import FlopCounterMode

    meta = {n: torch.empty_like(p, device="meta").requires_grad_(p.requires_grad) for n, p in model.named_parameters()}
    meta.update({n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()})
    mapping = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        logits = torch.func.functional_call(model, meta, (torch.empty_like(x, device="meta"),))
        F.cross_entropy(logits, torch.empty_like(labels, device="meta")).backward()
    return int(counter.get_total_flops())


@dataclass
class Measurement:
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


# --------------------------------------------------------------------------------------
# The two pipelines


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


def _our_model(name: str, classes: int, crop: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(model_config(name, classes, input_size=crop)).to(device)


def our_step(
    name: str, classes: int, bc: BenchConfig, options: StepOptions, pre: Any, device: torch.device
) -> TrainStep:
    """This project's training step for network ``name`` (seeded weights, the paper's optimiser)."""
    model = _our_model(name, classes, bc.crop_size, device)
    optimizer = PaperSGD(param_groups(model, 5e-4, True), lr=0.01, momentum=0.9)
    return TrainStep(model, optimizer, pre, options, device)


def measure_model_step(
    name: str,
    label: str,
    step: TrainStep,
    bc: BenchConfig,
    batch: int,
    classes: int,
    device: torch.device,
    options: StepOptions,
    override: float | None,
) -> Measurement:
    x = torch.randn(batch, 3, bc.crop_size, bc.crop_size, device=device).contiguous(memory_format=step.memory_format)
    y = torch.randint(0, classes, (batch,), device=device)
    flops = step_flops(step.model, x, y)
    seconds = timed(lambda: step.model_step(x, y), bc.steps, bc.warmup, device)
    peak, source = device_peak(device, options.amp if options.amp != "off" else _fp32_kind(device), override)
    return Measurement(
        label, batch * bc.steps / seconds, seconds, batch * bc.steps, flops / batch, options.amp, peak, source,
        {"model": name, "batch_size": batch, "options": options.as_dict(), "parameters": count_parameters(step.model)},
    )  # fmt: skip


def _fp32_kind(device: torch.device) -> str:
    """float32 on CUDA runs its convolutions in TF32 unless cuDNN is told otherwise (PyTorch's default)."""
    return "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"


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


def _ours_data(split: Any, pre: Any, bc: BenchConfig, device: torch.device) -> Measurement:
    """Store batches onto the device and through the paper's augmentation; no model."""
    sampler = EpochBatchSampler(len(split), bc.batch_size, shuffle=True, seed=0)
    gen = torch.Generator(device).manual_seed(0)
    batches = cycle(StoreLoader(split, sampler, device), sampler)

    def data_only() -> None:
        batch = next(batches)
        train_batch(batch.images.to(device, non_blocking=True), pre, generator=gen)

    seconds = timed(data_only, bc.steps, bc.warmup, device)
    batches.close()
    n = bc.batch_size * bc.steps
    return Measurement("ours: data", n / seconds, seconds, n)


def _ours_end_to_end(
    split: Any, step: TrainStep, bc: BenchConfig, device: torch.device, like: Measurement
) -> Measurement:
    sampler = EpochBatchSampler(len(split), bc.batch_size, shuffle=True, seed=1)
    gen = torch.Generator(device).manual_seed(1)
    batches = cycle(StoreLoader(split, sampler, device), sampler)

    def end_to_end() -> None:
        batch = next(batches)
        step(batch.images.to(device, non_blocking=True), batch.labels.to(device, non_blocking=True), gen)

    seconds = timed(end_to_end, bc.steps, bc.warmup, device)
    batches.close()
    n = bc.batch_size * bc.steps
    return Measurement(
        "ours: end to end", n / seconds, seconds, n, like.flops_per_image, like.dtype, like.peak_flops, like.peak_source
    )


def _reference(root: Path, classes: int, bc: BenchConfig, workers: int, device: torch.device) -> dict[str, Measurement]:
    """The three measurements of the reference pipeline."""
    b, n = bc.batch_size, bc.batch_size * bc.steps
    loader, dataset = reference_loader(root, b, bc.crop_size, workers, device)
    if len(dataset) < b:
        raise AlexNetError(f"{root}/train has fewer than {b} images")
    batches = _endless(loader)

    def data_only() -> None:
        images, target = next(batches)
        images.to(device, non_blocking=True), target.to(device, non_blocking=True)

    out = {}
    seconds = timed(data_only, bc.steps, bc.warmup, device)
    out["reference_data"] = Measurement("reference: data", n / seconds, seconds, n)
    log.info("reference data path: %.1f images/s", out["reference_data"].images_per_s)

    step, model = reference_step(classes, device)
    x = torch.randn(b, 3, bc.crop_size, bc.crop_size, device=device)
    y = torch.randint(0, classes, (b,), device=device)
    flops = step_flops(model, x, y) / b
    kind = _fp32_kind(device)
    peak, source = device_peak(device, kind, bc.peak_tflops)
    seconds = timed(lambda: step(x, y), bc.steps, bc.warmup, device)
    out["reference_step"] = Measurement(
        "reference: step", n / seconds, seconds, n, flops, kind, peak, source, {"model": "torchvision.models.alexnet"}
    )
    log.info("reference step: %.1f images/s", out["reference_step"].images_per_s)

    def end_to_end() -> None:
        images, target = next(batches)
        step(images.to(device, non_blocking=True), target.to(device, non_blocking=True))

    seconds = timed(end_to_end, bc.steps, bc.warmup, device)
    out["reference_end_to_end"] = Measurement(
        "reference: end to end", n / seconds, seconds, n, flops, kind, peak, source
    )
    log.info("reference end to end: %.1f images/s", out["reference_end_to_end"].images_per_s)
    batches.close()
    return out


def run_bench(bc: BenchConfig) -> dict[str, Any]:
    """Every measurement of the module docstring; returns the JSON-ready results."""
    device = resolve_device(bc.device)
    workers = resolve_workers(bc.workers)
    if bc.data is not None and is_store(bc.data):
        raise AlexNetError("--data takes the source images (the reference reads them); give the store with --store")
    if bc.data:
        root = Path(bc.data)
    else:
        w, h = bc.source_size
        root = make_bench_images(cache_dir() / f"bench-{bc.images}-{w}x{h}", bc.images, size=(w, h), workers=workers)
    if bc.baseline and not (root / "train").is_dir():
        raise AlexNetError(
            f"the reference pipeline reads an ImageFolder tree ({root}/train/<class>/); use --no-baseline"
        )
    store_path = Path(bc.store) if bc.store else root.with_name(root.name + f".store{bc.image_size}")

    from alexnet.data.prepare import prepare

    report = prepare(root, store_path, image_size=bc.image_size, workers=workers, progress=bc.progress)
    store = open_store(store_path, bc.image_size)
    split, classes = store.split("train"), len(store.classes)
    if len(split) < bc.batch_size:
        raise AlexNetError(f"the store has {len(split)} training images, fewer than one batch of {bc.batch_size}")
    stats = store.stats()
    pre = make_preprocess(
        "mean-image", bc.image_size, bc.crop_size, stats.mean_image, stats.pixel_std, stats.eigvals, stats.eigvecs
    ).to(device)
    options = resolve_options(bc.speed, device, bc.model)
    log.info("device %s; our step: %s", device, options.as_dict())
    results: dict[str, Measurement] = {}

    results["ours_data"] = _ours_data(split, pre, bc, device)
    log.info("ours data path: %.1f images/s", results["ours_data"].images_per_s)

    step = our_step(bc.model, classes, bc, options, pre, device)
    by_batch = []
    for batch_size in sorted({bc.batch_size, *bc.batch_sizes}):
        m = measure_model_step(bc.model, "ours: step", step, bc, batch_size, classes, device, options, bc.peak_tflops)
        by_batch.append(m)
        log.info("ours step (%s, batch %d): %.1f images/s, MFU %s", bc.model, batch_size, m.images_per_s, _pct(m.mfu))
    results["ours_step"] = next(m for m in by_batch if m.extra["batch_size"] == bc.batch_size)
    results["ours_end_to_end"] = _ours_end_to_end(split, step, bc, device, results["ours_step"])
    log.info("ours end to end: %.1f images/s", results["ours_end_to_end"].images_per_s)

    # Alternatives, one at a time: the other tower convolution, and torchvision's network in our step.
    variants = []
    if bc.towers and bc.model == "paper":
        other = "split" if options.tower_convs == "grouped" else "grouped"
        variants.append(
            (f"ours_step_towers_{other}", "paper", f"ours: step, {other} towers", replace(options, tower_convs=other))
        )
    if bc.model != "torchvision":
        tv_options = resolve_options(bc.speed, device, "torchvision")
        variants.append(("ours_step_torchvision_arch", "torchvision", "ours: step, torchvision's network", tv_options))
    for key, name, label, opts in variants:
        variant = our_step(name, classes, bc, opts, pre, device)
        results[key] = measure_model_step(
            name, label, variant, bc, bc.batch_size, classes, device, opts, bc.peak_tflops
        )
        log.info("%s: %.1f images/s", label, results[key].images_per_s)

    if bc.baseline:
        results.update(_reference(root, classes, bc, workers, device))
    best = max(by_batch, key=lambda m: m.images_per_s)
    return _summarise(bc, device, options, report.as_dict(), store_path, results, best, by_batch)


def _endless(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _environment(device: torch.device) -> dict[str, Any]:
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "alexnet": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def _summarise(
    bc: BenchConfig,
    device: torch.device,
    options: StepOptions,
    prepare_report: dict[str, Any],
    store_path: Path,
    results: dict[str, Measurement],
    best: Measurement,
    steps_by_batch: list[Measurement],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "environment": _environment(device),
        "config": {
            k: (v if not isinstance(v, (SpeedConfig, tuple)) else (list(v) if isinstance(v, tuple) else vars(v)))
            for k, v in vars(bc).items()
        },  # fmt: skip
        "options": options.as_dict(),
        "store": str(store_path),
        "prepare": prepare_report
        if prepare_report["images"]
        else {**prepare_report, "note": "store existed; not timed"},
        "results": {k: {"name": m.name, **m.as_dict()} for k, m in results.items()},
        "model_step_by_batch_size": [m.as_dict() for m in steps_by_batch],
        "best_model_step": best.as_dict(),
    }
    ratios: dict[str, float] = {}
    for what in ("data", "step", "end_to_end"):
        ours, ref = results.get(f"ours_{what}"), results.get(f"reference_{what}")
        if ours and ref:
            ratios[what] = ours.images_per_s / ref.images_per_s
    if "ours_step_torchvision_arch" in results and "reference_step" in results:
        ratios["step_same_network"] = (
            results["ours_step_torchvision_arch"].images_per_s / results["reference_step"].images_per_s
        )
    out["ratios_to_reference"] = ratios
    e2e, step = results["ours_end_to_end"].images_per_s, results["ours_step"].images_per_s
    out["end_to_end_over_step"] = e2e / step
    out["data_over_step"] = results["ours_data"].images_per_s / step
    out["projected_paper_training_hours"] = PAPER_EPOCHS * IMAGENET_TRAIN_IMAGES / e2e / 3600
    targets: dict[str, Any] = {
        "end_to_end_at_least_10x_reference": ratios.get("end_to_end", math.nan) >= 10
        if "end_to_end" in ratios
        else None,
        "best_step_mfu_at_least_25pct": (best.mfu >= 0.25) if best.mfu is not None else None,
        "end_to_end_within_15pct_of_step": e2e >= 0.85 * step,
        "data_path_faster_than_step": results["ours_data"].images_per_s > step,
    }
    if "step_same_network" in ratios:
        targets["torchvision_network_step_not_slower_than_reference"] = ratios["step_same_network"] >= 1.0
    out["targets"] = targets
    return out


def format_report(result: dict[str, Any]) -> str:
    """The human-readable table printed by ``alexnet bench``."""
    r, ratios = result["results"], result["ratios_to_reference"]
    env = result["environment"]
    lines = [
        f"alexnet bench  {env['date']}  torch {env['torch']}  {env['device_name']} ({env['cpu_count']} CPU cores)",
        f"our step: {result['options']}",
        f"{'':42s}{'images/s':>12s}{'x reference':>13s}{'MFU':>8s}",
    ]
    ratio_of = {
        "ours_data": "data",
        "ours_step": "step",
        "ours_end_to_end": "end_to_end",
        "ours_step_torchvision_arch": "step_same_network",
    }
    for key, m in r.items():
        ratio = ratios.get(ratio_of.get(key, ""))
        lines.append(
            f"{m['name']:42s}{m['images_per_s']:12.1f}{'' if ratio is None else f'{ratio:.2f}x':>13s}{_pct(m['mfu']):>8s}"
        )
    best = result["best_model_step"]
    lines.append(
        f"best model step: batch {best['batch_size']}, {best['images_per_s']:.1f} images/s, MFU {_pct(best['mfu'])}"
    )
    p = result["prepare"]
    if p["images"]:
        lines.append(
            f"prepare: {p['images_per_s']:.1f} images/s with {p['workers']} workers, {p['images_per_s_per_worker']:.1f} per worker"
        )
    lines.append(
        f"end to end / step alone: {result['end_to_end_over_step']:.2f}; data path / step: {result['data_over_step']:.2f}"
    )
    lines.append(f"projected 90 epochs over 1.28M images: {result['projected_paper_training_hours']:.1f} h")
    lines.append("targets: " + ", ".join(f"{k}={v}" for k, v in result["targets"].items()))
    return "\n".join(lines)
