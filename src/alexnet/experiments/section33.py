"""``alexnet experiment cifar-norm``: section 3.3's CIFAR-10 claim about response normalisation.

"On the CIFAR-10 dataset, a four-layer CNN achieved a 13% test error rate without
normalization and 11% with normalization." The network is cuda-convnet's CIFAR-10 example
(:class:`~alexnet.models.cifar_convnet.CudaConvnetCifar`: ``layers-conv-local-13pct.cfg``
and ``-11pct.cfg``), trained with and without its cross-map response normalisation over
several seeds, on 24x24 crops with reflections as cuda-convnet's ``cifar-cropped`` provider,
tested on the centre crop and on the ten patches (cuda-convnet's ``--multiview-test``).

Departures from cuda-convnet's methodology (``layer-params-conv-local-11pct.cfg``): one
learning rate and weight decay for all layers where the file gives biases twice the weights'
rate and no decay on the convolutions, and a fixed schedule of ``epochs`` (lr / 10 at 50% and
75%) where the file trains about 470 epochs with hand-made drops on a held-out batch.

Training is :func:`alexnet.train.memory.fit` (or experiments/batched.py with
``--batch-seeds``); the run directory is :class:`~alexnet.experiments.common.RunDir`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from alexnet.data.cifar import ArraySplit
from alexnet.data.stats import DataStats
from alexnet.errors import AlexNetError
from alexnet.experiments.common import (
    Experiment,
    RunDir,
    check_at_least_one,
    check_counts,
    device_line,
    evaluate_split,
    fit_group,
    make_pre,
    mean_std,
    pct,
    split_stats,
    verdict,
)
from alexnet.models.alexnet import count_parameters
from alexnet.models.cifar_convnet import CudaConvnetCifar
from alexnet.train.memory import FitResult, Recipe, fit

log = logging.getLogger("alexnet")

CLAIM = "section 3.3: a four-layer CNN reached 13% CIFAR-10 test error without normalisation and 11% with"
NORMS = {"with-norm": "cross-map", "without-norm": "none"}  # run name -> CudaConvnetCifar(norm=...)


@dataclass
class NormSettings:
    subset: int = 0  # training images (balanced); 0: all 50,000
    test_subset: int = 0  # test images; 0: all 10,000
    epochs: int = 60
    seeds: int = 3
    lr: float = 0.01  # per batch of 128 (PaperSGD); cuda-convnet's epsW 0.001 is for ~470 epochs
    weight_decay: float = 0.004  # cuda-convnet's wc of local3, local4 and fc10
    batch_size: int = 128

    def __post_init__(self) -> None:
        check_at_least_one(self, ("epochs", "seeds", "batch_size"))
        check_counts(self, ("subset", "test_subset"))
        if self.lr <= 0:
            raise AlexNetError(f"--lr must be positive; got {self.lr}")


REDUCED_NORM = NormSettings(subset=500, test_subset=500, epochs=2, seeds=1)


def norm_recipe(settings: NormSettings) -> Recipe:
    return Recipe(
        epochs=settings.epochs,
        lr=settings.lr,
        batch_size=settings.batch_size,
        weight_decay=settings.weight_decay,
        lr_drops=(0.5, 0.75),
        crop_size=24,  # cuda-convnet's --crop-border=4 on 32x32
        flip=True,
        normalize="mean-image",  # cuda-convnet subtracted the mean image from raw pixels
    )


@dataclass(frozen=True)
class NormJob:
    variant: str  # a key of NORMS
    seed: int


def _model(job: NormJob, classes: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(job.seed)
    return CudaConvnetCifar(NORMS[job.variant], classes).to(device)


def _result(
    job: NormJob, model: torch.nn.Module, r: FitResult, pre: Any, test: ArraySplit, device: torch.device
) -> dict:
    if r.diverged:
        raise AlexNetError(f"{job.variant} seed {job.seed} diverged (loss {r.rows[-1]['train_loss']}); lower --lr")
    errors = evaluate_split(model, pre, test, device, ten=True)
    log.info("  %s seed %d: test top-1 error %.2f%%", job.variant, job.seed, 100 * errors["centre"].top1_error)
    return {
        "variant": job.variant,
        "seed": job.seed,
        "parameters": count_parameters(model),
        "final_train_error": r.final_train_error,
        "test_top1_error": errors["centre"].top1_error,
        "ten_top1_error": errors["ten_patches"].top1_error,
        "test_images": errors["centre"].images,
        "seconds": r.seconds,
        "images_per_s": r.images / r.seconds if r.seconds else math.nan,
    }


def norm_run(
    job: NormJob,
    train: ArraySplit,
    test: ArraySplit,
    stats: DataStats,
    settings: NormSettings,
    *,
    device: torch.device,
    on_row: Callable[[dict[str, float]], None],
) -> dict[str, Any]:
    """One variant, one seed (module level, so worker processes can run it)."""
    recipe = norm_recipe(settings)
    pre = make_pre(stats, recipe).to(device)
    model = _model(job, len(train.classes), device)
    r = fit(model, train, pre, recipe, seed=job.seed, device=device, on_row=on_row)
    return _result(job, model, r, pre, test, device)


def norm_group_run(
    jobs: dict[str, NormJob],
    train: ArraySplit,
    test: ArraySplit,
    stats: DataStats,
    settings: NormSettings,
    *,
    device: torch.device,
    on_rows: dict[str, Callable[[dict[str, float]], None]],
) -> dict[str, dict[str, Any]]:
    """One variant's seeds trained together (experiments/batched.py)."""
    recipe = norm_recipe(settings)
    pre = make_pre(stats, recipe).to(device)
    return fit_group(
        jobs,
        lambda job: _model(job, len(train.classes), device),
        train,
        pre,
        recipe,
        lambda job, model, r: _result(job, model, r, pre, test, device),
        device=device,
        on_rows=on_rows,
    )


def cifar_norm(
    train: ArraySplit,
    test: ArraySplit,
    settings: NormSettings,
    device: torch.device,
    run: RunDir,
    workers: int = 1,
    batch: bool = False,
) -> dict[str, Any]:
    """The experiment; returns the summary (also written to the run directory)."""
    train, test = train.subset(settings.subset), test.subset(settings.test_subset)
    shared = (train, test, split_stats(train), settings)
    groups = {v: {f"{v}-seed{s}": NormJob(v, s) for s in range(settings.seeds)} for v in NORMS}
    if batch:
        done = run.run_groups(norm_group_run, shared, groups, device, workers)
    else:
        jobs = {n: j for g in groups.values() for n, j in g.items()}
        done = run.run_all(norm_run, shared, jobs, device, workers)
    rows = {}
    for v in NORMS:
        runs = [done[f"{v}-seed{s}"] for s in range(settings.seeds)]
        for key in ("test_top1_error", "ten_top1_error"):
            mean, std = mean_std([r[key] for r in runs])
            rows.setdefault(v, {"variant": v, "parameters": runs[0]["parameters"]})[key] = {
                "per_seed": [r[key] for r in runs],
                "mean": mean,
                "std": std,
            }
        rows[v]["final_train_error_mean"] = sum(r["final_train_error"] for r in runs) / len(runs)
    w, wo = rows["with-norm"]["ten_top1_error"], rows["without-norm"]["ten_top1_error"]
    effect = wo["mean"] - w["mean"]  # points normalisation is worth (paper: 2)
    n = settings.seeds
    se = math.sqrt((w["std"] ** 2 + wo["std"] ** 2) / n) if n > 1 else math.nan
    summary = {
        "experiment": "cifar-norm",
        "claim": CLAIM,
        "paper": {"without-norm": 0.13, "with-norm": 0.11},
        "training_images": len(train),
        "test_images": len(test),
        "settings": dataclasses.asdict(settings),
        "environment": run.environment(),
        "rows": list(rows.values()),
        "effect": effect,
        "effect_se": se,
        "reproduced": verdict(effect, se, n, True),
    }
    run.write_summary(summary, _markdown(summary))
    return summary


def _markdown(s: dict[str, Any]) -> str:
    env, st = s["environment"], s["settings"]
    lines = [
        "# Section 3.3 on CIFAR-10: response normalisation in cuda-convnet's four-layer net",
        "",
        f"{s['claim']}.",
        "",
        f"Command: `{env['command']}`  ",
        device_line(env),
        f"{s['training_images']:,} training images, {s['test_images']:,} test images, {st['epochs']} epochs, "
        f"batch {st['batch_size']}, lr {st['lr']:g}, weight decay {st['weight_decay']:g}, {st['seeds']} seed(s).",
        "",
        "| net | paper's test error % | test top-1 error %, ten patches (mean +- std) | centre patch | "
        "train error, last epoch | parameters |",
        "|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        ten, centre = r["ten_top1_error"], r["test_top1_error"]
        lines.append(
            f"| {r['variant']} | {100 * s['paper'][r['variant']]:.0f} | {pct(ten['mean'])} +- {pct(ten['std'])} | "
            f"{pct(centre['mean'])} | {pct(r['final_train_error_mean'])} | {r['parameters']:,} |"
        )
    lines += [
        "",
        f"Effect of normalisation (without minus with, ten patches): {100 * s['effect']:+.2f} +- "
        f"{pct(s['effect_se'])} points (paper: +2). Reproduced: {s['reproduced']}.",
    ]
    return "\n".join(lines) + "\n"


EXPERIMENT = Experiment("cifar-norm", NormSettings, NormSettings(), REDUCED_NORM, cifar_norm)
