"""One entry point for a dataset in either form: an ImageFolder tree or a prepared store.

Training (:func:`open_training_data`) and evaluation (:func:`open_eval_data`) both ask
"store or folder?" here, so the two cannot disagree about what a ``--data`` path means.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alexnet.data import ilsvrc, store
from alexnet.data.holdout import digest, split_positions
from alexnet.data.images import ImageFolderDataset, ImageList, find_splits, scan_image_folder, val_folder
from alexnet.data.loader import EpochBatchSampler, make_loader
from alexnet.data.stats import DataStats, compute_stats
from alexnet.data.store import StoreLoader, is_store, open_store
from alexnet.errors import AlexNetError


@dataclass
class TrainingData:
    """What training (alexnet.train) needs of a dataset, whichever form it is in."""

    description: str
    classes: list[str]
    counts: dict[str, int]  # images per split
    stats: Callable[[], tuple[DataStats, list[str]]]  # mean image + PCA, and unreadable training files
    loader: Callable[[str, EpochBatchSampler], Any]  # an iterable of Batch for "train" or "val"
    # With data.holdout: "val" is the part of train/ held out (holdout.py), and this is
    # its record (setting, images, SHA-256 of their names) for the run directory.
    holdout: dict[str, Any] | None = None


def open_training_data(
    root: str | Path,
    image_size: int,
    *,
    workers: int = -1,
    stats_max_images: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    holdout: float = 0.0,
) -> TrainingData:
    """A prepared store (``alexnet prepare``) if ``root`` is one, otherwise an ImageFolder tree.

    With a store, decoding is already done: batches are memcpy'd from the memory map by
    threads (``workers`` is ignored), and the statistics are the store's (computed by
    prepare over all of train/, a holdout included: they set the mean image and PCA
    lighting, not the weights). ``holdout`` (data.holdout) replaces val by part of train.
    """
    if is_store(root):
        store = open_store(root, image_size)
        splits: dict[str, Any] = dict(store.splits)
        record = None
        if holdout:
            base = store.split("train")
            kept, held = split_positions(base.labels[base.index], store.classes, holdout)
            splits = {"train": _subset_split(base, kept), "val": _subset_split(base, held)}
            record = _record(holdout, [f"slot {i}" for i in base.index[held]])

        def store_loader(split: str, sampler: EpochBatchSampler) -> StoreLoader:
            if split not in splits:
                store.split(split)  # its error names the splits there are
            return StoreLoader(splits[split], sampler, device)

        def store_stats() -> tuple[DataStats, list[str]]:
            return store.stats(), store.skipped

        return TrainingData(
            f"store {store.root}",
            store.classes,
            {name: len(split) for name, split in splits.items()},
            store_stats,
            store_loader,
            record,
        )
    if holdout and (Path(root) / "train").is_dir():
        train_images = scan_image_folder(Path(root) / "train")  # val/ is not needed, nor read
        kept, held = split_positions(np.asarray(train_images.labels), train_images.classes, holdout)
        lists = {"train": _subset(train_images, kept), "val": _subset(train_images, held)}
        names = [os.path.relpath(p, train_images.root) for p in lists["val"].paths]
        record = _record(holdout, names)
    else:
        train_dir, val_dir = find_splits(root)
        train_images = scan_image_folder(train_dir)
        val_images = scan_image_folder(val_dir, classes=train_images.classes)
        lists, record = {"train": train_images, "val": val_images}, None
    train_images = lists["train"]

    def folder_loader(split: str, sampler: EpochBatchSampler) -> Any:
        return make_loader(ImageFolderDataset(lists[split], image_size), sampler, workers)

    def folder_stats() -> tuple[DataStats, list[str]]:
        return compute_stats(train_images, image_size, workers, stats_max_images, progress)

    return TrainingData(
        f"folder {root}",
        train_images.classes,
        {k: len(v) for k, v in lists.items()},
        folder_stats,
        folder_loader,
        record,
    )


def _subset(images: ImageList, positions: np.ndarray) -> ImageList:
    return ImageList(
        images.root, [images.paths[i] for i in positions], [images.labels[i] for i in positions], images.classes
    )


def _record(holdout: float, names: list[str]) -> dict[str, Any]:
    return {"holdout": holdout, "images": len(names), "sha256": digest(names)}


def _subset_split(split: Any, positions: np.ndarray) -> Any:
    """Some positions of a store split (raw or JPEG) as a split of their own: the same files, a narrower index."""
    part = copy.copy(split)
    part.index = split.index[np.asarray(positions, dtype=np.int64)]
    return part


def open_eval_data(
    root: str | Path,
    classes: list[str],
    image_size: int,
    batch_size: int,
    workers: int,
    device: torch.device | str = "cpu",
    *,
    classes_from: str = "the checkpoint",
    split: str | None = None,
) -> tuple[Path, Any]:
    """(what is evaluated, an iterable of Batch in a fixed order) for ``alexnet evaluate --data root``.

    A store: its val split (or ``split``: "test" for ILSVRC-2010's, prepared from its
    archives), whose classes must be ``classes`` (those of ``classes_from``, named in the
    error). A folder: its ``val/``, ``validation/`` or ``test/`` subfolder if it has one
    (``split``: that subfolder, which must exist), else the folder itself, read as class
    folders numbered by ``classes``.
    """
    root = Path(root)
    if is_store(root):
        store = open_store(root, image_size)
        if store.classes != classes:
            raise AlexNetError(f"store {root} has other classes than {classes_from}")
        part = store.split(split or "val")
        return root, StoreLoader(part, EpochBatchSampler(len(part), batch_size, shuffle=False), device)
    if split is None:
        folder = val_folder(root) or root
    else:
        folder = (val_folder(root) if split == "val" else None) or root / split
        if not folder.is_dir():
            raise AlexNetError(f"{root} has no {split}/ folder to evaluate (--split {split})")
    images = scan_image_folder(folder, classes=classes)
    sampler = EpochBatchSampler(len(images), batch_size, shuffle=False)
    return folder, make_loader(ImageFolderDataset(images, image_size), sampler, workers)


Member = ilsvrc.Member  # (name or path, offset in the archive or -1 for a file, size or -1)


@dataclass
class SplitSource:
    archive: str | None  # the archive the members' offsets refer to; None: members are files
    members: list[Member]
    labels: list[int]


@dataclass
class Source:
    kind: str  # "image-folder" | "ilsvrc2012" | "ilsvrc2010"
    path: Path
    classes: list[str]
    splits: dict[str, SplitSource]
    class_words: dict[str, str] = field(default_factory=dict)

    def fingerprint(self, image_size: int, chunk_size: int) -> str:
        """Identifies the inputs and parameters of a prepare: names, sizes and mtimes of every input."""
        h = hashlib.sha256(f"{store.VERSION} {self.kind} {image_size} {chunk_size} {self.classes}".encode())
        for name, split in self.splits.items():
            if split.archive is not None:
                st = os.stat(split.archive)
                h.update(f"{name} {split.archive} {st.st_size} {st.st_mtime_ns}\n".encode())
            for (member, offset, size), label in zip(split.members, split.labels):
                if offset < 0:
                    st = os.stat(member)
                    offset, size = st.st_mtime_ns, st.st_size
                h.update(f"{member} {offset} {size} {label}\n".encode())
        return h.hexdigest()


def find_source(src: str | Path) -> Source:
    """An ILSVRC-2012 or -2010 archive folder (if it holds ILSVRC2012_img_train.tar or
    ILSVRC2010_images_train.tar), else an ImageFolder tree."""
    src = Path(src)
    release = ilsvrc.find_release(src)
    if release is not None:
        classes, words, splits = ilsvrc.scan_ilsvrc(src)
        return Source(
            f"ilsvrc{release.year}",
            src.resolve(),
            classes,
            {name: SplitSource(str(archive), members, labels) for name, (archive, members, labels) in splits.items()},
            words,
        )
    train_dir, val_dir = find_splits(src)
    train = scan_image_folder(train_dir)
    val = scan_image_folder(val_dir, classes=train.classes)
    return Source(
        "image-folder",
        src.resolve(),
        train.classes,
        {
            "train": SplitSource(None, [(p, -1, -1) for p in train.paths], train.labels),
            "val": SplitSource(None, [(p, -1, -1) for p in val.paths], val.labels),
        },
    )
