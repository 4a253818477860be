"""The epoch loop: train an epoch batch by batch, end it with validation and a checkpoint.

``Loop`` is built by run.py from a run's parts (``RunParts``: the configuration, the
network, its optimizer and schedule, the step) and its stop signals. It keeps the
counters that change as the run goes (step, best validation error, the newest
checkpoint's name) and the augmentation generator; checkpoints.py saves and restores
them. ``after_step_hooks`` lets tests act after an optimizer step (the restart tests
kill a rank there); production code installs none.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from alexnet.config import Config
from alexnet.data.augment import Preprocess
from alexnet.data.loader import EpochBatchSampler
from alexnet.errors import AlexNetError, Stopped
from alexnet.evaluate import evaluate
from alexnet.train import checkpoints
from alexnet.train.distributed import Dist
from alexnet.train.optim import PaperSGD
from alexnet.train.rundir import RunLog
from alexnet.train.state import EpochTotals, StopSignals, seed_epoch
from alexnet.train.step import TrainStep

log = logging.getLogger("alexnet")

# How often (in steps) the loop reads anything back from the device: the progress bar's
# running loss and the non-finite check. Reading forces the host to wait for the device;
# once every 50 steps costs nothing measurable, once per step would.
SYNC_EVERY = 50

# Called as hook(step, dist) after every optimizer step, on every rank. For tests only.
after_step_hooks: list[Callable[[int, Dist], None]] = []


@dataclass(frozen=True)
class RunParts:
    """What a run is made of; fixed once the run is set up."""

    cfg: Config  # the resolved configuration, as saved in config.yaml and every checkpoint
    run_dir: Path
    device: torch.device
    dist: Dist
    model: nn.Module
    optimizer: PaperSGD
    schedule: ReduceLROnPlateau
    pre: Preprocess
    classes: list[str]
    step_fn: TrainStep
    progress: bool  # progress bars: cfg.run.progress on rank 0, never on the others


@dataclass(frozen=True)
class Feeds:
    """Where the loop's batches come from and its metric rows go."""

    train_sampler: EpochBatchSampler
    train_loader: Any
    val_loader: Any
    run_log: RunLog | None  # rank 0 only


class Loop:
    """The mutable state of a run and the two things done with it: train an epoch, end an epoch.

    Every checkpoint holds everything needed to continue from the batch boundary where it
    was taken (checkpoints.py): weights, optimizer and schedule state, the position in the
    epoch, the epoch's partial sums, and the global (dropout) and augmentation random states.
    """

    def __init__(self, parts: RunParts, stop: StopSignals, reported: set[str]) -> None:
        self.parts, self.stop = parts, stop
        self.reported = reported  # undecodable files already named in a warning
        self.augment_gen = torch.Generator(device=parts.device)
        self.step, self.best = 0, math.inf
        self.saved = "none (none was written yet)"  # the newest checkpoint, for messages
        # The first step whose loss was not finite, or -1; kept on the device and read
        # only every SYNC_EVERY steps, at checkpoints and at epoch ends.
        self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=parts.device)
        self.run_log: RunLog | None = None  # rank 0's (Feeds.run_log): the step scalars and epoch rows
        self.window = (0.0, 0, 0.0)  # (loss sum, images, time.perf_counter()) at the last step scalars

    def run(self, start_epoch: int, totals: EpochTotals | None, feeds: Feeds) -> None:
        """Epochs start_epoch+1 to cfg.optim.epochs; ``totals``: a resumed epoch's partial sums."""
        cfg = self.parts.cfg
        self.run_log = feeds.run_log
        for epoch in range(start_epoch, cfg.optim.epochs):
            if totals is None:
                seed_epoch(cfg.run.seed, epoch, self.parts.dist, self.augment_gen)
                totals = EpochTotals.zeros(self.parts.device)
            feeds.train_sampler.set_epoch(epoch, totals.batches)
            self.train_epoch(feeds.train_loader, epoch, totals, feeds.train_sampler.global_batches())
            self.end_epoch(epoch, totals, feeds.val_loader)
            totals = None
            if self.stop.requested and epoch + 1 < cfg.optim.epochs:
                raise self.stopped(epoch + 1, 0)

    # -- training an epoch -------------------------------------------------------------

    def train_epoch(self, loader: Any, epoch: int, totals: EpochTotals, epoch_batches: int) -> None:
        """Train on the epoch's remaining batches, adding to totals; checkpoint every
        run.checkpoint_every steps, and stop with a checkpoint when a signal asks."""
        from tqdm import tqdm

        p, every = self.parts, self.parts.cfg.run.checkpoint_every
        p.model.train()
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", disable=not p.progress, leave=False)
        # Step scalars only where TensorBoard takes them: computing them reads the loss back.
        log_every = p.cfg.run.log_every_steps if self.run_log is not None and self.run_log.writer is not None else 0
        self.window = (float(totals.loss_sum.item()) if log_every else 0.0, totals.seen, start)
        for batch in bar:
            totals.batches += 1
            report_skipped(batch.skipped, self.reported)
            usable, stop = self._agree(len(batch.labels) > 0, self.stop.requested)
            stepped = usable and self._step(batch, totals, epoch)
            if stepped:
                for hook in after_step_hooks:
                    hook(self.step, p.dist)
            if stepped and log_every and self.step % log_every == 0:
                self._log_step(totals)
            if stepped and self.step % SYNC_EVERY == 0:
                self.check_finite(epoch, params_too=False)
                if p.progress and totals.seen:
                    bar.set_postfix(loss=f"{totals.loss_sum.item() / totals.seen:.3f}")
            if stop or (stepped and every and self.step % every == 0):
                totals.seconds += time.perf_counter() - start
                self.check_finite(epoch, params_too=True)
                checkpoints.save(self, epoch, totals)
                start = time.perf_counter()
                log.info(
                    "checkpoint at step %d (epoch %d, batch %d/%d)", self.step, epoch + 1, totals.batches, epoch_batches
                )
                if stop:
                    raise self.stopped(epoch, totals.batches)
        totals.seconds += time.perf_counter() - start

    def _log_step(self, totals: EpochTotals) -> None:
        """Mean loss, lr and images/s since the last step scalars. Reading the loss sum waits for
        the device, which is why this runs every run.log_every_steps steps, not every step; the
        images/s is then the device's rate over the window, not the host's queueing rate."""
        loss_sum, now = float(totals.loss_sum.item()), time.perf_counter()
        last_loss, last_seen, last_time = self.window
        images = totals.seen - last_seen
        if images > 0 and self.run_log is not None:
            self.run_log.step(
                self.step,
                {
                    "train_loss": (loss_sum - last_loss) / images,
                    "lr": float(self.parts.optimizer.param_groups[0]["lr"]),
                    # rank 0's images times the ranks: every rank steps on a batch of the same size
                    "images_per_s": images * self.parts.dist.world_size / max(now - last_time, 1e-9),
                },
            )
        self.window = (loss_sum, totals.seen, now)

    def _agree(self, usable: bool, stop: bool) -> tuple[bool, bool]:
        """(usable, stop) agreed by all ranks: usable only if every rank's batch is, stop if any rank's signal came."""
        if not self.parts.dist.active:
            return usable, stop
        # All ranks must take every step together (DDP) and stop at the same batch:
        # one all-reduce of two flags per step, whose read-back is a host sync.
        flags = torch.tensor([int(not usable), int(stop)], device=self.parts.device)
        empty_somewhere, stop = (bool(f) for f in self.parts.dist.all_reduce_max(flags).tolist())
        return not empty_somewhere, stop

    def _step(self, batch: Any, totals: EpochTotals, epoch: int) -> bool:
        """One SGD step on a batch; False if the batch was skipped for a non-finite loss."""
        p = self.parts
        images = batch.images.to(p.device, non_blocking=True)
        labels = batch.labels.to(p.device, non_blocking=True)
        loss, wrong = p.step_fn(images, labels, self.augment_gen)
        if p.step_fn.skipped:
            totals.skipped_nonfinite += 1
            log.warning(
                "skipped batch %d of epoch %d: non-finite loss or gradient (%d skipped this epoch)",
                totals.batches,
                epoch + 1,
                totals.skipped_nonfinite,
            )
            return False
        self.step += 1
        totals.steps += 1
        bad = ~loss.isfinite() & (self.first_nonfinite < 0)
        self.first_nonfinite = torch.where(bad, self.step, self.first_nonfinite)
        totals.loss_sum += loss * len(labels)
        totals.wrong += wrong
        totals.seen += len(labels)
        return True

    def check_finite(self, epoch: int, params_too: bool) -> None:
        """Raise if a loss (or, before a checkpoint, a weight) became NaN or inf. One host sync."""
        # The maximum over ranks: every rank takes the same decision (one raising alone would
        # leave the others waiting in their next collective). -1 < any step number.
        first = int(self.parts.dist.all_reduce_max(self.first_nonfinite.clone()))
        what = f"training loss became non-finite at step {first} (epoch {epoch + 1})"
        if first < 0 and params_too:
            if bool(torch.stack([w.isfinite().all() for w in self.parts.model.parameters()]).all()):
                return
            what = f"weights became non-finite by step {self.step} (epoch {epoch + 1}; the loss was finite: an overflowing gradient)"
        elif first < 0:
            return
        raise AlexNetError(
            f"{what}; the last good checkpoint is {self.saved}; lower optim.lr, or set "
            "optim.skip_nonfinite=true to skip such batches"
        )

    def global_totals(self, totals: EpochTotals) -> EpochTotals:
        """The epoch's sums over all ranks (totals itself with one rank). A collective: every rank calls it."""
        d, device = self.parts.dist, self.parts.device
        if not d.active:
            return totals
        seen = torch.tensor(totals.seen, device=device)
        return dataclasses.replace(
            totals,
            loss_sum=d.all_reduce_sum(totals.loss_sum.clone()),
            wrong=d.all_reduce_sum(totals.wrong.clone()),
            seen=int(d.all_reduce_sum(seen)),
        )

    def stopped(self, epoch_done: int, batch: int) -> Stopped:
        """The exception that ends a run stopped by a signal, once its checkpoint is written."""
        assert self.stop.signum is not None
        run_dir = self.parts.run_dir
        where = f"in epoch {epoch_done + 1} after batch {batch}" if batch else f"after epoch {epoch_done}"
        message = (
            f"stopped by {self.stop.name} {where} (step {self.step}); checkpoint "
            f"{run_dir / 'last.pt'}; continue with: alexnet train --resume {run_dir}"
        )
        log.warning("%s", message)
        return Stopped(message, self.stop.signum)

    # -- ending an epoch ---------------------------------------------------------------

    def end_epoch(self, epoch: int, totals: EpochTotals, val_loader: Any) -> None:
        """Validate, step the schedule, append the metrics row and checkpoint."""
        p = self.parts
        totals = self.global_totals(totals)
        if totals.seen == 0:
            raise AlexNetError("no training image could be decoded in this epoch")
        self.check_finite(epoch, params_too=True)
        # Each rank evaluates its share of the validation set; the counts are summed.
        results, skipped = evaluate([p.model], [p.pre], val_loader, p.device, ten=False, reduce=p.dist.all_reduce_sum)
        val = results["centre"]
        report_skipped(skipped, self.reported)
        lr_before = p.optimizer.param_groups[0]["lr"]
        p.schedule.step(val.top1_error)
        row = {
            "epoch": epoch + 1,
            "step": self.step,
            "train_loss": totals.loss_sum.item() / totals.seen,
            "train_error": totals.wrong.item() / totals.seen,
            "train_images": totals.seen,
            "train_nonfinite_skipped": totals.skipped_nonfinite,
            **val.as_dict("val_"),
            "lr": lr_before,
            "images_per_s": totals.seen / max(totals.seconds, 1e-9),
            "epoch_seconds": totals.seconds,
        }
        # The row goes out before the checkpoint: a crash in between leaves a row for an
        # epoch the checkpoint has not got, which resume drops and redoes. The other
        # order would lose the row for good.
        if self.run_log is not None:
            self.run_log.epoch(row)
        improved = val.top1_error < self.best
        self.best = min(self.best, val.top1_error)
        checkpoints.save(self, epoch + 1, None, metrics=row, best=improved)
        self._log_epoch(epoch, row, lr_before)

    def _log_epoch(self, epoch: int, row: dict[str, Any], lr_before: float) -> None:
        log.info(
            "epoch %d/%d  loss %.4f  train err %.2f%%  val top-1 %.2f%%  top-5 %.2f%%  lr %.2g  %.0f img/s",
            epoch + 1,
            self.parts.cfg.optim.epochs,
            row["train_loss"],
            100 * row["train_error"],
            100 * row["val_top1_error"],
            100 * row["val_top5_error"],
            lr_before,
            row["images_per_s"],
        )
        lr_after = self.parts.optimizer.param_groups[0]["lr"]
        if lr_after < lr_before:
            log.info("validation error stopped improving: lr %.2g -> %.2g", lr_before, lr_after)


def report_skipped(skipped: list[str], reported: set[str]) -> None:
    """Log each undecodable file once per run ("path: reason"), however often it is met."""
    for item in skipped:
        if item not in reported:
            reported.add(item)
            log.warning("skipped unreadable image %s", item)
