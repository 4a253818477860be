"""checkpoint.py: atomic writes under injected failures, rotation, resume fallback, and files from strangers."""

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from alexnet import checkpoint
from alexnet.checkpoint import (
    load_checkpoint,
    load_for_inference,
    model_from_checkpoint,
    save_checkpoint,
)
from alexnet.config import resolve
from alexnet.data.augment import Preprocess
from alexnet.errors import AlexNetError
from alexnet.models.alexnet import build_model
from alexnet.train.checkpoints import history, load_for_resume, remove_partial_writes, save_run_checkpoint

TINY_MODEL = {
    "model.width": "0.125",
    "model.fc_width": "32",
    "model.conv1_kernel": "5",
    "model.conv1_stride": "1",
    "model.num_classes": "3",
    "model.input_size": "28",
}


def make_state(step: int = 0, seed: int = 0) -> dict[str, Any]:
    """A complete training checkpoint of a tiny network, as train.py writes it."""
    cfg = resolve("paper", TINY_MODEL)
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    return {
        "config": cfg.to_dict(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "schedule": {},
        "epoch": 1,
        "batch": 0,
        "step": step,
        "best_val_top1_error": 0.5,
        "preprocess": Preprocess(torch.zeros(3, 32, 32), torch.ones(3), torch.ones(3), torch.eye(3), 28).state_dict(),
        "classes": ["a", "b", "c"],
    }


def first_weight(path: Path) -> torch.Tensor:
    return torch.load(path, weights_only=True)["model"]["conv1.weight"]


def half_then_fail(exc: BaseException):
    """A torch.save that writes the first half of the real file, then raises exc."""
    real_save = torch.save

    def save(obj: Any, f: Any) -> None:
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        raise exc

    return save


def partial_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp*"))


# --------------------------------------------------------------------------------------
# Atomic writes


def test_round_trip(tmp_path: Path) -> None:
    state = make_state(step=7)
    save_checkpoint(tmp_path / "a.pt", state)
    loaded = load_checkpoint(tmp_path / "a.pt", for_training=True)
    assert loaded["step"] == 7 and loaded["version"] == checkpoint.VERSION
    assert torch.equal(loaded["model"]["conv1.weight"], state["model"]["conv1.weight"])


def test_disk_full_mid_write_keeps_previous_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, make_state(step=1, seed=1))
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", half_then_fail(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(
        AlexNetError,
        match=r"cannot write checkpoint .*last.pt: No space left on device .*the previous last.pt is intact",
    ):
        save_checkpoint(path, make_state(step=2, seed=2))
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert partial_files(tmp_path) == []  # the half-written file is gone, freeing its space


def test_first_write_failing_says_nothing_was_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "save", half_then_fail(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))))
    with pytest.raises(AlexNetError, match="no last.pt was written"):
        save_checkpoint(tmp_path / "last.pt", make_state())
    assert list(tmp_path.iterdir()) == []


def test_interrupt_mid_write_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # KeyboardInterrupt (a second Ctrl-C) in the middle of a write: not converted, but cleaned up.
    path = tmp_path / "last.pt"
    save_checkpoint(path, make_state(step=1))
    monkeypatch.setattr(torch, "save", half_then_fail(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, make_state(step=2))
    assert load_checkpoint(path)["step"] == 1 and partial_files(tmp_path) == []


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file size limits")
def test_real_write_error_through_torch_save_keeps_its_errno(tmp_path: Path) -> None:
    # A real failing write(2), not a mock: RLIMIT_FSIZE makes writes past 64 KiB fail with
    # EFBIG, as a full disk fails with ENOSPC. torch.save reports that as a RuntimeError
    # without the errno; the message must still give the operating system's reason.
    import resource

    path = tmp_path / "last.pt"
    save_checkpoint(path, make_state(step=1))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(AlexNetError) as info:
            save_checkpoint(path, make_state(step=2))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert os.strerror(errno.EFBIG) in str(info.value) and "previous last.pt is intact" in str(info.value)
    assert load_checkpoint(path)["step"] == 1 and partial_files(tmp_path) == []


def test_process_killed_mid_write_leaves_previous_loadable(tmp_path: Path) -> None:
    # A real SIGKILL halfway through writing: no cleanup code runs at all.
    import subprocess

    path = tmp_path / "last.pt"
    save_checkpoint(path, make_state(step=1))
    code = f"""
import io, os, signal, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_checkpoint import make_state
from alexnet.checkpoint import save_checkpoint
real_save = torch.save
def save_half_and_die(obj, f):
    buf = io.BytesIO(); real_save(obj, buf)
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_half_and_die
save_checkpoint({str(path)!r}, make_state(step=2))
"""
    result = subprocess.run(
        [sys.executable, "-c", code], env=_subprocess_env(), capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    [partial] = partial_files(tmp_path)
    assert partial.stat().st_size > 0  # the half-written file is there, under another name
    assert load_checkpoint(path)["step"] == 1
    assert remove_partial_writes(tmp_path) == [partial] and partial_files(tmp_path) == []


def _subprocess_env() -> dict[str, str]:
    src = str(Path(checkpoint.__file__).parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


# --------------------------------------------------------------------------------------
# Run directories: history, rotation, best.pt, resume fallback


def test_rotation_keeps_the_newest_and_never_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for step in (10, 20, 30, 40, 50):
        save_run_checkpoint(tmp_path, make_state(step=step, seed=step), keep=2)
        kept = [s for s, _ in history(tmp_path)]
        assert kept == [s for s in (10, 20, 30, 40, 50) if s <= step][-2:]
    for step, path in history(tmp_path):
        assert load_checkpoint(path)["step"] == step
    # The newest history entry and last.pt are the same bytes (a hard link or a copy).
    assert (tmp_path / "last.pt").read_bytes() == (tmp_path / "checkpoints" / "step-000000050.pt").read_bytes()
    # A failing write neither touches last.pt nor deletes any history.
    monkeypatch.setattr(torch, "save", half_then_fail(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(AlexNetError, match="No space left"):
        save_run_checkpoint(tmp_path, make_state(step=60), keep=2)
    assert [s for s, _ in history(tmp_path)] == [40, 50]
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 50
    assert partial_files(tmp_path) == []


def test_keep_zero_writes_only_last(tmp_path: Path) -> None:
    save_run_checkpoint(tmp_path, make_state(step=1), keep=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_best_survives_later_checkpoints(tmp_path: Path) -> None:
    save_run_checkpoint(tmp_path, make_state(step=1, seed=1), best=True, keep=1)
    best = first_weight(tmp_path / "best.pt")
    save_run_checkpoint(tmp_path, make_state(step=2, seed=2), keep=1)
    assert torch.equal(first_weight(tmp_path / "best.pt"), best)
    assert not torch.equal(first_weight(tmp_path / "last.pt"), best)
    assert [s for s, _ in history(tmp_path)] == [2]


def test_history_is_copied_where_hard_links_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_links(src: Any, dst: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    save_run_checkpoint(tmp_path, make_state(step=3), best=True, keep=1)
    copy = tmp_path / "checkpoints" / "step-000000003.pt"
    assert copy.read_bytes() == (tmp_path / "last.pt").read_bytes() == (tmp_path / "best.pt").read_bytes()
    assert not os.path.samefile(copy, tmp_path / "last.pt")


def test_resume_falls_back_to_the_newest_good_history(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for step in (10, 20, 30):
        save_run_checkpoint(tmp_path, make_state(step=step), keep=3)
    # Bit rot in last.pt. It is a hard link of step 30, which is damaged with it; step 20 is not.
    with open(tmp_path / "last.pt", "r+b") as f:
        f.write(os.urandom(64))
    (tmp_path / ".last.pt.tmp99999").write_bytes(b"half a checkpoint")
    with caplog.at_level(logging.WARNING, logger="alexnet"):
        state, path = load_for_resume(tmp_path)
    damaged_together = os.path.samefile(tmp_path / "last.pt", tmp_path / "checkpoints" / "step-000000030.pt")
    expected = 20 if damaged_together else 30
    assert state["step"] == expected and path.name == f"step-{expected:09d}.pt"
    assert "cannot resume from" in caplog.text and f"resuming from {path}" in caplog.text
    assert "removed 1 partial checkpoint file" in caplog.text and partial_files(tmp_path) == []


def test_resume_without_any_checkpoint_names_last_pt(tmp_path: Path) -> None:
    with pytest.raises(AlexNetError, match=r"checkpoint .*last.pt does not exist"):
        load_for_resume(tmp_path)


# --------------------------------------------------------------------------------------
# Files from strangers: code never runs, malformed structure is named


class _Exploit:
    """Unpickling this runs a shell command: what a malicious .pth carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecExploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _write_zip(path: Path, payload: Any) -> None:
    torch.save({"format": "alexnet-checkpoint", "version": 2, "model": payload}, path)


def _write_legacy(path: Path, payload: Any) -> None:
    torch.save({"format": "alexnet-checkpoint", "model": payload}, path, _use_new_zipfile_serialization=False)


def _write_raw_pickle(protocol: int):
    def write(path: Path, payload: Any) -> None:
        with open(path, "wb") as f:
            pickle.dump({"format": "alexnet-checkpoint", "model": payload}, f, protocol=protocol)

    return write


@pytest.mark.parametrize("exploit", [_Exploit, _ExecExploit], ids=["os.system", "exec"])
@pytest.mark.parametrize(
    "write",
    [_write_zip, _write_legacy, _write_raw_pickle(0), _write_raw_pickle(2), _write_raw_pickle(5)],
    ids=["torch-zip", "torch-legacy", "pickle-0", "pickle-2", "pickle-5"],
)
@pytest.mark.parametrize(
    "load",
    [load_checkpoint, load_for_inference, lambda p: load_for_resume(p.parent)],
    ids=["load", "inference", "resume"],
)
def test_crafted_pickle_never_executes(tmp_path: Path, exploit: type, write: Any, load: Any) -> None:
    marker = tmp_path / "EXPLOITED"
    path = tmp_path / "last.pt"
    write(path, exploit(marker))
    with pytest.raises(AlexNetError, match=r"refusing .*last.pt|cannot read checkpoint") as info:
        load(path)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def _set(state: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    target = state
    for k in keys[:-1]:
        target = target[k]
    if value is KeyError:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value


@pytest.mark.parametrize(
    "change, message",
    [
        (("classes", KeyError), "'classes' is missing"),
        (("classes", "abc"), "'classes' should be a list"),
        (("classes", []), "non-empty list of distinct class names"),
        (("classes", ["a", "a", "b"]), "distinct class names"),
        (("config", [1, 2]), "'config' should be a mapping"),
        (("model", {"conv1.weight": "not a tensor"}), "map parameter names to tensors"),
        (("preprocess.mean", torch.zeros(3, 32)), "preprocess 'mean' should be a 3-d float tensor"),
        (("preprocess.mean", torch.zeros(3, 32, 16)), "a \\(3, S, S\\) mean image"),
        (("preprocess.crop_size", 64), "crop size of at most S"),
        (("preprocess.eigvecs", torch.zeros(3, 3, dtype=torch.long)), "'eigvecs' should be a 2-d float tensor"),
        (("step", KeyError), "'step' is missing"),
        (("epoch", 1.5), "'epoch' should be an integer"),
        (("epoch", True), "'epoch' should be an integer"),
        (("optimizer", None), "'optimizer' should be a mapping"),
    ],
)
def test_malformed_checkpoints_are_named(tmp_path: Path, change: tuple[str, Any], message: str) -> None:
    state = make_state()
    _set(state, *change)
    save_checkpoint(tmp_path / "bad.pt", state)
    with pytest.raises(AlexNetError, match=message) as info:
        load_checkpoint(tmp_path / "bad.pt", for_training=True)
    assert str(info.value).startswith(f"checkpoint {tmp_path / 'bad.pt'} is malformed")


def test_newer_format_is_refused(tmp_path: Path) -> None:
    state = make_state()
    path = tmp_path / "new.pt"
    torch.save({**state, "format": "alexnet-checkpoint", "version": checkpoint.VERSION + 1}, path)
    with pytest.raises(AlexNetError, match="written by a newer alexnet"):
        load_checkpoint(path)


def test_config_asking_for_a_huge_network_allocates_nothing(tmp_path: Path) -> None:
    # fc_width 2**20 would need 2**40 floats (4 TiB) for fc7 if built for real; the
    # network is built on the meta device and its shapes compared with the file's first.
    state = make_state()
    state["config"]["model"]["fc_width"] = 2**20
    with pytest.raises(
        AlexNetError, match=r"does not match its own config: fc6.weight is \(32, .*\) in the file, \(1048576, .*\)"
    ):
        model_from_checkpoint(state, "huge.pt")


def test_weights_with_missing_or_extra_tensors(tmp_path: Path) -> None:
    state = make_state()
    del state["model"]["fc8.bias"]
    with pytest.raises(AlexNetError, match="its weights lack fc8.bias"):
        model_from_checkpoint(state)
    state = make_state()
    state["model"]["backdoor.weight"] = torch.zeros(1)
    with pytest.raises(AlexNetError, match="its weights have unknown backdoor.weight"):
        model_from_checkpoint(state)


def test_model_from_checkpoint_restores_exact_weights() -> None:
    state = make_state(seed=5)
    model = model_from_checkpoint(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["model"][key]), key
        assert value.device.type == "cpu"


def test_config_with_unknown_key_in_checkpoint(tmp_path: Path) -> None:
    state = make_state()
    state["config"]["run"]["shell"] = "rm -rf /"
    with pytest.raises(AlexNetError, match="unknown config key 'run.shell' in checkpoint"):
        model_from_checkpoint(state, "x.pt")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("classes", ["a", "b", "c", "d"]), "'classes' lists 4 classes for a network with 3 outputs"),
        (("class_names", ["x", "y"]), "'class_names' should be a list of 3 strings, one per class; found 2 names"),
        (("class_names", [1, 2, 3]), "'class_names' should be a list of 3 strings"),
        (("config.model", "paper"), "config section 'model' is missing or not a mapping"),
        (("config.data", [1]), "config section 'data' should be a mapping, found list"),
        (("preprocess.std", torch.zeros(3)), "preprocess 'std' must be positive"),
        (("preprocess.eigvecs", torch.full((3, 3), float("inf"))), "preprocess 'eigvecs' holds NaN or infinite"),
        (("preprocess.crop_size", 12), "'crop_size' 12 does not fit its network \\(configured for 28 px\\)"),
        (("preprocess.crop_size", 28.0), "crop size of at most S \\(an integer\\)"),
    ],
)
def test_inference_fields_are_checked_against_each_other(tmp_path: Path, change: tuple[str, Any], message: str) -> None:
    state = make_state()
    _set(state, *change)
    save_checkpoint(tmp_path / "bad.pt", state)
    with pytest.raises(AlexNetError, match=message) as info:
        load_checkpoint(tmp_path / "bad.pt")
    assert "\n" not in str(info.value)


def test_nan_weights_are_refused_for_inference_but_a_resume_still_reads_them(tmp_path: Path) -> None:
    state = make_state()
    state["model"]["fc8.bias"][1] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", state)
    with pytest.raises(AlexNetError, match="weights 'fc8.bias' hold NaN or infinite values"):
        load_for_inference(tmp_path / "nan.pt")
    # A resume keeps its own judgement of a diverged run (and its fallback to older history).
    assert load_checkpoint(tmp_path / "nan.pt", for_training=True)["step"] == 0


def test_in_memory_states_get_the_same_network_checks() -> None:
    state = make_state()
    state["classes"] = ["a", "b"]
    with pytest.raises(AlexNetError, match="'classes' lists 2 classes for a network with 3 outputs"):
        model_from_checkpoint(state)
    state = make_state()
    state["config"]["model"]["conv1_stride"] = 0  # refused by the config's own check, naming the key
    with pytest.raises(AlexNetError, match="model.conv1_stride must be 1 or more; got 0"):
        model_from_checkpoint(state)
