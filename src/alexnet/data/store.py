"""The prepared store: every image decoded once to the paper's fixed size, read back as uint8 batches.

Section 2 of the paper reduces every image to its central 256x256 patch after rescaling,
so decoding, resizing and cropping can be done once (``alexnet prepare``, prepare.py)
instead of once per epoch. A store is a folder::

    store.json              header: format, version, resolution, classes, per-split files,
                            chunk checksums, skipped files, statistics, creation parameters
    train_images.npy        (N, S, S, 3) uint8, HWC, memory-mapped (numpy .npy format)
    train_labels.npy        (N,) int32; -1 marks a slot whose source could not be decoded
    val_images.npy, val_labels.npy
    stats_mean_image.npy    (3, S, S) float32 ...and stats_pixel_std, stats_eigvals, stats_eigvecs

Why raw uint8 in a memory map: reading a batch is one np.take from the page cache
(measured 3-4 ms for 128 images of 256x256 on the 2-core development machine, with the
GIL released), which no decoder approaches (a JPEG batch: 37 ms per core); the cost is size, 196,608 bytes per
256x256 image (ImageNet's 1.28M training images: 252 GB), so the store should sit on a
local SSD. Pixels stay uint8 until they are on the training device, where augment.py
crops, flips, lights and normalises whole batches.

A store may instead hold its images JPEG-encoded (``alexnet prepare --format jpeg``,
header ``"encoding": "jpeg"``; layout and reasons in jpegstore.py): 4-13x smaller, decoded
in batches by the loader, with the same labels, statistics files, checksums and header.

Opening a store checks everything that is cheap to check: format and version, the
resolution the caller expects, each images file's .npy header (dtype, shape) and exact
byte size (a truncated copy is caught here), and SHA-256 checksums of the labels and
statistics files. The images themselves carry a CRC-32 per chunk, checked on demand by
verify.py (``alexnet prepare --verify``): one read of the whole store, at
about 1.7 GB/s per core for the checksum on the development machine, usually limited by
the disk.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alexnet.data import jpegstore
from alexnet.data.loader import Batch, EpochBatchSampler, PinnedRing
from alexnet.data.stats import DataStats
from alexnet.errors import AlexNetError
from alexnet.runtime import cpu_cores

FORMAT = "alexnet-store"
# 2: the header names its "encoding" (raw or jpeg). A version-1 store is a raw store with
# the same pixels and is still read; an older alexnet refuses version 2 in one line.
# 3: the images are resized by torch's antialiased bilinear, not PIL's (images._square):
# at most 1 apart in about 0.2% of values, so stores of versions 1 and 2 are still read,
# but a prepare does not add version-3 chunks to them.
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
HEADER = "store.json"
PROGRESS = "prepare-progress.jsonl"  # present only while a prepare is unfinished
SPLITS = ("train", "val")
STATS_KEYS = ("mean_image", "pixel_std", "eigvals", "eigvecs")


def images_file(split: str) -> str:
    return f"{split}_images.npy"


def labels_file(split: str) -> str:
    return f"{split}_labels.npy"


def stats_file(key: str) -> str:
    return f"stats_{key}.npy"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) from a .npy header, without mapping the file."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            if major == 1:
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except (OSError, ValueError, SyntaxError) as e:
        raise AlexNetError(f"{path} is not a readable .npy file ({e})") from None
    if fortran:
        raise AlexNetError(f"{path} is in Fortran order; a store's arrays are C-ordered")
    return tuple(shape), dtype, offset


def is_store(path: str | Path | None) -> bool:
    """True for a folder holding a store header (or an unfinished prepare, so that it gets a clear error)."""
    if path is None:
        return False
    p = Path(path)
    return (p / HEADER).is_file() or (p / PROGRESS).is_file()


# --------------------------------------------------------------------------------------
# Reading


class StoreSplit:
    """One split: the memory-mapped images, labels, and the index of the usable slots.

    A slot whose source image could not be decoded keeps label -1 and is left out of the
    index, so dataset position ``i`` is slot ``index[i]``.
    """

    encoding = "raw"

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, info: dict[str, Any]) -> None:
        self.name, self.images, self.labels, self.info = name, images, labels, info
        self.index = np.flatnonzero(labels >= 0)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def slots(self) -> int:
        return len(self.images)

    def gather(self, positions: np.ndarray | list[int], out: np.ndarray | torch.Tensor) -> np.ndarray:
        """Copy the images at dataset positions into ``out`` (B, S, S, 3); returns their labels (int64).

        One np.take for the batch, which releases the GIL for the whole copy (a Python
        thread was stalled at most 12 ms, scheduling noise, during a 1.6 s take), where a
        loop of per-image copies took the GIL back 128 times a batch from the training
        thread. mode="clip" because the default "raise" copies through a buffer (slots are
        in range by construction). Medians of 20 interleaved batches of 128 random
        256x256 images from the page cache, Xeon (AMX) development machine, 2 cores
        loaded by other sessions: 4.1 ms, against 7.8 ms for the loop and 12.9 ms for
        np.take with the default mode. torch.index_select was equal to the loop with one
        intra-op thread but 167 ms with two (OpenMP teams fighting over loaded cores).
        Slots are read in batch order: in a shuffled epoch a sorted batch of 128 images
        is still about 10,000 images apart per image on ImageNet, no help to readahead.
        """
        slots = self.index[np.asarray(positions, dtype=np.int64)]
        target = out.numpy() if isinstance(out, torch.Tensor) else out
        np.take(self.images, slots, axis=0, out=target, mode="clip")
        return self.labels[slots].astype(np.int64)


class Store:
    """An opened, checked store. ``store.split("train")``, ``store.stats()``, ``store.classes``."""

    def __init__(self, root: Path, header: dict[str, Any], splits: dict[str, StoreSplit]) -> None:
        self.root, self.header, self.splits = root, header, splits
        self.classes: list[str] = list(header["classes"])
        self.image_size: int = int(header["image_size"])

    def split(self, name: str) -> StoreSplit:
        if name not in self.splits:
            raise AlexNetError(f"store {self.root} has no '{name}' split (it has {', '.join(self.splits)})")
        return self.splits[name]

    def stats(self) -> DataStats:
        """The training set's mean image (3, S, S) and RGB PCA, computed by prepare over every valid image."""
        arrays = {k: torch.from_numpy(np.load(self.root / stats_file(k), allow_pickle=False)) for k in STATS_KEYS}
        return DataStats(**arrays, count=int(self.header["stats"]["count"]))

    @property
    def skipped(self) -> list[str]:
        return skipped_lines(self.header)


def skipped_lines(header: dict[str, Any]) -> list[str]:
    """'item: reason' for every source image a store left out, from its header."""
    return [f"{s['item']}: {s['reason']}" for info in header["splits"].values() for s in info["skipped"]]


def _read_header(root: Path) -> dict[str, Any]:
    path = root / HEADER
    if not path.is_file():
        if (root / PROGRESS).is_file():
            raise AlexNetError(
                f"{root} is an unfinished store (an interrupted alexnet prepare): run the same "
                "alexnet prepare command again to finish it"
            )
        raise AlexNetError(f"{root} is not a prepared store (no {HEADER}); make one with: alexnet prepare SRC {root}")
    try:
        header = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AlexNetError(f"cannot read {path}: {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise AlexNetError(f"{path} is not an alexnet store header (format {header.get('format')!r})")
    if header.get("version") not in READABLE_VERSIONS:
        raise AlexNetError(
            f"{root} was written in store format version {header.get('version')}; this alexnet reads version "
            f"{VERSION}: prepare the store again with this version"
        )
    return header


def require_file(root: Path, name: str) -> Path:
    if not (root / name).is_file():
        raise AlexNetError(f"store {root} is missing {name}")
    return root / name


def check_small_file(root: Path, name: str, expected_sha: str) -> Path:
    path = require_file(root, name)
    if sha256_file(path) != expected_sha:
        raise AlexNetError(f"store file {path} does not match its checksum in {HEADER}: damaged or replaced")
    return path


def check_size(path: Path, expected: int) -> None:
    actual = path.stat().st_size
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise AlexNetError(f"{path} is {what}: {actual:,} bytes, expected {expected:,}")


def check_array_file(root: Path, name: str, shape: tuple[int, ...], dtype: type) -> Path:
    """A store's .npy file, present, with the dtype and shape the header implies and their exact byte size."""
    path = require_file(root, name)
    got_shape, got_dtype, offset = npy_layout(path)
    if got_shape != shape or got_dtype != dtype:
        raise AlexNetError(
            f"{path} holds {got_dtype} {got_shape}; the header says {np.dtype(dtype)} {shape}: "
            "the files do not belong together"
        )
    check_size(path, offset + int(np.prod(shape)) * np.dtype(dtype).itemsize)
    return path


def open_store(path: str | Path, image_size: int | None = None) -> Store:
    """Open and check a store; ``image_size`` (the config's) must match the store's resolution.

    Costs one header read per file and SHA-256 of the labels and statistics (5 MB for
    ImageNet); the images are mapped, not read.
    """
    root = Path(path)
    header = _read_header(root)
    size = int(header["image_size"])
    if image_size is not None and image_size != size:
        raise AlexNetError(
            f"store {root} holds {size}x{size} images but data.image_size is {image_size}: "
            f"set data.image_size={size} or prepare the store again with --image-size {image_size}"
        )
    splits: dict[str, StoreSplit | jpegstore.JpegSplit] = {}
    encoding = header.get("encoding", "raw")
    if encoding not in ("raw", jpegstore.ENCODING):
        raise AlexNetError(f"{root / HEADER} names an unknown image encoding {encoding!r}")
    for name, info in header["splits"].items():
        if encoding == jpegstore.ENCODING:
            labels = _checked_labels(root, info, int(info["slots"]), len(header["classes"]))
            splits[name] = jpegstore.open_split(root, name, info, labels, size)
            continue
        ipath = check_array_file(root, info["images"], (int(info["slots"]), size, size, 3), np.uint8)
        labels = _checked_labels(root, info, int(info["slots"]), len(header["classes"]))
        images = np.load(ipath, mmap_mode="r")
        splits[name] = StoreSplit(name, images, labels, info)
    for key in STATS_KEYS:
        check_small_file(root, stats_file(key), header["stats"]["sha256"][key])
    return Store(root, header, splits)


def _checked_labels(root: Path, info: dict[str, Any], slots: int, classes: int) -> np.ndarray:
    labels = np.load(check_small_file(root, info["labels"], info["labels_sha256"]), allow_pickle=False)
    if labels.shape != (slots,) or (len(labels) and (labels.min() < -1 or labels.max() >= classes)):
        raise AlexNetError(f"{root / info['labels']} does not fit the store ({labels.shape}, {classes} classes)")
    return labels


# --------------------------------------------------------------------------------------
# Loading batches


class StoreLoader:
    """Batches of a store split as :class:`~alexnet.data.Batch`, uint8 until they reach the device.

    Indices come from an :class:`EpochBatchSampler`, so order, resume (``start_batch``)
    and sharding are those of the folder loader. ``threads`` background threads each
    gather whole batches (raw: one np.take; JPEG: one batched decode), ``prefetch``
    batches ahead (at least one per thread). On CUDA a raw batch is gathered into one of a
    ring of ``threads + 2`` pinned buffers and copied on a side stream, so the copy of
    batch k+1 runs while the model computes batch k; a JPEG batch's bytes go to nvJPEG on
    the side stream. The consumer's stream waits on an event, never the host.
    On the CPU every batch is a new tensor that the consumer owns.
    Images arrive as (B, 3, S, S) views of HWC memory, which is the channels-last layout.
    """

    def __init__(
        self,
        split: Any,
        sampler: EpochBatchSampler,
        device: torch.device | str = "cpu",
        prefetch: int = 4,
        threads: int = 0,
    ) -> None:
        self.split, self.sampler, self.device = split, sampler, torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.jpeg = split.encoding == jpegstore.ENCODING
        if not threads:
            if self.jpeg and not self.cuda:
                # Decoding is compute: 0.28 ms per 256x256 image and core (development
                # machine), so all cores but one, which the training loop keeps.
                threads = max(1, cpu_cores() - 1)
            else:
                # One np.take copies 128 images of 256x256 in 3-4 ms (30,000 images/s
                # per thread); two threads keep one copy running while the other waits on
                # its buffer. nvJPEG decodes one batch at a time.
                threads = 2
        self.prefetch, self.threads = max(1, prefetch, threads), threads
        self._ring: PinnedRing | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def _load(self, positions: list[int], stream: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        s, n = self.split.image_size, len(positions)
        if self.cuda and self.jpeg:
            with torch.cuda.stream(stream):
                images, labels_np = self.split.decode_on(positions, self.device)
                labels = torch.from_numpy(labels_np).pin_memory().to(self.device, non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            return images, labels, done
        if not self.cuda:
            host = torch.empty((n, s, s, 3), dtype=torch.uint8)
            return host, torch.from_numpy(self.split.gather(positions, host)), None
        assert self._ring is not None
        buffer = self._ring.take()
        host = buffer[:n]
        labels = torch.from_numpy(self.split.gather(positions, host))
        with torch.cuda.stream(stream):
            images = host.to(self.device, non_blocking=True)
            labels = labels.pin_memory().to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        self._ring.give(buffer, done)  # reused only once this copy has completed
        return images, labels, done

    def __iter__(self) -> Iterator[Batch]:
        stream = torch.cuda.Stream(self.device) if self.cuda else None
        if self.cuda and not self.jpeg and self._ring is None:
            s = self.split.image_size
            self._ring = PinnedRing(self.threads + 2, (self.sampler.batch_size, s, s, 3))
        batches = iter(self.sampler)
        with ThreadPoolExecutor(self.threads, thread_name_prefix="store-loader") as pool:
            pending = deque(pool.submit(self._load, positions, stream) for positions in islice(batches, self.prefetch))
            try:
                while pending:
                    images, labels, done = pending.popleft().result()
                    following = next(batches, None)
                    if following is not None:
                        pending.append(pool.submit(self._load, following, stream))
                    if done is not None:
                        current = torch.cuda.current_stream(self.device)
                        current.wait_event(done)
                        images.record_stream(current)
                        labels.record_stream(current)
                    yield Batch(images.permute(0, 3, 1, 2), labels, [])
            finally:  # the consumer stopped early: do not gather batches nobody will take
                for future in pending:
                    future.cancel()
