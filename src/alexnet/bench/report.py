"""A benchmark run's results: the JSON record ``alexnet bench --json`` writes, and the table it prints.

Beside the measurements the record holds what they mean: the ratios to the reference,
the targets this project set itself (each True, False, or None where not measured) and
the hours 90 epochs of ImageNet would take at the measured end-to-end rate.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from alexnet.bench.measure import BenchConfig, Measurement
from alexnet.config import SpeedConfig
from alexnet.runtime import environment
from alexnet.train.step import StepOptions

IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012 training set
PAPER_EPOCHS = 90


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ratios(results: dict[str, Measurement]) -> dict[str, float]:
    """Ours over the reference for each measurement both sides have, and the same network's step."""
    ratios: dict[str, float] = {}
    for what in ("data", "step", "end_to_end"):
        ours, ref = results.get(f"ours_{what}"), results.get(f"reference_{what}")
        if ours and ref:
            ratios[what] = ours.images_per_s / ref.images_per_s
    if "ours_step_torchvision_arch" in results and "reference_step" in results:
        ratios["step_same_network"] = (
            results["ours_step_torchvision_arch"].images_per_s / results["reference_step"].images_per_s
        )
    return ratios


def _targets(results: dict[str, Measurement], ratios: dict[str, float], best: Measurement) -> dict[str, Any]:
    e2e, step = results["ours_end_to_end"].images_per_s, results["ours_step"].images_per_s
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
    return targets


def summarise(
    bc: BenchConfig,
    device: torch.device,
    options: StepOptions,
    prepare_report: dict[str, Any],
    store_path: Path,
    results: dict[str, Measurement],
    best: Measurement,
    steps_by_batch: list[Measurement],
) -> dict[str, Any]:
    """The JSON-ready record of one run."""
    out: dict[str, Any] = {
        "environment": environment(device),
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
    ratios = _ratios(results)
    out["ratios_to_reference"] = ratios
    e2e, step = results["ours_end_to_end"].images_per_s, results["ours_step"].images_per_s
    out["end_to_end_over_step"] = e2e / step
    out["data_over_step"] = results["ours_data"].images_per_s / step
    out["projected_paper_training_hours"] = PAPER_EPOCHS * IMAGENET_TRAIN_IMAGES / e2e / 3600
    out["targets"] = _targets(results, ratios, best)
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
            f"{m['name']:42s}{m['images_per_s']:12.1f}{'' if ratio is None else f'{ratio:.2f}x':>13s}{pct(m['mfu']):>8s}"
        )
    best = result["best_model_step"]
    lines.append(
        f"best model step: batch {best['batch_size']}, {best['images_per_s']:.1f} images/s, MFU {pct(best['mfu'])}"
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
