"""The JPEG store (``alexnet prepare --format jpeg``): the same fixed-size images, JPEG-encoded, decoded in batches.

Why: a raw store costs S*S*3 bytes per image (196,608 at 256x256; ImageNet's 1.28M
training images: 252 GB), more than the RAM of a training node, so every epoch of
ImageNet would be read from disk. At quality 96 with 4:4:4 chroma an image takes
15-49 KB (measured on upscaled CIFAR-10 and on benchimages.py's noisy 500x375 bench
JPEGs, the worst case), 4-13x less, at a PSNR of 51.6 and 40.9 dB against the raw
pixels. 4:2:0 chroma saves 20-30% more but costs 1.5 dB (35.4 dB at quality 90 on the
bench JPEGs), below the 40 dB this store promises.

Layout, beside the raw store's labels, statistics and header (store.py)::

    train_images.jpegs      the JPEG files of every slot, back to back in slot order
    train_index.npy         (slots + 1,) int64 byte offsets: slot i is [index[i], index[i+1]);
                            an empty range marks a slot whose source could not be decoded

While ``alexnet prepare`` runs, each chunk of consecutive slots is written to its own
file ``train_parts/NNNNNN.jpegs`` (atomically, so a chunk is either whole or absent,
and a resumed prepare redoes only unrecorded chunks); at the end the parts are joined
in chunk order into the one data file, so that reading needs one memory map and one
descriptor per split, whatever the size of the store. PIL's encoder is deterministic,
so a resumed prepare ends byte-identical to an uninterrupted one.

Decoding: torchvision.io.decode_jpeg (libjpeg-turbo) releases the GIL for the whole call
(measured: a Python thread was never stalled while another thread decoded a 12 MP JPEG
for 112 ms) and decodes a 256x256 image in 0.28 ms, PIL in 0.34 ms, on the development
machine's Xeon; so the CPU path decodes whole batches on threads. On CUDA a batch goes
to nvJPEG in one call: ``decode_jpeg(list, device="cuda")``.
"""

from __future__ import annotations

import io
import math
import threading
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from alexnet.errors import AlexNetError

ENCODING = "jpeg"
DEFAULT_QUALITY = 96  # the lowest quality with PSNR >= 40 dB on the noisy bench JPEGs (40.9 dB; 95 gave 39.6)
SUBSAMPLING = 0  # PIL's code for 4:4:4 (no chroma subsampling): see the module docstring

# torchvision 0.29 warns on every decode that its image codecs will move to TorchCodec;
# they are what this store is measured with, and one warning per image would flood a run.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)


def data_file(split: str) -> str:
    return f"{split}_images.jpegs"


def index_file(split: str) -> str:
    return f"{split}_index.npy"


def parts_dir(split: str) -> str:
    return f"{split}_parts"


def part_file(chunk: int) -> str:
    return f"{chunk:06d}.jpegs"


# --------------------------------------------------------------------------------------
# Encoding (prepare, in pool processes)


def encode(image: np.ndarray, quality: int) -> bytes:
    """One (S, S, 3) uint8 image as a baseline JPEG at ``quality``, 4:4:4; deterministic."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality, subsampling=SUBSAMPLING)
    return buf.getvalue()


def decode_one(data: bytes | np.ndarray | torch.Tensor) -> torch.Tensor:
    """One JPEG as (S, S, 3) uint8 (HWC), with the decoder the loader uses."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not isinstance(data, torch.Tensor):
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_jpeg(data, mode=ImageReadMode.RGB).permute(1, 2, 0)


def encode_chunk(pixels: np.ndarray, valid: list[bool], quality: int) -> tuple[bytes, list[int], int]:
    """(the chunk's JPEGs back to back, each slot's length (0: skipped), summed squared error).

    Every image is decoded again with the loader's decoder, so the squared error (over all
    S*S*3 values of every valid image, an exact integer) is that of what training sees.
    """
    blobs, lengths, sse = [], [], 0
    for image, ok in zip(pixels, valid):
        if not ok:
            lengths.append(0)
            continue
        data = encode(image, quality)
        diff = decode_one(data).numpy().astype(np.int32) - image
        sse += int(np.einsum("ijk,ijk->", diff, diff, dtype=np.int64))
        blobs.append(data)
        lengths.append(len(data))
    return b"".join(blobs), lengths, sse


def psnr(sse: int, values: int) -> float | None:
    """PSNR in dB of uint8 data from its summed squared error over ``values`` values (None if none; inf if exact)."""
    if values == 0:
        return None
    return math.inf if sse == 0 else 10 * math.log10(255**2 * values / sse)


# --------------------------------------------------------------------------------------
# Finishing a prepare: the parts joined into the data file and its index


def join_parts(dest: Path, split: str, lengths: list[int], chunk_size: int) -> tuple[int, list[int]]:
    """Write the split's data file and index from its parts; returns (data bytes, each chunk's CRC-32).

    Re-run safely after an interruption: the parts stay until the header is written.
    """
    parts = dest / parts_dir(split)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=offsets[1:])
    crcs = []
    with open(dest / data_file(split), "wb") as out:
        for k, start in enumerate(range(0, len(lengths), chunk_size)):
            data = (parts / part_file(k)).read_bytes()
            expected = int(offsets[min(start + chunk_size, len(lengths))] - offsets[start])
            if len(data) != expected:
                raise AlexNetError(
                    f"{parts / part_file(k)} holds {len(data):,} bytes, its progress record {expected:,}: "
                    f"delete {dest} and prepare again"
                )
            crcs.append(zlib.crc32(data))
            out.write(data)
    np.save(dest / index_file(split), offsets)
    return int(offsets[-1]), crcs


def plan_chunks(
    dest: Path,
    source: Any,
    done: dict[tuple[str, int], dict[str, Any]],
    image_size: int,
    chunk_size: int,
    quality: int,
) -> list[Any]:
    """chunks.plan_chunks for a JPEG store: a part file per chunk; a recorded chunk whose part is gone is redone."""
    from alexnet.data.chunks import ChunkTask

    tasks = []
    for name, split in source.splits.items():
        parts = dest / parts_dir(name)
        parts.mkdir(exist_ok=True)
        for k, start in enumerate(range(0, len(split.members), chunk_size)):
            part = parts / part_file(k)
            if (name, k) in done and part.is_file():
                continue
            done.pop((name, k), None)
            members = split.members[start : start + chunk_size]
            task = ChunkTask(name, k, start, str(part), split.archive, members, image_size, ENCODING, quality)
            tasks.append(task)
    return tasks


def finish_split(
    dest: Path, name: str, info: dict[str, Any], done: dict[tuple[str, int], dict[str, Any]], params: dict[str, Any]
) -> None:
    """Join a split's parts into its data file and index; fill its header entry (bytes, PSNR, checksums)."""
    from alexnet.data import store

    chunk = params["chunk_size"]
    records = [done[name, k] for k in range(-(-info["slots"] // chunk))]
    lengths = [n for r in records for n in r["lengths"]]
    total, crcs = join_parts(dest, name, lengths, chunk)
    if crcs != [r["crc32"] for r in records]:
        raise AlexNetError(f"the parts of {dest / parts_dir(name)} changed since they were written")
    values = info["valid"] * 3 * params["image_size"] ** 2
    db = psnr(sum(r["sse"] for r in records), values)
    info.update(
        images=data_file(name),
        index=index_file(name),
        index_sha256=store.sha256_file(dest / index_file(name)),
        bytes=total,
        chunk_crc32=crcs,
        bytes_per_image=total / max(1, info["valid"]),
        psnr_db=None if db is None else min(db, 999.0),  # JSON has no infinity
    )


def remove_parts(dest: Path, split: str) -> None:
    parts = dest / parts_dir(split)
    if parts.is_dir():
        for f in parts.iterdir():
            f.unlink()
        parts.rmdir()


def chunk_sums_jpeg(args: tuple[str, str, int, int, int]) -> tuple[np.ndarray, list[int], list[list[int]], int]:
    """chunks.chunk_sums over a chunk of a JPEG store: the statistics of the decoded pixels training sees."""
    from alexnet.data.chunks import sum_images

    data_path, index_path, start, stop, size = args
    offsets = np.load(index_path, mmap_mode="r")[start : stop + 1]
    data = np.memmap(data_path, dtype=np.uint8, mode="r") if offsets[-1] > 0 else None
    images = [
        decode_one(torch.from_numpy(np.array(data[a:b]))).numpy()
        for a, b in zip(offsets[:-1], offsets[1:])
        if b > a and data is not None
    ]
    return sum_images(images, size)


# --------------------------------------------------------------------------------------
# Reading


class JpegSplit:
    """One split of a JPEG store, read like store.StoreSplit: ``gather`` decodes a batch into ``out``."""

    encoding = ENCODING

    def __init__(
        self, name: str, data_path: Path, index_path: Path, labels: np.ndarray, info: dict[str, Any], size: int
    ) -> None:
        self.name, self.labels, self.info = name, labels, info
        self._size = size
        self.offsets = np.load(index_path, mmap_mode="r")
        self.data_path = data_path
        total = int(self.offsets[-1]) if len(self.offsets) else 0
        # An empty file cannot be memory-mapped; a store with no valid slot is never read.
        with warnings.catch_warnings():  # torch warns that the read-only map is not writable; it is only read
            warnings.simplefilter("ignore", UserWarning)
            self._data = (
                torch.from_numpy(np.memmap(data_path, dtype=np.uint8, mode="r"))
                if total
                else torch.empty(0, dtype=torch.uint8)
            )
        self.index = np.flatnonzero(labels >= 0)
        self._cuda_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.index)

    @property
    def image_size(self) -> int:
        return self._size

    @property
    def slots(self) -> int:
        return len(self.labels)

    def encoded(self, positions: np.ndarray | list[int]) -> tuple[list[torch.Tensor], np.ndarray]:
        """The JPEG bytes of dataset positions as uint8 tensors (views of the memory map), and their slots."""
        slots = self.index[np.asarray(positions, dtype=np.int64)]
        # Two fancy reads of the index map: 0.25 ms for 128 slots, against 0.5 ms slot by slot (dev machine).
        starts, stops = self.offsets[slots].tolist(), self.offsets[slots + 1].tolist()
        return [self._data[a:b] for a, b in zip(starts, stops)], slots

    def _decoded(self, blobs: list[torch.Tensor], slots: np.ndarray, device: str | torch.device) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as e:
            raise AlexNetError(
                f"a JPEG among slots {slots.min()}-{slots.max()} of {self.data_path} does not decode "
                f"({str(e).splitlines()[0]}): check the store with alexnet prepare --verify"
            ) from None

    def gather(self, positions: np.ndarray | list[int], out: np.ndarray | torch.Tensor) -> np.ndarray:
        """Decode the images at dataset positions into ``out`` (B, S, S, 3) on the CPU; returns their labels (int64).

        One decode_jpeg call for the batch (the GIL released throughout), then a numpy copy
        per image into ``out`` (HWC from the decoder's CHW; also without the GIL). Not
        torch.stack(out=...): on the 2 loaded cores of the development machine it took
        855 ms for 128 images with two intra-op threads (OpenMP teams competing), against
        43 ms for decode plus these copies, 37 ms for the decode alone.
        """
        blobs, slots = self.encoded(positions)
        target = out.numpy() if isinstance(out, torch.Tensor) else out
        if blobs:
            for j, x in enumerate(self._decoded(blobs, slots, "cpu")):
                target[j] = x.permute(1, 2, 0).numpy()
        return self.labels[slots].astype(np.int64)

    def decode_on(self, positions: np.ndarray | list[int], device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
        """The batch decoded on ``device`` by nvJPEG in one call: ((B, S, S, 3) uint8, int64 labels).

        Runs on the caller's current stream; one batch at a time per split (torchvision's
        nvJPEG decoder is one shared object).
        """
        blobs, slots = self.encoded(positions)
        with self._cuda_lock:
            images = torch.stack([x.permute(1, 2, 0) for x in self._decoded(blobs, slots, device)])
        return images, self.labels[slots].astype(np.int64)


def open_split(root: Path, name: str, info: dict[str, Any], labels: np.ndarray, size: int) -> JpegSplit:
    """Check a JPEG split's index and data file against the header (store.open_store has checked the labels)."""
    from alexnet.data.store import check_array_file, check_size, check_small_file, require_file

    data_path = require_file(root, info["images"])
    check_array_file(root, info["index"], (int(info["slots"]) + 1,), np.int64)
    index_path = check_small_file(root, info["index"], info["index_sha256"])
    check_size(data_path, int(info["bytes"]))
    return JpegSplit(name, data_path, index_path, labels, info, size)
