"""The training loop: the paper's SGD rule, its plateau schedule, checkpoints and resume.

Section 5 of the paper: batches of 128, momentum 0.9, weight decay 0.0005 with the
update

    v <- 0.9 v - 0.0005 lr w - lr grad(L)        w <- w + v

and a learning rate of 0.01 divided by 10 whenever the validation error stopped
improving, three times in all, over about 90 epochs.

Everything that decides what a step computes -- the data order, the augmentation draws,
dropout -- comes from generators seeded by (seed, epoch). A checkpoint, written at every
epoch end and every ``run.checkpoint_every`` steps, records the position in the epoch,
the epoch's partial sums and the generators' states at that batch boundary, so
``alexnet train --resume RUN_DIR`` after a crash at any moment ends with the same
weights and metrics, bit for bit on the CPU, as a run that was never interrupted.

Several processes (torchrun; distributed.py) train one run as data parallelism: the
same command, ``optim.batch_size`` the global batch, rank 0 writing the run directory.
When torchrun restarts the workers after a failure (--max-restarts), ``train`` finds the
run's checkpoint and resumes from it.

Faults a days-long run meets, and what happens (tests in tests/test_reliability.py):
SIGTERM/SIGINT save a checkpoint at the next batch boundary and raise errors.Stopped;
a NaN or inf loss stops the run naming the step, without overwriting the last good
checkpoint (or, with ``optim.skip_nonfinite``, skips the batch); a checkpoint that
cannot be written (full disk) stops the run with the previous one intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from alexnet import config as config_lib
from alexnet.checkpoint import (
    load_for_resume,
    model_from_checkpoint,
    save_run_checkpoint,
)
from alexnet.config import Config
from alexnet.data.augment import Preprocess, make_preprocess
from alexnet.data.loader import EpochBatchSampler
from alexnet.data.source import open_training_data
from alexnet.data.stats import DataStats
from alexnet.errors import AlexNetError, Stopped
from alexnet.evaluate import evaluate
from alexnet.files import exclusive_lock
from alexnet.models.alexnet import build_model
from alexnet.runtime import resolve_device
from alexnet.train import distributed
from alexnet.train.distributed import SINGLE, Dist
from alexnet.train.optim import PaperSGD, param_groups, plateau_schedule
from alexnet.train.step import TrainStep, resolve_options

log = logging.getLogger("alexnet")


def _seed_for(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


# How often (in steps) the loop reads anything back from the device: the progress bar's
# running loss and the non-finite check. Reading forces the host to wait for the device;
# once every 50 steps costs nothing measurable, once per step would.
SYNC_EVERY = 50


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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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


def _truncate_metrics(path: Path, epochs_done: int) -> None:
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


class StopSignals:
    """SIGTERM and SIGINT ask the loop to stop at the next batch boundary with a checkpoint.

    The handler only records the signal: logging or printing from a handler can raise
    "reentrant call" inside an interrupted write. A second SIGINT raises
    KeyboardInterrupt at once (Ctrl-C twice: abort without waiting for the checkpoint;
    the previous checkpoint stays intact because every write is atomic). Handlers are
    installed only in the main thread (Python allows nothing else) and restored on exit.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


@dataclass
class EpochTotals:
    """What an epoch has done so far. Saved in mid-epoch checkpoints, so a resumed epoch
    ends with the same sums, in the same order of additions, as an uninterrupted one."""

    loss_sum: torch.Tensor  # () float32 on the device: sum of per-image cross-entropy
    wrong: torch.Tensor  # () int64 on the device: top-1 mistakes
    seen: int = 0  # images trained on
    batches: int = 0  # batches of the epoch's order consumed, including wholly undecodable ones
    steps: int = 0  # optimizer updates
    skipped_nonfinite: int = 0  # batches skipped for a non-finite loss or gradient
    seconds: float = 0.0  # training time so far; for images/s only, not part of exact resume

    @classmethod
    def zeros(cls, device: torch.device) -> EpochTotals:
        return cls(torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long))

    def state_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "loss_sum": self.loss_sum.cpu(), "wrong": self.wrong.cpu()}

    @classmethod
    def from_state_dict(cls, d: Any, device: torch.device, path: Path) -> EpochTotals:
        try:
            totals = cls(**d)
            ok = (
                totals.loss_sum.shape == () and totals.loss_sum.dtype == torch.float32
                and totals.wrong.shape == () and totals.wrong.dtype == torch.long
                and all(isinstance(getattr(totals, k), int) and getattr(totals, k) >= 0
                        for k in ("seen", "batches", "steps", "skipped_nonfinite"))
                and isinstance(totals.seconds, (int, float))
            )  # fmt: skip
        except (TypeError, AttributeError):
            ok = False
        if not ok:
            raise AlexNetError(f"checkpoint {path} is malformed: its partial epoch sums are not what alexnet writes")
        totals.loss_sum, totals.wrong = totals.loss_sum.to(device), totals.wrong.to(device)
        return totals


def train(cfg: Config) -> Path:
    """Train a new run with cfg in ``cfg.run.out``; returns the run directory.

    Under torchrun every rank calls this. After a restart by torchrun (a rank had died)
    the run directory already has a checkpoint, and the run resumes from it.
    Raises errors.Stopped after saving a checkpoint when SIGTERM or SIGINT arrives.
    """
    run_dir = Path(cfg.run.out)
    # Before joining the group: a batch that does not divide stops every rank at once.
    distributed.split_batch(cfg.optim.batch_size, distributed.from_env().world_size, cfg.optim.accumulate)
    with distributed.context() as d:
        if (run_dir / "last.pt").exists():
            if distributed.restart_count() > 0:
                log.warning(
                    "restart %d by torchrun: resuming %s from its last checkpoint", distributed.restart_count(), run_dir
                )
                return _resume(run_dir, d, dict(epochs=cfg.optim.epochs, device=cfg.run.device,
                                                workers=cfg.data.workers, progress=cfg.run.progress))  # fmt: skip
            raise AlexNetError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out"
            )
        with _rank_zero_owns(run_dir, d):
            return _run(cfg, None, run_dir, d)


def resume(
    run_dir: str | Path,
    *,
    epochs: int | None = None,
    device: str | None = None,
    workers: int | None = None,
    progress: bool | None = None,
) -> Path:
    """Continue the run in run_dir from its newest loadable checkpoint with its own recipe.

    The checkpoint may be from the middle of an epoch; the rest of that epoch replays
    exactly what the uninterrupted run would have done (with the same world size; with
    another one, from the same global batch on). ``epochs`` may extend the run.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AlexNetError(f"run directory {run_dir} does not exist")
    with distributed.context() as d:
        return _resume(run_dir, d, dict(epochs=epochs, device=device, workers=workers, progress=progress))


def _resume(run_dir: Path, d: Dist, changes: dict[str, Any]) -> Path:
    # Every rank reads the checkpoint itself: the run directory must be on storage all
    # ranks see (a shared file system with several machines).
    with _rank_zero_owns(run_dir, d):
        state, path = load_for_resume(run_dir)
        cfg = config_lib.from_dict(state["config"], f"checkpoint {path}")
        cfg.run.out = str(run_dir)
        if changes["epochs"] is not None:
            cfg.optim.epochs = changes["epochs"]
        if changes["device"] is not None:
            cfg.run.device = changes["device"]
        if changes["workers"] is not None:
            cfg.data.workers = changes["workers"]
        if changes["progress"] is not None:
            cfg.run.progress = changes["progress"]
        return _run(cfg, state, run_dir, d, path)


@contextlib.contextmanager
def _rank_zero_owns(run_dir: Path, d: Dist) -> Iterator[None]:
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


def _run(cfg: Config, state: dict[str, Any] | None, run_dir: Path, d: Dist, state_path: Path | None = None) -> Path:
    # Checked before any work: every rank raises the same error and the job ends at once.
    distributed.split_batch(cfg.optim.batch_size, d.world_size, cfg.optim.accumulate)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        cfg.run.progress = False
    device = resolve_device(distributed.device_for(d, cfg.run.device))

    if cfg.data.root is None:
        from alexnet.data.synthetic import ensure_shapes_dataset

        if d.is_main:  # rank 0 generates it; the others find it after the barrier
            cfg.data.root = str(ensure_shapes_dataset(progress=cfg.run.progress))
        d.barrier()
        if not d.is_main:
            cfg.data.root = str(ensure_shapes_dataset(progress=False))
        log.info("no --data given: using the built-in shapes dataset at %s", cfg.data.root)
    # An ImageFolder tree, or a store from `alexnet prepare` (decoded once, read as uint8 batches).
    data = open_training_data(
        cfg.data.root,
        cfg.data.image_size,
        workers=cfg.data.workers,
        stats_max_images=cfg.data.stats_max_images,
        device=device,
        progress=cfg.run.progress,
    )
    classes = data.classes
    cfg.model = dataclasses.replace(cfg.model, num_classes=len(classes), input_size=cfg.data.crop_size)
    if cfg.data.crop_size > cfg.data.image_size:
        raise AlexNetError(f"data.crop_size {cfg.data.crop_size} exceeds data.image_size {cfg.data.image_size}")

    reported: set[str] = set()
    if state is not None:
        if list(state["classes"]) != classes:
            raise AlexNetError(
                f"the checkpoint in {run_dir} has {len(state['classes'])} classes, "
                f"but {cfg.data.root} has {len(classes)} (or different names): resume with the same data"
            )
        model = model_from_checkpoint(state, state_path or run_dir)
        pre = Preprocess.from_state_dict(state["preprocess"])
        reported.update(str(s) for s in state.get("skipped_files", []))
    else:
        pre_state = None
        if d.is_main:  # the statistics are computed once and sent to the other ranks
            log.info("mean image and RGB PCA over %d training images (%s)", data.counts["train"], data.description)
            stats, skipped = data.stats()
            if skipped:
                log.warning("%d training files cannot be decoded and are skipped", len(skipped))
                _report_skipped(skipped, reported)
            pre_state = _preprocess(cfg, stats).state_dict()
        pre = Preprocess.from_state_dict(d.broadcast_object(pre_state))
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model)
    if d.is_main:
        config_lib.save(cfg, run_dir / "config.yaml")
    model = model.to(device)
    pre = pre.to(device)

    lr = cfg.optim.scaled_lr
    if lr != cfg.optim.lr:
        log.info("optim.lr_scaling linear: lr %g x batch %d / 128 = %g", cfg.optim.lr, cfg.optim.batch_size, lr)
    optimizer = PaperSGD(
        param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_biases), lr=lr, momentum=cfg.optim.momentum
    )
    schedule = plateau_schedule(optimizer, cfg.optim)
    options = resolve_options(cfg.speed, device, cfg.model.name)
    log.info("step options: %s", ", ".join(f"{k} {v}" for k, v in options.as_dict().items()))
    step_fn = TrainStep(
        model,
        optimizer,
        pre,
        options,
        device,
        flip=cfg.data.flip,
        lighting_std=cfg.data.lighting_std,
        skip_nonfinite=cfg.optim.skip_nonfinite,
        dist=d,
        accumulate=cfg.optim.accumulate,
    )
    loop = _Loop(cfg, run_dir, device, model, optimizer, schedule, pre, classes, reported, step_fn, d)
    start_epoch, totals = 0, None
    if state is not None:
        start_epoch, totals = loop.restore(state, state_path or run_dir / "last.pt")
    if d.is_main:
        _truncate_metrics(run_dir / "metrics.jsonl", start_epoch)

    # With several ranks a partial last global batch is dropped (see distributed.py).
    ranks = dict(rank=d.rank, world_size=d.world_size)
    train_sampler = EpochBatchSampler(
        data.counts["train"], cfg.optim.batch_size, shuffle=True, seed=cfg.run.seed, drop_last=d.active, **ranks
    )
    val_sampler = EpochBatchSampler(data.counts["val"], cfg.optim.batch_size, shuffle=False, **ranks)
    train_loader = data.loader("train", train_sampler)
    val_loader = data.loader("val", val_sampler)
    run_log = RunLog(run_dir, cfg.run.tensorboard) if d.is_main else None
    try:
        # From here on SIGTERM/SIGINT stop with a checkpoint; before, there is nothing to
        # save and they end the process at once. The "training" line marks the switch.
        with StopSignals() as stop:
            loop.stop = stop
            log.info(
                "training %s (%s parameters) on %d images of %d classes, %s, for epochs %d-%d",
                cfg.model.name,
                f"{sum(p.numel() for p in model.parameters()):,}",
                data.counts["train"],
                len(classes),
                device,
                start_epoch + 1,
                cfg.optim.epochs,
            )
            if d.active:
                log.info(
                    "%d ranks: global batch %d = %d ranks x %d accumulation steps x %d images",
                    d.world_size, cfg.optim.batch_size, d.world_size, cfg.optim.accumulate,
                    distributed.split_batch(cfg.optim.batch_size, d.world_size, cfg.optim.accumulate),
                )  # fmt: skip
            for epoch in range(start_epoch, cfg.optim.epochs):
                if totals is None:
                    seed = _seed_for(cfg.run.seed, epoch)
                    torch.manual_seed(seed + _rank_offset(d))  # dropout: each rank its own masks
                    loop.augment_gen.manual_seed(seed + 1)  # augmentation: the same on every rank
                    totals = EpochTotals.zeros(device)
                train_sampler.set_epoch(epoch, totals.batches)
                loop.train_epoch(train_loader, epoch, totals, train_sampler.global_batches())
                loop.end_epoch(epoch, totals, val_loader, run_log)
                totals = None
                if stop.signum is not None and epoch + 1 < cfg.optim.epochs:
                    raise loop.stopped(epoch + 1, 0)
    finally:
        if run_log is not None:
            run_log.close()
    return run_dir


def _rank_offset(d: Dist) -> int:
    """Rank 0 keeps the single-process seed, so a one-rank run is what it always was."""
    return d.rank * 1_000_033


class _Loop:
    """The mutable state of a run and the two things done with it: train an epoch, end an epoch.

    Every checkpoint holds everything needed to continue from the batch boundary where it
    was taken: weights, optimizer and schedule state, the position in the epoch, the
    epoch's partial sums, and the global (dropout) and augmentation random states.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        device: torch.device,
        model: nn.Module,
        optimizer: PaperSGD,
        schedule: ReduceLROnPlateau,
        pre: Preprocess,
        classes: list[str],
        reported: set[str],
        step_fn: TrainStep,
        dist: Dist = SINGLE,
    ) -> None:
        self.cfg, self.run_dir, self.device, self.dist = cfg, run_dir, device, dist
        self.step_fn = step_fn
        self.model, self.optimizer, self.schedule, self.pre, self.classes = model, optimizer, schedule, pre, classes
        self.reported = reported
        self.augment_gen = torch.Generator(device=device)
        self.step, self.best = 0, math.inf
        self.saved = "none (none was written yet)"  # the newest checkpoint, for messages
        self.stop: StopSignals | None = None
        # The first step whose loss was not finite, or -1; kept on the device and read
        # only every SYNC_EVERY steps, at checkpoints and at epoch ends.
        self.first_nonfinite = torch.full((), -1, dtype=torch.long, device=device)
        # Fault injection for the restart test (tests/test_distributed.py): this rank dies
        # abruptly after that step, on torchrun's first attempt only.
        kill_at = os.environ.get("ALEXNET_FAULT_KILL_AT_STEP", "")
        self.kill_at = (
            int(kill_at) if kill_at.isdigit() and dist.rank == int(os.environ.get("ALEXNET_FAULT_RANK", "1")) else -1
        )

    # -- checkpoints ----------------------------------------------------------------

    def restore(self, state: dict[str, Any], path: Path) -> tuple[int, EpochTotals | None]:
        """Load optimizer, schedule, counters and, for a mid-epoch checkpoint, the partial
        epoch and random states; returns (epochs done, partial totals or None)."""
        unknown = set(state["schedule"]) - set(self.schedule.state_dict())
        if unknown:  # ReduceLROnPlateau.load_state_dict sets any key as an attribute
            raise AlexNetError(f"checkpoint {path} is malformed: unknown schedule state {sorted(unknown)[:3]}")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
            raise AlexNetError(
                f"checkpoint {path} is malformed: its optimizer or schedule state does not fit the network ({e})"
            ) from None
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                v = self.optimizer.state[p].get("velocity")
                if not isinstance(group["lr"], float) or (v is not None and v.shape != p.shape):
                    raise AlexNetError(f"checkpoint {path} is malformed: its optimizer state does not fit the network")
        epoch, self.step, self.best = state["epoch"], state["step"], float(state["best_val_top1_error"])
        self.saved = f"{path} (epoch {epoch}, step {self.step})"
        batch = state.get("batch", 0)
        if not isinstance(batch, int) or batch < 0 or epoch < 0 or self.step < 0:
            raise AlexNetError(f"checkpoint {path} is malformed: negative or non-integer epoch, batch or step")
        if batch == 0:
            log.info("resuming %s after epoch %d (step %d)", self.run_dir, epoch, self.step)
            return epoch, None
        totals = EpochTotals.from_state_dict(state.get("partial"), self.device, path)
        if totals.batches != batch:
            raise AlexNetError(f"checkpoint {path} is malformed: its batch count disagrees with its partial sums")
        if not self.dist.is_main:  # the saved sums are over all ranks: rank 0 carries them on
            totals.loss_sum.zero_(), totals.wrong.zero_()
            totals.seen = 0
        self._restore_rng(state.get("rng"), path, epoch, batch)
        log.info("resuming %s in epoch %d after batch %d (step %d)", self.run_dir, epoch + 1, batch, self.step)
        return epoch, totals

    def _restore_rng(self, rng: Any, path: Path, epoch: int, batch: int) -> None:
        if not isinstance(rng, dict):
            raise AlexNetError(f"checkpoint {path} is malformed: a mid-epoch checkpoint without random states")
        if rng.get("world_size", 1) != self.dist.world_size or self.dist.active:
            # The augmentation generator is the same on every rank and for any world size;
            # dropout's is per rank and only rank 0's was saved: reseeded per rank.
            if rng.get("device") == self.device.type:
                self._set_augment_state(rng, path)
                seed = _seed_for(self.cfg.run.seed, epoch) + 2 * batch + _rank_offset(self.dist)
                torch.manual_seed(seed)
                if rng.get("world_size", 1) != self.dist.world_size:
                    log.warning(
                        "checkpoint written by %d ranks, resumed with %d: dropout reseeded, the run is not bit-exact",
                        rng.get("world_size", 1),
                        self.dist.world_size,
                    )
                return
        if rng.get("device") != self.device.type:
            # CPU and CUDA generators have different state formats; the run cannot be exact
            # across devices anyway (other kernels), so continue with a fresh seed.
            log.warning(
                "checkpoint written on %s, resumed on %s: random state reseeded, the run is not bit-exact",
                rng.get("device"),
                self.device.type,
            )
            seed = _seed_for(self.cfg.run.seed, epoch) + 2 * batch
            torch.manual_seed(seed + _rank_offset(self.dist))
            self.augment_gen.manual_seed(seed + 1)
            return
        try:
            torch.set_rng_state(rng["torch"])
            self.augment_gen.set_state(rng["augment"])
            if self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        except (KeyError, TypeError, RuntimeError) as e:
            raise AlexNetError(f"checkpoint {path} is malformed: bad random state ({e})") from None

    def _set_augment_state(self, rng: dict[str, Any], path: Path) -> None:
        try:
            self.augment_gen.set_state(rng["augment"])
        except (KeyError, TypeError, RuntimeError) as e:
            raise AlexNetError(f"checkpoint {path} is malformed: bad random state ({e})") from None

    def _check_finite(self, epoch: int, params_too: bool) -> None:
        """Raise if a loss (or, before a checkpoint, a weight) became NaN or inf. One host sync."""
        # The maximum over ranks: every rank takes the same decision (one raising alone would
        # leave the others waiting in their next collective). -1 < any step number.
        first = int(self.dist.all_reduce_max(self.first_nonfinite.clone()))
        what = f"training loss became non-finite at step {first} (epoch {epoch + 1})"
        if first < 0 and params_too:
            if bool(torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()):
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
        if not self.dist.active:
            return totals
        seen = torch.tensor(totals.seen, device=self.device)
        return dataclasses.replace(
            totals,
            loss_sum=self.dist.all_reduce_sum(totals.loss_sum.clone()),
            wrong=self.dist.all_reduce_sum(totals.wrong.clone()),
            seen=int(self.dist.all_reduce_sum(seen)),
        )

    def save(
        self, epoch_done: int, totals: EpochTotals | None, metrics: dict[str, Any] | None = None, best: bool = False
    ) -> Path:
        """Checkpoint at a batch boundary (``totals``: inside an epoch) or at an epoch end.

        Every rank calls it (the partial sums are reduced over ranks); rank 0 writes.
        """
        if totals is not None:
            totals = self.global_totals(totals)
        if not self.dist.is_main:
            return self.run_dir / "last.pt"
        rng: dict[str, Any] = {
            "world_size": self.dist.world_size,
            "device": self.device.type,
            "torch": torch.get_rng_state(),
            "augment": self.augment_gen.get_state(),
        }
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "epoch": epoch_done,
            "batch": totals.batches if totals is not None else 0,
            "step": self.step,
            "best_val_top1_error": self.best,
            "preprocess": self.pre.state_dict(),
            "classes": self.classes,
            "skipped_files": sorted(self.reported),
            "rng": rng,
        }
        if totals is not None:
            state["partial"] = totals.state_dict()
        if metrics is not None:
            state["metrics"] = metrics
        path = save_run_checkpoint(self.run_dir, state, best=best, keep=self.cfg.run.keep_checkpoints)
        self.saved = f"{path} (epoch {epoch_done}, step {self.step})"
        return path

    def stopped(self, epoch_done: int, batch: int) -> Stopped:
        """The exception that ends a run stopped by a signal, once its checkpoint is written."""
        assert self.stop is not None and self.stop.signum is not None
        where = f"in epoch {epoch_done + 1} after batch {batch}" if batch else f"after epoch {epoch_done}"
        message = (
            f"stopped by {self.stop.name} {where} (step {self.step}); checkpoint "
            f"{self.run_dir / 'last.pt'}; continue with: alexnet train --resume {self.run_dir}"
        )
        log.warning("%s", message)
        return Stopped(message, self.stop.signum)

    # -- the loop ---------------------------------------------------------------------

    def train_epoch(self, loader: Any, epoch: int, totals: EpochTotals, epoch_batches: int) -> None:
        """Train on the epoch's remaining batches, adding to totals; checkpoint every
        run.checkpoint_every steps, and stop with a checkpoint when a signal asks."""
        from tqdm import tqdm

        cfg, every = self.cfg, self.cfg.run.checkpoint_every
        self.model.train()
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", disable=not cfg.run.progress, leave=False)
        for batch in bar:
            totals.batches += 1
            _report_skipped(batch.skipped, self.reported)
            stepped = False
            stop = self.stop is not None and self.stop.signum is not None
            usable = len(batch.labels) > 0
            if self.dist.active:
                # All ranks must take every step together (DDP) and stop at the same batch:
                # one all-reduce of two flags per step, whose read-back is a host sync.
                flags = torch.tensor([int(not usable), int(stop)], device=self.device)
                empty_somewhere, stop = (bool(f) for f in self.dist.all_reduce_max(flags).tolist())
                usable = not empty_somewhere
            if usable:
                stepped = self._step(batch, totals, epoch)
                if stepped and self.step == self.kill_at and distributed.restart_count() == 0:
                    os._exit(17)
            if stepped and self.step % SYNC_EVERY == 0:
                self._check_finite(epoch, params_too=False)
                if cfg.run.progress and totals.seen:
                    bar.set_postfix(loss=f"{totals.loss_sum.item() / totals.seen:.3f}")
            if stop or (stepped and every and self.step % every == 0):
                totals.seconds += time.perf_counter() - start
                self._check_finite(epoch, params_too=True)
                self.save(epoch, totals)
                start = time.perf_counter()
                log.info(
                    "checkpoint at step %d (epoch %d, batch %d/%d)", self.step, epoch + 1, totals.batches, epoch_batches
                )
                if stop:
                    raise self.stopped(epoch, totals.batches)
        totals.seconds += time.perf_counter() - start

    def _step(self, batch: Any, totals: EpochTotals, epoch: int) -> bool:
        """One SGD step on a batch; False if the batch was skipped for a non-finite loss."""
        images = batch.images.to(self.device, non_blocking=True)
        labels = batch.labels.to(self.device, non_blocking=True)
        loss, wrong = self.step_fn(images, labels, self.augment_gen)
        if self.step_fn.skipped:
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

    def end_epoch(self, epoch: int, totals: EpochTotals, val_loader: Any, run_log: RunLog | None) -> None:
        """Validate, step the schedule, append the metrics row and checkpoint."""
        totals = self.global_totals(totals)
        if totals.seen == 0:
            raise AlexNetError("no training image could be decoded in this epoch")
        self._check_finite(epoch, params_too=True)
        # Each rank evaluates its share of the validation set; the counts are summed.
        results, skipped = evaluate(
            [self.model], [self.pre], val_loader, self.device, ten=False, reduce=self.dist.all_reduce_sum
        )
        val = results["centre"]
        _report_skipped(skipped, self.reported)
        lr_before = self.optimizer.param_groups[0]["lr"]
        self.schedule.step(val.top1_error)
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
        if run_log is not None:
            run_log.epoch(row)
        improved = val.top1_error < self.best
        self.best = min(self.best, val.top1_error)
        self.save(epoch + 1, None, metrics=row, best=improved)
        log.info(
            "epoch %d/%d  loss %.4f  train err %.2f%%  val top-1 %.2f%%  top-5 %.2f%%  lr %.2g  %.0f img/s",
            epoch + 1,
            self.cfg.optim.epochs,
            row["train_loss"],
            100 * row["train_error"],
            100 * val.top1_error,
            100 * val.top5_error,
            lr_before,
            row["images_per_s"],
        )
        if self.optimizer.param_groups[0]["lr"] < lr_before:
            log.info(
                "validation error stopped improving: lr %.2g -> %.2g", lr_before, self.optimizer.param_groups[0]["lr"]
            )


def _preprocess(cfg: Config, stats: DataStats) -> Preprocess:
    try:
        return make_preprocess(
            cfg.data.normalize,
            cfg.data.image_size,
            cfg.data.crop_size,
            stats.mean_image,
            stats.pixel_std,
            stats.eigvals,
            stats.eigvecs,
        )
    except ValueError as e:
        raise AlexNetError(f"data.normalize: {e}") from None


def _report_skipped(skipped: list[str], reported: set[str]) -> None:
    """Log each undecodable file once per run ("path: reason"), however often it is met."""
    for item in skipped:
        if item not in reported:
            reported.add(item)
            log.warning("skipped unreadable image %s", item)
