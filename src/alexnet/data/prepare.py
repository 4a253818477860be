"""``alexnet prepare SRC DEST``: decode a dataset once into a store (store.py), on every core, resumably.

SRC is an ImageFolder tree (``train/<class>/*``, ``val/<class>/*``) or a folder of the
official ILSVRC-2012 or -2010 archives (ilsvrc.py; 2010 adds a test split). Each image goes through the same
``data.load_image`` as the folder loader (shorter side to S, central S x S patch), so a
store holds exactly the uint8 pixels the folder path would produce.

The work is cut into chunks of ``chunk_size`` consecutive images. A process pool decodes
chunks (chunks.py) and writes each straight into the memory-mapped images file; when a chunk is on
disk (flushed), one line goes into ``prepare-progress.jsonl`` (appended and fsynced, so
an interrupted write leaves at most a torn last line, which is ignored). Running the same
command again skips the recorded chunks. The training set's mean image and RGB PCA are
then computed from the store in one parallel read, and the header ``store.json`` is
written last, atomically: a folder with a header is a complete store.

Images that cannot be decoded are not zero-filled into the data: their slots get label
-1, are left out of the store's index, and are listed with their reasons in the header.

``encoding="jpeg"`` (``--format jpeg``) stores the same pixels JPEG-encoded
(jpegstore.py): each chunk goes to its own part file, and the parts are joined into the
split's data file before the header is written. The report then gives the bytes per
image and the PSNR of the decoded images against the raw pixels, over every image.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alexnet.data import jpegstore, store
from alexnet.data.chunks import ChunkTask, chunk_sums, plan_chunks, write_chunk
from alexnet.data.loader import resolve_workers
from alexnet.data.source import Source, SplitSource, find_source
from alexnet.data.stats import DataStats, StatsAccumulator
from alexnet.errors import AlexNetError
from alexnet.files import exclusive_lock, write_json
from alexnet.runtime import die_with_parent, package_version

log = logging.getLogger("alexnet")

# The largest stored side. A store image is S x S x 3 bytes, held whole in memory while it
# is decoded and resized, and a worker's chunk is chunk_size of them: at 4096 one image is
# 48 MiB and a default chunk of 64 is 3 GiB per worker, already beyond a small machine,
# and 16 times the paper's 256 (no ILSVRC image is even half as large, so more would only
# upsample). 100000 would have asked for 1.4 TB of (sparse) images files before failing.
MAX_IMAGE_SIZE = 4096


# --------------------------------------------------------------------------------------
# Driver


@dataclass
class PrepareReport:
    dest: Path
    images: int  # decoded by this run (0 when the store was already complete)
    seconds: float  # decoding time of this run
    workers: int
    skipped: list[str]
    complete_before: bool = False
    encoding: str = "raw"
    bytes_per_image: float | None = None  # of the stored images (raw: S*S*3)
    psnr_db: float | None = None  # JPEG: of the decoded images against the raw pixels, over every image

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "dest": str(self.dest),
            "images": self.images,
            "seconds": self.seconds,
            "images_per_s": self.images_per_s,
            "workers": self.workers,
            "images_per_s_per_worker": self.images_per_s / max(1, self.workers),
            "skipped": len(self.skipped),
            "complete_before": self.complete_before,
            "encoding": self.encoding,
            "bytes_per_image": self.bytes_per_image,
            "psnr_db": self.psnr_db,
        }


def _read_progress(path: Path, params: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """Finished chunks recorded by an earlier run with the same parameters; a torn last line is ignored."""
    lines = path.read_text().splitlines()
    try:
        first = json.loads(lines[0]) if lines else None
    except ValueError:
        first = None
    if first != params:
        raise AlexNetError(
            f"{path.parent} holds an unfinished prepare of other data or parameters; run the command that "
            "started it, or delete the folder to start over"
        )
    done = {}
    for line in lines[1:]:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # torn by an interruption: that chunk is redone
        done[record["split"], record["chunk"]] = record
    return done


def _worker_init(parent_pid: int) -> None:
    """A preparing process: dies with its parent, and one thread for torch's resize (the
    workers already fill the cores; threads per worker would only contend)."""
    die_with_parent(parent_pid)
    torch.set_num_threads(1)


def _map(fn: Any, tasks: list[Any], workers: int) -> Iterator[Any]:
    """Results of fn over tasks as they finish: a process pool, or in this process with workers=0."""
    if workers == 0:
        yield from map(fn, tasks)
        return
    # Forked from the main thread; each worker dies with this process (it would otherwise
    # outlive a kill -9, holding the store's lock it inherited).
    pool = ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(os.getpid(),))
    try:
        futures: list[Future] = [pool.submit(fn, t) for t in tasks]
        for future in as_completed(futures):
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def prepare(
    src: str | Path,
    dest: str | Path,
    *,
    image_size: int = 256,
    workers: int = -1,
    chunk_size: int = 64,
    progress: bool = True,
    encoding: str = "raw",
    quality: int = jpegstore.DEFAULT_QUALITY,
) -> PrepareReport:
    """Write (or finish writing) the store of ``src`` at ``dest``; see the module docstring."""
    if encoding not in ("raw", jpegstore.ENCODING):
        raise AlexNetError(f"store format must be raw or jpeg; got {encoding!r}")
    if encoding == jpegstore.ENCODING:
        if not 1 <= quality <= 100:
            raise AlexNetError(f"JPEG quality must be 1-100; got {quality}")
        import torchvision.io  # noqa: F401  # once here, not in every forked worker of both pools (about 1 s each)
    if image_size < 1 or chunk_size < 1:
        raise AlexNetError(f"image size and chunk size must be positive; got {image_size} and {chunk_size}")
    if image_size > MAX_IMAGE_SIZE:
        raise AlexNetError(
            f"image size must be at most {MAX_IMAGE_SIZE} (the store holds S x S x 3 bytes per image); got {image_size}"
        )
    dest = Path(dest)
    workers = resolve_workers(workers)
    source = find_source(src)
    params = _params(source, image_size, chunk_size, encoding, quality)
    if _already_prepared(dest, source, params):
        return PrepareReport(dest, 0, 0.0, workers, [], complete_before=True, encoding=encoding)
    dest.mkdir(parents=True, exist_ok=True)

    # One prepare per destination at a time: two writers would corrupt the progress log.
    with exclusive_lock(dest / ".prepare.lock", f"another alexnet prepare is writing {dest}"):
        progress_path = dest / store.PROGRESS
        done = _read_progress(progress_path, params) if progress_path.is_file() else {}
        if not progress_path.is_file():
            with open(progress_path, "w") as f:
                f.write(json.dumps(params) + "\n")
        if encoding == jpegstore.ENCODING:
            tasks = jpegstore.plan_chunks(dest, source, done, image_size, chunk_size, quality)
        else:
            tasks = plan_chunks(dest, source, done, image_size, chunk_size)
        todo = sum(len(t.members) for t in tasks)
        seconds = _write_chunks(tasks, source, done, progress_path, chunk_size, workers, progress)
        header = _finish(dest, source, params, done, workers, progress)
    report = PrepareReport(
        dest,
        todo,
        seconds,
        workers,
        store.skipped_lines(header),
        encoding=encoding,
        bytes_per_image=header["splits"]["train"]["bytes_per_image"],
        psnr_db=header["splits"]["train"].get("psnr_db"),
    )
    if todo:
        log.info(
            "prepared %d images in %.1f s: %.0f images/s, %.1f per worker (%d workers)",
            todo,
            seconds,
            report.images_per_s,
            report.images_per_s / max(1, workers),
            workers,
        )
    return report


def _params(source: Source, image_size: int, chunk_size: int, encoding: str, quality: int) -> dict[str, Any]:
    """What identifies a prepare: a resumed or repeated one must have exactly these."""
    params = {
        "format": store.FORMAT,
        "version": store.VERSION,
        "source": source.kind,
        "path": str(source.path),
        "image_size": image_size,
        "chunk_size": chunk_size,
        "counts": {name: len(split.members) for name, split in source.splits.items()},
        "fingerprint": source.fingerprint(image_size, chunk_size),
        "encoding": encoding,
    }
    if encoding == jpegstore.ENCODING:
        params["quality"] = quality
    return params


def _already_prepared(dest: Path, source: Source, params: dict[str, Any]) -> bool:
    """True if dest is a complete store of these params; an error if it holds anything else
    than nothing, an unfinished prepare, or that store."""
    if (dest / store.HEADER).is_file():
        header = json.loads((dest / store.HEADER).read_text())
        if header.get("prepare", {}).get("params") == params:
            log.info("%s is already a complete store of %s", dest, source.path)
            for name in header["splits"]:  # left by a prepare interrupted right after its header
                jpegstore.remove_parts(dest, name)
            return True
        version = header.get("version")
        if version != store.VERSION and version in store.READABLE_VERSIONS:
            raise AlexNetError(
                f"{dest} is a store of format version {version}, written by an older alexnet: it is still read "
                f"for training and evaluation, but a prepare cannot add to it; remove it to prepare version "
                f"{store.VERSION}, or choose another destination"
            )
        raise AlexNetError(f"{dest} already holds a store of other data or parameters; choose another destination")
    if dest.exists() and any(dest.iterdir()) and not (dest / store.PROGRESS).is_file():
        raise AlexNetError(f"{dest} exists and is not an alexnet store; give a new or empty folder")
    return False


def _write_chunks(
    tasks: list[ChunkTask],
    source: Source,
    done: dict[tuple[str, int], dict[str, Any]],
    progress_path: Path,
    chunk_size: int,
    workers: int,
    progress: bool,
) -> float:
    """Decode and write the chunks, recording each in the progress log (fsynced) and in
    ``done`` as it finishes; returns the seconds taken."""
    from tqdm import tqdm

    todo = sum(len(t.members) for t in tasks)
    total = sum(len(s.members) for s in source.splits.values())
    if done:
        log.info("resuming: %d of %d images already prepared", total - todo, total)
    bar = tqdm(total=total, initial=total - todo, desc="prepare", unit="img", disable=not progress, smoothing=0.05)
    start_time = time.perf_counter()
    with open(progress_path, "a") as log_file:
        for record in _map(write_chunk, tasks, workers):
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            os.fsync(log_file.fileno())
            done[record["split"], record["chunk"]] = record
            bar.update(min(chunk_size, len(source.splits[record["split"]].members) - record["chunk"] * chunk_size))
    seconds = time.perf_counter() - start_time
    bar.close()
    return seconds


def _finish(
    dest: Path,
    source: Source,
    params: dict[str, Any],
    done: dict[tuple[str, int], dict[str, Any]],
    workers: int,
    progress: bool,
) -> dict[str, Any]:
    """Labels with skipped slots marked, the training statistics, then the header (last, atomically)."""
    splits_info, labels_by_split = {}, {}
    encoding = params.get("encoding", "raw")
    for name, split in source.splits.items():
        splits_info[name], labels_by_split[name] = _write_labels(dest, source, name, split, done, params["chunk_size"])
        if encoding == jpegstore.ENCODING:
            jpegstore.finish_split(dest, name, splits_info[name], done, params)
        else:
            splits_info[name]["bytes_per_image"] = 3 * params["image_size"] ** 2
    stats, shas = _write_stats(dest, labels_by_split["train"], params, workers, progress)
    header = {
        "format": store.FORMAT,
        "version": store.VERSION,
        "encoding": encoding,
        "quality": params.get("quality"),
        "image_size": params["image_size"],
        "layout": "NHWC",
        "dtype": "uint8",
        "classes": source.classes,
        "class_words": [source.class_words.get(c, "") for c in source.classes],
        "splits": splits_info,
        "stats": {"count": stats.count, "sha256": shas},
        "prepare": {
            "params": params,
            "alexnet_version": package_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
        },
    }
    write_json(dest / store.HEADER, header)
    for name in source.splits:
        jpegstore.remove_parts(dest, name)
    (dest / store.PROGRESS).unlink()
    (dest / ".prepare.lock").unlink(missing_ok=True)
    return header


def _write_labels(
    dest: Path,
    source: Source,
    name: str,
    split: SplitSource,
    done: dict[tuple[str, int], dict[str, Any]],
    chunk: int,
) -> tuple[dict[str, Any], np.ndarray]:
    """One split's labels file (-1 for each skipped slot) and its entry in the header."""
    labels = np.asarray(split.labels, dtype=np.int32)
    records = [done[name, k] for k in range(-(-len(labels) // chunk))]
    skipped = [s for r in records for s in r["skipped"]]
    for slot, _, _ in skipped:
        labels[slot] = -1
    if name == "train" and not (labels >= 0).any():
        raise AlexNetError(f"none of the {len(labels)} training images of {source.path} could be decoded")
    np.save(dest / store.labels_file(name), labels)
    info = {
        "slots": len(labels),
        "valid": int((labels >= 0).sum()),
        "images": store.images_file(name),
        "labels": store.labels_file(name),
        "labels_sha256": store.sha256_file(dest / store.labels_file(name)),
        "chunk_size": chunk,
        "chunk_crc32": [r["crc32"] for r in records],
        "skipped": [{"slot": slot, "item": item, "reason": reason} for slot, item, reason in skipped],
    }
    for _slot, item, reason in skipped[:20]:
        log.warning("skipped %s: %s", item, reason)
    if len(skipped) > 20:
        log.warning("... and %d more unreadable %s images (all listed in %s)", len(skipped) - 20, name, store.HEADER)
    return info, labels


def _write_stats(
    dest: Path, labels: np.ndarray, params: dict[str, Any], workers: int, progress: bool
) -> tuple[DataStats, dict[str, str]]:
    """The training set's mean image and RGB PCA over its valid slots, saved; and the files' SHA-256."""
    from tqdm import tqdm

    size, chunk = params["image_size"], params["chunk_size"]
    path = str(dest / store.images_file("train"))
    tasks: list[Any] = [
        (path, a, min(a + chunk, len(labels)), labels[a : a + chunk] >= 0) for a in range(0, len(labels), chunk)
    ]
    sums: Any = chunk_sums
    if params.get("encoding") == jpegstore.ENCODING:  # the statistics of the decoded pixels that training sees
        data, index = str(dest / jpegstore.data_file("train")), str(dest / jpegstore.index_file("train"))
        tasks, sums = [(data, index, a, b, size) for _, a, b, _ in tasks], jpegstore.chunk_sums_jpeg
    acc = StatsAccumulator(size)
    bar = tqdm(total=len(tasks), desc="mean image and PCA", unit="chunk", disable=not progress, leave=False)
    for image_sum, rgb_sum, outer, count in _map(sums, tasks, workers):
        acc.add_sums(image_sum.transpose(2, 0, 1), rgb_sum, outer, count)
        bar.update()
    bar.close()
    stats = acc.result()
    shas = {}
    for key in store.STATS_KEYS:
        np.save(dest / store.stats_file(key), getattr(stats, key).numpy())
        shas[key] = store.sha256_file(dest / store.stats_file(key))
    return stats, shas
