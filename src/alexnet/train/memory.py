"""The in-memory training loop of the CIFAR-10 experiments (:mod:`alexnet.experiments`).

CIFAR-10 is 184 MB of uint8 (data/cifar.py), copied once to the device, and each batch is
an index gather followed by augment.py's batched crops, reflections and lighting. The
step itself is step.py's :class:`~alexnet.train.step.TrainStep` (fp32, eager) with the
paper's :class:`~alexnet.train.optim.PaperSGD`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from alexnet.config import OptimConfig
from alexnet.data.augment import Preprocess, train_batch
from alexnet.data.cifar import ArraySplit
from alexnet.train.optim import PaperSGD, param_groups
from alexnet.train.step import StepOptions, TrainStep

log = logging.getLogger("alexnet")


@dataclass
class Recipe:
    """What one training run does; the paper's optimiser with the run's own settings.

    ``epochs``, ``lr``, ``batch_size``, ``momentum`` and ``weight_decay`` mean what the
    fields of those names in :class:`~alexnet.config.OptimConfig` mean (one process, so
    the batch is the global batch; lr per batch inside PaperSGD's velocity; every weight
    decayed, biases included, as ``OptimConfig.decay_biases``), and batch size and momentum
    take its defaults. Two differ on purpose: ``weight_decay`` defaults to 0 (the Figure 1
    runs use no regularisation), and ``lr_drops`` here are fixed fractions of the run, not
    OptimConfig's count of drops on validation plateaus (the experiments hold out no split).
    """

    epochs: int
    lr: float
    batch_size: int = OptimConfig.batch_size
    momentum: float = OptimConfig.momentum
    weight_decay: float = 0.0
    lr_drops: tuple[float, ...] = ()  # fractions of the run after which lr is divided by 10
    crop_size: int = 32  # random patches of the 32x32 images; 32 means no cropping
    flip: bool = False
    lighting_std: float = 0.0  # PCA lighting alphas ~ N(0, lighting_std); 0: off
    normalize: str = "mean-image-std"  # mean image subtracted, then unit scale for He init
    windows_per_epoch: int = 1  # training error is recorded this many times per epoch
    stop_at_error: float = 0.0  # stop once a window's training error is at most this; 0: never


def lr_at(recipe: Recipe, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based) under the fixed step schedule."""
    drops = sum(epoch >= round(f * recipe.epochs) for f in recipe.lr_drops)
    return recipe.lr * 0.1**drops


@dataclass
class FitResult:
    rows: list[dict[str, float]]  # one per window: epoch (fractional), train_loss, train_error, lr, seconds
    diverged: bool  # the loss became inf or nan; the run stopped there
    seconds: float
    images: int  # images trained on

    @property
    def final_train_error(self) -> float:
        return self.rows[-1]["train_error"] if self.rows else math.nan


def fit(
    model: nn.Module,
    train: ArraySplit,
    pre: Preprocess,
    recipe: Recipe,
    *,
    seed: int,
    device: torch.device,
    on_row: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``train`` (held on ``device`` as uint8) with the paper's SGD.

    The training error of a window is the online error: the fraction of the window's
    images the model misclassified in the forward pass that preceded each update, as the
    paper's Figure 1 and cuda-convnet report it. One host synchronisation per window.
    """
    images, labels = train.images.to(device), train.labels.to(device)
    n = len(train)
    steps = math.ceil(n / recipe.batch_size)
    # A window spans at least 8 batches (1,024 images at 128), so its error is measured to
    # about +-1.4 points (binomial std at 25%); fewer windows on small subsets.
    windows = max(1, min(recipe.windows_per_epoch, steps // 8))
    bounds = [round(steps * (w + 1) / windows) for w in range(windows)]
    optimizer = PaperSGD(
        param_groups(model, recipe.weight_decay, decay_biases=OptimConfig.decay_biases),
        lr=recipe.lr,
        momentum=recipe.momentum,
    )
    # fp32 eager, the same on every device, so CPU and GPU runs compare.
    stepper = TrainStep(model, optimizer, pre, StepOptions("off", False, False, "grouped"), device)
    gen = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks
    rows: list[dict[str, float]] = []
    start, seen_total = time.perf_counter(), 0
    for epoch in range(recipe.epochs):
        lr = lr_at(recipe, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        order = torch.randperm(n, generator=gen, device=device)
        for w, end in enumerate(bounds):
            loss_sum = torch.zeros((), device=device)
            wrong = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            for step in range(bounds[w - 1] if w else 0, end):
                idx = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
                x = train_batch(images[idx], pre, flip=recipe.flip, lighting_std=recipe.lighting_std, generator=gen)
                batch_loss, batch_wrong = stepper.model_step(x, labels[idx])
                loss_sum += batch_loss * len(idx)
                wrong += batch_wrong
                seen += len(idx)
            seen_total += seen
            row = {
                "epoch": epoch + (w + 1) / windows,
                "train_loss": loss_sum.item() / seen,
                "train_error": wrong.item() / seen,
                "lr": lr,
                "seconds": time.perf_counter() - start,
            }
            rows.append(row)
            if on_row is not None:
                on_row(row)
            if not math.isfinite(row["train_loss"]):
                return FitResult(rows, True, time.perf_counter() - start, seen_total)
            if recipe.stop_at_error and row["train_error"] <= recipe.stop_at_error:
                return FitResult(rows, False, time.perf_counter() - start, seen_total)
        log.info(
            "  epoch %d/%d  loss %.4f  train err %.2f%%  lr %.2g  %.0f img/s",
            epoch + 1,
            recipe.epochs,
            rows[-1]["train_loss"],
            100 * rows[-1]["train_error"],
            lr,
            seen_total / (time.perf_counter() - start),
        )
    return FitResult(rows, False, time.perf_counter() - start, seen_total)
