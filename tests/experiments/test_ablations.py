"""experiments/ablations.py (``alexnet experiment ablations``): the variants against hand-computed
values, and the reduced mode end to end (seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.cli import main
from alexnet.experiments.ablations import (
    REDUCED_ABLATIONS,
    VARIANTS,
    AblationSettings,
    ablation_model_options,
)
from alexnet.experiments.common import verdict
from alexnet.models.alexnet import PaperAlexNet, create_model


@pytest.mark.parametrize(
    ("effect", "se", "n", "claimed", "expected"),
    [
        (0.02, 0.005, 3, True, "yes"),
        (-0.02, 0.005, 3, True, "no (the opposite)"),
        (0.005, 0.005, 3, True, "not resolved (within noise)"),
        (0.02, 0.005, 3, False, "helps"),
        (0.02, math.nan, 1, True, "undetermined (one seed: no spread)"),
    ],
)
def test_verdict(effect: float, se: float, n: int, claimed: bool, expected: str) -> None:
    assert verdict(effect, se, n, claimed) == expected


def test_ablation_baseline_is_the_paper_layer_pattern_at_cifar_scale() -> None:
    settings = AblationSettings()
    options = ablation_model_options(settings, VARIANTS["baseline"])
    net = create_model("paper", 10, **options)
    assert isinstance(net, PaperAlexNet)
    assert [
        net.conv1.out_channels,
        net.conv2.out_channels,
        net.conv3.out_channels,
        net.conv4.out_channels,
        net.conv5.out_channels,
    ] == [48, 128, 192, 192, 128]
    assert net.conv2.groups == net.conv4.groups == net.conv5.groups == 2 and net.conv3.groups == 1
    assert net.feature_shape == (128, 2, 2)  # 28 -> conv1 28 -> pools 13, 6, 2
    assert options["lrn"] == "paper" and options["pooling"] == "overlap" and options["dropout"] == 0.5


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_changes_only_its_component(name: str) -> None:
    settings = REDUCED_ABLATIONS
    base = ablation_model_options(settings, VARIANTS["baseline"])
    options = ablation_model_options(settings, VARIANTS[name])
    changed = {k for k in options.keys() | base.keys() if options.get(k) != base.get(k)}
    expected = {
        "baseline": set(),
        "no-lrn": {"lrn"},
        "non-overlap-pool": {"pooling"},
        "no-dropout": {"dropout"},
        "no-pca-lighting": set(),  # a data change: the recipe's lighting_std
        "one-tower-half": {"towers", "width"},
        "one-tower": {"towers"},
        "no-conv2": {"remove_conv"},
        "no-conv3": {"remove_conv"},
        "no-conv4": {"remove_conv"},
        "no-conv5": {"remove_conv"},
    }[name]
    assert changed == expected
    net = create_model("paper", 10, **options)
    assert net(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
    if name == "one-tower-half":
        assert options["width"] == settings.width / 2
    if name.startswith("no-conv"):
        removed = int(name[-1])
        assert options["remove_conv"] == removed and getattr(net, f"conv{removed}") is None
        assert net.feature_shape[1:] == (2, 2)  # pool2 kept: fc6 sees the baseline's 2x2 maps


def test_every_conv_removal_runs_in_reduced_mode(cifar_tree: Path, tmp_path: Path, capsys) -> None:
    removals = [f"no-conv{i}" for i in (2, 3, 4, 5)]
    argv = ["experiment", "ablations", "--data", str(cifar_tree), "--reduced", "--seeds", "1", "--device", "cpu"]
    assert main([*argv, "--variants", ",".join(["baseline", *removals]), "--out", str(tmp_path / "ab")]) == 0
    assert "removing any middle conv layer costs about 2 top-1" in capsys.readouterr().out
    rows = {r["variant"]: r for r in json.loads((tmp_path / "ab" / "summary.json").read_text())["rows"]}
    base = rows["baseline"]
    for name in removals:
        assert rows[name]["effect"] == pytest.approx(rows[name]["mean"] - base["mean"])
        assert 0.0 <= rows[name]["mean"] <= 1.0
    runs = {}
    for path in (tmp_path / "ab" / "runs").glob("*.json"):
        run = json.loads(path.read_text())
        runs[run["variant"]] = run["parameters"]
    for name in removals:
        built = create_model("paper", 10, **ablation_model_options(REDUCED_ABLATIONS, VARIANTS[name]))
        # Not always fewer: without conv5, fc6 reads conv4's 48 maps instead of 32.
        assert runs[name] == sum(p.numel() for p in built.parameters()) != runs["baseline"]
    # By hand at width 0.125 (conv widths 12-32-48-48-32): conv2 has 32 * (12/2) * 5 * 5 + 32
    # parameters, and conv3 then reads 12 maps instead of 32: 48 * 20 * 3 * 3 fewer weights.
    assert runs["baseline"] - runs["no-conv2"] == 32 * 6 * 25 + 32 + 48 * 20 * 9


def test_ablations_reduced_table_seeds_and_rerun(
    cifar_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "ab"
    argv = ["experiment", "ablations", "--data", str(cifar_tree), "--reduced", "--seeds", "2"]
    argv += ["--variants", "baseline,no-lrn", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| no-lrn |" in printed and "LRN lowers top-1 by 1.4" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_images"] == 40 and summary["training_images"] == 120
    rows = {r["variant"]: r for r in summary["rows"]}
    assert set(rows) == {"baseline", "no-lrn", "baseline, centre patch only"}
    base = rows["baseline"]
    assert len(base["test_top1_errors"]) == 2
    assert base["mean"] == pytest.approx(np.mean(base["test_top1_errors"]))
    assert base["std"] == pytest.approx(np.std(base["test_top1_errors"], ddof=1))
    assert rows["no-lrn"]["effect"] == pytest.approx(rows["no-lrn"]["mean"] - base["mean"])
    ten = rows["baseline, centre patch only"]
    assert ten["effect"] == pytest.approx(base["mean"] - ten["ten_patch_mean"])
    for r in summary["rows"]:
        assert all(0.0 <= e <= 1.0 for e in r["test_top1_errors"]) and r["seeds"] == 2
    with Image.open(out / "ablations.png") as img:
        assert img.format == "PNG"

    # The same command again reuses every finished run, as does one asking for a subset
    # of the variants and seeds; other settings are refused.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert main(argv) == 0
    assert main([*argv, "--variants", "no-lrn", "--seeds", "1"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps
    assert [r["variant"] for r in json.loads((out / "summary.json").read_text())["rows"]] == ["no-lrn"]
    capsys.readouterr()
    assert main([*argv, "--epochs", "1"]) == 2
    assert "holds a ablations run with other settings" in capsys.readouterr().err
