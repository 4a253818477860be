"""This project's side of the benchmark, and the run that sets both sides on the same images.

Ours: the prepared store (store.StoreLoader) plus the paper's augmentation as batched
tensor ops on the device (augment.train_batch), and step.TrainStep with the speed
options. The model step is timed at every batch size asked for, and once more for each
alternative (the other tower convolution, torchvision's network) so that the gain of
each is seen alone.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alexnet.bench.flops import device_peak, fp32_kind, step_flops
from alexnet.bench.measure import Arm, BenchConfig, Measurement, Windows, cycle, from_windows, interleaved, min_window
from alexnet.bench.reference import reference_arms
from alexnet.bench.report import pct, summarise
from alexnet.data.augment import make_preprocess, train_batch
from alexnet.data.benchimages import make_bench_images
from alexnet.data.loader import EpochBatchSampler, resolve_workers
from alexnet.data.store import VERSION as STORE_VERSION
from alexnet.data.store import Store, StoreLoader, is_store, open_store
from alexnet.errors import AlexNetError
from alexnet.files import cache_dir
from alexnet.models.alexnet import build_model, count_parameters, model_config
from alexnet.runtime import resolve_device
from alexnet.train.optim import PaperSGD, param_groups
from alexnet.train.step import StepOptions, TrainStep, resolve_options

if TYPE_CHECKING:
    from alexnet.data.prepare import PrepareReport

log = logging.getLogger("alexnet")


def our_step(
    name: str, classes: int, bc: BenchConfig, options: StepOptions, pre: Any, device: torch.device
) -> TrainStep:
    """This project's training step for network ``name`` (seeded weights, the paper's optimiser)."""
    torch.manual_seed(0)
    model = build_model(model_config(name, classes, input_size=bc.crop_size)).to(device)
    optimizer = PaperSGD(param_groups(model, 5e-4, True), lr=0.01, momentum=0.9)
    return TrainStep(model, optimizer, pre, options, device)


def _step_arm(step: TrainStep, bc: BenchConfig, batch: int, classes: int, device: torch.device) -> tuple[Arm, float]:
    """The model step alone, on a random batch already on the device; and its FLOPs per image."""
    x = torch.randn(batch, 3, bc.crop_size, bc.crop_size, device=device).contiguous(memory_format=step.memory_format)
    y = torch.randint(0, classes, (batch,), device=device)
    return Arm(lambda: step.model_step(x, y), batch), step_flops(step.model, x, y) / batch


def _peak(options: StepOptions, device: torch.device, override: float | None) -> tuple[str, float | None, str | None]:
    peak, source = device_peak(device, options.amp if options.amp != "off" else fp32_kind(device), override)
    return options.amp, peak, source


def measure_model_step(
    name: str, label: str, step: TrainStep, bc: BenchConfig, batch: int, classes: int,
    device: torch.device, options: StepOptions, override: float | None,
) -> Measurement:  # fmt: skip
    """The model step alone (:func:`_step_arm`), its median over ``bc.repeats`` windows, FLOPs and MFU."""
    arm, flops = _step_arm(step, bc, batch, classes, device)
    w = interleaved({label: arm}, bc.steps, bc.warmup, bc.repeats, device, min_window(bc))[label]
    return from_windows(
        label, w, flops, _peak(options, device, override),
        model=name, batch_size=batch, options=options.as_dict(), parameters=count_parameters(step.model),
    )  # fmt: skip


def _ours_data_arm(split: Any, pre: Any, bc: BenchConfig, device: torch.device) -> tuple[Arm, Any]:
    """Store batches onto the device and through the paper's augmentation; no model."""
    sampler = EpochBatchSampler(len(split), bc.batch_size, shuffle=True, seed=0)
    gen = torch.Generator(device).manual_seed(0)
    batches = cycle(StoreLoader(split, sampler, device), sampler)

    def data_only() -> None:
        batch = next(batches)
        train_batch(batch.images.to(device, non_blocking=True), pre, generator=gen)

    return Arm(data_only, bc.batch_size), batches


def _ours_end_to_end_arm(split: Any, step: TrainStep, bc: BenchConfig, device: torch.device) -> tuple[Arm, Any]:
    """Store batches through augmentation and the training step."""
    sampler = EpochBatchSampler(len(split), bc.batch_size, shuffle=True, seed=1)
    gen = torch.Generator(device).manual_seed(1)
    batches = cycle(StoreLoader(split, sampler, device), sampler)

    def end_to_end() -> None:
        batch = next(batches)
        step(batch.images.to(device, non_blocking=True), batch.labels.to(device, non_blocking=True), gen)

    return Arm(end_to_end, bc.batch_size), batches


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


def _drop_stale_cache(store_path: Path) -> None:
    """The bench's own store in the cache, if an older alexnet wrote it in another store format
    version, is removed so that it is prepared again (a prepare refuses to add to it)."""
    header = store_path / "store.json"
    if header.is_file():
        try:
            version = json.loads(header.read_text()).get("version")
        except (OSError, ValueError, AttributeError):
            version = None
        if version != STORE_VERSION:
            log.info("%s is a bench store of format version %s; preparing it again", store_path, version)
            shutil.rmtree(store_path)


def _prepared_store(bc: BenchConfig, root: Path, workers: int) -> tuple[Path, PrepareReport, Store]:
    """(path, prepare's report, the open store) of bc.store, or of the cached store beside ``root``."""
    from alexnet.data.prepare import prepare

    store_path = Path(bc.store) if bc.store else root.with_name(root.name + f".store{bc.image_size}")
    if not bc.store:
        _drop_stale_cache(store_path)
    report = prepare(root, store_path, image_size=bc.image_size, workers=workers, progress=bc.progress)
    return store_path, report, open_store(store_path, bc.image_size)


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


def _paired(bc: BenchConfig, device: torch.device, arms: dict[str, Arm]) -> dict[str, Windows]:
    """Ours and the reference's arm, window by window in turn."""
    return interleaved(arms, bc.steps, bc.warmup, bc.repeats, device, min_window(bc))


def run_bench(bc: BenchConfig, on_part: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every measurement of the package docstring (alexnet.bench); returns the JSON-ready results.

    ``on_part`` gets the measurements so far after each part (data, steps, end to end, the
    variants), so a run stopped by a time limit keeps what it measured (``--json``)."""
    device = resolve_device(bc.device)
    workers = resolve_workers(bc.workers)
    root = _source_images(bc, workers)
    store_path, report, store = _prepared_store(bc, root, workers)
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

    logged: set[str] = set()

    def part_done() -> None:
        for m in (m for key, m in results.items() if key not in logged):
            log.info("%s: %.1f images/s (spread %.2f)", m.name, m.images_per_s, m.extra.get("spread", 0.0))
        logged.update(results)
        if on_part is not None:
            on_part({"partial": True, "results": {k: {"name": m.name, **m.as_dict()} for k, m in results.items()}})

    ref = reference_arms(root, classes, bc, workers, device) if bc.baseline else None
    try:
        # 1. The data paths, ours and the reference's in turn.
        data_arm, ours_batches = _ours_data_arm(split, pre, bc, device)
        w = _paired(bc, device, {"ours": data_arm, **({"reference": ref.data} if ref else {})})
        ours_batches.close()
        results["ours_data"] = from_windows("ours: data", w["ours"])
        if ref:
            results["reference_data"] = ref.measurement("reference: data", w["reference"], False)
        part_done()

        # 2. The model step at each batch size; at the main one, in turn with the reference's.
        step = our_step(bc.model, classes, bc, options, pre, device)
        peak = _peak(options, device, bc.peak_tflops)
        extra = {"model": bc.model, "options": options.as_dict(), "parameters": count_parameters(step.model)}
        by_batch = []
        for batch_size in sorted({bc.batch_size, *bc.batch_sizes}):
            arm, flops = _step_arm(step, bc, batch_size, classes, device)
            paired = ref is not None and batch_size == bc.batch_size
            w = _paired(bc, device, {"ours": arm, **({"reference": ref.step} if paired else {})})
            by_batch.append(from_windows("ours: step", w["ours"], flops, peak, batch_size=batch_size, **extra))
            if paired:
                results["reference_step"] = ref.measurement("reference: step", w["reference"], True)
                results["reference_step"].extra["model"] = "torchvision.models.alexnet"
            m = by_batch[-1]
            log.info(
                "ours step (%s, batch %d): %.1f images/s, MFU %s", bc.model, batch_size, m.images_per_s, pct(m.mfu)
            )
        results["ours_step"] = next(m for m in by_batch if m.extra["batch_size"] == bc.batch_size)
        part_done()

        # 3. End to end, ours and the reference's in turn (the reference drained before each window).
        e2e_arm, ours_batches = _ours_end_to_end_arm(split, step, bc, device)
        w = _paired(bc, device, {"ours": e2e_arm, **({"reference": ref.end_to_end} if ref else {})})
        ours_batches.close()
        like = results["ours_step"]
        results["ours_end_to_end"] = from_windows("ours: end to end", w["ours"], like.flops_per_image, peak)
        if ref:
            results["reference_end_to_end"] = ref.measurement("reference: end to end", w["reference"], True)
        part_done()
    finally:
        if ref is not None:
            ref.close()
    results.update(_variants(bc, options, classes, pre, device))
    part_done()
    best = max(by_batch, key=lambda m: m.images_per_s)
    return summarise(bc, device, options, report.as_dict(), store_path, results, best, by_batch)
