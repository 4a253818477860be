"""experiments/figure1.py (``alexnet experiment relu-vs-tanh``): the reduced mode end to end (seconds)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from alexnet.cli import main


def test_relu_vs_tanh_reduced_writes_a_complete_run(
    cifar_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "rt"
    argv = ["experiment", "relu-vs-tanh", "--data", str(cifar_tree), "--reduced", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    assert "# Figure 1: ReLU against tanh" in capsys.readouterr().out
    for name in ("config.yaml", "metrics.jsonl", "log.txt", "figure1.png", "summary.json", "summary.md"):
        assert (out / name).is_file(), name
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["experiment"] == "relu-vs-tanh" and config["settings"]["subset"] == 500
    assert config["environment"]["torch"] == str(torch.__version__)
    assert config["environment"]["command"] == shlex.join(["alexnet", *argv])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training_images"] == 120 and summary["paper_ratio"] == 6.0
    for act in ("relu", "tanh"):
        a = summary["activations"][act]
        assert a["lr"] in (0.01, 0.1) and a["runs"] == 1 and len(summary["sweep"][act]) == 2
    runs = {p.stem for p in (out / "runs").glob("*.json")}
    assert runs == {
        "sweep-relu-lr0.01",
        "sweep-relu-lr0.1",
        "sweep-tanh-lr0.01",
        "sweep-tanh-lr0.1",
        "relu-seed0",
        "tanh-seed0",
    }
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["run"] for r in rows} == runs
    assert all(0.0 <= r["train_error"] <= 1.0 and r["epoch"] > 0 for r in rows)
    with Image.open(out / "figure1.png") as img:
        assert img.format == "PNG" and img.width > 300


def _run_results(out: Path) -> dict[str, dict]:
    timing = ("seconds", "images_per_s", "concurrent_runs")
    return {
        p.stem: {k: v for k, v in json.loads(p.read_text()).items() if k not in timing}
        for p in (out / "runs").glob("*.json")
    }


def test_jobs_in_worker_processes_give_the_sequential_results(
    cifar_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Each run is seeded on its own, so where it runs must not matter. One torch thread in
    # both cases, as each of two workers gets on two cores: the same arithmetic, bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["experiment", "relu-vs-tanh", "--data", str(cifar_tree), "--reduced", "--device", "cpu"]
        assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main([*argv, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = _run_results(tmp_path / "one"), _run_results(tmp_path / "two")
    assert len(one) == 6 and one == two
    # Every worker's metric rows reached the shared file, each under its run's name.
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert {r["run"] for r in rows} == set(two)
    assert all(
        json.loads(p.read_text())["concurrent_runs"] == 2 for p in (tmp_path / "two" / "runs").glob("sweep-*.json")
    )
    assert "[sweep-relu-lr0.01] started in process" in (tmp_path / "two" / "log.txt").read_text()
    assert "with up to 2 runs training at once" in (tmp_path / "two" / "summary.md").read_text()
    assert "at once" not in (tmp_path / "one" / "summary.md").read_text()
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "three"), "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err
