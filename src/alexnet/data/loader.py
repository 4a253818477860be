"""Batches: the sampler that fixes the order of every epoch, and the decoding DataLoader.

A file that cannot be decoded is never fatal: the worker returns it as skipped with its
reason, the batch shrinks by one, and the trainer reports each such file once.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import queue
import signal
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from alexnet.runtime import cpu_cores, die_with_parent


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) uint8
    labels: torch.Tensor  # (B,) int64
    skipped: list[str]  # "path: reason" for each file of the batch that could not be decoded


def collate(items: list[tuple[torch.Tensor | None, int, str]]) -> Batch:
    good = [(x, y) for x, y, _ in items if x is not None]
    skipped = [reason for x, _, reason in items if x is None]
    if not good:
        return Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), skipped)
    return Batch(torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), skipped)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices, shuffled by a generator seeded with (seed, epoch).

    The order of epoch e depends on nothing but the seed and e, so a resumed run replays
    it exactly, and ``start_batch`` skips the batches an interrupted epoch already did.

    ``batch_size`` is the global batch. With ``world_size > 1`` every global batch of the
    one permutation is cut into world_size consecutive shares and rank r takes share r:
    no sample is seen twice in an epoch, and global batch k holds the same samples for
    any world size (what makes N ranks compute the update of one). ``start_batch``
    counts global batches, so a position carries over to another world size.
    ``drop_last`` drops a last global batch that is not whole (training with several
    ranks: every rank must make the same number of steps); otherwise the last batch's
    shares are as even as possible and a rank with an empty share skips it (evaluation).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if drop_last and batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def global_batches(self) -> int:
        """Global batches in a whole epoch."""
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def _share(self, size: int) -> tuple[int, int]:
        """(start, stop) of this rank's share of a global batch of `size` samples."""
        per, extra = divmod(size, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return start, start + per + (self.rank < extra)

    def __len__(self) -> int:
        """Batches this rank will still yield (global batches where its share is not empty)."""
        full = self.n // self.batch_size
        count = max(0, full - self.start_batch)
        last = self.n - full * self.batch_size
        if last and not self.drop_last and self.start_batch <= full:
            start, stop = self._share(last)
            count += stop > start
        return count

    def __iter__(self):
        order = self._order()
        for b in range(self.start_batch, self.global_batches()):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            start, stop = self._share(len(batch))
            if stop > start:
                yield batch[start:stop]


def resolve_workers(workers: int) -> int:
    """``workers`` decoding processes; -1: one per core this process may use."""
    return cpu_cores() if workers < 0 else workers


def _ignore_stop_signals(worker_id: int) -> None:
    """Decoding workers leave SIGINT and SIGTERM to the main process.

    Ctrl-C reaches the whole process group and ``scancel`` every process of a job step; a
    worker that died of it would make the main process fail on its next batch instead of
    finishing the step and saving a checkpoint. Workers still exit with their parent
    (:func:`_start_worker`), and the main process stops them itself at its end
    (:meth:`WorkerLoader.close`): the SIGTERM multiprocessing sends its children at exit
    is ignored too.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _start_worker(parent_pid: int, worker_id: int) -> None:
    """A decoding worker's initializer: die with the main process, leave it the stop signals."""
    die_with_parent(parent_pid)
    _ignore_stop_signals(worker_id)


def _only_die_with_parent(parent_pid: int, worker_id: int) -> None:
    die_with_parent(parent_pid)


def die_with_parent_init() -> Any:
    """A ``worker_init_fn`` for the DataLoaders built elsewhere (statistics, bench): each worker dies with this process."""
    return functools.partial(_only_die_with_parent, os.getpid())


class WorkerLoader(DataLoader):
    """A DataLoader whose decoding workers can be stopped now: :meth:`close` (or :func:`closing_loaders`).

    Why it is needed: after an exception escapes a loop over the loader, the traceback
    keeps the loop's frame, and with it the loader's iterator, alive until the
    interpreter ends; persistent workers are also held by the loader itself. At exit,
    multiprocessing sends its daemonic children SIGTERM and joins them, but these
    workers ignore SIGTERM (:func:`_ignore_stop_signals`) and wait on their index queue:
    the process hung for ever. ``close`` shuts the workers down through the iterator
    (torch has no public call for it), and every loader closes itself at exit, before
    multiprocessing's own exit handler (atexit runs the later registration first).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._live_iterators: weakref.WeakSet = weakref.WeakSet()
        if self.num_workers > 0:
            ref = weakref.ref(self)
            atexit.register(lambda: (loader := ref()) is not None and loader.close())

    def __iter__(self) -> Any:
        if self.num_workers > 0:
            # The workers' expected parent is the process that forks them, the one iterating
            # now (a loader built before a fork is iterated by another process).
            self.worker_init_fn = functools.partial(_start_worker, os.getpid())
        iterator = super().__iter__()
        if self.num_workers > 0:
            self._live_iterators.add(iterator)
        return iterator

    def close(self) -> None:
        """Stop every worker this loader started (idempotent); a later iter() starts new ones."""
        for iterator in list(self._live_iterators):
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self._live_iterators = weakref.WeakSet()
        self._iterator = None  # a persistent iterator, now without workers


@contextlib.contextmanager
def closing_loaders(*loaders: Any) -> Iterator[None]:
    """Close (stop the workers of) each loader that can be closed when the block ends, however it ends."""
    try:
        yield
    finally:
        for loader in loaders:
            close = getattr(loader, "close", None)
            if close is not None:
                close()


def make_loader(dataset: Dataset, sampler: EpochBatchSampler, workers: int) -> WorkerLoader:
    workers = resolve_workers(workers)
    return WorkerLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        # worker_init_fn: set by WorkerLoader.__iter__ (die with the main process, leave it the stop signals)
        # Without its own generator, every iter() of a DataLoader draws a worker seed from
        # the global RNG, which also drives dropout: a resumed epoch would then see other
        # dropout masks than the uninterrupted one.
        generator=torch.Generator().manual_seed(0),
    )


class PinnedRing:
    """Reusable pinned host buffers for batches on their way to the GPU.

    ``take`` hands out a free buffer, first waiting (in the gathering thread, never the
    training thread) for the event of the copy that last read it; ``give`` returns it
    with the event of its new copy. Allocated once: a store's batches no longer go
    through the caching host allocator, whose blocks are only freed by its own events.
    """

    def __init__(self, count: int, shape: tuple[int, ...]) -> None:
        self.free: queue.Queue = queue.Queue()
        for _ in range(count):
            self.free.put((torch.empty(shape, dtype=torch.uint8, pin_memory=True), None))

    def take(self) -> torch.Tensor:
        buffer, event = self.free.get()
        if event is not None:
            event.synchronize()
        return buffer

    def give(self, buffer: torch.Tensor, event: Any) -> None:
        self.free.put((buffer, event))
