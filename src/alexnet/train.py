"""The training loop: the paper's SGD rule, its plateau schedule, checkpoints and resume.

Section 5 of the paper: batches of 128, momentum 0.9, weight decay 0.0005 with the
update

    v <- 0.9 v - 0.0005 lr w - lr grad(L)        w <- w + v

and a learning rate of 0.01 divided by 10 whenever the validation error stopped
improving, three times in all, over about 90 epochs.

Everything that decides what a step computes -- the data order, the augmentation draws,
dropout -- comes from generators seeded by (seed, epoch) and saved in the checkpoint, so
``alexnet train --resume RUN_DIR`` continues exactly where the run stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from . import config as config_lib
from .augment import Preprocess, make_preprocess
from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .config import Config
from .data import DataStats, EpochBatchSampler
from .errors import AlexNetError
from .evaluate import evaluate
from .model import build_model
from .step import TrainStep, resolve_options
from .store import open_training_data

log = logging.getLogger("alexnet")


class PaperSGD(torch.optim.Optimizer):
    """SGD with the paper's momentum form: the learning rate is inside the velocity.

    ``torch.optim.SGD`` computes v <- mu v + g, w <- w - lr v: when lr is divided by 10
    the whole accumulated velocity is scaled down at once. Here the velocity keeps the
    steps taken at the old rate and only new gradients are scaled, as in the paper.
    The two agree while lr is constant. Weight decay is per parameter group, so biases
    can be exempted as Caffe does.
    """

    def __init__(self, params: Any, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be non-negative")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            velocities = []
            for p in params:
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                velocities.append(state["velocity"])
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            # v <- mu v - wd lr w - lr g ; w <- w + v, over all tensors of the group at once.
            torch._foreach_mul_(velocities, mu)
            if wd:
                torch._foreach_add_(velocities, params, alpha=-wd * lr)
            torch._foreach_add_(velocities, grads, alpha=-lr)
            torch._foreach_add_(params, velocities)
        return loss


def param_groups(model: nn.Module, weight_decay: float, decay_biases: bool) -> list[dict[str, Any]]:
    if decay_biases:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights, "weight_decay": weight_decay}, {"params": biases, "weight_decay": 0.0}]


def plateau_schedule(optimizer: torch.optim.Optimizer, cfg: config_lib.OptimConfig) -> ReduceLROnPlateau:
    """lr / 10 when val top-1 error has not improved for `plateau_patience` epochs, `lr_drops` times at most."""
    return ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=0.1,
        patience=cfg.plateau_patience,
        threshold=cfg.plateau_threshold,
        threshold_mode="abs",
        # The floor stops the schedule after lr_drops divisions; the margins absorb rounding.
        min_lr=cfg.lr * 0.1**cfg.lr_drops * (1 - 1e-6),
        eps=cfg.lr * 0.1**cfg.lr_drops * 1e-3,
    )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AlexNetError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AlexNetError(f"device {name} requested but CUDA is not available on this machine")
    return device


def _seed_for(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


class RunLog:
    """metrics.jsonl, TensorBoard events and log.txt of a run directory."""

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        self.metrics_path = run_dir / "metrics.jsonl"
        self.handler = logging.FileHandler(run_dir / "log.txt")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(self.handler)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def epoch(self, row: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key, value, row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        log.removeHandler(self.handler)
        self.handler.close()
        if self.writer is not None:
            self.writer.close()


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """On resume, drop metric rows of epochs after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if json.loads(r).get("epoch", 0) <= epochs_done]
    path.write_text("".join(r + "\n" for r in keep))


def train(cfg: Config) -> Path:
    """Train a new run with cfg in ``cfg.run.out``; returns the run directory."""
    run_dir = Path(cfg.run.out)
    if (run_dir / "last.pt").exists():
        raise AlexNetError(f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out")
    return _run(cfg, None, run_dir)


def resume(
    run_dir: str | Path,
    *,
    epochs: int | None = None,
    device: str | None = None,
    workers: int | None = None,
    progress: bool | None = None,
) -> Path:
    """Continue the run in run_dir from its last checkpoint with its own recipe; ``epochs`` may extend it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AlexNetError(f"run directory {run_dir} does not exist")
    state = load_checkpoint(run_dir / "last.pt")
    cfg = config_lib.from_dict(state["config"], f"checkpoint in {run_dir}")
    cfg.run.out = str(run_dir)
    if epochs is not None:
        cfg.optim.epochs = epochs
    if device is not None:
        cfg.run.device = device
    if workers is not None:
        cfg.data.workers = workers
    if progress is not None:
        cfg.run.progress = progress
    return _run(cfg, state, run_dir)


def _run(cfg: Config, state: dict[str, Any] | None, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.run.device)

    if cfg.data.root is None:
        from .synthetic import ensure_shapes_dataset

        cfg.data.root = str(ensure_shapes_dataset(progress=cfg.run.progress))
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

    if state is not None:
        if list(state["classes"]) != classes:
            raise AlexNetError(
                f"the checkpoint in {run_dir} has {len(state['classes'])} classes, "
                f"but {cfg.data.root} has {len(classes)} (or different names): resume with the same data"
            )
        model = model_from_checkpoint(state, run_dir)
        pre = Preprocess.from_state_dict(state["preprocess"])
    else:
        log.info("mean image and RGB PCA over %d training images (%s)", data.counts["train"], data.description)
        stats, skipped = data.stats()
        if skipped:
            log.warning("%d training files cannot be decoded and are skipped, e.g. %s", len(skipped), skipped[0])
        pre = _preprocess(cfg, stats)
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model)
    config_lib.save(cfg, run_dir / "config.yaml")
    model = model.to(device)
    pre = pre.to(device)

    optimizer = PaperSGD(
        param_groups(model, cfg.optim.weight_decay, cfg.optim.decay_biases), lr=cfg.optim.lr, momentum=cfg.optim.momentum
    )
    schedule = plateau_schedule(optimizer, cfg.optim)
    start_epoch, step, best = 0, 0, math.inf
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, step, best = state["epoch"], state["step"], state["best_val_top1_error"]
        log.info("resuming %s after epoch %d (step %d)", run_dir, start_epoch, step)
    _truncate_metrics(run_dir / "metrics.jsonl", start_epoch)
    options = resolve_options(cfg.speed, device, cfg.model.name)
    log.info("training step: %s", ", ".join(f"{k} {v}" for k, v in options.as_dict().items()))
    step_fn = TrainStep(model, optimizer, pre, options, device, flip=cfg.data.flip, lighting_std=cfg.data.lighting_std)

    train_sampler = EpochBatchSampler(data.counts["train"], cfg.optim.batch_size, shuffle=True, seed=cfg.run.seed)
    val_sampler = EpochBatchSampler(data.counts["val"], cfg.optim.batch_size, shuffle=False)
    train_loader = data.loader("train", train_sampler)
    val_loader = data.loader("val", val_sampler)
    augment_gen = torch.Generator(device=device)
    reported: set[str] = set()
    run_log = RunLog(run_dir, cfg.run.tensorboard)
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
    try:
        for epoch in range(start_epoch, cfg.optim.epochs):
            seed = _seed_for(cfg.run.seed, epoch)
            torch.manual_seed(seed)  # dropout
            augment_gen.manual_seed(seed + 1)
            train_sampler.set_epoch(epoch)
            row = _train_epoch(model, step_fn, train_loader, cfg, augment_gen, device, epoch, reported)
            step += row.pop("steps")
            results, skipped = evaluate([model], [pre], val_loader, device, ten=False)
            val = results["centre"]
            _report_skipped(skipped, reported)
            lr_before = optimizer.param_groups[0]["lr"]
            schedule.step(val.top1_error)
            row = {"epoch": epoch + 1, "step": step, **row, **val.as_dict("val_"), "lr": lr_before}
            run_log.epoch(row)
            improved = val.top1_error < best
            best = min(best, val.top1_error)
            checkpoint = {
                "config": cfg.to_dict(),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "epoch": epoch + 1,
                "step": step,
                "best_val_top1_error": best,
                "preprocess": pre.state_dict(),
                "classes": classes,
                "metrics": row,
            }
            save_checkpoint(run_dir / "last.pt", checkpoint)
            if improved:
                save_checkpoint(run_dir / "best.pt", checkpoint)
            log.info(
                "epoch %d/%d  loss %.4f  train err %.2f%%  val top-1 %.2f%%  top-5 %.2f%%  lr %.2g  %.0f img/s",
                epoch + 1,
                cfg.optim.epochs,
                row["train_loss"],
                100 * row["train_error"],
                100 * val.top1_error,
                100 * val.top5_error,
                lr_before,
                row["images_per_s"],
            )
            if optimizer.param_groups[0]["lr"] < lr_before:
                log.info("validation error stopped improving: lr %.2g -> %.2g", lr_before, optimizer.param_groups[0]["lr"])
    finally:
        run_log.close()
    return run_dir


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
    for item in skipped:
        if item not in reported:
            reported.add(item)
            log.warning("skipped unreadable image %s", item)


def _train_epoch(
    model: nn.Module,
    step_fn: TrainStep,
    loader: Any,
    cfg: Config,
    gen: torch.Generator,
    device: torch.device,
    epoch: int,
    reported: set[str],
) -> dict[str, float]:
    from tqdm import tqdm

    model.train()
    # Sums stay on the device: no host synchronisation inside the loop.
    loss_sum = torch.zeros((), device=device)
    wrong = torch.zeros((), device=device, dtype=torch.long)
    seen, steps = 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}", unit="batch", disable=not cfg.run.progress, leave=False)
    for batch in bar:
        _report_skipped(batch.skipped, reported)
        if not len(batch.labels):
            continue
        images = batch.images.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        loss, errors = step_fn(images, labels, gen)
        loss_sum += loss * len(labels)
        wrong += errors
        seen += len(labels)
        steps += 1
        if steps % 20 == 0 and cfg.run.progress:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}")
    elapsed = time.perf_counter() - start
    if seen == 0:
        raise AlexNetError("no training image could be decoded in this epoch")
    train_loss = loss_sum.item() / seen
    if not math.isfinite(train_loss):
        raise AlexNetError(
            f"training loss became {train_loss} in epoch {epoch + 1}; lower optim.lr or use model.init=kaiming"
        )
    return {
        "train_loss": train_loss,
        "train_error": wrong.item() / seen,
        "images_per_s": seen / elapsed,
        "epoch_seconds": elapsed,
        "steps": steps,
    }
