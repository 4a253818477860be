"""train/memory.py: the in-memory training loop of the experiments, on tiny CIFAR-like splits."""

from __future__ import annotations

import math

import pytest
import torch

from alexnet.experiments.common import make_pre, split_stats
from alexnet.models.figure1 import Figure1Net
from alexnet.train.memory import Recipe, fit, lr_at
from conftest import make_split


def test_lr_schedule_hand_computed() -> None:
    r = Recipe(epochs=8, lr=0.01, lr_drops=(0.5, 0.75))
    assert [lr_at(r, e) for e in range(8)] == pytest.approx([0.01] * 4 + [0.001] * 2 + [0.0001] * 2)
    assert lr_at(Recipe(epochs=3, lr=0.1), 2) == 0.1


def test_fit_learns_records_windows_and_is_repeatable() -> None:
    train = make_split(32)  # 64 images, 2 classes: 8 batches of 8
    recipe = Recipe(epochs=3, lr=0.01, batch_size=8, windows_per_epoch=4)
    pre = make_pre(split_stats(train), recipe)

    def run() -> list[dict]:
        torch.manual_seed(0)
        return fit(Figure1Net("relu", 2), train, pre, recipe, seed=0, device=torch.device("cpu")).rows

    rows = run()
    # 8 batches per epoch allow one window of >= 8 batches: one row per epoch.
    assert [r["epoch"] for r in rows] == [1.0, 2.0, 3.0]
    assert rows[-1]["train_error"] < 0.1 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert [(r["train_loss"], r["train_error"]) for r in run()] == [(r["train_loss"], r["train_error"]) for r in rows]


def test_fit_stops_at_target_error() -> None:
    train = make_split(64)
    recipe = Recipe(epochs=20, lr=0.01, batch_size=16, stop_at_error=0.2)
    pre = make_pre(split_stats(train), recipe)
    torch.manual_seed(0)
    result = fit(Figure1Net("relu", 2), train, pre, recipe, seed=0, device=torch.device("cpu"))
    assert result.rows[-1]["train_error"] <= 0.2 and len(result.rows) < 20
    assert result.images == 128 * len(result.rows) and not result.diverged


def test_fit_reports_divergence_instead_of_raising() -> None:
    train = make_split(32)
    recipe = Recipe(epochs=5, lr=1e6, batch_size=16)
    pre = make_pre(split_stats(train), recipe)
    torch.manual_seed(0)
    result = fit(Figure1Net("relu", 2), train, pre, recipe, seed=0, device=torch.device("cpu"))
    assert result.diverged and not math.isfinite(result.rows[-1]["train_loss"]) and len(result.rows) < 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_matches_the_cpu_schedule() -> None:
    # The same recipe on the GPU: data, generator and batches live on the device.
    train = make_split(32)
    recipe = Recipe(epochs=2, lr=0.01, batch_size=8, flip=True, lighting_std=0.1)
    pre = make_pre(split_stats(train), recipe).to("cuda")
    torch.manual_seed(0)
    result = fit(Figure1Net("relu", 2).cuda(), train, pre, recipe, seed=0, device=torch.device("cuda"))
    assert [r["epoch"] for r in result.rows] == [1.0, 2.0] and not result.diverged
    assert result.images == 128
