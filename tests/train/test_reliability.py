"""Fault injection end to end: kills, signals, full disks, NaNs, bad files and files from strangers.

Each test injects one fault into a real training run -- a separate process where the
fault is a signal or an operating-system limit -- and checks the outcome against the
uninterrupted run of the same recipe: the same weights, optimizer velocities, schedule
state and metrics rows, bit for bit (timing fields aside). The reliability table of
docs/reliability.md points at these tests.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.cli import main
from alexnet.data.synthetic import make_shapes_dataset
from alexnet.train import checkpoints as checkpoints_module
from alexnet.train import step as step_module
from alexnet.train.optim import PaperSGD
from conftest import SUBPROCESS_ENV, TINY

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX signals and resource limits")

# 60 training images in batches of 4: 15 steps an epoch, 30 in all.
RECIPE = [
    "--preset",
    "paper",
    *TINY,
    "--batch-size",
    "4",
    "--epochs",
    "2",
    "--seed",
    "1",
    "--set",
    "run.tensorboard=false",
]
STEPS_PER_EPOCH, TOTAL_STEPS = 15, 30
TIMING = ("images_per_s", "epoch_seconds")
CHECKPOINT_LINE = re.compile(r"checkpoint at step (\d+) \(epoch (\d+), batch (\d+)/(\d+)\)")
ENV = SUBPROCESS_ENV


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """One intra-op thread in every run of this module, in-process and in subprocesses.

    Bit-exact comparisons need the same thread count everywhere (a reduction split over
    two threads adds in another order). One is also much faster for these tiny networks
    on a shared machine: a 30-step run took 39 s with two threads and 7 s with one at
    load average 7 on the 2-core development machine (2026-11-23, torch 2.14.1).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), image_size=32, train_per_class=6, val_per_class=2, seed=3
    )


@pytest.fixture(scope="module")
def reference(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run. It writes no mid-epoch checkpoints, so a match also shows
    that taking checkpoints (and reading random states) does not perturb training."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(["train", "--data", str(dataset), "--out", str(out), *RECIPE]) == 0
    return out


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def assert_same_run(run_dir: Path, reference: Path, context: str = "") -> None:
    """Weights, velocities, schedule, counters and metrics identical to the reference run."""
    a = torch.load(reference / "last.pt", weights_only=True)
    b = torch.load(run_dir / "last.pt", weights_only=True)
    assert (b["epoch"], b["batch"], b["step"]) == (a["epoch"], a["batch"], a["step"]), context
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"weight {key} differs; {context}"
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["velocity"], b["optimizer"]["state"][index]["velocity"]), (
            f"velocity {index}; {context}"
        )
    assert a["schedule"] == b["schedule"] and a["best_val_top1_error"] == b["best_val_top1_error"], context
    assert metric_rows(run_dir) == metric_rows(reference), context


def start(*args: Any, **popen: Any) -> subprocess.Popen:
    """``python -m alexnet ARGS`` as a separate process, its log (stderr) readable line by line."""
    return subprocess.Popen(
        [sys.executable, "-m", "alexnet", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        **popen,
    )


def act_on_line(proc: subprocess.Popen, trigger: Callable[[str], bool], action: Callable[[], None]) -> tuple[int, str]:
    """Read the process's log; call action() at the first line for which trigger is true.

    Returns the exit status and the whole log. A watchdog kills a process that hangs.
    """
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    lines, fired = [], False
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if not fired and trigger(line):
                action()
                fired = True
        status = proc.wait()
    finally:
        watchdog.cancel()
    log = "".join(lines)
    assert fired, f"the trigger line never came (exit {status}):\n{log}"
    return status, log


def checkpoint_at_least(step: int) -> Callable[[str], bool]:
    def trigger(line: str) -> bool:
        m = CHECKPOINT_LINE.match(line)
        return m is not None and int(m[1]) >= step

    return trigger


def resume(run_dir: Path, *extra: str) -> int:
    return main(["train", "--resume", str(run_dir), "--no-progress", *extra])


# --------------------------------------------------------------------------------------
# 1. Exact resume after SIGKILL at a random step


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(dataset: Path, reference: Path, tmp_path: Path) -> None:
    seed = int(os.environ.get("ALEXNET_FAULT_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    target, delay = rng.randrange(3, 13), rng.uniform(0, 0.02)
    context = f"ALEXNET_FAULT_SEED={seed}: SIGKILL {1000 * delay:.0f} ms after the checkpoint at step >= {target}"
    out = tmp_path / "run"
    proc = start("train", "--data", dataset, "--out", out, *RECIPE, "--set", "run.checkpoint_every=3")

    def kill() -> None:
        time.sleep(delay)  # anywhere: mid-step, mid-validation, mid-checkpoint-write
        proc.kill()

    status, log = act_on_line(proc, checkpoint_at_least(target), kill)
    assert status == -signal.SIGKILL, f"{context}\n{log}"
    killed = torch.load(out / "last.pt", weights_only=True)
    assert target <= killed["step"] < TOTAL_STEPS, f"the run was not killed in time; {context}"
    assert resume(out) == 0
    assert_same_run(out, reference, context)


def test_resume_from_history_when_last_pt_is_damaged(dataset: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    extra = ["--set", "run.checkpoint_every=4", "--set", "run.keep_checkpoints=3"]
    assert main(["train", "--data", str(dataset), "--out", str(out), *RECIPE, *extra, "--epochs", "1"]) == 0
    with open(out / "last.pt", "r+b") as f:  # bit rot, shared by its hard link checkpoints/step-000000015.pt
        f.seek(100)
        f.write(os.urandom(256))
    assert resume(out, "--epochs", "2") == 0
    log = (out / "log.txt").read_text()
    assert "cannot resume from" in log and "resuming from" in log and "step-000000012.pt" in log
    assert_same_run(out, reference)


def test_metrics_line_cut_by_a_crash_is_dropped_on_resume(dataset: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", str(dataset), "--out", str(out), *RECIPE, "--epochs", "1"]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "step": 30, "train_lo')  # killed while appending epoch 2's row
    assert resume(out, "--epochs", "2") == 0
    assert_same_run(out, reference)


# --------------------------------------------------------------------------------------
# 2. Preemption: SIGTERM / SIGINT save a checkpoint at the next batch boundary


STOPPED = re.compile(
    r"alexnet: stopped by (SIGTERM|SIGINT) (?:in epoch (\d+) after batch (\d+)|after epoch (\d+)) \(step (\d+)\); "
    r"checkpoint (\S+); continue with: alexnet train --resume (\S+)$"
)


def _check_stopped(log: str, out: Path, name: str) -> None:
    assert "Traceback" not in log, log
    [line] = [line for line in log.splitlines() if line.startswith("alexnet: stopped")]
    m = STOPPED.match(line)
    assert m is not None and m[1] == name, line
    assert m[6] == str(out / "last.pt") and m[7] == str(out)
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["step"] == int(m[5])
    assert state["batch"] == (int(m[3]) if m[2] else 0)


def test_sigterm_saves_a_checkpoint_and_resume_matches(dataset: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = start("train", "--data", dataset, "--out", out, *RECIPE)  # no periodic checkpoints: the stop writes one
    status, log = act_on_line(proc, lambda line: line.startswith("training "), lambda: proc.send_signal(signal.SIGTERM))
    assert status == 128 + signal.SIGTERM, log
    _check_stopped(log, out, "SIGTERM")
    assert resume(out) == 0
    assert_same_run(out, reference)


def test_ctrl_c_to_the_process_group_with_decoding_workers(dataset: Path, reference: Path, tmp_path: Path) -> None:
    # A terminal's Ctrl-C reaches every process of the group, decoding workers included;
    # they must leave the stop to the main process instead of dying under it.
    out = tmp_path / "run"
    proc = start("train", "--data", dataset, "--out", out, *RECIPE, "--workers", "2", start_new_session=True)
    status, log = act_on_line(
        proc, lambda line: line.startswith("training "), lambda: os.killpg(proc.pid, signal.SIGINT)
    )
    assert status == 128 + signal.SIGINT, log
    _check_stopped(log, out, "SIGINT")
    assert "DataLoader worker" not in log
    assert resume(out) == 0
    assert_same_run(out, reference)


def children(pid: int) -> list[int]:
    """The processes pid started (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    """pid runs (a zombie, dead but not yet reaped by whoever adopted it, holds no files)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux only")
def test_sigkill_with_decoding_workers_then_resume_at_once(dataset: Path, reference: Path, tmp_path: Path) -> None:
    # Workers forked by the killed trainer inherit the run directory's lock; they must die
    # with it, or the resume right after kill -9 (or torchrun's restart) finds the run in
    # use (torch's workers notice a dead parent only at their next 5 s poll). The log goes
    # to a file: reading a pipe to its end would wait for the orphans too.
    out, log_path = tmp_path / "run", tmp_path / "killed.log"
    with open(log_path, "w") as log_file:
        args = ["train", "--data", dataset, "--out", out, *RECIPE, "--workers", "2", "--set", "run.checkpoint_every=3"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "alexnet", *map(str, args)], stdout=log_file, stderr=log_file, env=ENV
        )
        deadline = time.monotonic() + 180
        while not any(map(checkpoint_at_least(3), log_path.read_text().splitlines())):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)
        workers = children(proc.pid)
        assert len(workers) >= 2, workers
        proc.kill()
        assert proc.wait() == -signal.SIGKILL
    # SIGKILL reaches the workers as their parent exits; they take a moment to end.
    deadline = time.monotonic() + 1
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not any(map(alive, workers)), f"decoding workers {workers} outlived the killed trainer"
    assert resume(out) == 0, log_path.read_text()
    assert_same_run(out, reference)


# --------------------------------------------------------------------------------------
# 3. A checkpoint that cannot be written: the previous one stays, the run says so and stops


def test_disk_full_during_training_keeps_the_previous_checkpoint(
    dataset: Path, reference: Path, tmp_path: Path
) -> None:
    # A real failing write: once a checkpoint exists, the running process's file size
    # limit drops below a checkpoint's size (EFBIG, the same path as ENOSPC). Log and
    # metrics lines stay under the limit.
    import resource

    out = tmp_path / "run"
    proc = start(
        "train", "--data", dataset, "--out", out, *RECIPE, "--set", "run.checkpoint_every=5",
        preexec_fn=lambda: signal.signal(signal.SIGXFSZ, signal.SIG_IGN),  # fail the write, do not kill
    )  # fmt: skip
    limit = 100_000  # bytes; a checkpoint of the tiny network is about 380 kB

    def fill_disk() -> None:
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (limit, limit))

    status, log = act_on_line(proc, checkpoint_at_least(5), fill_disk)
    assert status == 2, log
    assert "Traceback" not in log
    [error] = [line for line in log.splitlines() if line.startswith("alexnet: error:")]
    assert re.match(
        rf"alexnet: error: cannot write checkpoint {re.escape(str(out))}/last.pt: File too large .*; "
        r"the previous last.pt is intact$",
        error,
    ), error
    assert not list(out.rglob(".*.tmp*"))
    assert torch.load(out / "last.pt", weights_only=True)["step"] >= 5
    assert resume(out) == 0
    assert_same_run(out, reference)


# --------------------------------------------------------------------------------------
# 4. Non-finite loss: stop naming the step with the last good checkpoint, or skip the batch


def poison_batches(monkeypatch: pytest.MonkeyPatch, calls: set[int]) -> None:
    """Make the network input infinite on the given (1-based) calls of train_batch."""
    real = step_module.train_batch
    counter = itertools.count(1)

    def poisoned(*args: Any, **kwargs: Any) -> torch.Tensor:
        x = real(*args, **kwargs)
        return x * math.inf if next(counter) in calls else x

    monkeypatch.setattr(step_module, "train_batch", poisoned)


def train_in_process(dataset: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(dataset), "--out", str(out), *RECIPE, *extra])


def _error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("alexnet: error:")]
    return line


def _finite(path: Path) -> bool:
    return all(t.isfinite().all() for t in torch.load(path, weights_only=True)["model"].values())


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    poison_batches(monkeypatch, {7})
    assert train_in_process(dataset, out, "--set", "run.checkpoint_every=2") == 2
    line = _error_line(capsys)
    assert line == (
        f"alexnet: error: training loss became non-finite at step 7 (epoch 1); the last good checkpoint is "
        f"{out / 'last.pt'} (epoch 0, step 6); lower optim.lr, or set optim.skip_nonfinite=true to skip such batches"
    )
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["step"], state["batch"]) == (6, 6) and _finite(out / "last.pt")


def test_nan_loss_between_epoch_checkpoints(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    poison_batches(monkeypatch, {STEPS_PER_EPOCH + 3})
    assert train_in_process(dataset, out) == 2
    assert "non-finite at step 18 (epoch 2); the last good checkpoint is " in _error_line(capsys)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1 and _finite(out / "last.pt")
    assert [r["epoch"] for r in metric_rows(out)] == [1]


def test_weights_overflowing_with_a_finite_loss_are_never_checkpointed(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # An update that overflows (here: forced) leaves the loss of that step finite; the
    # check of the weights before writing the checkpoint catches it.
    real_step = PaperSGD.step
    counter = itertools.count(1)

    def overflowing_step(self: PaperSGD, closure: Any = None) -> Any:
        result = real_step(self, closure)
        if next(counter) == 4:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(math.inf)
        return result

    monkeypatch.setattr(PaperSGD, "step", overflowing_step)
    out = tmp_path / "run"
    assert train_in_process(dataset, out, "--set", "run.checkpoint_every=2") == 2
    assert "weights became non-finite by step 4 (epoch 1; the loss was finite" in _error_line(capsys)
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2 and _finite(out / "last.pt")


def test_skip_nonfinite_leaves_the_step_undone_and_counts_it(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The last batch of epoch 1 is poisoned; with a checkpoint every 14 steps, the state
    # before it (step 14, mid-epoch) and after it (the epoch-end checkpoint) must be equal.
    saved: list[dict[str, Any]] = []
    real_save = checkpoints_module.save_run_checkpoint

    def recording_save(run_dir: Path, state: dict[str, Any], **kw: Any) -> Path:
        saved.append(
            {
                "step": state["step"],
                "batch": state["batch"],
                "model": {k: v.clone() for k, v in state["model"].items()},
                "velocity": [s["velocity"].clone() for s in state["optimizer"]["state"].values()],
            }
        )
        return real_save(run_dir, state, **kw)

    monkeypatch.setattr(checkpoints_module, "save_run_checkpoint", recording_save)
    poison_batches(monkeypatch, {STEPS_PER_EPOCH})
    out = tmp_path / "run"
    extra = ["--set", "optim.skip_nonfinite=true", "--set", "run.checkpoint_every=14"]
    assert train_in_process(dataset, out, *extra) == 0
    before = next(s for s in saved if (s["step"], s["batch"]) == (14, 14))
    after = next(s for s in saved if (s["step"], s["batch"]) == (14, 0))
    for key, value in before["model"].items():
        assert torch.equal(value, after["model"][key]), key
    assert all(torch.equal(a, b) for a, b in zip(before["velocity"], after["velocity"], strict=True))
    rows = metric_rows(out)
    assert [r["train_nonfinite_skipped"] for r in rows] == [1, 0]
    assert [r["train_images"] for r in rows] == [56, 60] and [r["step"] for r in rows] == [14, 29]
    assert all(math.isfinite(r["train_loss"]) for r in rows) and _finite(out / "last.pt")
    assert "skipped batch 15 of epoch 1: non-finite loss or gradient" in (out / "log.txt").read_text()


# --------------------------------------------------------------------------------------
# 5. A dataset with every kind of bad and odd file trains to the end


def _encode(img: Image.Image, path: Path, fmt: str, **options: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **options)


def _png_bomb(width: int, height: int) -> bytes:
    """A real decompression bomb: a 1-bit PNG of width x height zeros, a few kB on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed pixels
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(row * height, 9))
        + chunk(b"IEND", b"")
    )


def add_bad_and_odd_files(root: Path) -> tuple[dict[str, str], list[Path]]:
    """Seed a copy of the shapes dataset; returns ({bad file: expected reason pattern}, odd-but-good files)."""
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    good_jpeg = (next((root / "train" / "ring").iterdir())).read_bytes()
    png_buf = root / "tmp.png"
    picture.save(png_buf, "PNG")
    good_png = png_buf.read_bytes()
    png_buf.unlink()
    t = root / "train"
    bad = {
        t / "circle" / "zero-bytes.jpg": "",
        t / "circle" / "truncated.jpg": "truncated|broken|cannot identify",
        t / "square" / "truncated.png": "truncated|broken|cannot identify",
        t / "square" / "notes.jpg": "cannot identify",
        t / "star" / "page.png": "cannot identify",
        t / "star" / "bomb.png": r"9000x8000 pixels is over the .* limit",
        t / "triangle" / "giant-header.gif": "decompression bomb|pixels is over",
        root / "val" / "ring" / "zero.jpg": "",
    }
    contents = {
        "zero-bytes.jpg": b"",
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 3],
        "truncated.png": good_png[: len(good_png) // 2],
        "notes.jpg": b"shopping list: eggs, milk\n",
        "page.png": b"<html><body>404 Not Found</body></html>",
        "bomb.png": _png_bomb(9000, 8000),
        "giant-header.gif": b"GIF89a"
        + struct.pack("<HH", 65535, 65535)
        + b"\x00\x00\x00"
        + b",\x00\x00\x00\x00\xff\xff\xff\xff\x00\x02\x02D\x01\x00;",
        "zero.jpg": b"",
    }
    for path in bad:
        path.write_bytes(contents[path.name])
    odd: list[Path] = []

    def add(path: Path, img: Image.Image, fmt: str, **options: Any) -> None:
        _encode(img, path, fmt, **options)
        odd.append(path)

    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown rotated
    add(t / "circle" / "cmyk.jpg", picture.convert("CMYK"), "JPEG")
    add(t / "circle" / "gray16.png", Image.fromarray(rng.integers(0, 65536, (40, 40)).astype(np.uint16)), "PNG")
    add(t / "square" / "palette.png", picture.convert("P"), "PNG")
    add(t / "square" / "exif-rotated.jpg", picture, "JPEG", exif=exif.tobytes())
    add(t / "star" / "really-a-png.jpg", picture, "PNG")
    add(t / "star" / "large.jpg", picture.resize((3000, 2000)), "JPEG", quality=70)
    add(t / "triangle" / "gray.jpg", picture.convert("L"), "JPEG")
    add(t / "triangle" / "rgba.png", picture.convert("RGBA"), "PNG")
    add(t / "ring" / "animated.gif", picture.convert("P"), "GIF", save_all=True, append_images=[picture.convert("P")])
    add(t / "ring" / "image.bmp", picture, "BMP")
    add(t / "ring" / "image.tiff", picture, "TIFF")
    add(root / "val" / "star" / "cmyk.jpg", picture.convert("CMYK"), "JPEG")
    return {str(p): reason for p, reason in bad.items()}, odd


def test_dataset_with_every_kind_of_bad_file_trains_to_the_end(tmp_path: Path) -> None:
    root = make_shapes_dataset(tmp_path / "data", image_size=32, train_per_class=6, val_per_class=2, seed=3)
    bad, odd = add_bad_and_odd_files(root)
    out = tmp_path / "run"
    args = ["train", "--data", str(root), "--out", str(out), *RECIPE, "--workers", "2"]
    assert main(args) == 0
    log = (out / "log.txt").read_text()
    for path, reason in bad.items():
        lines = [line for line in log.splitlines() if path in line]
        assert len(lines) == 1, f"{path} reported {len(lines)} times:\n{log}"
        m = re.search(rf"skipped unreadable image {re.escape(path)}: (.+)$", lines[0])
        assert m is not None and re.search(reason, m[1], re.IGNORECASE), lines[0]
    for path in odd:
        assert str(path) not in log, f"{path} decodes and must not be skipped"
    rows = metric_rows(out)
    good_train = 60 + sum("/train/" in str(p) for p in odd)
    assert [r["train_images"] for r in rows] == [good_train, good_train]  # every odd file was trained on
    assert [r["val_images"] for r in rows] == [21, 21]


# --------------------------------------------------------------------------------------
# 6. Files from strangers through the command line


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch EXPLOITED",))


@pytest.mark.parametrize("command", ["predict", "evaluate", "resume"])
def test_crafted_checkpoint_never_executes_through_the_cli(
    command: str, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"format": "alexnet-checkpoint", "version": 2, "model": _Exploit()}, run_dir / "last.pt")
    image = next((dataset / "val" / "ring").iterdir())
    argv = {
        "predict": ["predict", str(run_dir / "last.pt"), str(image)],
        "evaluate": ["evaluate", str(run_dir), "--data", str(dataset), "--workers", "0"],
        "resume": ["train", "--resume", str(run_dir), "--no-progress"],
    }[command]
    assert main(argv) == 2
    assert "refusing" in _error_line(capsys)
    assert not (tmp_path / "EXPLOITED").exists()


def test_config_file_with_code_tag_is_refused_by_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.yaml"
    evil.write_text("optim:\n  lr: !!python/object/apply:os.system ['touch EXPLOITED']\n")
    assert main(["config", "--preset", str(evil)]) == 2
    assert "evil.yaml is refused at line 2" in _error_line(capsys)
    assert not (tmp_path / "EXPLOITED").exists()


@pytest.fixture(scope="module")
def mid_epoch_checkpoint(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real checkpoint from the middle of epoch 1 (after batch 12)."""
    out = tmp_path_factory.mktemp("mid") / "run"
    extra = ["--set", "run.checkpoint_every=4", "--set", "run.keep_checkpoints=4", "--epochs", "1"]
    assert main(["train", "--data", str(dataset), "--out", str(out), *RECIPE, *extra]) == 0
    return torch.load(out / "checkpoints" / "step-000000012.pt", weights_only=True)


def _first_velocity(state: dict[str, Any]) -> dict[str, Any]:
    return next(iter(state["optimizer"]["state"].values()))


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (
            lambda s: _first_velocity(s).update(velocity=torch.zeros(2, 2)),
            "its optimizer state does not fit the network",
        ),
        (lambda s: s["schedule"].update(optimizer={"x": 1}), r"unknown schedule state \['optimizer'\]"),
        (lambda s: s["partial"].update(loss_sum=torch.zeros(3)), "its partial epoch sums are not what alexnet writes"),
        (lambda s: s["partial"].update(rogue=1), "its partial epoch sums are not what alexnet writes"),
        (lambda s: s.pop("partial"), "its partial epoch sums are not what alexnet writes"),
        (lambda s: s.pop("rng"), "a mid-epoch checkpoint without random states"),
        (lambda s: s["rng"].update(torch=torch.zeros(7, dtype=torch.uint8)), "bad random state"),
        (lambda s: s.update(batch=-3), "negative or non-integer epoch, batch or step"),
        (lambda s: s.update(batch=5), "its batch count disagrees with its partial sums"),
    ],
    ids=[
        "velocity-shape",
        "schedule-key",
        "partial-shape",
        "partial-key",
        "no-partial",
        "no-rng",
        "bad-rng",
        "negative-batch",
        "batch-mismatch",
    ],
)
def test_malformed_training_state_is_refused_on_resume(
    corrupt: Callable[[dict[str, Any]], Any], message: str, mid_epoch_checkpoint: dict[str, Any], tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:  # fmt: skip
    state = copy.deepcopy(mid_epoch_checkpoint)
    corrupt(state)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(state, run_dir / "last.pt")
    assert resume(run_dir) == 2
    line = _error_line(capsys)
    assert re.search(rf"checkpoint {re.escape(str(run_dir / 'last.pt'))} is malformed: {message}", line), line


def test_second_process_on_the_same_run_directory_is_refused(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # A requeued job starting while its first incarnation still runs.
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running trainer holds
        assert train_in_process(dataset, out) == 2
        assert f"{out} is in use by another alexnet process" in _error_line(capsys)
        assert not (out / "last.pt").exists()
    assert train_in_process(dataset, out, "--epochs", "1") == 0  # released: the lock dies with its holder
