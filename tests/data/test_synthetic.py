"""Tests for the built-in synthetic shapes dataset."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexnet.data import synthetic
from alexnet.data.synthetic import (
    CLASSES,
    MARKER_NAME,
    default_dataset_dir,
    ensure_shapes_dataset,
    image_rng,
    make_shapes_dataset,
    render_image,
)
from alexnet.errors import AlexNetError

TINY = {"image_size": 32, "train_per_class": 3, "val_per_class": 2}
COUNTS = {"train": 3, "val": 2}


def _files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes for every image under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/*/*.jpg"))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "ds"
    assert make_shapes_dataset(root, seed=0, **TINY) == root
    return root


def test_classes() -> None:
    assert len(CLASSES) >= 10
    assert len(set(CLASSES)) == len(CLASSES)
    # ImageFolder labels classes in sorted order; keeping CLASSES sorted makes
    # label i == CLASSES[i] either way.
    assert list(CLASSES) == sorted(CLASSES)


def test_layout_and_counts(tiny: Path) -> None:
    assert sorted(p.name for p in tiny.iterdir() if p.is_dir()) == ["train", "val"]
    for split, n in COUNTS.items():
        assert sorted(p.name for p in (tiny / split).iterdir()) == sorted(CLASSES)
        for name in CLASSES:
            names = sorted(p.name for p in (tiny / split / name).iterdir())
            assert names == [f"{i:05d}.jpg" for i in range(n)]
    marker = json.loads((tiny / MARKER_NAME).read_text())
    assert marker["version"] == synthetic.DATASET_VERSION
    assert marker["seed"] == 0
    assert marker["image_size"] == 32
    assert marker["train_per_class"] == 3 and marker["val_per_class"] == 2
    assert marker["classes"] == list(CLASSES)


def test_every_file_decodes_as_rgb(tiny: Path) -> None:
    files = list(tiny.glob("*/*/*.jpg"))
    assert len(files) == len(CLASSES) * sum(COUNTS.values())
    for path in files:
        with Image.open(path) as im:
            assert im.format == "JPEG"
            assert im.mode == "RGB"
            assert im.size == (32, 32)
            im.load()
            # A rendered image is never a flat colour.
            assert np.asarray(im).std() > 5.0


def test_same_seed_identical_bytes(tiny: Path, tmp_path: Path) -> None:
    again = make_shapes_dataset(tmp_path / "again", seed=0, **TINY)
    assert _files(again) == _files(tiny)


def test_different_seed_differs(tiny: Path, tmp_path: Path) -> None:
    other = _files(make_shapes_dataset(tmp_path / "other", seed=1, **TINY))
    base = _files(tiny)
    assert other.keys() == base.keys()
    assert all(other[k] != base[k] for k in base)


def test_train_and_val_differ(tiny: Path) -> None:
    for name in CLASSES:
        for i in range(COUNTS["val"]):
            a = np.asarray(Image.open(tiny / "train" / name / f"{i:05d}.jpg"), dtype=np.int16)
            b = np.asarray(Image.open(tiny / "val" / name / f"{i:05d}.jpg"), dtype=np.int16)
            assert np.abs(a - b).mean() > 5.0


def test_single_image_reproducible_out_of_order(tiny: Path) -> None:
    # Rendering one image on its own must give the same file as the full run.
    label = CLASSES.index("star")
    image = render_image(label, 32, image_rng(0, "val", label, 1))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=synthetic.JPEG_QUALITY)
    assert buf.getvalue() == (tiny / "val" / "star" / "00001.jpg").read_bytes()


def test_colour_does_not_identify_class() -> None:
    # Mean colour per class should be close to the global mean: colours come from one
    # distribution for all classes. Loose bound; only catches per-class palettes.
    means = []
    for label in range(len(CLASSES)):
        imgs = [
            np.asarray(render_image(label, 16, image_rng(7, "train", label, i)), dtype=np.float32) for i in range(40)
        ]
        means.append(np.mean([im.mean(axis=(0, 1)) for im in imgs], axis=0))
    means = np.array(means)
    assert np.abs(means - means.mean(axis=0)).max() < 30.0


def test_ensure_does_not_regenerate_when_complete(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> Path:
        raise AssertionError("regenerated a complete dataset")

    monkeypatch.setattr(synthetic, "make_shapes_dataset", fail)
    assert ensure_shapes_dataset(tiny, seed=0, **TINY) == tiny


def _spy(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    calls: list[dict] = []
    real = synthetic.make_shapes_dataset

    def spy(root: Path, **kwargs: object) -> Path:
        calls.append(dict(kwargs))
        return real(root, **kwargs)

    monkeypatch.setattr(synthetic, "make_shapes_dataset", spy)
    return calls


def test_ensure_generates_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy(monkeypatch)
    root = tmp_path / "ds"
    ensure_shapes_dataset(root, **TINY)
    assert len(calls) == 1 and (root / MARKER_NAME).is_file()
    mtimes = {p: p.stat().st_mtime_ns for p in root.glob("*/*/*.jpg")}
    ensure_shapes_dataset(root, **TINY)
    assert len(calls) == 1
    assert {p: p.stat().st_mtime_ns for p in root.glob("*/*/*.jpg")} == mtimes


def test_ensure_regenerates_without_marker(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_shapes_dataset(tmp_path / "ds", **TINY)
    # Simulate an interrupted run: marker absent, one image truncated.
    (root / MARKER_NAME).unlink()
    (root / "train" / "dots" / "00002.jpg").write_bytes(b"\xff\xd8")
    calls = _spy(monkeypatch)
    ensure_shapes_dataset(root, **TINY)
    assert len(calls) == 1
    assert (root / MARKER_NAME).is_file()
    assert _files(root) == _files(tiny)


def test_ensure_regenerates_on_corrupt_marker_or_missing_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_shapes_dataset(tmp_path / "ds", **TINY)
    calls = _spy(monkeypatch)
    (root / MARKER_NAME).write_text("{not json")
    ensure_shapes_dataset(root, **TINY)
    assert len(calls) == 1
    (root / "val" / "ring" / "00001.jpg").unlink()
    ensure_shapes_dataset(root, **TINY)
    assert len(calls) == 2
    assert (root / "val" / "ring" / "00001.jpg").is_file()


def test_ensure_regenerates_when_parameters_differ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_shapes_dataset(tmp_path / "ds", seed=0, **TINY)
    calls = _spy(monkeypatch)
    ensure_shapes_dataset(root, seed=3, **TINY)
    assert len(calls) == 1 and calls[0]["seed"] == 3
    assert json.loads((root / MARKER_NAME).read_text())["seed"] == 3

    # Fewer images per class: the stale higher-numbered files must be gone.
    ensure_shapes_dataset(root, seed=3, image_size=24, train_per_class=1, val_per_class=1)
    assert len(calls) == 2
    for split in ("train", "val"):
        for name in CLASSES:
            assert [p.name for p in (root / split / name).iterdir()] == ["00000.jpg"]
    with Image.open(root / "train" / "circle" / "00000.jpg") as im:
        assert im.size == (24, 24)

    # A marker from another dataset version is also stale.
    marker = json.loads((root / MARKER_NAME).read_text())
    marker["version"] = -1
    (root / MARKER_NAME).write_text(json.dumps(marker))
    ensure_shapes_dataset(root, seed=3, image_size=24, train_per_class=1, val_per_class=1)
    assert len(calls) == 3


def test_regeneration_keeps_foreign_files(tmp_path: Path) -> None:
    root = make_shapes_dataset(tmp_path / "ds", **TINY)
    keep = root / "train" / "circle" / "notes.txt"
    keep.write_text("mine")
    make_shapes_dataset(root, **TINY)
    assert keep.read_text() == "mine"


def test_default_dataset_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALEXNET_CACHE", str(tmp_path / "cache"))
    assert default_dataset_dir() == tmp_path / "cache" / "datasets" / "shapes-v1"
    monkeypatch.delenv("ALEXNET_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_dataset_dir() == tmp_path / "home" / ".cache" / "alexnet" / "datasets" / "shapes-v1"


def test_ensure_uses_default_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ALEXNET_CACHE", str(tmp_path))
    root = ensure_shapes_dataset(image_size=16, train_per_class=1, val_per_class=1)
    assert root == tmp_path / "datasets" / "shapes-v1"
    assert (root / MARKER_NAME).is_file()


@pytest.mark.parametrize(
    "kwargs",
    [{"image_size": 4}, {"train_per_class": 0}, {"val_per_class": -1}, {"seed": -1}, {"image_size": 32.0}],
)
def test_invalid_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(AlexNetError):
        make_shapes_dataset(tmp_path / "ds", **{**TINY, **kwargs})
    with pytest.raises(AlexNetError):
        ensure_shapes_dataset(tmp_path / "ds", **{**TINY, **kwargs})


def test_root_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(AlexNetError):
        make_shapes_dataset(path, **TINY)
    with pytest.raises(AlexNetError):
        ensure_shapes_dataset(path, **TINY)


def test_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_shapes_dataset(tmp_path / "ds", image_size=16, train_per_class=1, val_per_class=1, progress=True)
    assert "synthetic shapes" in capsys.readouterr().err
