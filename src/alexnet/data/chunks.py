"""The work of ``alexnet prepare`` (prepare.py) on one chunk of consecutive images, run in pool processes.

:func:`plan_chunks` lists the chunks of a raw store still to be written (a JPEG store's:
jpegstore.plan_chunks). :func:`write_chunk` decodes a chunk and writes it into the
store's images file (raw) or into its own part file (JPEG, jpegstore.py), and returns
its progress record; :func:`chunk_sums` sums a written chunk for the training
statistics. Both take plain picklable arguments, so prepare.py can hand them to a
process pool (or call them in-process with ``workers=0``)."""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alexnet.data import jpegstore, store
from alexnet.data.ilsvrc import Member
from alexnet.data.images import BadImage, load_image
from alexnet.errors import AlexNetError
from alexnet.files import atomic_write

_archives: dict[str, int] = {}  # archive path -> file descriptor, one per worker process


def _decode(member: Member, archive: str | None, image_size: int) -> np.ndarray:
    name, offset, size = member
    if archive is None:
        return load_image(name, image_size)
    fd = _archives.get(archive)
    if fd is None:
        fd = _archives[archive] = os.open(archive, os.O_RDONLY)
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise BadImage(f"the archive ends {size - len(data)} bytes before the end of this member")
    if data[:2] == _GZIP_MAGIC:
        data = _gunzip(data)
    return load_image(io.BytesIO(data), image_size)


_GZIP_MAGIC = b"\x1f\x8b"
# ILSVRC-2010's archives hold some JPEGs gzip-compressed under a .JPEG name (fuel's
# converter, mila-iqia/fuel fuel/converters/ilsvrc2010.py, decompresses them too). JPEG
# data does not compress, so a member that inflates to over 64 MiB is no such image.
_MAX_GUNZIPPED = 64 << 20


def _gunzip(data: bytes) -> bytes:
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing
    try:
        out = inflate.decompress(data, _MAX_GUNZIPPED)
    except zlib.error as e:
        raise BadImage(f"a gzip-compressed member that does not decompress ({e})") from None
    if inflate.unconsumed_tail:
        raise BadImage(f"a gzip-compressed member of over {_MAX_GUNZIPPED >> 20} MiB")
    return out


@dataclass
class ChunkTask:
    split: str
    chunk: int
    start: int  # first slot
    images_path: str
    archive: str | None
    members: list[Member]
    image_size: int
    encoding: str = "raw"  # or "jpeg": images_path is then the chunk's part file
    quality: int = 0  # JPEG quality


def plan_chunks(
    dest: Path, source: Any, done: dict[tuple[str, int], dict[str, Any]], image_size: int, chunk_size: int
) -> list[ChunkTask]:
    """The chunks of a raw store not yet in ``done``, creating each split's images file where needed
    (``done`` loses the records of a split whose file is new)."""
    tasks = []
    for name, split in source.splits.items():
        path = dest / store.images_file(name)
        shape = (len(split.members), image_size, image_size, 3)
        if not done or not path.is_file():
            # A sparse file: creating it costs nothing whatever its size.
            np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape).flush()
            for key in [k for k in done if k[0] == name]:
                del done[key]
        elif store.npy_layout(path)[0] != shape:
            raise AlexNetError(f"{path} does not have the shape this prepare needs; delete {dest} to start over")
        for k, start in enumerate(range(0, len(split.members), chunk_size)):
            if (name, k) not in done:
                members = split.members[start : start + chunk_size]
                tasks.append(ChunkTask(name, k, start, str(path), split.archive, members, image_size))
    return tasks


def write_chunk(task: ChunkTask) -> dict[str, Any]:
    """Decode one chunk, write it durably (raw: into the images file; JPEG: its part file); returns its progress record."""
    s = task.image_size
    buf = np.zeros((len(task.members), s, s, 3), dtype=np.uint8)
    skipped = []
    for i, member in enumerate(task.members):
        try:
            buf[i] = _decode(member, task.archive, s)
        except BadImage as e:
            skipped.append([task.start + i, member[0], str(e)])
    record: dict[str, Any] = {"split": task.split, "chunk": task.chunk, "skipped": skipped}
    if task.encoding == jpegstore.ENCODING:
        bad = {slot - task.start for slot, _, _ in skipped}
        data, lengths, sse = jpegstore.encode_chunk(buf, [i not in bad for i in range(len(buf))], task.quality)
        atomic_write(Path(task.images_path), lambda f: f.write(data))  # durable before it is recorded
        record.update(crc32=zlib.crc32(data), lengths=lengths, sse=sse)
        return record
    # One pwrite at the chunk's place and an fdatasync, rather than mapping the file in
    # every worker and msync-ing the whole mapping after every chunk.
    offset = store.npy_layout(Path(task.images_path))[2] + task.start * s * s * 3
    fd = os.open(task.images_path, os.O_WRONLY)
    try:
        view, written = memoryview(buf).cast("B"), 0
        while written < len(view):
            written += os.pwrite(fd, view[written:], offset + written)
        os.fdatasync(fd)  # on disk before the chunk is recorded as done
    finally:
        os.close(fd)
    record["crc32"] = zlib.crc32(buf.data)
    return record


def chunk_sums(args: tuple[str, int, int, np.ndarray]) -> tuple[np.ndarray, list[int], list[list[int]], int]:
    """Exact integer sums over a chunk's valid images: per-pixel sum (S, S, 3), RGB sum, RGB outer products.

    Exact integers (see :func:`sum_images`), returned as Python ints, which never overflow.
    """
    path, start, stop, valid = args
    images = np.load(path, mmap_mode="r")
    return sum_images(images[np.flatnonzero(valid) + start], images.shape[1])


def sum_images(images: np.ndarray | list[np.ndarray], s: int) -> tuple[np.ndarray, list[int], list[list[int]], int]:
    """The sums of :func:`chunk_sums` over n (S, S, 3) uint8 images (an array or a list of them).

    Exact in integers throughout, 3.6x faster than float64 products (32 against 116 ms
    for 64 images at 256 px, one core, AMX Xeon): a block of 64 images sums per pixel in
    uint16 (64 * 255 < 2^16), each product of two channels fits uint16 (255^2 = 65,025),
    and the colour planes are made contiguous once so every reduction reads memory in order.
    """
    image_sum = np.zeros((s, s, 3), dtype=np.uint64)
    rgb_sum = np.zeros(3, dtype=np.uint64)
    outer = np.zeros((3, 3), dtype=np.uint64)
    for b in range(0, len(images), 64):
        block = np.asarray(images[b : b + 64])  # (<=64, S, S, 3) uint8
        image_sum += block.sum(0, dtype=np.uint16)
        planes = np.ascontiguousarray(block.reshape(-1, 3).T)  # (3, pixels)
        rgb_sum += planes.sum(1, dtype=np.uint64)
        for i in range(3):
            for j in range(i, 3):
                outer[i, j] += np.multiply(planes[i], planes[j], dtype=np.uint16).sum(dtype=np.uint64)
    products = [[int(outer[min(i, j), max(i, j)]) for j in range(3)] for i in range(3)]
    return image_sum, [int(v) for v in rgb_sum], products, len(images)
