"""``alexnet experiment ablations``: the components the paper credits, removed one at a time.

A CIFAR-scale version of the paper's network (:func:`ablation_model_options`: the same
eight layers, two towers, LRN, overlapping pooling and dropout, sized for 32x32 images)
trained with each component the paper credits removed in turn, over several seeds; test
top-1 error mean and standard deviation next to the effect the paper claims.

Training is :func:`alexnet.train.memory.fit`, test errors come from evaluate.py; the run
directory is :class:`~alexnet.experiments.common.RunDir`; the figure and summary.md are
drawn by :mod:`~alexnet.experiments.ablation_report`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from alexnet.data.augment import Preprocess
from alexnet.data.cifar import ArraySplit
from alexnet.data.stats import DataStats
from alexnet.errors import AlexNetError
from alexnet.experiments.ablation_report import ablation_markdown, plot_ablations
from alexnet.experiments.common import (
    Experiment,
    RunDir,
    check_at_least_one,
    check_counts,
    evaluate_split,
    fit_group,
    make_pre,
    mean_std,
    split_stats,
    verdict,
)
from alexnet.models.alexnet import count_parameters, create_model
from alexnet.train.memory import FitResult, Recipe, fit

log = logging.getLogger("alexnet")


@dataclass(frozen=True)
class Variant:
    what: str  # the change from the baseline
    paper: str  # the paper's claim about the component
    paper_top1: float | None  # claimed top-1 error added by removing it (ImageNet, points)
    model: dict[str, Any] = field(default_factory=dict)  # model options replaced
    half_width: bool = False  # halve the conv widths (the paper's one-GPU comparison net)
    lighting: bool = True


VARIANTS: dict[str, Variant] = {
    "baseline": Variant("everything on: LRN, 3/2 pooling, dropout, PCA lighting, two towers, five convs", "-", None),
    "no-lrn": Variant(
        "no local response normalisation",
        "LRN lowers top-1 by 1.4 (ImageNet); a four-layer CIFAR-10 net: 13% -> 11% test error",
        1.4,
        {"lrn": "none"},
    ),
    "non-overlap-pool": Variant(
        "2x2 stride-2 pooling instead of 3x3 stride 2",
        "overlapping pooling lowers top-1 by 0.4",
        0.4,
        {"pooling": "non-overlap"},
    ),
    "no-dropout": Variant(
        "dropout 0 in fc6 and fc7", "without dropout the net overfits substantially (no number)", None, {"dropout": 0.0}
    ),
    "no-pca-lighting": Variant(
        "no PCA colour augmentation", "PCA lighting lowers top-1 by over 1", 1.0, lighting=False
    ),
    "one-tower-half": Variant(
        "one tower with half the kernels in every conv layer",
        "two towers lower top-1 by 1.7 against one GPU with half the kernels",
        1.7,
        {"towers": 1},
        half_width=True,
    ),
    "one-tower": Variant(
        "one tower, same kernel counts (conv2/4/5 see all maps)",
        "not in the paper: grouping alone",
        None,
        {"towers": 1},
    ),
    # Section 1: "removing any of the middle convolutional layers (each of which contains no
    # more than 1% of the model's parameters) results in a loss of about 2% for the top-1".
    # conv2's removal keeps pool2 (models/alexnet.py), so every removal changes depth only.
    **{
        f"no-conv{i}": Variant(
            f"conv{i} removed" + (" (with LRN2; pool2 stays)" if i == 2 else ""),
            "removing any middle conv layer costs about 2 top-1",
            2.0,
            {"remove_conv": i},
        )
        for i in (2, 3, 4, 5)
    },
}
TEN_PATCH_CLAIM = "ten patches lower top-1 from 39.0 to 37.5 (ILSVRC-2010 test)"


@dataclass
class AblationSettings:
    subset: int = 0  # training images (balanced); 0: all 50,000
    test_subset: int = 0  # test images; 0: all 10,000
    epochs: int = 30
    seeds: int = 3
    width: float = 0.5  # conv widths 48-128-192-192-128 (the paper's x 0.5)
    fc_width: int = 1024
    lr: float = 0.01  # the paper's
    batch_size: int = 128
    variants: tuple[str, ...] = tuple(VARIANTS)

    def __post_init__(self) -> None:
        check_at_least_one(self, ("epochs", "seeds", "batch_size", "fc_width"))
        check_counts(self, ("subset", "test_subset"))
        if self.lr <= 0:
            raise AlexNetError(f"--lr must be positive; got {self.lr}")
        if not 0 < self.width <= 4:
            raise AlexNetError(f"--width must be in (0, 4]; got {self.width}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise AlexNetError(
                f"unknown ablation variant(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}"
            )


REDUCED_ABLATIONS = AblationSettings(subset=500, test_subset=500, epochs=2, seeds=1, width=0.125, fc_width=128)


def ablation_model_options(settings: AblationSettings, variant: Variant) -> dict[str, Any]:
    """The paper's network sized for CIFAR-10, with the variant's change.

    32x32 images stand for the paper's 256x256 and random 28x28 patches for its 224x224
    (28/32 = 224/256, so crops, reflections and the ten test patches keep their
    proportions). conv1 is 5x5 stride 1 instead of 11x11 stride 4: at 28 pixels a
    stride-4 conv would leave 7x7 maps and nothing after three poolings; 5x5/1 leaves
    28 -> 13 -> 6 -> 2 through the three 3/2 poolings (non-overlapping: 14 -> 7 -> 3).
    Everything else is the paper's: eight layers, two towers as grouped convolutions,
    LRN with the paper's constants after conv1 and conv2, dropout 0.5 in fc6 and fc7.
    He initialisation on unit-scale input (the README's reason: the paper's N(0, 0.01)
    with biases of 1 stalls in short schedules).
    """
    options: dict[str, Any] = {
        "activation": "relu",
        "lrn": "paper",
        "pooling": "overlap",
        "towers": 2,
        "dropout": 0.5,
        "init": "kaiming",
        "width": settings.width,
        "fc_width": settings.fc_width,
        "conv1_kernel": 5,
        "conv1_stride": 1,
        "conv1_padding": 2,
        "input_size": 28,
    }
    options.update(variant.model)
    if variant.half_width:
        options["width"] = settings.width / 2
    return options


def ablation_recipe(settings: AblationSettings, variant: Variant) -> Recipe:
    # Weight decay 5e-4, momentum 0.9, batch 128, lr 0.01: the paper's. The paper divides
    # lr by 10 on validation plateaus; a fixed schedule (at 50% and 75% of the run) needs no
    # held-out split and treats every variant alike.
    return Recipe(
        epochs=settings.epochs,
        lr=settings.lr,
        batch_size=settings.batch_size,
        weight_decay=5e-4,
        lr_drops=(0.5, 0.75),
        crop_size=28,
        flip=True,
        lighting_std=0.1 if variant.lighting else 0.0,
    )


@dataclass(frozen=True)
class AblationJob:
    variant: str
    seed: int


def ablation_run(
    job: AblationJob,
    train: ArraySplit,
    test: ArraySplit,
    stats: DataStats,
    settings: AblationSettings,
    *,
    device: torch.device,
    on_row: Callable[[dict[str, float]], None],
) -> dict[str, Any]:
    """Train one variant with one seed and test it (module level, so worker processes can run it)."""
    recipe = ablation_recipe(settings, VARIANTS[job.variant])
    pre = make_pre(stats, recipe).to(device)
    model = ablation_model(job, len(train.classes), settings, device)
    r = fit(model, train, pre, recipe, seed=job.seed, device=device, on_row=on_row)
    return _ablation_result(job, model, r, pre, test, device)


def ablation_group_run(
    jobs: dict[str, AblationJob],
    train: ArraySplit,
    test: ArraySplit,
    stats: DataStats,
    settings: AblationSettings,
    *,
    device: torch.device,
    on_rows: dict[str, Callable[[dict[str, float]], None]],
) -> dict[str, dict[str, Any]]:
    """The seeds of one variant trained together (experiments/batched.py), each tested alone."""
    recipe = ablation_recipe(settings, VARIANTS[next(iter(jobs.values())).variant])
    pre = make_pre(stats, recipe).to(device)
    return fit_group(
        jobs,
        lambda job: ablation_model(job, len(train.classes), settings, device),
        train,
        pre,
        recipe,
        lambda job, model, r: _ablation_result(job, model, r, pre, test, device),
        device=device,
        on_rows=on_rows,
    )


def ablation_model(job: AblationJob, classes: int, settings: AblationSettings, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(job.seed)  # the run's initial weights
    return create_model("paper", classes, **ablation_model_options(settings, VARIANTS[job.variant])).to(device)


def _ablation_result(
    job: AblationJob, model: torch.nn.Module, r: FitResult, pre: Preprocess, test: ArraySplit, device: torch.device
) -> dict[str, Any]:
    name = job.variant
    if r.diverged:
        raise AlexNetError(f"{name} seed {job.seed} diverged (loss {r.rows[-1]['train_loss']}); lower --lr")
    errors = evaluate_split(model, pre, test, device, ten=name == "baseline")
    out = {
        "variant": name,
        "seed": job.seed,
        "parameters": count_parameters(model),
        "final_train_error": r.final_train_error,
        "test_top1_error": errors["centre"].top1_error,
        "test_top5_error": errors["centre"].top5_error,
        "test_images": errors["centre"].images,
        "seconds": r.seconds,
        "images_per_s": r.images / r.seconds if r.seconds else math.nan,
    }
    if "ten_patches" in errors:
        out["ten_top1_error"] = errors["ten_patches"].top1_error
        out["ten_top5_error"] = errors["ten_patches"].top5_error
    log.info("  %s seed %d: test top-1 error %.2f%%", name, job.seed, 100 * out["test_top1_error"])
    return out


def ablations(
    train: ArraySplit,
    test: ArraySplit,
    settings: AblationSettings,
    device: torch.device,
    run: RunDir,
    workers: int = 1,
    batch: bool = False,
) -> dict[str, Any]:
    """The ablation experiment; returns the summary (also written to the run directory).
    The settings checked their variants when made (:class:`AblationSettings`). ``batch``:
    each variant's seeds train together in one process (:func:`ablation_group_run`)."""
    train, test = train.subset(settings.subset), test.subset(settings.test_subset)
    jobs = {f"{v}-seed{seed}": AblationJob(v, seed) for v in settings.variants for seed in range(settings.seeds)}
    shared = (train, test, split_stats(train), settings)
    if batch:
        groups = {v: {n: j for n, j in jobs.items() if j.variant == v} for v in settings.variants}
        done = run.run_groups(ablation_group_run, shared, groups, device, workers)
    else:
        done = run.run_all(ablation_run, shared, jobs, device, workers)
    results = {v: [done[f"{v}-seed{seed}"] for seed in range(settings.seeds)] for v in settings.variants}
    summary = _ablation_summary(settings, train, test, results, run)
    plot_ablations(summary, run.out / "ablations.png")
    run.write_summary(summary, ablation_markdown(summary))
    return summary


def _ablation_summary(
    settings: AblationSettings, train: ArraySplit, test: ArraySplit, results: dict[str, list[dict]], run: RunDir
) -> dict[str, Any]:
    rows = []
    base = results.get("baseline")
    base_errs = [r["test_top1_error"] for r in base] if base else []
    b_mean, b_std = mean_std(base_errs)
    for name, runs in results.items():
        errs = [r["test_top1_error"] for r in runs]
        mean, std = mean_std(errs)
        row: dict[str, Any] = {
            "variant": name,
            "what": VARIANTS[name].what,
            "paper": VARIANTS[name].paper,
            "paper_top1_effect": VARIANTS[name].paper_top1,
            "seeds": len(runs),
            "test_top1_errors": errs,
            "mean": mean,
            "std": std,
            "final_train_error_mean": statistics.fmean(r["final_train_error"] for r in runs),
            "parameters": runs[0]["parameters"],
        }
        if name != "baseline" and base:
            effect = mean - b_mean  # points of error the component is worth (removing it adds this)
            se = math.sqrt(std**2 / len(errs) + b_std**2 / len(base_errs))  # std nan for one seed
            row.update(
                effect=effect,
                effect_se=se,
                reproduced=verdict(
                    effect,
                    se,
                    min(len(errs), len(base_errs)),
                    VARIANTS[name].paper_top1 is not None or name == "no-dropout",
                ),
            )
        rows.append(row)
    if base and "ten_top1_error" in base[0]:
        rows.append(_ten_patch_row(base))
    return {
        "experiment": "ablations",
        "training_images": len(train),
        "test_images": len(test),
        "settings": dataclasses.asdict(settings),
        "environment": run.environment(),
        "rows": rows,
    }


def _ten_patch_row(base: list[dict]) -> dict[str, Any]:
    """The baseline tested on the centre patch against the ten patches (the paper's test-time averaging)."""
    base_errs = [r["test_top1_error"] for r in base]
    b_mean, b_std = mean_std(base_errs)
    # Paired by seed: the same trained net tested both ways.
    diffs = [r["test_top1_error"] - r["ten_top1_error"] for r in base]
    d_mean, d_std = mean_std(diffs)
    d_se = d_std / math.sqrt(len(diffs))  # nan for one seed
    tens = [r["ten_top1_error"] for r in base]
    t_mean, t_std = mean_std(tens)
    return {
        "variant": "baseline, centre patch only",
        "what": "baseline tested on the centre 28x28 patch only, not the ten patches",
        "paper": TEN_PATCH_CLAIM,
        "paper_top1_effect": 1.5,
        "seeds": len(base),
        "test_top1_errors": base_errs,
        "mean": b_mean,
        "std": b_std,
        "ten_patch_errors": tens,
        "ten_patch_mean": t_mean,
        "ten_patch_std": t_std,
        "effect": d_mean,
        "effect_se": d_se,
        "reproduced": verdict(d_mean, d_se, len(diffs), True),
        "final_train_error_mean": statistics.fmean(r["final_train_error"] for r in base),
        "parameters": base[0]["parameters"],
    }


EXPERIMENT = Experiment("ablations", AblationSettings, AblationSettings(), REDUCED_ABLATIONS, ablations)
