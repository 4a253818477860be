"""What a run carries from batch to batch besides the weights: the epoch's partial sums,
the stop signals, and the random states that make a resumed run exact.

Everything that decides what a step computes -- the data order, the augmentation draws,
dropout -- comes from generators seeded by (seed, epoch). A mid-epoch checkpoint saves
their states at a batch boundary (``random_state``), and resume puts them back
(``restore_random_state``), or reseeds them where the saved states cannot apply.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alexnet.errors import AlexNetError
from alexnet.train.distributed import Dist

log = logging.getLogger("alexnet")


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


class StopSignals:
    """SIGTERM and SIGINT ask the loop to stop at the next batch boundary with a checkpoint.

    The handler only records the signal: logging or printing from a handler can raise
    "reentrant call" inside an interrupted write. A second SIGINT raises
    KeyboardInterrupt at once (Ctrl-C twice: abort without waiting for the checkpoint;
    the previous checkpoint stays intact because every write is atomic). Handlers are
    installed only in the main thread (Python allows nothing else) and restored on exit;
    outside the ``with`` block nothing is recorded and ``signum`` stays None.
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
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


# -- seeds and random states ----------------------------------------------------------------


def seed_for(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


def rank_offset(d: Dist) -> int:
    """Rank 0 keeps the single-process seed, so a one-rank run is what it always was."""
    return d.rank * 1_000_033


def seed_epoch(seed: int, epoch: int, d: Dist, augment_gen: torch.Generator) -> None:
    """The random states at the start of an epoch."""
    epoch_seed = seed_for(seed, epoch)
    torch.manual_seed(epoch_seed + rank_offset(d))  # dropout: each rank its own masks
    augment_gen.manual_seed(epoch_seed + 1)  # augmentation: the same on every rank


def random_state(device: torch.device, augment_gen: torch.Generator, d: Dist) -> dict[str, Any]:
    """This rank's random states at a batch boundary, as a checkpoint records them."""
    rng: dict[str, Any] = {
        "world_size": d.world_size,
        "device": device.type,
        "torch": torch.get_rng_state(),
        "augment": augment_gen.get_state(),
    }
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_random_state(
    rng: Any,
    path: Path,
    *,
    seed: int,
    epoch: int,
    batch: int,
    device: torch.device,
    augment_gen: torch.Generator,
    d: Dist,
) -> None:
    """Put back the random states of a mid-epoch checkpoint taken after ``batch`` of ``epoch``,
    or reseed where they cannot apply (another world size, another device type)."""
    if not isinstance(rng, dict):
        raise AlexNetError(f"checkpoint {path} is malformed: a mid-epoch checkpoint without random states")
    if rng.get("world_size", 1) != d.world_size or d.active:
        # The augmentation generator is the same on every rank and for any world size;
        # dropout's is per rank and only rank 0's was saved: reseeded per rank.
        if rng.get("device") == device.type:
            _set_augment_state(augment_gen, rng, path)
            torch.manual_seed(seed_for(seed, epoch) + 2 * batch + rank_offset(d))
            if rng.get("world_size", 1) != d.world_size:
                log.warning(
                    "checkpoint written by %d ranks, resumed with %d: dropout reseeded, the run is not bit-exact",
                    rng.get("world_size", 1),
                    d.world_size,
                )
            return
    if rng.get("device") != device.type:
        # CPU and CUDA generators have different state formats; the run cannot be exact
        # across devices anyway (other kernels), so continue with a fresh seed.
        log.warning(
            "checkpoint written on %s, resumed on %s: random state reseeded, the run is not bit-exact",
            rng.get("device"),
            device.type,
        )
        batch_seed = seed_for(seed, epoch) + 2 * batch
        torch.manual_seed(batch_seed + rank_offset(d))
        augment_gen.manual_seed(batch_seed + 1)
        return
    try:
        torch.set_rng_state(rng["torch"])
        augment_gen.set_state(rng["augment"])
        if device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], device)
    except (KeyError, TypeError, RuntimeError) as e:
        raise AlexNetError(f"checkpoint {path} is malformed: bad random state ({e})") from None


def _set_augment_state(augment_gen: torch.Generator, rng: dict[str, Any], path: Path) -> None:
    try:
        augment_gen.set_state(rng["augment"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise AlexNetError(f"checkpoint {path} is malformed: bad random state ({e})") from None
