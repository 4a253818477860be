"""A run's checkpoints: what the loop writes at a batch boundary or an epoch end, and how
resume puts it back.

A checkpoint holds the resolved configuration, weights, optimizer and schedule state,
the counters, the preprocessing, the classes, the files reported as undecodable and the
random states; a mid-epoch one also the position in the epoch and the epoch's partial
sums (state.py). Every rank calls ``save`` (the partial sums are reduced over ranks);
rank 0 writes, through alexnet.checkpoint's atomic, rotating ``save_run_checkpoint``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alexnet.checkpoint import save_run_checkpoint
from alexnet.errors import AlexNetError
from alexnet.train.state import EpochTotals, random_state, restore_random_state

if TYPE_CHECKING:
    from alexnet.train.loop import Loop

log = logging.getLogger("alexnet")


def save(
    loop: Loop, epoch_done: int, totals: EpochTotals | None, metrics: dict[str, Any] | None = None, best: bool = False
) -> Path:
    """Checkpoint at a batch boundary (``totals``: inside an epoch) or at an epoch end.

    Every rank calls it (the partial sums are reduced over ranks); rank 0 writes.
    """
    p = loop.parts
    if totals is not None:
        totals = loop.global_totals(totals)
    if not p.dist.is_main:
        return p.run_dir / "last.pt"
    state = {
        "config": p.cfg.to_dict(),
        "model": p.model.state_dict(),
        "optimizer": p.optimizer.state_dict(),
        "schedule": p.schedule.state_dict(),
        "epoch": epoch_done,
        "batch": totals.batches if totals is not None else 0,
        "step": loop.step,
        "best_val_top1_error": loop.best,
        "preprocess": p.pre.state_dict(),
        "classes": p.classes,
        "skipped_files": sorted(loop.reported),
        "rng": random_state(p.device, loop.augment_gen, p.dist),
    }
    if totals is not None:
        state["partial"] = totals.state_dict()
    if metrics is not None:
        state["metrics"] = metrics
    path = save_run_checkpoint(p.run_dir, state, best=best, keep=p.cfg.run.keep_checkpoints)
    loop.saved = f"{path} (epoch {epoch_done}, step {loop.step})"
    return path


def restore(loop: Loop, state: dict[str, Any], path: Path) -> tuple[int, EpochTotals | None]:
    """Load optimizer, schedule, counters and, for a mid-epoch checkpoint, the partial
    epoch and random states; returns (epochs done, partial totals or None)."""
    p = loop.parts
    _load_optimizer_and_schedule(loop, state, path)
    epoch, loop.step, loop.best = state["epoch"], state["step"], float(state["best_val_top1_error"])
    loop.saved = f"{path} (epoch {epoch}, step {loop.step})"
    batch = state.get("batch", 0)
    if not isinstance(batch, int) or batch < 0 or epoch < 0 or loop.step < 0:
        raise AlexNetError(f"checkpoint {path} is malformed: negative or non-integer epoch, batch or step")
    if batch == 0:
        log.info("resuming %s after epoch %d (step %d)", p.run_dir, epoch, loop.step)
        return epoch, None
    totals = EpochTotals.from_state_dict(state.get("partial"), p.device, path)
    if totals.batches != batch:
        raise AlexNetError(f"checkpoint {path} is malformed: its batch count disagrees with its partial sums")
    if not p.dist.is_main:  # the saved sums are over all ranks: rank 0 carries them on
        totals.loss_sum.zero_(), totals.wrong.zero_()
        totals.seen = 0
    restore_random_state(
        state.get("rng"), path, seed=p.cfg.run.seed, epoch=epoch, batch=batch,
        device=p.device, augment_gen=loop.augment_gen, d=p.dist,
    )  # fmt: skip
    log.info("resuming %s in epoch %d after batch %d (step %d)", p.run_dir, epoch + 1, batch, loop.step)
    return epoch, totals


def _load_optimizer_and_schedule(loop: Loop, state: dict[str, Any], path: Path) -> None:
    optimizer, schedule = loop.parts.optimizer, loop.parts.schedule
    unknown = set(state["schedule"]) - set(schedule.state_dict())
    if unknown:  # ReduceLROnPlateau.load_state_dict sets any key as an attribute
        raise AlexNetError(f"checkpoint {path} is malformed: unknown schedule state {sorted(unknown)[:3]}")
    try:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise AlexNetError(
            f"checkpoint {path} is malformed: its optimizer or schedule state does not fit the network ({e})"
        ) from None
    for group in optimizer.param_groups:
        for param in group["params"]:
            v = optimizer.state[param].get("velocity")
            if not isinstance(group["lr"], float) or (v is not None and v.shape != param.shape):
                raise AlexNetError(f"checkpoint {path} is malformed: its optimizer state does not fit the network")
