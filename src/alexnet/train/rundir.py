"""The run directory: who owns it, and the logs written into it.

Rank 0 holds the directory's lock and writes log.txt, metrics.jsonl and TensorBoard
events; the other ranks log warnings only (``rank_zero_owns``). On resume the metric rows
of epochs after the checkpoint are dropped (``truncate_metrics``): they will be redone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from alexnet.errors import AlexNetError
from alexnet.files import exclusive_lock
from alexnet.train.distributed import Dist

log = logging.getLogger("alexnet")


class RunLog:
    """metrics.jsonl and TensorBoard events of a run directory."""

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.metrics_path = run_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def epoch(self, row: dict[str, Any]) -> None:
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            raise AlexNetError(
                f"cannot append to {self.metrics_path}: {e.strerror or e}; the last checkpoint is intact"
            ) from None
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()

    def step(self, step: int, scalars: dict[str, float]) -> None:
        """TensorBoard scalars at an optimizer step, under ``step/`` (the epoch rows are per epoch);
        flushed with the next epoch row, or by the writer itself every two minutes."""
        if self.writer is not None:
            for key, value in scalars.items():
                if math.isfinite(value):
                    self.writer.add_scalar(f"step/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@contextlib.contextmanager
def rank_zero_owns(run_dir: Path, d: Dist) -> Iterator[None]:
    """Rank 0 holds the run-directory lock and writes log.txt; the other ranks log warnings only."""
    if d.is_main:
        with _run_lock(run_dir), _log_file(run_dir):
            yield
        return
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


@contextlib.contextmanager
def _log_file(run_dir: Path) -> Iterator[None]:
    """Copy the run's log to run_dir/log.txt, including the error that ends it.

    The error goes to the file only: the command line prints it on the console itself.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    try:
        yield
    except AlexNetError as e:
        handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (e,), None))
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


def _run_lock(run_dir: Path) -> contextlib.AbstractContextManager[None]:
    """One trainer per run directory: a requeued job whose first incarnation still runs
    would otherwise interleave two runs' checkpoints and metrics."""
    busy = f"{run_dir} is in use by another alexnet process; wait for it to end or stop it first"
    return exclusive_lock(run_dir / ".lock", busy)


def truncate_metrics(path: Path, epochs_done: int) -> None:
    """On resume, drop metric rows of epochs after the checkpoint (they will be redone),
    and a last line cut short by a crash while it was being appended."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("epoch", 0) <= epochs_done:
            keep.append(line)
    path.write_text("".join(r + "\n" for r in keep))
