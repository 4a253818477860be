"""experiments/batched.py: K seeds trained together against the same runs trained one at a time by fit."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from alexnet.cli import main
from alexnet.errors import AlexNetError
from alexnet.experiments.ablations import VARIANTS, AblationSettings, ablation_model_options, ablation_recipe
from alexnet.experiments.batched import _dropout_specs, _masks, fit_batched
from alexnet.experiments.common import make_pre, split_stats
from alexnet.models.alexnet import Dropout, create_model
from alexnet.models.figure1 import Figure1Net
from alexnet.train.memory import Recipe, fit
from conftest import make_split

CPU = torch.device("cpu")
SMALL = AblationSettings(width=0.125, fc_width=32, batch_size=16, epochs=2)


def _paper(variant: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("paper", 3, **ablation_model_options(SMALL, VARIANTS[variant]))


def _compare(make: Any, recipe: Recipe, seeds: list[int], n_per_class: int = 16) -> tuple[list, list, list, list]:
    """Rows and final weights of the runs alone (fit) and batched (fit_batched)."""
    train = make_split(n_per_class, classes=3)
    pre = make_pre(split_stats(train), recipe)
    init = [make(s) for s in seeds]
    alone, together = copy.deepcopy(init), copy.deepcopy(init)
    rows_alone = [fit(m, train, pre, recipe, seed=s, device=CPU).rows for m, s in zip(alone, seeds)]
    rows_together = [r.rows for r in fit_batched(together, train, pre, recipe, seeds=seeds, device=CPU)]
    return rows_alone, rows_together, [_drift(i, a, b) for i, a, b in zip(init, alone, together)], alone


@torch.no_grad()
def _drift(init: nn.Module, a: nn.Module, b: nn.Module) -> float:
    """The largest ||a - b|| / ||a - init|| over the parameter tensors: how far the batched
    run's weights are from the run alone's, relative to how far training moved them."""
    pairs = zip(init.parameters(), a.parameters(), b.parameters())
    return max(float((pa - pb).norm() / (pa - p0).norm()) for p0, pa, pb in pairs)


@pytest.mark.parametrize("variant", ["baseline", "no-dropout", "no-lrn", "one-tower-half"])
def test_batched_seeds_match_the_runs_alone(variant: str) -> None:
    # 48 images, batch 16, 2 epochs: 6 SGD steps of each of 3 seeds, LRN, two towers and dropout on.
    # Tolerance: the batched kernels (one grouped conv over the seeds, batched matmuls, LRN by
    # F.local_response_norm) differ from the runs alone by float32 rounding (eps 1.2e-7) in
    # every op, and SGD amplifies it step by step: measured (2026-12-02, this CPU) 6e-6 of the
    # weights' movement after 3 steps and 2-3e-4 after 6, for baseline and no-lrn. The bound
    # 2e-3 leaves room for other CPUs' kernels; a different random stream (another data order,
    # crop or dropout mask) moves the weights by a sizeable fraction of their movement (the
    # seeds' own weights differ by more than 0.5 of it, asserted below).
    recipe = ablation_recipe(SMALL, VARIANTS[variant])
    rows_a, rows_b, drift, alone = _compare(lambda s: _paper(variant, s), recipe, [0, 1, 2])
    for ra, rb in zip(rows_a, rows_b):
        assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb]
        assert [r["train_error"] for r in ra] == [r["train_error"] for r in rb]  # every prediction the same
        for x, y in zip(ra, rb):
            assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-5, abs=1e-6)
    assert max(drift) < 2e-3
    # Another seed's run is far outside the tolerance (the comparison can fail).
    assert _drift(_paper(variant, 0), alone[0], alone[1]) > 0.5


def test_batched_figure1_net_stops_each_run_at_its_target() -> None:
    # Figure 1's runs stop when their window error reaches the target; one run stopping
    # freezes its rows and weights while the others go on.
    recipe = Recipe(epochs=4, lr=0.01, batch_size=16, windows_per_epoch=1, stop_at_error=0.5)

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return Figure1Net("relu", 3)

    rows_a, rows_b, drift, _ = _compare(make, recipe, [0, 1])
    assert [len(r) for r in rows_a] == [len(r) for r in rows_b]
    assert len(rows_a[0]) != len(rows_a[1]) or len(rows_a[0]) < recipe.epochs  # at least one run stopped early
    for ra, rb in zip(rows_a, rows_b):
        assert [r["train_error"] for r in ra] == [r["train_error"] for r in rb]
    assert max(drift) < 2e-3


def test_masks_are_those_of_eager_dropout() -> None:
    # The mask drawn outside vmap is bit-identical to what nn.Dropout draws from the global
    # generator seeded the same way (aten's CPU _dropout_impl: bernoulli_(1 - p) / (1 - p)).
    model = nn.Sequential(nn.Linear(5, 7), nn.Dropout(0.5), nn.Linear(7, 7), nn.Dropout(0.25))
    specs = _dropout_specs(model, torch.zeros(2, 5))
    assert specs == [((7,), 0.5, True), ((7,), 0.25, True)]
    gens = [torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)]
    masks = _masks(specs, 6, gens, CPU)
    for k, seed in enumerate((3, 4)):
        torch.manual_seed(seed)
        ones = torch.ones(6, 7)
        assert torch.equal(nn.functional.dropout(ones, 0.5, True), masks[0][k])
        assert torch.equal(nn.functional.dropout(ones, 0.25, True), masks[1][k])


def test_masks_are_those_of_paper_style_dropout() -> None:
    # The paper net's Dropout (model.dropout_style=paper) draws the same Bernoulli mask and
    # does not scale it: the mask given to the batched step is 0s and 1s.
    model = nn.Sequential(nn.Linear(5, 7), Dropout(0.5, "paper"), nn.Linear(7, 7), Dropout(0.25, "inverted"))
    specs = _dropout_specs(model, torch.zeros(2, 5))
    assert specs == [((7,), 0.5, False), ((7,), 0.25, True)]
    masks = _masks(specs, 6, [torch.Generator().manual_seed(3)], CPU)
    torch.manual_seed(3)
    ones = torch.ones(6, 7)
    assert torch.equal(model[1].train()(ones), masks[0][0])
    assert torch.equal(model[3].train()(ones), masks[1][0])


def test_batched_refuses_mismatched_seeds() -> None:
    train = make_split(4, classes=2)
    recipe = Recipe(epochs=1, lr=0.01, batch_size=4)
    with pytest.raises(AlexNetError, match="one seed per model"):
        fit_batched([Figure1Net()], train, make_pre(split_stats(train), recipe), recipe, seeds=[0, 1], device=CPU)


def _runs(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}


def test_batch_seeds_end_to_end_matches_runs_alone_and_keeps_each_run(
    cifar_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["experiment", "ablations", "--data", str(cifar_tree), "--reduced", "--seeds", "2", "--device", "cpu"]
    argv += ["--variants", "baseline,no-dropout"]
    assert main([*argv, "--out", str(tmp_path / "alone")]) == 0
    assert main([*argv, "--out", str(tmp_path / "batched"), "--batch-seeds"]) == 0
    alone, batched = _runs(tmp_path / "alone"), _runs(tmp_path / "batched")
    assert set(alone) == set(batched) == {"baseline-seed0", "baseline-seed1", "no-dropout-seed0", "no-dropout-seed1"}
    for name, a in alone.items():
        b = batched[name]
        assert b["batched_runs"] == 2 and "batched_runs" not in a
        # The same predictions on the 40 test images: rounding (test above) moves no decision here.
        assert b["test_top1_error"] == a["test_top1_error"] and b["final_train_error"] == a["final_train_error"]
    # Each run's metric rows are kept under its own name; a rerun reuses every finished run.
    rows = [json.loads(line) for line in (tmp_path / "batched" / "metrics.jsonl").read_text().splitlines()]
    assert {r["run"] for r in rows} == set(batched)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "batched" / "runs").glob("*.json")}
    (tmp_path / "batched" / "runs" / "no-dropout-seed1.json").unlink()  # as if the call ended mid-group
    assert main([*argv, "--out", str(tmp_path / "batched"), "--batch-seeds"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "batched" / "runs").glob("*.json")}
    assert {n: t for n, t in after.items() if n != "no-dropout-seed1.json"} == {
        n: t for n, t in stamps.items() if n != "no-dropout-seed1.json"
    }
    assert _runs(tmp_path / "batched")["no-dropout-seed1"]["batched_runs"] == 1  # trained again, alone in its group
    capsys.readouterr()


# In the default run (about 27 s with a cold Inductor cache on 2 cores): the compiled path of the
# batched step is what GPUs run; on the CPU it is Inductor without CUDA graphs.
def test_the_compiled_batched_step_matches_the_eager_one(caplog: pytest.LogCaptureFixture) -> None:
    # The path CUDA takes (torch.compile of the vmapped step and of the update; CUDA graphs
    # only on CUDA), here on the CPU with Inductor's C++ backend: minutes to compile the first
    # time. It must not fall back to eager (no warning) and must train the same runs.
    from alexnet.train.step import compile_available

    if not compile_available():
        pytest.skip("torch.compile needs a C++ compiler here")
    recipe = ablation_recipe(SMALL, VARIANTS["baseline"])
    train = make_split(16, classes=3)
    pre = make_pre(split_stats(train), recipe)
    eager = [_paper("baseline", s) for s in (0, 1)]
    compiled = copy.deepcopy(eager)
    a = fit_batched(eager, train, pre, recipe, seeds=[0, 1], device=CPU, compile_step=False)
    with caplog.at_level("WARNING", logger="alexnet"):
        b = fit_batched(compiled, train, pre, recipe, seeds=[0, 1], device=CPU, compile_step=True)
    assert "continuing eager" not in caplog.text
    for ra, rb in zip(a, b):
        assert [r["train_error"] for r in ra.rows] == [r["train_error"] for r in rb.rows]
        for x, y in zip(ra.rows, rb.rows):
            assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-5)


def _runs_channels_last(k: int, shape: tuple[int, ...]) -> torch.Tensor:
    """K runs' (B, C, H, W) inputs in BatchedStep's CPU layout, (B, H, W, K, C) in memory."""
    from alexnet.experiments.batched import _channels_last

    x = torch.randn(k, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return _channels_last(x, weights=False).requires_grad_(True)


def _vmap_against_loop(fn: Any, x: torch.Tensor) -> None:
    """fn under vmap over the runs equals fn run by run: values, gradients, and without grad.
    To float64 rounding: the folded band convolution (K x C channels) sums in another order
    than a run's own; a window crossing runs would be off by ~0.1, not 1e-16."""
    tol = {"rtol": 1e-12, "atol": 1e-14}
    got = torch.func.vmap(fn)(x)
    want = torch.stack([fn(x[k]) for k in range(x.shape[0])])
    torch.testing.assert_close(got, want, **tol)
    g = torch.randn_like(want)
    (got_grad,) = torch.autograd.grad(got, x, g)
    (want_grad,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(got_grad, want_grad, **tol)
    with torch.no_grad():
        torch.testing.assert_close(torch.func.vmap(fn)(x), want.detach(), **tol)


@pytest.mark.parametrize("groups", [1, 2])
def test_lrn_vmap_rule_folds_runs_into_towers_without_crossing_them(groups: int) -> None:
    # The fold puts run k's channels next to run k+1's: a window that crossed a run's edge
    # would differ from the run alone at its first and last two channels.
    from alexnet.models.lrn import LocalResponseNorm

    lrn = LocalResponseNorm("paper", groups=groups)
    lrn.alpha = 0.5  # large, so every neighbour's square visibly moves the result
    _vmap_against_loop(lrn, _runs_channels_last(3, (4, 8, 5, 5)))


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_folded_max_pool_equals_the_pool_of_each_run(ceil_mode: bool) -> None:
    from alexnet.experiments.batched import _FoldedMaxPool

    pool = nn.MaxPool2d(3, stride=2, ceil_mode=ceil_mode)
    folded = _FoldedMaxPool(pool)
    x = _runs_channels_last(3, (4, 6, 12, 12))
    _vmap_against_loop(folded, x)
    torch.testing.assert_close(torch.func.vmap(folded)(x), torch.func.vmap(pool)(x), rtol=0, atol=0)
