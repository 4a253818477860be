"""experiments/common.py and the registry: helpers, the run directory's worker pool, settings and errors."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from alexnet.cli import main
from alexnet.errors import AlexNetError
from alexnet.experiments import resolve_settings
from alexnet.experiments.ablations import REDUCED_ABLATIONS
from alexnet.experiments.common import RunDir, epochs_to


def test_epochs_to_target() -> None:
    rows = [{"epoch": 0.5, "train_error": 0.4}, {"epoch": 1.0, "train_error": 0.25}, {"epoch": 1.5, "train_error": 0.1}]
    assert epochs_to(rows, 0.25) == 1.0
    assert epochs_to(rows, 0.05) is None


def test_resolve_settings_reduced_overrides_and_mistakes() -> None:
    s = resolve_settings("ablations", True, {"seeds": 3, "epochs": None})
    assert s.seeds == 3 and s.epochs == REDUCED_ABLATIONS.epochs and s.subset == 500
    assert resolve_settings("relu-vs-tanh", False, {}).target == 0.25
    with pytest.raises(AlexNetError, match="--variants apply to ablations, not relu-vs-tanh"):
        resolve_settings("relu-vs-tanh", False, {"variants": ("baseline",)})
    with pytest.raises(AlexNetError, match="--epochs must be at least 1; got 0"):
        resolve_settings("ablations", False, {"epochs": 0})
    with pytest.raises(AlexNetError, match="unknown ablation variant\\(s\\) no-relu"):
        resolve_settings("ablations", False, {"variants": ("baseline", "no-relu")})
    with pytest.raises(AlexNetError, match="--lrs must list positive"):
        resolve_settings("relu-vs-tanh", False, {"lrs": (0.01, -1.0)})


def _fail_or_wait(job: str, *, device: torch.device, on_row) -> dict:
    if job == "bad":
        raise AlexNetError("bad run diverged")
    time.sleep(120)  # stands for a long run that must not be waited for
    return {}


def test_a_failed_worker_run_stops_the_others_and_raises(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "x", "ablations", {"a": 1}, {"device": "cpu"})
    try:
        with pytest.raises(AlexNetError, match="bad run diverged"):
            run.run_all(_fail_or_wait, (), {"slow": "slow", "bad": "bad"}, torch.device("cpu"), workers=2)
    finally:
        run.close()
    assert not list((tmp_path / "x" / "runs").glob("*.json"))
    for _ in range(100):  # terminated, not left to finish their two minutes
        if not multiprocessing.active_children():
            break
        time.sleep(0.1)
    assert not multiprocessing.active_children()


def test_experiment_without_data_is_a_clean_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv("ALEXNET_CIFAR10", raising=False)  # no default CIFAR-10
    monkeypatch.chdir(tmp_path)  # nor a ../shared/data (the older default) here
    assert main(["experiment", "ablations", "--reduced", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alexnet: error: no --data given") and "Traceback" not in err
    assert main(["experiment", "relu-vs-tanh", "--data", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err
