"""Worker processes die with the program, whatever kills it, and no exit path waits on one.

Each test runs ``python -m alexnet`` as a separate process: what is checked is what a
user sees after kill -9 or an error (an immediate re-run works; the command ends).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from alexnet.data import store
from alexnet.data.prepare import prepare
from alexnet.runtime import die_with_parent
from conftest import SUBPROCESS_ENV, write_jpeg, write_tiny_checkpoint

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux only")

ENV = SUBPROCESS_ENV


def run_alexnet(*args: object, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "alexnet", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        timeout=timeout,
    )


def slow_tree(root: Path, per_class: int) -> Path:
    """An ImageFolder tree of large noisy JPEGs (slow to decode): copies of one file, quick to write."""
    rng = np.random.default_rng(0)
    one = write_jpeg(root / "one.jpg", rng.integers(0, 256, (900, 900, 3), dtype=np.uint8))
    for split, n in (("train", per_class), ("val", 2)):
        for c in ("ant", "bee"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                shutil.copy(one, root / split / c / f"{i}.jpg")
    one.unlink()
    return root


def test_prepare_killed_with_sigkill_resumes_at_once(tmp_path: Path) -> None:
    tree = slow_tree(tmp_path / "src", per_class=60)
    dest = tmp_path / "store"
    args = ["prepare", tree, dest, "--workers", "2", "--image-size", "64", "--chunk-size", "2", "--no-progress"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "alexnet", *map(str, args)], stdout=log, stderr=log, env=ENV)
        deadline = time.monotonic() + 60
        while not (dest / store.PROGRESS).is_file() or len((dest / store.PROGRESS).read_text().splitlines()) < 3:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.monotonic() < deadline, "prepare wrote no chunk in 60 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (dest / store.HEADER).exists(), "prepare finished before it was killed: make the tree larger"
    again = run_alexnet(*args)
    assert again.returncode == 0, again.stdout
    prepare(tree, tmp_path / "reference", image_size=64, workers=0, chunk_size=2, progress=False)
    for split in ("train", "val"):
        for name in (store.images_file(split), store.labels_file(split)):
            np.testing.assert_array_equal(np.load(dest / name), np.load(tmp_path / "reference" / name), err_msg=name)


FAILING_EVALUATE = """
import sys

import alexnet.evaluate
from alexnet.cli import main
from alexnet.errors import AlexNetError

calls = []
real = alexnet.evaluate.patch_probs


def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # mid-loop: the decoding workers are running and have batches queued
        raise {error}("the second batch failed")
    return real(*args, **kwargs)


alexnet.evaluate.patch_probs = failing
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("error", "status"), [("AlexNetError", 2), ("RuntimeError", 1)])
def test_error_inside_evaluate_with_workers_ends_the_process(tmp_path: Path, error: str, status: int) -> None:
    rng = np.random.default_rng(0)
    classes = ["c0", "c1"]
    for c in classes:
        for i in range(40):
            write_jpeg(tmp_path / "data" / "val" / c / f"{i}.jpg", rng.integers(0, 256, (40, 36, 3), dtype=np.uint8))
    checkpoint = write_tiny_checkpoint(tmp_path / "tiny.pt", classes)
    script = tmp_path / "failing_evaluate.py"
    script.write_text(textwrap.dedent(FAILING_EVALUATE.format(error=error)))
    args = ["evaluate", checkpoint, "--data", tmp_path / "data", "--workers", "2", "--batch-size", "4"]
    args += ["--device", "cpu", "--centre-only"]
    done = subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        timeout=60,
    )
    assert done.returncode == status, done.stdout
    assert "the second batch failed" in done.stdout
    if error == "AlexNetError":
        assert done.stdout.strip().splitlines()[-1] == "alexnet: error: the second batch failed"


def _grandchild_pid(die: bool) -> tuple[int, int]:
    """Fork a parent that forks a worker (which calls die_with_parent if ``die``); (parent, worker)."""
    read, write = os.pipe()
    parent = os.fork()
    if parent == 0:  # the parent: starts the worker, reports its pid, waits to be killed
        worker = os.fork()
        if worker == 0:
            if die:
                die_with_parent(os.getppid())
            time.sleep(30)
            os._exit(0)
        os.write(write, str(worker).encode())
        time.sleep(30)
        os._exit(0)
    os.close(write)
    worker = int(os.read(read, 32))
    os.close(read)
    return parent, worker


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("die", [True, False])
def test_die_with_parent_ends_the_worker_when_its_parent_is_killed(die: bool) -> None:
    parent, worker = _grandchild_pid(die)
    time.sleep(0.2)  # the worker has run die_with_parent
    os.kill(parent, signal.SIGKILL)
    os.waitpid(parent, 0)
    deadline = time.monotonic() + 2
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.005)
    try:
        assert _gone(worker) == die  # without it the orphan lives on (the control case)
    finally:
        if not _gone(worker):
            os.kill(worker, signal.SIGKILL)


def test_die_with_parent_exits_at_once_when_the_parent_is_already_gone() -> None:
    pid = os.fork()
    if pid == 0:
        die_with_parent(os.getppid() + 1_000_000)  # not our parent: as if it had died before prctl
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 1


def test_closing_a_loader_stops_its_persistent_workers() -> None:
    from alexnet.data.loader import EpochBatchSampler, closing_loaders, make_loader

    dataset = [(torch.zeros(3, 2, 2, dtype=torch.uint8), i % 2, "") for i in range(8)]
    loader = make_loader(dataset, EpochBatchSampler(len(dataset), 2, shuffle=False), workers=2)
    with pytest.raises(ValueError), closing_loaders(loader):
        for _batch in loader:
            workers = [w.pid for w in loader._iterator._workers]
            raise ValueError("mid-loop")
    deadline = time.monotonic() + 5
    while not all(map(_gone, workers)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(map(_gone, workers))
    assert [len(b.labels) for b in loader] == [2, 2, 2, 2]  # still usable: new workers
    loader.close()
