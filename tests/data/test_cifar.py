"""cifar.py: both CIFAR-10 layouts, packed and extracted, on tiny archives written here.

The reference for the python batches is the layout the CIFAR-10 page documents: each
row holds 1024 red, then 1024 green, then 1024 blue values, each plane row-major. The
images below encode their own coordinates in the planes, so a wrong reshape shows.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.data.cifar import CIFAR10_CLASSES, BatchUnpickler, load_cifar10
from alexnet.errors import AlexNetError

PER_BATCH = 3  # images per data batch: 5 x 3 = 15 training images


def _images(n: int, seed: int) -> np.ndarray:
    """(n, 32, 32, 3) uint8: red = row, green = column, blue = 8 * image index + noise-free seed."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        out[i, :, :, 0] = rows * 8 % 256
        out[i, :, :, 1] = cols * 8 % 256
        out[i, :, :, 2] = (seed * 40 + i * 7) % 256
    return out


def _rows(images: np.ndarray) -> np.ndarray:
    """The official row layout: (n, 3072) = R plane, G plane, B plane."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def _batch_dict(images: np.ndarray, labels: list[int]) -> dict:
    return {
        b"batch_label": b"testing batch",
        b"labels": labels,
        b"data": _rows(images),
        b"filenames": [b"x.png"] * len(labels),
    }


def _python_files(protocol: int = 2) -> tuple[dict[str, bytes], np.ndarray, list[int], np.ndarray, list[int]]:
    files, train_imgs, train_labels = {}, [], []
    for b in range(5):
        imgs = _images(PER_BATCH, b)
        labels = [(b * PER_BATCH + i) % 10 for i in range(PER_BATCH)]
        files[f"data_batch_{b + 1}"] = pickle.dumps(_batch_dict(imgs, labels), protocol=protocol)
        train_imgs.append(imgs)
        train_labels += labels
    test_imgs, test_labels = _images(4, 9), [9, 0, 3, 3]
    files["test_batch"] = pickle.dumps(_batch_dict(test_imgs, test_labels), protocol=protocol)
    meta = {b"label_names": [n.encode() for n in CIFAR10_CLASSES], b"num_cases_per_batch": PER_BATCH}
    files["batches.meta"] = pickle.dumps(meta, protocol=protocol)
    return files, np.concatenate(train_imgs), train_labels, test_imgs, test_labels


def _write_tar(path: Path, files: dict[str, bytes], prefix: str = "cifar-10-batches-py/") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def _chw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


@pytest.mark.parametrize("protocol", [2, 4])
def test_python_archive_layout_labels_and_classes(tmp_path: Path, protocol: int) -> None:
    files, train_imgs, train_labels, test_imgs, test_labels = _python_files(protocol)
    train, test = load_cifar10(_write_tar(tmp_path / "cifar-10-python.tar.gz", files))
    assert train.images.dtype == torch.uint8 and train.images.shape == (15, 3, 32, 32)
    assert test.images.shape == (4, 3, 32, 32)
    assert torch.equal(train.images, _chw(train_imgs))
    assert torch.equal(test.images, _chw(test_imgs))
    # Red plane holds 8 * row, green 8 * column: the reshape kept planes and rows apart.
    assert train.images[0, 0, 5, 0] == 40 and train.images[0, 1, 0, 5] == 40
    assert train.labels.tolist() == train_labels and test.labels.tolist() == test_labels
    assert train.classes == CIFAR10_CLASSES == test.classes


def test_python_archive_extracted_folder_and_its_parent(tmp_path: Path) -> None:
    files, train_imgs, *_ = _python_files()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    (folder / "readme.html").write_text("<html></html>")
    for path in (folder, tmp_path):
        train, test = load_cifar10(path)
        assert torch.equal(train.images, _chw(train_imgs)) and len(test) == 4


def test_python_archive_without_meta_uses_cifar10_names(tmp_path: Path) -> None:
    files, *_ = _python_files()
    del files["batches.meta"]
    train, _ = load_cifar10(_write_tar(tmp_path / "a.tar.gz", files))
    assert train.classes == CIFAR10_CLASSES


class _RunsCode:
    """Pickles as a call to os.system: what a booby-trapped batch would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evaluates:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_batch_is_refused_without_running(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    files, *_ = _python_files()
    files["data_batch_3"] = pickle.dumps({b"data": _RunsCode(marker), b"labels": []}, protocol=protocol)
    with pytest.raises(AlexNetError, match=r"data_batch_3.*refusing global (posix|os|nt)\.system"):
        load_cifar10(_write_tar(tmp_path / "evil.tar.gz", files))
    assert not marker.exists()


def test_restricted_unpickler_refuses_eval_and_allows_arrays() -> None:
    with pytest.raises(pickle.UnpicklingError, match=r"refusing global (__builtin__|builtins)\.eval"):
        BatchUnpickler(io.BytesIO(pickle.dumps(_Evaluates(), protocol=2))).load()
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = BatchUnpickler(io.BytesIO(pickle.dumps({"a": a, "l": [1, 2]}, protocol=2)), encoding="bytes").load()
    np.testing.assert_array_equal(out["a"], a)


def test_restricted_unpickler_refuses_other_codecs() -> None:
    # _codecs.encode is allowed only for the latin1 bytes Python 3 writes into protocol 2.
    import codecs

    class Rot13:
        def __reduce__(self):
            return (codecs.encode, ("abc", "rot13"))

    with pytest.raises(pickle.UnpicklingError, match="rot13"):
        BatchUnpickler(io.BytesIO(pickle.dumps(Rot13(), protocol=2))).load()


def test_object_array_and_wrong_structure_are_refused(tmp_path: Path) -> None:
    files, *_ = _python_files()
    files["test_batch"] = pickle.dumps({b"data": np.array([[1, "x"]], dtype=object), b"labels": [0]}, protocol=2)
    with pytest.raises(AlexNetError, match="test_batch: 'data' should be a uint8 array"):
        load_cifar10(_write_tar(tmp_path / "a.tar.gz", files))
    files, *_ = _python_files()
    files["data_batch_1"] = pickle.dumps([1, 2, 3], protocol=2)
    with pytest.raises(AlexNetError, match="data_batch_1 should hold a dict; found list"):
        load_cifar10(_write_tar(tmp_path / "b.tar.gz", files))
    files, *_ = _python_files()
    files["data_batch_2"] = pickle.dumps(_batch_dict(_images(2, 0), [0, 12]), protocol=2)
    with pytest.raises(AlexNetError, match="labels should be 0-9; found 0-12"):
        load_cifar10(_write_tar(tmp_path / "c.tar.gz", files))


def test_cifar100_and_missing_batches_are_named(tmp_path: Path) -> None:
    files, *_ = _python_files()
    files["data_batch_1"] = pickle.dumps({b"data": _rows(_images(1, 0)), b"fine_labels": [3]}, protocol=2)
    with pytest.raises(AlexNetError, match="CIFAR-100"):
        load_cifar10(_write_tar(tmp_path / "a.tar.gz", files))
    files, *_ = _python_files()
    del files["data_batch_4"], files["test_batch"]
    with pytest.raises(AlexNetError, match="lacks CIFAR-10 batch\\(es\\) data_batch_4, test_batch"):
        load_cifar10(_write_tar(tmp_path / "b.tar.gz", files))


# --------------------------------------------------------------------------------------
# ImageFolder trees


def _write_tree(
    root: Path, classes: list[str], per_class: dict[str, int], fmt: str = "PNG"
) -> dict[str, list[np.ndarray]]:
    """root/<split>/<class>/NNNN.<ext>; returns the arrays written, in file-name order."""
    written: dict[str, list[np.ndarray]] = {}
    ext = "png" if fmt == "PNG" else "jpg"
    for split, n in per_class.items():
        written[split] = []
        for c, name in enumerate(classes):
            imgs = _images(n, c + (10 if split == "test" else 0))
            for i, img in enumerate(imgs):
                path = root / split / name / f"{i:04d}.{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(path, fmt)
                written[split].append(img)
    return written


def _tar_tree(root: Path, path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for split in ("train", "test"):
            tar.add(root / split, arcname=split)
    return path


def test_tree_labels_follow_sorted_names_and_pixels_are_exact(tmp_path: Path) -> None:
    classes = ["zebra", "ant", "moth"]
    written = _write_tree(tmp_path / "tree", classes, {"train": 3, "test": 2})
    train, test = load_cifar10(tmp_path / "tree")
    assert train.classes == ["ant", "moth", "zebra"] == test.classes
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # Written in the order zebra, ant, moth; read back in sorted-name order.
    expected = np.stack(written["train"][3:6] + written["train"][6:9] + written["train"][0:3])
    assert torch.equal(train.images, _chw(expected))
    assert test.images.shape == (6, 3, 32, 32) and test.images.dtype == torch.uint8


def test_tree_archive_equals_extracted_tree(tmp_path: Path) -> None:
    _write_tree(tmp_path / "tree", CIFAR10_CLASSES[:4], {"train": 2, "test": 1}, fmt="JPEG")
    a_train, a_test = load_cifar10(tmp_path / "tree")
    b_train, b_test = load_cifar10(_tar_tree(tmp_path / "tree", tmp_path / "cifar10-jpeg.tar.gz"))
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_test.images, b_test.images)
    assert a_train.labels.tolist() == b_train.labels.tolist() and a_train.classes == b_train.classes
    # JPEG is lossy but close: the coordinate pattern survives within a few grey levels.
    assert (a_train.images[0, 0].float() - _chw(_images(1, 0))[0, 0].float()).abs().mean() < 6


def test_tree_and_python_archive_agree_on_labels(tmp_path: Path) -> None:
    # CIFAR-10's label_names are alphabetical, so sorted folder names give the same numbers.
    _write_tree(tmp_path / "tree", CIFAR10_CLASSES, {"train": 1, "test": 1})
    tree_train, _ = load_cifar10(tmp_path / "tree")
    files, *_ = _python_files()
    py_train, _ = load_cifar10(_write_tar(tmp_path / "py.tar.gz", files))
    assert tree_train.classes == py_train.classes == sorted(CIFAR10_CLASSES)


def test_tree_skips_undecodable_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write_tree(tmp_path / "tree", ["a", "b"], {"train": 2, "test": 1})
    (tmp_path / "tree" / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    train, _ = load_cifar10(tmp_path / "tree")
    assert len(train) == 4
    assert "1 images cannot be decoded" in caplog.text and "broken.jpg" in caplog.text


def test_tree_test_class_unknown_to_training_is_an_error(tmp_path: Path) -> None:
    _write_tree(tmp_path / "tree", ["a", "b"], {"train": 1, "test": 1})
    (tmp_path / "tree" / "test" / "c").mkdir()
    Image.fromarray(_images(1, 0)[0]).save(tmp_path / "tree" / "test" / "c" / "0.png")
    with pytest.raises(AlexNetError, match="training set"):
        load_cifar10(tmp_path / "tree")
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "tree", arcname=".")
    with pytest.raises(AlexNetError, match="test classes c are not among the training classes"):
        load_cifar10(tmp_path / "t.tar.gz")


def test_bad_inputs_say_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(AlexNetError, match="does not exist"):
        load_cifar10(tmp_path / "nope.tar.gz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(AlexNetError, match="not a readable tar archive"):
        load_cifar10(tmp_path / "notes.txt")
    with pytest.raises(AlexNetError, match="neither CIFAR-10 python batches"):
        load_cifar10(_write_tar(tmp_path / "other.tar.gz", {"readme.txt": b"x"}, prefix=""))


def test_subset_is_balanced_fixed_and_in_original_order(tmp_path: Path) -> None:
    _write_tree(tmp_path / "tree", ["a", "b", "c"], {"train": 6, "test": 1})
    train, _ = load_cifar10(tmp_path / "tree")
    sub = train.subset(9, seed=0)
    assert torch.bincount(sub.labels, minlength=3).tolist() == [3, 3, 3]
    again = train.subset(9, seed=0)
    assert torch.equal(sub.images, again.images) and torch.equal(sub.labels, again.labels)
    assert sub.labels.tolist() == sorted(sub.labels.tolist())  # the tree's class-major order is kept
    assert train.subset(0) is train and train.subset(100) is train
    assert torch.bincount(train.subset(4).labels, minlength=3).max() == 2  # 4 = 2 + 1 + 1


def test_shared_array_unpickler_refuses_code_and_cifar_extras(tmp_path: Path) -> None:
    # files.py's ArrayUnpickler, which BatchUnpickler and the Caffe .npy reader build on,
    # refuses code itself, and _codecs.encode is CIFAR's allowance only.
    from alexnet.files import ArrayUnpickler, load_array_pickle

    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError, match=r"refusing global (posix|os|nt)\.system"):
        load_array_pickle(pickle.dumps([_RunsCode(marker)], protocol=4))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match=r"refusing global _codecs\.encode"):
        ArrayUnpickler(io.BytesIO(pickle.dumps({"b": b"\x00\xff"}, protocol=2))).load()
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(load_array_pickle(pickle.dumps({"a": [a]}, protocol=4))["a"][0], a)


def test_default_data_path_is_the_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from alexnet.data.cifar import default_data_path

    monkeypatch.delenv("ALEXNET_CIFAR10", raising=False)
    assert default_data_path() is None
    monkeypatch.setenv("ALEXNET_CIFAR10", "")
    assert default_data_path() is None
    monkeypatch.setenv("ALEXNET_CIFAR10", str(tmp_path / "cifar10.tar.gz"))
    assert default_data_path() == tmp_path / "cifar10.tar.gz"
