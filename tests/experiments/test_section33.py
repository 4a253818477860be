"""experiments/section33.py (``alexnet experiment cifar-norm``): the reduced mode end to end, alone and batched."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alexnet.cli import main
from alexnet.experiments import REGISTRY


def test_cifar_norm_reduced_writes_the_table_alone_and_batched(
    cifar_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert "cifar-norm" in REGISTRY
    argv = ["experiment", "cifar-norm", "--data", str(cifar_tree), "--reduced", "--device", "cpu"]
    argv += ["--epochs", "1", "--subset", "60", "--test-subset", "20"]  # seconds: 6 runs of 60 images
    assert main([*argv, "--seeds", "1", "--out", str(tmp_path / "alone")]) == 0
    printed = capsys.readouterr().out
    assert "| with-norm | 11 |" in printed and "| without-norm | 13 |" in printed and "Reproduced:" in printed
    s = json.loads((tmp_path / "alone" / "summary.json").read_text())
    assert s["training_images"] == 60 and s["test_images"] == 20
    rows = {r["variant"]: r for r in s["rows"]}
    ten = {v: rows[v]["ten_top1_error"] for v in rows}
    assert ten["with-norm"]["mean"] == pytest.approx(np.mean(ten["with-norm"]["per_seed"]))
    assert s["effect"] == pytest.approx(ten["without-norm"]["mean"] - ten["with-norm"]["mean"])
    assert len(list((tmp_path / "alone" / "runs").glob("*.json"))) == 2

    # Seed 0 trained beside seed 1 is seed 0 trained alone.
    assert main([*argv, "--seeds", "2", "--out", str(tmp_path / "batched"), "--batch-seeds"]) == 0
    capsys.readouterr()
    for p in (tmp_path / "alone" / "runs").glob("*.json"):
        a, b = json.loads(p.read_text()), json.loads((tmp_path / "batched" / "runs" / p.name).read_text())
        assert b["batched_runs"] == 2
        assert b["test_top1_error"] == a["test_top1_error"] and b["final_train_error"] == a["final_train_error"]
