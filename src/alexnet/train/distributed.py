"""Data-parallel training on PyTorch's own engine: torch.distributed under torchrun.

torchrun starts one process per GPU (or per CPU worker) and tells each who it is
through environment variables: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
:func:`context` reads them, joins the process group (NCCL on CUDA, gloo on the CPU)
when there is more than one process, and leaves it cleanly on every way out.

What the training loop does with several ranks (train.py):

* ``optim.batch_size`` is the GLOBAL batch (the paper's 128). Each global batch of the
  epoch's permutation is cut into ``world_size`` equal consecutive shares
  (data.EpochBatchSampler), and each share into ``optim.accumulate`` micro-batches.
  A last global batch that is not whole is dropped with several ranks: every rank
  must make the same number of steps, or DistributedDataParallel waits forever.
* The augmentation of a global batch is drawn for all of it on every rank from the same
  generator, and each rank keeps its slice, so a sample is cropped, flipped and lit the
  same whatever the world size. Together with DDP's averaging of gradients, N ranks
  with global batch B compute the update of one rank with batch B (dropout aside:
  each rank draws its own masks). tests/test_distributed.py checks it.
* Rank 0 alone writes: log.txt, metrics.jsonl, TensorBoard, config.yaml, checkpoints
  (of the unwrapped model, so they load anywhere), and holds the run-directory lock.
  Checkpoints hold the epoch's position in global batches and the epoch's sums over
  all ranks, so a run resumes with another world size.
* torchrun --max-restarts=K restarts every rank after a failure; ``train`` then resumes
  the run directory's checkpoint (``restart_count``).

The paper's other parallelism, its two towers on two GPUs, is towers.py.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from alexnet.errors import AlexNetError

# What torchrun sets for every worker. With one of them set, all must be (a script that
# exports RANK by hand and forgets MASTER_ADDR would otherwise wait for a rendezvous
# that never comes, or train alone believing it is one of many).
RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Dist:
    """Who this process is in the job. ``world_size == 1``: a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run directory; the others only compute."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """The sum of t over all ranks (in place, also returned); t itself with one rank."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: Tensor) -> Tensor:
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's obj on every rank. Pickled between this job's own processes, never from files."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


SINGLE = Dist()  # a plain single-process run


def from_env(env: dict[str, str] | None = None) -> Dist:
    """The process's place in the job from torchrun's variables; a single process when none is set."""
    env = dict(os.environ) if env is None else env
    present = [v for v in RENDEZVOUS_VARS if v in env]
    if not present:
        return SINGLE
    missing = [v for v in RENDEZVOUS_VARS if v not in env]
    if missing:
        raise AlexNetError(
            f"distributed launch incomplete: {', '.join(present)} set but {', '.join(missing)} missing; "
            "start with torchrun (or alexnet train --nproc N), which sets all of " + ", ".join(RENDEZVOUS_VARS)
        )
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", env["RANK"]))
    except ValueError:
        raise AlexNetError(
            f"RANK, WORLD_SIZE and LOCAL_RANK must be integers; got {env['RANK']!r}, {env['WORLD_SIZE']!r}"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise AlexNetError(f"RANK must be in 0..WORLD_SIZE-1; got RANK={rank}, WORLD_SIZE={world}")
    return Dist(rank, world, local)


def restart_count() -> int:
    """How often torchrun restarted this job's workers (--max-restarts); 0 on the first attempt."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def device_for(d: Dist, name: str) -> str:
    """With several ranks and a CUDA device, each rank takes the GPU of its LOCAL_RANK."""
    if d.active and torch.cuda.is_available() and name in ("auto", "cuda"):
        return f"cuda:{d.local_rank}"
    return name


@contextlib.contextmanager
def context(timeout_s: float = 1800.0) -> Iterator[Dist]:
    """Join the job's process group for the duration (only with WORLD_SIZE > 1).

    NCCL on CUDA, gloo on the CPU. The group is destroyed on every way out, errors
    included, so a failing rank exits instead of leaving torchrun waiting; the others
    then fail their next collective (after ``timeout_s`` at worst) or are stopped by torchrun.
    """
    d = from_env()
    if not d.active:
        yield d
        return
    if dist.is_initialized():  # a caller (a test, a notebook) already joined
        yield d
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(d.local_rank)
    timeout = datetime.timedelta(seconds=timeout_s)
    store, _, _ = next(dist.rendezvous("env://", d.rank, d.world_size, timeout=timeout))
    # The keys of this attempt only. Workers restarted by torchrun (--max-restarts) share
    # the agent's store with the failed attempt; joining with its keys, gloo's restarted
    # workers connected to the dead workers' addresses ("connectFullMesh ... Connection
    # refused") or hung: 1 of 5 restarts joined on torch 2.14.1 (CPU, 2026-11-23), 7 of 7
    # with the prefix (README, "Many GPUs and many machines").
    store = dist.PrefixStore(f"alexnet/attempt_{restart_count()}", store)
    dist.init_process_group(backend, store=store, rank=d.rank, world_size=d.world_size, timeout=timeout)
    try:
        yield d
        # Leave together: a rank that tore gloo down while its peer was still sending
        # aborted with "terminate called without an active exception" (1 in ~3 runs of
        # tests/test_distributed.py, torch 2.14.1 CPU, 2026-11-24).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def split_batch(batch_size: int, world_size: int, accumulate: int) -> int:
    """Images per rank per micro-step; a clear error when the global batch does not divide."""
    if accumulate < 1:
        raise AlexNetError(f"optim.accumulate must be 1 or more; got {accumulate}")
    parts = world_size * accumulate
    if batch_size % parts:
        raise AlexNetError(
            f"optim.batch_size {batch_size} (the global batch) must be divisible by world size {world_size} "
            f"x optim.accumulate {accumulate} = {parts}"
        )
    return batch_size // parts
