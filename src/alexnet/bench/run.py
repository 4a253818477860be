"""This project's side of the benchmark, and the run that sets both sides on the same images.

Ours: the prepared store (store.StoreLoader) plus the paper's augmentation as batched
tensor ops on the device (augment.train_batch), and step.TrainStep with the speed
options. The model step is timed at every batch size asked for, and once more for each
alternative (the other tower convolution, torchvision's network) so that the gain of
each is seen alone.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from alexnet.bench.flops import device_peak, fp32_kind, step_flops
from alexnet.bench.measure import BenchConfig, Measurement, cycle, timed
from alexnet.bench.reference import measure_reference
from alexnet.bench.report import pct, summarise
from alexnet.data.augment import make_preprocess, train_batch
from alexnet.data.loader import EpochBatchSampler, resolve_workers
from alexnet.data.store import StoreLoader, is_store, open_store
from alexnet.data.synthetic import make_bench_images
from alexnet.errors import AlexNetError
from alexnet.files import cache_dir
from alexnet.models.alexnet import build_model, count_parameters, model_config
from alexnet.runtime import resolve_device
from alexnet.train.optim import PaperSGD, param_groups
from alexnet.train.step import StepOptions, TrainStep, resolve_options

log = logging.getLogger("alexnet")


def our_step(
    name: str, classes: int, bc: BenchConfig, options: StepOptions, pre: Any, device: torch.device
) -> TrainStep:
    """This project's training step for network ``name`` (seeded weights, the paper's optimiser)."""
    torch.manual_seed(0)
    model = build_model(model_config(name, classes, input_size=bc.crop_size)).to(device)
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
    """The model step alone, on a random batch already on the device, with its FLOPs and MFU."""
    x = torch.randn(batch, 3, bc.crop_size, bc.crop_size, device=device).contiguous(memory_format=step.memory_format)
    y = torch.randint(0, classes, (batch,), device=device)
    flops = step_flops(step.model, x, y)
    seconds = timed(lambda: step.model_step(x, y), bc.steps, bc.warmup, device)
    peak, source = device_peak(device, options.amp if options.amp != "off" else fp32_kind(device), override)
    return Measurement(
        label, batch * bc.steps / seconds, seconds, batch * bc.steps, flops / batch, options.amp, peak, source,
        {"model": name, "batch_size": batch, "options": options.as_dict(), "parameters": count_parameters(step.model)},
    )  # fmt: skip


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
    """Store batches through augmentation and the training step; FLOPs and peak as ``like``'s."""
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


def _source_images(bc: BenchConfig, workers: int) -> Path:
    """The ImageFolder root both sides read: ``--data``, or generated JPEGs in the cache."""
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
    return root


def _variants(
    bc: BenchConfig, options: StepOptions, classes: int, pre: Any, device: torch.device
) -> dict[str, Measurement]:
    """Alternatives, one at a time: the other tower convolution, and torchvision's network in our step."""
    variants = []
    if bc.towers and bc.model == "paper":
        other = "split" if options.tower_convs == "grouped" else "grouped"
        variants.append(
            (f"ours_step_towers_{other}", "paper", f"ours: step, {other} towers", replace(options, tower_convs=other))
        )
    if bc.model != "torchvision":
        tv_options = resolve_options(bc.speed, device, "torchvision")
        variants.append(("ours_step_torchvision_arch", "torchvision", "ours: step, torchvision's network", tv_options))
    results = {}
    for key, name, label, opts in variants:
        variant = our_step(name, classes, bc, opts, pre, device)
        results[key] = measure_model_step(
            name, label, variant, bc, bc.batch_size, classes, device, opts, bc.peak_tflops
        )
        log.info("%s: %.1f images/s", label, results[key].images_per_s)
    return results


def run_bench(bc: BenchConfig) -> dict[str, Any]:
    """Every measurement of the package docstring (alexnet.bench); returns the JSON-ready results."""
    device = resolve_device(bc.device)
    workers = resolve_workers(bc.workers)
    root = _source_images(bc, workers)
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
        log.info("ours step (%s, batch %d): %.1f images/s, MFU %s", bc.model, batch_size, m.images_per_s, pct(m.mfu))
    results["ours_step"] = next(m for m in by_batch if m.extra["batch_size"] == bc.batch_size)
    results["ours_end_to_end"] = _ours_end_to_end(split, step, bc, device, results["ours_step"])
    log.info("ours end to end: %.1f images/s", results["ours_end_to_end"].images_per_s)
    results.update(_variants(bc, options, classes, pre, device))

    if bc.baseline:
        results.update(measure_reference(root, classes, bc, workers, device))
    best = max(by_batch, key=lambda m: m.images_per_s)
    return summarise(bc, device, options, report.as_dict(), store_path, results, best, by_batch)
