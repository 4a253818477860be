"""``data.holdout``: part of train/ held out as the split that drives the schedule and best.pt.

The paper divides the learning rate "when the validation error rate stopped improving"
and reports on the same ILSVRC validation set (section 5, Table 2's 2012 rows), as this
project's runs do by default. With ``data.holdout`` the plateau rule and best.pt read a
split taken from train/ instead, so val/ is never seen before a final ``alexnet
evaluate``: N images per class (an integer), or a fraction of each class in (0, 1),
rounded half up and at least one image.

Which images: for each class, in the order of the training split (sorted file names; a
store's slot order), a permutation from a generator seeded with a fixed number and the
class's label picks them. The choice depends only on the split's labels and the
setting -- not on run.seed, the machine, the number of ranks -- so a resumed run holds out
the same images; :func:`check_record` also compares them with those recorded in the
run directory (holdout.json) and refuses a resume whose data changed.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alexnet.errors import AlexNetError
from alexnet.files import write_json

SEED = 20_121_203  # NeurIPS 2012 (Dec 3): any fixed number; changing it changes every holdout
RECORD = "holdout.json"


def check_setting(holdout: float) -> None:
    """0 (off), a whole number of images per class, or a fraction in (0, 1)."""
    if not math.isfinite(holdout) or holdout < 0 or (holdout >= 1 and holdout != int(holdout)):
        raise AlexNetError(
            f"data.holdout must be 0 (off), images per class (an integer), or a fraction in (0, 1); got {holdout}"
        )


def per_class_count(holdout: float, n: int) -> int:
    """Images held out of a class of n: the integer itself, or fraction * n rounded half up, at least 1."""
    return int(holdout) if holdout >= 1 else max(1, math.floor(holdout * n + 0.5))


def split_positions(labels: np.ndarray, classes: list[str], holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out): sorted positions into the training split, disjoint, covering it."""
    check_setting(holdout)
    labels = np.asarray(labels, dtype=np.int64)
    held: list[np.ndarray] = []
    for label, name in enumerate(classes):
        members = np.flatnonzero(labels == label)
        k = per_class_count(holdout, len(members))
        if k >= len(members):
            raise AlexNetError(
                f"data.holdout {holdout:g} takes {k} images of class {name!r}, which has {len(members)} in train/: "
                "at least one must stay for training"
            )
        g = torch.Generator().manual_seed(SEED + label)
        held.append(members[torch.randperm(len(members), generator=g)[:k].numpy()])
    out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), out, assume_unique=True)
    return kept, out


def digest(names: list[str]) -> str:
    """SHA-256 of the held-out images' names, one per line: what the record compares."""
    return hashlib.sha256("".join(f"{n}\n" for n in names).encode("utf-8", "surrogateescape")).hexdigest()


def check_record(run_dir: Path, record: dict[str, Any], *, resuming: bool, write: bool) -> None:
    """Write the holdout's record for a new run; on resume, refuse one that holds out other images."""
    path = run_dir / RECORD
    if resuming and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise AlexNetError(f"cannot read {path}: {e}") from None
        if saved != record:
            raise AlexNetError(
                f"{path} records another holdout ({saved.get('images')} images, {str(saved.get('sha256'))[:12]}) "
                f"than the data gives now ({record['images']}, {record['sha256'][:12]}): train/ changed since the run began"
            )
        return
    if write:
        write_json(path, record, indent=2)
