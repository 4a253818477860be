"""data.holdout (data/holdout.py): part of train/ held out to drive the schedule and best.pt."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from alexnet.cli import main
from alexnet.config import parse_assignments, resolve
from alexnet.data.holdout import RECORD, per_class_count, split_positions
from alexnet.data.loader import EpochBatchSampler
from alexnet.data.prepare import prepare
from alexnet.data.source import open_training_data
from alexnet.errors import AlexNetError
from conftest import TINY, write_tree

LABELS = np.array([0] * 10 + [1] * 3 + [2] * 7)  # class sizes 10, 3, 7
CLASSES = ["a", "b", "c"]


@pytest.mark.parametrize(("holdout", "per_class"), [(2, [2, 2, 2]), (0.25, [3, 1, 2]), (0.1, [1, 1, 1])])
def test_positions_are_disjoint_cover_and_count_per_class(holdout, per_class):
    # By hand: 0.25 of 10, 3, 7 is 2.5, 0.75, 1.75 -> half up 3, 1, 2; 0.1 -> at least 1 each.
    kept, held = split_positions(LABELS, CLASSES, holdout)
    assert np.intersect1d(kept, held).size == 0
    assert sorted([*kept, *held]) == list(range(len(LABELS)))
    assert np.bincount(LABELS[held], minlength=3).tolist() == per_class
    assert [per_class_count(holdout, n) for n in (10, 3, 7)] == per_class


def test_choice_is_deterministic_and_per_class():
    first = split_positions(LABELS, CLASSES, 2)[1]
    assert np.array_equal(first, split_positions(LABELS, CLASSES, 2)[1])
    # A class's choice depends on its own images only: another class growing changes nothing.
    grown = np.concatenate([LABELS, [2, 2]])
    again = split_positions(grown, CLASSES, 2)[1]
    assert np.array_equal(first[LABELS[first] < 2], again[grown[again] < 2])


def test_a_holdout_that_takes_a_whole_class_is_refused():
    with pytest.raises(AlexNetError, match=r"data.holdout 3 takes 3 images of class 'b', which has 3 in train/"):
        split_positions(LABELS, CLASSES, 3)
    for bad in ("2.5", "-1", "nan"):
        with pytest.raises(AlexNetError, match="data.holdout must be 0"):
            resolve(None, parse_assignments([f"data.holdout={bad}"]))


def _paths(data, split: str) -> list[str]:
    loader = data.loader(split, EpochBatchSampler(data.counts[split], 4, shuffle=False))
    return list(loader.dataset.images.paths)


def test_folder_holdout_comes_from_train_and_val_is_not_needed(tmp_path):
    root = write_tree(tmp_path / "d", train=5, val=2)
    shutil.rmtree(root / "val")  # a user who keeps val/ elsewhere, untouched
    data = open_training_data(root, 32, workers=0, holdout=2)
    assert data.counts == {"train": 9, "val": 6}
    train, val = _paths(data, "train"), _paths(data, "val")
    assert not set(train) & set(val) and all("/train/" in p for p in train + val)
    assert data.holdout["images"] == 6 and data.holdout["holdout"] == 2
    assert open_training_data(root, 32, workers=0, holdout=2).holdout == data.holdout


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_store_holdout_gathers_the_same_images_as_the_train_split(tmp_path, encoding):
    root = write_tree(tmp_path / "d", train=4, val=1)
    prepare(root, tmp_path / "s", image_size=16, workers=0, progress=False, encoding=encoding)
    data = open_training_data(tmp_path / "s", 16, holdout=0.5)
    assert data.counts == {"train": 6, "val": 6}
    whole = open_training_data(tmp_path / "s", 16)
    batches = {}
    for name, d, split in (("train", whole, "train"), ("held", data, "val"), ("kept", data, "train")):
        loader = d.loader(split, EpochBatchSampler(d.counts[split], 64, shuffle=False))
        [batch] = list(loader)
        batches[name] = (batch.images.numpy(), batch.labels.numpy())
    kept, held = split_positions(batches["train"][1], ["ant", "bee", "cat"], 0.5)
    for name, positions in (("held", held), ("kept", kept)):
        np.testing.assert_array_equal(batches[name][0], batches["train"][0][positions])
        np.testing.assert_array_equal(batches[name][1], batches["train"][1][positions])


def test_cifar_tree_holdout(cifar_tree):
    data = open_training_data(cifar_tree, 32, workers=0, holdout=0.25)
    assert data.counts == {"train": 90, "val": 30}  # 12 per class: 3 held out of each of 10


def test_train_with_holdout_records_it_and_refuses_a_changed_train_set_on_resume(tmp_path, capsys):
    root = write_tree(tmp_path / "d", train=4, val=1)
    argv = ["train", "--data", str(root), "--out", str(tmp_path / "run"), *TINY, "--set", "data.holdout=1"]
    assert main([*argv, "--epochs", "1"]) == 0
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["val_images"] == 3  # one per class, from train/
    assert json.loads((tmp_path / "run" / RECORD).read_text())["images"] == 3
    assert "holdout: 1.0" in (tmp_path / "run" / "config.yaml").read_text()
    for i in range(4):  # the images of one class renamed: the held-out one has another name
        (root / "train" / "ant" / f"{i}.jpg").rename(root / "train" / "ant" / f"x{i}.jpg")
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2", "--no-progress"]) == 2
    assert "records another holdout" in capsys.readouterr().err


def test_resume_with_holdout_is_exact(tmp_path):
    import torch

    root = write_tree(tmp_path / "d", train=4, val=1)
    base = ["train", "--data", str(root), *TINY, "--set", "data.holdout=0.25"]
    assert main([*base, "--out", str(tmp_path / "full"), "--epochs", "2"]) == 0
    assert main([*base, "--out", str(tmp_path / "split"), "--epochs", "1"]) == 0
    assert main(["train", "--resume", str(tmp_path / "split"), "--epochs", "2", "--no-progress"]) == 0
    full, split = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("full", "split"))
    for key, value in full["model"].items():
        assert torch.equal(value, split["model"][key]), key
