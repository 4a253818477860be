"""prepare.py: an ImageFolder tree decoded once into a store, every pixel equal to the folder loader's.

References: data.load_image on each source file, data.compute_stats on the same tree,
and an uninterrupted prepare for the resumed one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alexnet.data import prepare as prepare_mod
from alexnet.data import store
from alexnet.data.images import load_image, scan_image_folder
from alexnet.data.prepare import prepare
from alexnet.data.stats import compute_stats
from alexnet.errors import AlexNetError
from conftest import write_tree


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "src")


def test_store_holds_load_image_pixels_labels_and_classes(tree: Path, tmp_path: Path) -> None:
    report = prepare(tree, tmp_path / "store", image_size=16, workers=0, chunk_size=4, progress=False)
    assert report.images == 21 and report.skipped == []
    s = store.open_store(tmp_path / "store", 16)
    assert s.classes == ["ant", "bee", "cat"]
    for split in ("train", "val"):
        listing = scan_image_folder(tree / split)
        part = s.split(split)
        assert len(part) == len(listing)
        out = np.empty((len(part), 16, 16, 3), np.uint8)
        labels = part.gather(list(range(len(part))), out)
        assert labels.tolist() == listing.labels
        for i, path in enumerate(listing.paths):
            np.testing.assert_array_equal(out[i], load_image(path, 16))


def test_statistics_equal_compute_stats_on_the_folder(tree: Path, tmp_path: Path) -> None:
    prepare(tree, tmp_path / "store", image_size=16, workers=0, chunk_size=4, progress=False)
    ours = store.open_store(tmp_path / "store").stats()
    reference, _ = compute_stats(scan_image_folder(tree / "train"), 16, workers=0)
    assert ours.count == reference.count == 15
    for key in store.STATS_KEYS:
        torch.testing.assert_close(getattr(ours, key), getattr(reference, key), rtol=1e-6, atol=1e-6)


def test_unreadable_images_are_listed_and_left_out_not_zero_filled(tree: Path, tmp_path: Path) -> None:
    (tree / "train" / "bee" / "empty.jpg").write_bytes(b"")
    (tree / "train" / "cat" / "text.jpg").write_text("not an image")
    report = prepare(tree, tmp_path / "store", image_size=16, workers=0, chunk_size=4, progress=False)
    assert sorted(Path(s.split(":")[0]).name for s in report.skipped) == ["empty.jpg", "text.jpg"]
    s = store.open_store(tmp_path / "store")
    train = s.split("train")
    assert len(train) == 15 and len(train.images) == 17
    assert (train.labels == -1).sum() == 2
    info = s.header["splits"]["train"]["skipped"]
    assert {Path(e["item"]).name for e in info} == {"empty.jpg", "text.jpg"} and all(e["reason"] for e in info)
    # The statistics see only the 15 good images.
    assert s.stats().count == 15


def test_process_pool_writes_the_same_store(tree: Path, tmp_path: Path) -> None:
    prepare(tree, tmp_path / "a", image_size=16, workers=0, chunk_size=4, progress=False)
    prepare(tree, tmp_path / "b", image_size=16, workers=2, chunk_size=4, progress=False)
    ha, hb = (json.loads((tmp_path / d / store.HEADER).read_text()) for d in "ab")
    for split in ("train", "val"):
        assert ha["splits"][split]["chunk_crc32"] == hb["splits"][split]["chunk_crc32"]
    assert ha["stats"]["sha256"] == hb["stats"]["sha256"]


def test_interrupted_prepare_resumes_without_redoing_chunks(tree: Path, tmp_path: Path, monkeypatch) -> None:
    prepare(tree, tmp_path / "reference", image_size=16, workers=0, chunk_size=4, progress=False)
    real = prepare_mod.write_chunk
    calls: list[tuple[str, int]] = []

    def dies_on_third(task):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append((task.split, task.chunk))
        return real(task)

    monkeypatch.setattr(prepare_mod, "write_chunk", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare(tree, tmp_path / "store", image_size=16, workers=0, chunk_size=4, progress=False)
    with pytest.raises(AlexNetError, match="unfinished store"):
        store.open_store(tmp_path / "store")

    decoded: list[tuple[str, int]] = []

    def counting(task):
        decoded.append((task.split, task.chunk))
        return real(task)

    monkeypatch.setattr(prepare_mod, "write_chunk", counting)
    report = prepare(tree, tmp_path / "store", image_size=16, workers=0, chunk_size=4, progress=False)
    # train has 15 images (chunks 0-3), val 6 (chunks 0-1): all but the two finished chunks.
    assert set(decoded).isdisjoint(calls) and len(decoded) == 6 - 2
    assert report.images == 21 - 8
    a, b = (json.loads((tmp_path / d / store.HEADER).read_text()) for d in ("reference", "store"))
    assert a["splits"] == b["splits"] and a["stats"] == b["stats"]
    assert not (tmp_path / "store" / store.PROGRESS).exists()


def test_torn_progress_line_is_redone(tree: Path, tmp_path: Path, monkeypatch) -> None:
    real = prepare_mod.write_chunk
    seen: list[int] = []

    def dies_on_second(task):
        if seen:
            raise KeyboardInterrupt
        seen.append(task.chunk)
        return real(task)

    monkeypatch.setattr(prepare_mod, "write_chunk", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare(tree, tmp_path / "store", image_size=16, workers=0, chunk_size=4, progress=False)
    with open(tmp_path / "store" / store.PROGRESS, "a") as f:
        f.write('{"split": "train", "chu')  # a write cut short by the interruption
    monkeypatch.setattr(prepare_mod, "write_chunk", real)
    report = prepare(tree, tmp_path / "store", image_size=16, workers=0, chunk_size=4, progress=False)
    assert report.images == 21 - 4
    assert len(store.open_store(tmp_path / "store").split("train")) == 15


def test_complete_store_is_not_redone_and_other_parameters_are_refused(tree: Path, tmp_path: Path) -> None:
    prepare(tree, tmp_path / "store", image_size=16, workers=0, progress=False)
    again = prepare(tree, tmp_path / "store", image_size=16, workers=0, progress=False)
    assert again.complete_before and again.images == 0
    with pytest.raises(AlexNetError, match="already holds a store of other data or parameters"):
        prepare(tree, tmp_path / "store", image_size=24, workers=0, progress=False)


def test_unfinished_prepare_with_other_parameters_is_refused(tree: Path, tmp_path: Path, monkeypatch) -> None:
    def interrupt(task):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod, "write_chunk", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare(tree, tmp_path / "store", image_size=16, workers=0, progress=False)
    with pytest.raises(AlexNetError, match="unfinished prepare of other data or parameters"):
        prepare(tree, tmp_path / "store", image_size=20, workers=0, progress=False)


def test_changed_source_is_refused_on_resume(tree: Path, tmp_path: Path, monkeypatch, make_jpeg) -> None:
    def interrupt(task):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod, "write_chunk", interrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare(tree, tmp_path / "store", image_size=16, workers=0, progress=False)
    make_jpeg(tree / "train" / "ant" / "new.jpg")
    with pytest.raises(AlexNetError, match="other data or parameters"):
        prepare(tree, tmp_path / "store", image_size=16, workers=0, progress=False)


def test_destination_that_is_not_a_store_is_refused(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(AlexNetError, match="is not an alexnet store"):
        prepare(tree, tmp_path / "busy", image_size=16, workers=0, progress=False)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]


def test_source_errors(tmp_path: Path, make_jpeg) -> None:
    with pytest.raises(AlexNetError, match="does not exist"):
        prepare(tmp_path / "nothing", tmp_path / "store", workers=0, progress=False)
    make_jpeg(tmp_path / "only-train" / "train" / "a" / "0.jpg")
    with pytest.raises(AlexNetError, match="must hold train"):
        prepare(tmp_path / "only-train", tmp_path / "store", workers=0, progress=False)
    write_tree(tmp_path / "bad", train=1, val=1, classes=("a",))
    for f in (tmp_path / "bad" / "train" / "a").iterdir():
        f.write_bytes(b"broken")
    with pytest.raises(AlexNetError, match="none of the 1 training images"):
        prepare(tmp_path / "bad", tmp_path / "store2", workers=0, progress=False)


def test_image_size_beyond_the_bound_is_refused_before_anything_is_written(tree: Path, tmp_path: Path) -> None:
    from alexnet.cli import main

    dest = tmp_path / "store"
    with pytest.raises(AlexNetError, match="at most 4096"):
        prepare(tree, dest, image_size=100000, workers=0, progress=False)
    assert not dest.exists()
    assert main(["prepare", str(tree), str(dest), "--image-size", "100000", "--no-progress"]) == 2
    assert not dest.exists()


def test_a_store_of_an_older_format_version_is_named_not_called_foreign(tmp_path):
    # Version 2 (the JPEG store's `encoding`) changed every prepare's fingerprint, so a
    # version-1 store of the same folder cannot be continued: the message says why and what to do.
    root = write_tree(tmp_path / "d", train=2, val=1)
    prepare(root, tmp_path / "s", image_size=16, workers=0, progress=False)
    header_path = tmp_path / "s" / store.HEADER
    header = json.loads(header_path.read_text())
    header["version"] = header["prepare"]["params"]["version"] = 1
    header_path.write_text(json.dumps(header))
    with pytest.raises(AlexNetError, match="format version 1, written by an older alexnet.*remove it"):
        prepare(root, tmp_path / "s", image_size=16, workers=0, progress=False)
