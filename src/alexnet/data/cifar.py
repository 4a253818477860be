"""CIFAR-10 in memory: both official layouts read into uint8 tensors (N, 3, 32, 32).

CIFAR-10 is small enough (60,000 x 3 x 32 x 32 bytes = 184 MB) to live in memory, on
the training device, as uint8. Batches are then index gathers and augment.py crops and
flips them as tensor ops: no per-image decoding after the first load. Measured on the
shared 2-core development machine (2026-11-23, torch 2.14.1, CPU, other jobs running;
``python benchmarks/cifar_loader.py --benchmark /tmp/cifar10`` on the extracted JPEG tree):
128-image batches of random 28x28 patches with reflections and PCA lighting came out of
memory at 9,300 images/s, and from a DataLoader decoding the JPEGs (images.py's
ImageFolderDataset) at 1,760 images/s in-process and 1,980 with two workers. Loading
all 60,000 JPEGs once took 12-18 s from the .tar.gz or the tree.

Accepted inputs (``load_cifar10``):

* an ImageFolder tree ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` (``val/`` is
  accepted for ``test/``), as in the JPEG copy of CIFAR-10;
* the same tree packed as ``.tar``, ``.tar.gz`` or ``.tgz``, read member by member in
  memory (nothing is extracted to disk, so member names cannot escape anywhere);
* the official ``cifar-10-python.tar.gz`` (``cifar-10-batches-py/data_batch_1..5``,
  ``test_batch``, ``batches.meta``), packed or extracted.

The python batches are pickles. Pickle can run arbitrary code, so they are read with
:class:`BatchUnpickler`, which can build only dicts, lists, strings, bytes, numbers and
numpy uint8 arrays: any other global named in the stream (``os.system``,
``builtins.eval``, ...) is refused before it is looked up, and the result is checked
against the known structure (``data`` uint8 (N, 3072), ``labels`` N ints).

Labels: an ImageFolder tree numbers classes in sorted folder-name order (torchvision's
rule); the python archive uses ``batches.meta``'s ``label_names``. CIFAR-10's label names
happen to be in alphabetical order, so both layouts give the same label for each class.

Where the data is: callers pass a path; :func:`default_data_path` reads the environment
variable ``ALEXNET_CIFAR10`` (a path to any of the layouts above) for those that may
fall back on a configured copy.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from alexnet.data.images import BadImage, find_splits, load_image, scan_image_folder
from alexnet.errors import AlexNetError
from alexnet.files import ArrayUnpickler, load_array_pickle

log = logging.getLogger("alexnet")

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_SIZE = 32
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


@dataclass
class ArraySplit:
    """One split held in memory."""

    images: torch.Tensor  # (N, 3, 32, 32) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list[str]  # names in label order

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, n: int, seed: int = 0) -> ArraySplit:
        """``n`` images, the same number from each class (as far as n allows), in a fixed
        shuffled order; all of them if n is 0 or at least the split's size."""
        if n <= 0 or n >= len(self):
            return self
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        labels = self.labels[order]
        # Rank of each image within its class in the shuffled order; taking ranks round by
        # round keeps the classes balanced.
        rank = torch.zeros_like(labels)
        for c in range(len(self.classes)):
            mine = labels == c
            rank[mine] = torch.arange(int(mine.sum()))
        keep = order[torch.argsort(rank * len(self) + torch.arange(len(self)), stable=True)[:n]]
        keep = keep.sort().values  # the original order, so the training shuffle alone decides
        return ArraySplit(self.images[keep], self.labels[keep], self.classes)


# --------------------------------------------------------------------------------------
# The official python batches, read without running code


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes into protocol-2 pickles as _codecs.encode(str, "latin1");
    # only that use is allowed, so no other codec is ever looked up.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not part of a CIFAR batch")
    return text.encode("latin1")


class BatchUnpickler(ArrayUnpickler):
    """An unpickler for CIFAR batches: NumPy arrays and plain containers (files.py's
    :class:`~alexnet.files.ArrayUnpickler`), and bytes in Python 3 protocol-2 pickles."""

    allowed: ClassVar[dict[tuple[str, str], Any]] = {
        **ArrayUnpickler.allowed,
        ("_codecs", "encode"): _latin1_encode,
    }

    def refusal(self, module: str, name: str) -> str:
        return f"refusing global {module}.{name}: a CIFAR batch holds only arrays and lists"


def _load_pickle(raw: bytes, what: str) -> dict[str, Any]:
    try:
        # encoding="bytes": the official files are Python 2 pickles whose str objects
        # become bytes (the CIFAR page's own recipe); numpy's dtype accepts b"u1".
        obj = load_array_pickle(raw, encoding="bytes", unpickler=BatchUnpickler)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise AlexNetError(f"{what} is not a readable CIFAR batch: {e}") from None
    if not isinstance(obj, dict):
        raise AlexNetError(f"{what} should hold a dict; found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _parse_batch(raw: bytes, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, 32, 32) uint8, labels (N,) int64) from one pickled batch."""
    d = _load_pickle(raw, what)
    data, labels = d.get("data"), d.get("labels")
    if labels is None and "fine_labels" in d:
        raise AlexNetError(f"{what} is a CIFAR-100 batch; only CIFAR-10 is supported")
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * IMAGE_SIZE**2
    ):
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise AlexNetError(f"{what}: 'data' should be a uint8 array (N, 3072); found {found}")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise AlexNetError(
            f"{what}: 'labels' should list one class per image ({len(data)}); found {type(labels).__name__}"
        )
    if not all(isinstance(y, (int, np.integer)) and not isinstance(y, bool) for y in labels):
        raise AlexNetError(f"{what}: 'labels' should be integers")
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise AlexNetError(f"{what}: labels should be 0-9; found {labels.min()}-{labels.max()}")
    # Each row is the red plane, then green, then blue, each 32x32 row-major: exactly (3, 32, 32).
    return data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE), labels


def _parse_meta(raw: bytes, what: str) -> list[str]:
    names = _load_pickle(raw, what).get("label_names")
    if not isinstance(names, list) or len(names) != len(CIFAR10_CLASSES):
        raise AlexNetError(f"{what}: 'label_names' should list {len(CIFAR10_CLASSES)} class names")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _from_batches(files: dict[str, bytes], where: str) -> tuple[ArraySplit, ArraySplit]:
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if n not in files]
    if missing:
        raise AlexNetError(f"{where} lacks CIFAR-10 batch(es) {', '.join(missing)}")
    classes = (
        _parse_meta(files["batches.meta"], f"{where}: batches.meta") if "batches.meta" in files else CIFAR10_CLASSES
    )
    parts = [_parse_batch(files[n], f"{where}: {n}") for n in TRAIN_BATCHES]
    test = _parse_batch(files[TEST_BATCH], f"{where}: {TEST_BATCH}")

    def split(images: np.ndarray, labels: np.ndarray) -> ArraySplit:
        return ArraySplit(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), list(classes))

    return split(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])), split(*test)


# --------------------------------------------------------------------------------------
# JPEG (or PNG) ImageFolder trees, on disk or in a tar archive


def _decode(source: str | io.BytesIO) -> np.ndarray:
    # load_image is the project's decoder (grey, CMYK, palette, 16-bit, EXIF all handled);
    # for 32x32 files its shorter-side rescale to 32 leaves the pixels as decoded.
    return load_image(source, IMAGE_SIZE)  # (32, 32, 3) uint8


def _stack(arrays: list[np.ndarray], labels: list[int], classes: list[str]) -> ArraySplit:
    if not arrays:
        return ArraySplit(
            torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8), torch.empty(0, dtype=torch.long), classes
        )
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ArraySplit(images, torch.tensor(labels, dtype=torch.long), classes)


def _from_tree(root: Path) -> tuple[ArraySplit, ArraySplit]:
    train_dir, test_dir = find_splits(root)
    train_list = scan_image_folder(train_dir)
    test_list = scan_image_folder(test_dir, classes=train_list.classes)
    splits = []
    for listing in (train_list, test_list):
        arrays, labels, skipped = [], [], []
        for path, label in zip(listing.paths, listing.labels):
            try:
                arrays.append(_decode(path))
                labels.append(label)
            except BadImage as e:
                skipped.append(f"{path}: {e}")
        _warn_skipped(skipped)
        splits.append(_stack(arrays, labels, train_list.classes))
    return splits[0], splits[1]


_TREE_MEMBER = re.compile(r"^(?:.*/)?(train|test|val)/([^/]+)/([^/]+)$")


def _tar_members(tar: tarfile.TarFile) -> Iterator[tuple[tarfile.TarInfo, bytes]]:
    for member in tar:
        if member.isfile():
            f = tar.extractfile(member)
            if f is not None:
                yield member, f.read()


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise AlexNetError(f"{path} is not a readable tar archive: {e}") from None


def _from_tar(path: Path) -> tuple[ArraySplit, ArraySplit]:
    batches: dict[str, bytes] = {}
    images: dict[str, dict[str, list[tuple[str, bytes]]]] = {"train": {}, "test": {}}
    with _open_tar(path) as tar:
        try:
            for member, raw in _tar_members(tar):
                name = member.name.lstrip("./")
                base = name.rsplit("/", 1)[-1]
                if base in (*TRAIN_BATCHES, TEST_BATCH, "batches.meta"):
                    batches[base] = raw
                    continue
                m = _TREE_MEMBER.match(name)
                if m and not m.group(3).startswith(".") and m.group(3).lower().endswith((".jpg", ".jpeg", ".png")):
                    split = "train" if m.group(1) == "train" else "test"
                    images[split].setdefault(m.group(2), []).append((m.group(3), raw))
        except (tarfile.TarError, OSError, EOFError) as e:
            raise AlexNetError(f"{path} is damaged: {e}") from None
    if batches:
        return _from_batches(batches, str(path))
    if not images["train"] or not images["test"]:
        raise AlexNetError(
            f"{path} holds neither CIFAR-10 python batches (data_batch_1..5, test_batch) "
            "nor an image tree train/<class>/*.jpg + test/<class>/*.jpg"
        )
    classes = sorted(images["train"])
    unknown = sorted(set(images["test"]) - set(classes))
    if unknown:
        raise AlexNetError(f"{path}: test classes {', '.join(unknown[:5])} are not among the training classes")
    out = []
    for split in ("train", "test"):
        arrays, labels, skipped = [], [], []
        for label, cls in enumerate(classes):
            for file_name, raw in sorted(images[split].get(cls, [])):
                try:
                    arrays.append(_decode(io.BytesIO(raw)))
                    labels.append(label)
                except BadImage as e:
                    skipped.append(f"{path}:{split}/{cls}/{file_name}: {e}")
        _warn_skipped(skipped)
        out.append(_stack(arrays, labels, classes))
    return out[0], out[1]


def _warn_skipped(skipped: list[str]) -> None:
    if skipped:
        log.warning("%d images cannot be decoded and are skipped, e.g. %s", len(skipped), skipped[0])


def load_cifar10(path: str | Path) -> tuple[ArraySplit, ArraySplit]:
    """(train, test) from any of the layouts in the module docstring, as uint8 tensors."""
    path = Path(path)
    if not path.exists():
        raise AlexNetError(f"CIFAR-10 data {path} does not exist (expected a folder or a .tar.gz archive)")
    if path.is_dir():
        for folder in (path, path / "cifar-10-batches-py"):
            if (folder / TRAIN_BATCHES[0]).is_file():
                files = {
                    p.name: p.read_bytes()
                    for p in folder.iterdir()
                    if p.name in (*TRAIN_BATCHES, TEST_BATCH, "batches.meta")
                }
                train, test = _from_batches(files, str(folder))
                break
        else:
            train, test = _from_tree(path)
    else:
        train, test = _from_tar(path)
    if len(train) == 0 or len(test) == 0:
        raise AlexNetError(f"{path}: no readable training or test images")
    return train, test


def default_data_path() -> Path | None:
    """The CIFAR-10 copy named by the environment variable ``ALEXNET_CIFAR10`` (any layout
    :func:`load_cifar10` accepts); None when it is unset or empty."""
    value = os.environ.get("ALEXNET_CIFAR10")
    return Path(value) if value else None
