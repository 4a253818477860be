"""Starting a run: ``train(cfg)`` a new one, ``resume(run_dir)`` one from its checkpoint.

Section 5 of the paper: batches of 128, momentum 0.9, weight decay 0.0005 with the
update

    v <- 0.9 v - 0.0005 lr w - lr grad(L)        w <- w + v

and a learning rate of 0.01 divided by 10 whenever the validation error stopped
improving, three times in all, over about 90 epochs (optim.py).

A checkpoint, written at every epoch end and every ``run.checkpoint_every`` steps,
records the position in the epoch, the epoch's partial sums and the generators' states
at that batch boundary, so ``alexnet train --resume RUN_DIR`` after a crash at any moment
ends with the same weights and metrics, bit for bit on the CPU, as a run that was never
interrupted.

Several processes (torchrun; distributed.py) train one run as data parallelism: the
same command, ``optim.batch_size`` the global batch, rank 0 writing the run directory.
When torchrun restarts the workers after a failure (--max-restarts), ``train`` finds the
run's checkpoint and resumes from it.

Faults a days-long run meets, and what happens (tests in tests/train/test_reliability.py):
SIGTERM/SIGINT save a checkpoint at the next batch boundary and raise errors.Stopped;
a NaN or inf loss stops the run naming the step, without overwriting the last good
checkpoint (or, with ``optim.skip_nonfinite``, skips the batch); a checkpoint that
cannot be written (full disk) stops the run with the previous one intact.

This module sets a run up: it resolves the configuration once (the data root, the
network's classes and input size), opens the data, builds or loads the network, the
optimizer and the step, and hands them to loop.Loop.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alexnet import config as config_lib
from alexnet.checkpoint import load_checkpoint, model_from_checkpoint
from alexnet.config import Config
from alexnet.data import holdout as holdout_lib
from alexnet.data.augment import Preprocess, make_preprocess
from alexnet.data.loader import EpochBatchSampler, closing_loaders
from alexnet.data.source import open_training_data
from alexnet.data.stats import DataStats
from alexnet.errors import AlexNetError
from alexnet.models.alexnet import build_model
from alexnet.runtime import keep_freed_memory, resolve_device
from alexnet.train import checkpoints, distributed, finetune
from alexnet.train.checkpoints import load_for_resume
from alexnet.train.distributed import Dist
from alexnet.train.loop import Feeds, Loop, RunParts, report_skipped
from alexnet.train.optim import PaperSGD, param_groups, plateau_schedule
from alexnet.train.rundir import RunLog, rank_zero_owns, truncate_metrics
from alexnet.train.state import StopSignals
from alexnet.train.step import TrainStep, resolve_options

log = logging.getLogger("alexnet")


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
        with rank_zero_owns(run_dir, d):
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


def check_resume_changes(run_dir: str | Path, given: list[str], model: str | None) -> None:
    """Refuse options that would change a resumed run's saved recipe (they would silently not apply).

    ``given``: the command-line options given besides --resume that a resume cannot
    honour (--data, --model, --set, ...); ``model`` the --model value, if any.
    """
    if not given:
        return
    saved = load_checkpoint(Path(run_dir) / "last.pt")["config"]["model"]
    if model and model != saved["name"]:
        raise AlexNetError(
            f"the checkpoint in {run_dir} is a '{saved['name']}' model with {saved['num_classes']} "
            f"classes; --model {model} cannot change a run being resumed"
        )
    raise AlexNetError(
        f"--resume continues {run_dir} with its saved config; {', '.join(given)} cannot change it "
        "(only --epochs, --device, --workers and --no-progress can)"
    )


def _resume(run_dir: Path, d: Dist, changes: dict[str, Any]) -> Path:
    # Every rank reads the checkpoint itself: the run directory must be on storage all
    # ranks see (a shared file system with several machines).
    with rank_zero_owns(run_dir, d):
        state, path = load_for_resume(run_dir)
        saved = config_lib.from_dict(state["config"], f"checkpoint {path}")
        given = {key: value for key, value in changes.items() if value is not None}
        cfg = _replace(saved, "run", out=str(run_dir))
        cfg = _replace(cfg, "optim", **{k: v for k, v in given.items() if k == "epochs"})
        cfg = _replace(cfg, "run", **{k: v for k, v in given.items() if k in ("device", "progress")})
        cfg = _replace(cfg, "data", **{k: v for k, v in given.items() if k == "workers"})
        return _run(cfg, state, run_dir, d, path)


def _replace(cfg: Config, section: str, **changes: Any) -> Config:
    """A new Config with some fields of one section changed (cfg itself when there are none)."""
    if not changes:
        return cfg
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


def _run(given: Config, state: dict[str, Any] | None, run_dir: Path, d: Dist, state_path: Path | None = None) -> Path:
    # Checked before any work: every rank raises the same error and the job ends at once.
    distributed.split_batch(given.optim.batch_size, d.world_size, given.optim.accumulate)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    progress = given.run.progress and d.is_main
    device = resolve_device(distributed.device_for(d, given.run.device))
    keep_freed_memory(device)
    root = _data_root(given, d, progress)
    # An ImageFolder tree, or a store from `alexnet prepare` (decoded once, read as uint8 batches).
    data = open_training_data(
        root,
        given.data.image_size,
        workers=given.data.workers,
        stats_max_images=given.data.stats_max_images,
        device=device,
        progress=progress,
        holdout=given.data.holdout,
    )
    if data.holdout is not None:
        # Recorded so that a resume holds out exactly these images (data/holdout.py).
        holdout_lib.check_record(run_dir, data.holdout, resuming=state is not None, write=d.is_main)
        log.info(
            "data.holdout %g: %d images of train/ drive the lr plateaus and best.pt (val/ is not read)",
            given.data.holdout,
            data.counts["val"],
        )
    cfg = _resolved(given, root, data.classes)
    source = None
    if state is None and cfg.run.init_from:  # fine-tuning (finetune.py): the source's path and sha256 recorded
        source = finetune.load_source(cfg.run.init_from, cfg.run.init_sha256)
        cfg = _replace(cfg, "run", init_from=str(source.path), init_sha256=source.sha256)
    # From here on the run's configuration, unchanged.

    reported: set[str] = set()
    if state is not None:
        model, pre = _from_checkpoint(cfg, state, run_dir, state_path, data.classes, reported)
    else:
        model, pre = _fresh(cfg, data, d, reported, source)
    if d.is_main:
        config_lib.save(cfg, run_dir / "config.yaml")
    parts = _parts(cfg, run_dir, device, d, model.to(device), pre.to(device), data.classes, progress)
    stop = StopSignals()  # installed below, once there is something to save
    loop = Loop(parts, stop, reported)
    start_epoch, totals = 0, None
    if state is not None:
        start_epoch, totals = checkpoints.restore(loop, state, state_path or run_dir / "last.pt")
    if d.is_main:
        truncate_metrics(run_dir / "metrics.jsonl", start_epoch)

    feeds = _feeds(cfg, data, d, run_dir)
    try:
        # From here on SIGTERM/SIGINT stop with a checkpoint; before, there is nothing to
        # save and they end the process at once. The "training" line marks the switch.
        # The decoding workers stop when the run ends, however it ends: an error's traceback
        # would otherwise keep the loaders alive to an exit that waits on their workers.
        with closing_loaders(feeds.train_loader, feeds.val_loader), stop:
            _log_start(parts, data.counts["train"], start_epoch)
            loop.run(start_epoch, totals, feeds)
    finally:
        if feeds.run_log is not None:
            feeds.run_log.close()
    return run_dir


def _data_root(cfg: Config, d: Dist, progress: bool) -> str:
    """cfg.data.root, or the built-in shapes dataset (generated once) when none is given."""
    if cfg.data.root is not None:
        return cfg.data.root
    from alexnet.data.synthetic import ensure_shapes_dataset

    root = None
    if d.is_main:  # rank 0 generates it; the others find it after the barrier
        root = str(ensure_shapes_dataset(progress=progress))
    d.barrier()
    if not d.is_main:
        root = str(ensure_shapes_dataset(progress=False))
    log.info("no --data given: using the built-in shapes dataset at %s", root)
    return root


def _resolved(given: Config, root: str, classes: list[str]) -> Config:
    """The run's configuration: the data root found and the network sized for the data."""
    cfg = _replace(given, "data", root=root)
    cfg = _replace(cfg, "model", num_classes=len(classes), input_size=cfg.data.crop_size)
    if cfg.data.crop_size > cfg.data.image_size:
        raise AlexNetError(f"data.crop_size {cfg.data.crop_size} exceeds data.image_size {cfg.data.image_size}")
    return cfg


def _from_checkpoint(
    cfg: Config, state: dict[str, Any], run_dir: Path, state_path: Path | None, classes: list[str], reported: set[str]
) -> tuple[nn.Module, Preprocess]:
    if list(state["classes"]) != classes:
        raise AlexNetError(
            f"the checkpoint in {run_dir} has {len(state['classes'])} classes, "
            f"but {cfg.data.root} has {len(classes)} (or different names): resume with the same data"
        )
    model = model_from_checkpoint(state, state_path or run_dir)
    pre = Preprocess.from_state_dict(state["preprocess"])
    reported.update(str(s) for s in state.get("skipped_files", []))
    return model, pre


def _fresh(
    cfg: Config, data: Any, d: Dist, reported: set[str], source: finetune.Source | None = None
) -> tuple[nn.Module, Preprocess]:
    """A new network, or with ``source`` one with its weights (fine-tuning), and the preprocessing."""
    pre_state = None
    if d.is_main:  # the statistics are computed once and sent to the other ranks
        log.info("mean image and RGB PCA over %d training images (%s)", data.counts["train"], data.description)
        stats, skipped = data.stats()
        if skipped:
            log.warning("%d training files cannot be decoded and are skipped", len(skipped))
            report_skipped(skipped, reported)
        pre = _preprocess(cfg, stats) if source is None else finetune.init_preprocess(cfg.data, source, stats)
        pre_state = pre.state_dict()
    pre = Preprocess.from_state_dict(d.broadcast_object(pre_state))
    if source is not None:
        return finetune.init_model(cfg.model, source, data.classes, cfg.run.seed), pre
    torch.manual_seed(cfg.run.seed)
    return build_model(cfg.model), pre


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


def _parts(
    cfg: Config,
    run_dir: Path,
    device: torch.device,
    d: Dist,
    model: nn.Module,
    pre: Preprocess,
    classes: list[str],
    progress: bool,
) -> RunParts:
    """The optimizer, its schedule and the step for a network on its device."""
    lr = cfg.optim.scaled_lr
    if lr != cfg.optim.lr:
        log.info("optim.lr_scaling linear: lr %g x batch %d / 128 = %g", cfg.optim.lr, cfg.optim.batch_size, lr)
    frozen = finetune.freeze(model, cfg.optim.freeze)  # before the optimizer, which leaves them out
    if frozen:
        fixed = sum(p.numel() for p in model.parameters() if not p.requires_grad)
        log.info("optim.freeze %s: %s fixed (%s parameters)", cfg.optim.freeze, ", ".join(frozen), f"{fixed:,}")
    scale = cfg.optim.backbone_lr_scale
    backbone_lr = lr * scale if scale != 1.0 else None
    if backbone_lr is not None:
        log.info("optim.backbone_lr_scale %g: lr %g for the layers before fc8, %g for fc8", scale, backbone_lr, lr)
    groups = param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_biases, backbone_lr)
    optimizer = PaperSGD(groups, lr=lr, momentum=cfg.optim.momentum)
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
    return RunParts(cfg, run_dir, device, d, model, optimizer, schedule, pre, classes, step_fn, progress)


def _feeds(cfg: Config, data: Any, d: Dist, run_dir: Path) -> Feeds:
    # With several ranks a partial last global batch is dropped (see distributed.py).
    ranks = dict(rank=d.rank, world_size=d.world_size)
    train_sampler = EpochBatchSampler(
        data.counts["train"], cfg.optim.batch_size, shuffle=True, seed=cfg.run.seed, drop_last=d.active, **ranks
    )
    val_sampler = EpochBatchSampler(data.counts["val"], cfg.optim.batch_size, shuffle=False, **ranks)
    return Feeds(
        train_sampler,
        data.loader("train", train_sampler),
        data.loader("val", val_sampler),
        RunLog(run_dir, cfg.run.tensorboard) if d.is_main else None,
    )


def _log_start(parts: RunParts, train_images: int, start_epoch: int) -> None:
    cfg, d = parts.cfg, parts.dist
    log.info(
        "training %s (%s parameters) on %d images of %d classes, %s, for epochs %d-%d",
        cfg.model.name,
        f"{sum(p.numel() for p in parts.model.parameters()):,}",
        train_images,
        len(parts.classes),
        parts.device,
        start_epoch + 1,
        cfg.optim.epochs,
    )
    if d.active:
        log.info(
            "%d ranks: global batch %d = %d ranks x %d accumulation steps x %d images",
            d.world_size, cfg.optim.batch_size, d.world_size, cfg.optim.accumulate,
            distributed.split_batch(cfg.optim.batch_size, d.world_size, cfg.optim.accumulate),
        )  # fmt: skip
