"""The work of ``alexnet prepare`` (prepare.py) on one chunk of consecutive images, run in pool processes.

:func:`write_chunk` decodes a chunk into the store's memory-mapped images file and
returns its progress record; :func:`chunk_sums` sums a written chunk for the training
statistics. Both take plain picklable arguments, so prepare.py can hand them to a
process pool (or call them in-process with ``workers=0``).
"""

from __future__ import annotations

import io
import os
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from alexnet.data.ilsvrc import Member
from alexnet.data.images import BadImage, load_image

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


def write_chunk(task: ChunkTask) -> dict[str, Any]:
    """Decode one chunk, write it into the store's memory map and flush; returns its progress record."""
    s = task.image_size
    buf = np.zeros((len(task.members), s, s, 3), dtype=np.uint8)
    skipped = []
    for i, member in enumerate(task.members):
        try:
            buf[i] = _decode(member, task.archive, s)
        except BadImage as e:
            skipped.append([task.start + i, member[0], str(e)])
    images = np.load(task.images_path, mmap_mode="r+")
    images[task.start : task.start + len(buf)] = buf
    images.flush()  # on disk before the chunk is recorded as done
    del images
    return {"split": task.split, "chunk": task.chunk, "crc32": zlib.crc32(buf.data), "skipped": skipped}


def chunk_sums(args: tuple[str, int, int, np.ndarray]) -> tuple[np.ndarray, list[int], list[list[int]], int]:
    """Exact integer sums over a chunk's valid images: per-pixel sum (S, S, 3), RGB sum, RGB outer products.

    Products are summed in float64 over 8 images at a time (at most 8 * S * S * 255^2,
    far below 2^53, so exact) and returned as Python ints, which never overflow.
    """
    path, start, stop, valid = args
    images = np.load(path, mmap_mode="r")
    s = images.shape[1]
    image_sum = np.zeros((s, s, 3), dtype=np.uint64)
    rgb_sum = np.zeros(3, dtype=np.uint64)
    outer = [[0] * 3 for _ in range(3)]
    slots = np.flatnonzero(valid) + start
    for b in range(0, len(slots), 8):
        block = images[slots[b : b + 8]]  # (<=8, S, S, 3) uint8
        image_sum += block.sum(0, dtype=np.uint64)
        pixels = block.reshape(-1, 3).astype(np.float64)
        rgb_sum += pixels.sum(0).astype(np.uint64)
        products = pixels.T @ pixels
        for i in range(3):
            for j in range(3):
                outer[i][j] += int(products[i, j])
    return image_sum, [int(v) for v in rgb_sum], outer, len(slots)
