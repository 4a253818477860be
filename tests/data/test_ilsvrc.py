"""ilsvrc.py and prepare from the official ILSVRC-2012 and -2010 archives, on miniature archives of the same structure.

The miniature: a train tar of per-class tars of JPEGs, a flat val tar, and a devkit
.tar.gz whose meta.mat (written with scipy.io.savemat, the devkit's field names) has a
non-leaf synset and IDs that are not in WNID order, so labels must go through the
ID -> WNID table. The reference is an ImageFolder tree of the same JPEGs.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexnet.data import ilsvrc, store
from alexnet.data.images import load_image
from alexnet.data.prepare import prepare
from alexnet.errors import AlexNetError

scipy_io = pytest.importorskip("scipy.io")

# ILSVRC2012_ID -> WNID, deliberately not in sorted order; 4 is a non-leaf synset (not a class).
SYNSETS = [
    (1, "n0300", "trombone", 0),
    (2, "n0100", "tench, Tinca tinca", 0),
    (3, "n0200", "goldfish", 0),
    (4, "n0000", "animal", 3),
]
VAL_IDS = [3, 1, 2, 2, 1]  # ground truth of val images 1..5


def _jpeg_bytes(seed: int, size: tuple[int, int] = (30, 20)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tar_bytes(members: dict[str, bytes], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            _add(tar, name, data)
    return buf.getvalue()


def _meta_mat(synsets: list[tuple[int, str, str, int]], id_field: str = "ILSVRC2012_ID") -> bytes:
    fields = [
        id_field,
        "WNID",
        "words",
        "gloss",
        "num_children",
        "children",
        "wordnet_height",
        "num_train_images",
    ]
    table = np.zeros((len(synsets), 1), dtype=[(f, "O") for f in fields])
    for i, (sid, wnid, words, children) in enumerate(synsets):
        table[i, 0] = (
            np.array([[sid]]),
            wnid,
            words,
            "a gloss",
            np.array([[children]]),
            np.zeros((1, children)),
            np.array([[0]]),
            np.array([[3]]),
        )
    buf = io.BytesIO()
    scipy_io.savemat(buf, {"synsets": table})
    return buf.getvalue()


def make_ilsvrc(root: Path, per_class: int = 3, synsets=SYNSETS, val_ids=VAL_IDS) -> dict[str, dict[str, bytes]]:
    """The three archives under root; returns the JPEG bytes per class folder (train) and per val name."""
    root.mkdir(parents=True, exist_ok=True)
    leaves = sorted(w for _, w, _, c in synsets if c == 0)
    train: dict[str, dict[str, bytes]] = {}
    with tarfile.open(root / ilsvrc.TRAIN_TAR, "w") as outer:
        for k, wnid in enumerate(leaves):
            images = {f"{wnid}_{i}.JPEG": _jpeg_bytes(100 * k + i, (30 + 4 * i, 20)) for i in range(per_class)}
            train[wnid] = images
            _add(outer, f"{wnid}.tar", _tar_bytes(images))
    val = {f"ILSVRC2012_val_{n:08d}.JPEG": _jpeg_bytes(10_000 + n) for n in range(1, len(val_ids) + 1)}
    (root / ilsvrc.VAL_TAR).write_bytes(_tar_bytes(val))
    truth = "".join(f"{i}\n" for i in val_ids).encode()
    devkit = {
        "ILSVRC2012_devkit_t12/data/meta.mat": _meta_mat(synsets),
        "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt": truth,
        "ILSVRC2012_devkit_t12/readme.txt": b"devkit",
    }
    (root / ilsvrc.DEVKIT).write_bytes(_tar_bytes(devkit, "w:gz"))
    return {"train": {f"{w}/{n}": b for w, images in train.items() for n, b in images.items()}, "val": val}


@pytest.fixture
def archives(tmp_path: Path) -> tuple[Path, dict]:
    return tmp_path / "ilsvrc", make_ilsvrc(tmp_path / "ilsvrc")


def _decode(data: bytes, size: int) -> np.ndarray:
    return load_image(io.BytesIO(data), size)


def test_scan_reads_offsets_that_point_at_each_jpeg(archives) -> None:
    root, files = archives
    classes, words, splits = ilsvrc.scan_ilsvrc(root)
    assert classes == ["n0100", "n0200", "n0300"]  # leaves only, sorted WNIDs
    assert words["n0100"] == "tench, Tinca tinca"
    archive, members, labels = splits["train"]
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    raw = archive.read_bytes()
    for name, offset, size in members:
        wnid, image = name.split("/")
        assert raw[offset : offset + size] == files["train"][f"{wnid.removesuffix('.tar')}/{image}"]
    archive, members, labels = splits["val"]
    wnid_of_id = {i: w for i, w, _, _ in SYNSETS}
    assert labels == [classes.index(wnid_of_id[i]) for i in VAL_IDS] == [1, 2, 0, 0, 2]
    raw = archive.read_bytes()
    assert [raw[o : o + s] for _, o, s in members] == list(files["val"].values())


def test_store_from_archives_equals_store_from_the_same_images_as_a_folder(archives, tmp_path: Path) -> None:
    root, files = archives
    folder = tmp_path / "folder"
    for name, data in files["train"].items():
        (folder / "train" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "train" / name).write_bytes(data)
    classes = ["n0100", "n0200", "n0300"]
    wnid_of_id = {i: w for i, w, _, _ in SYNSETS}
    for (name, data), sid in zip(files["val"].items(), VAL_IDS):
        (folder / "val" / wnid_of_id[sid]).mkdir(parents=True, exist_ok=True)
        (folder / "val" / wnid_of_id[sid] / name).write_bytes(data)

    prepare(root, tmp_path / "a", image_size=16, workers=0, chunk_size=4, progress=False)
    prepare(folder, tmp_path / "b", image_size=16, workers=0, chunk_size=4, progress=False)
    a, b = store.open_store(tmp_path / "a"), store.open_store(tmp_path / "b")
    assert a.classes == b.classes == classes
    assert a.header["class_words"] == ["tench, Tinca tinca", "goldfish", "trombone"]
    assert a.header["splits"]["train"]["chunk_crc32"] == b.header["splits"]["train"]["chunk_crc32"]
    assert a.header["stats"] == b.header["stats"]
    # val: the archive keeps ILSVRC order, the folder groups by class; compare image by image.
    val = a.split("val")
    out = np.empty((len(val), 16, 16, 3), np.uint8)
    labels = val.gather(list(range(len(val))), out)
    assert labels.tolist() == [classes.index(wnid_of_id[i]) for i in VAL_IDS]
    for i, data in enumerate(files["val"].values()):
        np.testing.assert_array_equal(out[i], _decode(data, 16))


def test_workers_read_archives_in_parallel(archives, tmp_path: Path) -> None:
    root, _ = archives
    prepare(root, tmp_path / "a", image_size=16, workers=0, chunk_size=2, progress=False)
    prepare(root, tmp_path / "b", image_size=16, workers=2, chunk_size=2, progress=False)
    ha, hb = (json.loads((tmp_path / d / store.HEADER).read_text()) for d in "ab")
    assert ha["splits"] == hb["splits"]


def test_undecodable_member_is_skipped_and_named(tmp_path: Path) -> None:
    root = tmp_path / "ilsvrc"
    make_ilsvrc(root)
    # Rebuild the train tar with one class holding a broken JPEG.
    with tarfile.open(root / ilsvrc.TRAIN_TAR, "w") as outer:
        for k, wnid in enumerate(["n0100", "n0200", "n0300"]):
            images = {f"{wnid}_0.JPEG": _jpeg_bytes(k)}
            if wnid == "n0200":
                images[f"{wnid}_bad.JPEG"] = b"\xff\xd8 not really a jpeg"
            _add(outer, f"{wnid}.tar", _tar_bytes(images))
    report = prepare(root, tmp_path / "s", image_size=16, workers=0, progress=False)
    assert len(report.skipped) == 1 and report.skipped[0].startswith("n0200.tar/n0200_bad.JPEG: ")
    assert len(store.open_store(tmp_path / "s").split("train")) == 3


def test_missing_archives_are_named(tmp_path: Path) -> None:
    root = tmp_path / "ilsvrc"
    make_ilsvrc(root)
    (root / ilsvrc.DEVKIT).unlink()
    with pytest.raises(AlexNetError, match=f"lacks {ilsvrc.DEVKIT}"):
        prepare(root, tmp_path / "s", workers=0, progress=False)


def test_truncated_train_archive_is_caught(tmp_path: Path) -> None:
    root = tmp_path / "ilsvrc"
    make_ilsvrc(root)
    path = root / ilsvrc.TRAIN_TAR
    raw = path.read_bytes()
    second = raw.index(b"n0200.tar")  # the header of the second class tar
    path.write_bytes(raw[: second + 512 + 3000])  # ends inside that class's data
    with pytest.raises(AlexNetError, match="truncated|not a readable"):
        ilsvrc.scan_ilsvrc(root)


def test_class_member_that_is_not_a_tar(tmp_path: Path) -> None:
    root = tmp_path / "ilsvrc"
    make_ilsvrc(root)
    with tarfile.open(root / ilsvrc.TRAIN_TAR, "w") as outer:
        _add(outer, "n0100.tar", _tar_bytes({"a.JPEG": _jpeg_bytes(0)}))
        _add(outer, "n0200.tar", b"garbage" * 200)
        _add(outer, "n0300.tar", _tar_bytes({"c.JPEG": _jpeg_bytes(1)}))
    with pytest.raises(AlexNetError, match="class archive n0200.tar"):
        ilsvrc.scan_ilsvrc(root)


def _devkit(synsets, val_ids) -> bytes:
    truth = "".join(f"{i}\n" for i in val_ids).encode()
    return _tar_bytes(
        {"d/data/meta.mat": _meta_mat(synsets), "d/data/ILSVRC2012_validation_ground_truth.txt": truth}, "w:gz"
    )


def test_val_images_and_ground_truth_must_agree(archives) -> None:
    root, files = archives
    four = dict(list(files["val"].items())[:4])  # the archive lost its last image
    (root / ilsvrc.VAL_TAR).write_bytes(_tar_bytes(four))
    with pytest.raises(
        AlexNetError, match="has 4 images, the devkit's ground truth 5; missing e.g. ILSVRC2012_val_00000005.JPEG"
    ):
        ilsvrc.scan_ilsvrc(root)
    (root / ilsvrc.DEVKIT).write_bytes(_devkit(SYNSETS, VAL_IDS[:3]))
    with pytest.raises(AlexNetError, match="image 4 has no ground truth"):
        ilsvrc.scan_ilsvrc(root)
    (root / ilsvrc.DEVKIT).write_bytes(_devkit(SYNSETS, [1, 2, 3, 9]))
    with pytest.raises(AlexNetError, match=r"names ILSVRC2012_IDs \[9\] that meta.mat does not define"):
        ilsvrc.scan_ilsvrc(root)


def test_classes_must_match_the_devkit(archives) -> None:
    root, _ = archives
    (root / ilsvrc.DEVKIT).write_bytes(_devkit(SYNSETS + [(5, "n0400", "missing class", 0)], VAL_IDS))
    with pytest.raises(AlexNetError, match="missing from the archive: n0400"):
        ilsvrc.scan_ilsvrc(root)
    (root / ilsvrc.DEVKIT).write_bytes(_tar_bytes({"x/data/meta.mat": b"not a mat file"}, "w:gz"))
    with pytest.raises(AlexNetError, match="lacks data/ILSVRC2012_validation_ground_truth.txt"):
        ilsvrc.read_devkit(root / ilsvrc.DEVKIT)
    (root / ilsvrc.DEVKIT).write_bytes(
        _tar_bytes(
            {"x/data/meta.mat": b"not a mat file", "x/data/ILSVRC2012_validation_ground_truth.txt": b"1\n"}, "w:gz"
        )
    )
    with pytest.raises(AlexNetError, match="is not the devkit's synset table"):
        ilsvrc.read_devkit(root / ilsvrc.DEVKIT)


def test_missing_scipy_is_a_clear_error(archives, monkeypatch) -> None:
    root, _ = archives
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # import scipy.io now raises ImportError
    with pytest.raises(AlexNetError, match=r"needs scipy: pip install 'alexnet\[imagenet\]'"):
        ilsvrc.read_devkit(root / ilsvrc.DEVKIT)


# --------------------------------------------------------------------------------------
# ILSVRC-2010: the layout of its devkit readme and of fuel's converter (ilsvrc.py cites
# both): devkit-1.0/data/..., val and test tars of numbered JPEGs, and the public test
# ground truth beside the archives.

TEST_IDS = [2, 3, 1, 1, 3, 2]  # ground truth of test images 1..6 (ILSVRC2010_IDs)


def make_ilsvrc2010(root: Path, test: bool = True, test_truth: bool = True) -> dict[str, dict[str, bytes]]:
    """The 2010 archives under root; the second training image of n0200 is stored gzipped."""
    import gzip

    r = ilsvrc.ILSVRC2010
    root.mkdir(parents=True, exist_ok=True)
    train = {}
    with tarfile.open(root / r.train_tar, "w") as outer:
        for k, wnid in enumerate(["n0100", "n0200", "n0300"]):
            images = {f"{wnid}_{i}.JPEG": _jpeg_bytes(100 * k + i) for i in range(2)}
            train.update({f"{wnid}/{n}": b for n, b in images.items()})
            stored = {n: gzip.compress(b, mtime=0) if n == "n0200_1.JPEG" else b for n, b in images.items()}
            _add(outer, f"{wnid}.tar", _tar_bytes(stored))
    val = {f"val/ILSVRC2010_val_{n:08d}.JPEG": _jpeg_bytes(10_000 + n) for n in range(1, len(VAL_IDS) + 1)}
    (root / r.val_tar).write_bytes(_tar_bytes(val))
    tests = {f"test/ILSVRC2010_test_{n:08d}.JPEG": _jpeg_bytes(20_000 + n) for n in range(1, len(TEST_IDS) + 1)}
    if test:
        (root / r.test_tar).write_bytes(_tar_bytes(tests))
    if test_truth:
        (root / r.test_truth).write_text("".join(f"{i}\n" for i in TEST_IDS))
    devkit = {
        "devkit-1.0/data/meta.mat": _meta_mat(SYNSETS, "ILSVRC2010_ID"),
        "devkit-1.0/data/ILSVRC2010_validation_ground_truth.txt": "".join(f"{i}\n" for i in VAL_IDS).encode(),
        "devkit-1.0/readme.txt": b"ILSVRC2010 Development Kit",
    }
    (root / r.devkit).write_bytes(_tar_bytes(devkit, "w:gz"))
    return {"train": train, "val": val, "test": tests}


def test_2010_scan_reads_train_val_and_the_public_test_labels(tmp_path: Path) -> None:
    root = tmp_path / "ilsvrc2010"
    files = make_ilsvrc2010(root)
    classes, words, splits = ilsvrc.scan_ilsvrc(root)
    assert classes == ["n0100", "n0200", "n0300"] and words["n0300"] == "trombone"
    assert set(splits) == {"train", "val", "test"}
    assert splits["train"][2] == [0, 0, 1, 1, 2, 2]
    wnid_of_id = {i: w for i, w, _, _ in SYNSETS}
    assert splits["val"][2] == [classes.index(wnid_of_id[i]) for i in VAL_IDS]
    archive, members, labels = splits["test"]
    assert labels == [classes.index(wnid_of_id[i]) for i in TEST_IDS] == [0, 1, 2, 2, 1, 0]
    raw = archive.read_bytes()
    assert [raw[o : o + s] for _, o, s in members] == list(files["test"].values())
    # Without the test archive there is no test split; a test archive needs its labels.
    (root / ilsvrc.ILSVRC2010.test_tar).unlink()
    assert set(ilsvrc.scan_ilsvrc(root)[2]) == {"train", "val"}
    make_ilsvrc2010(root, test_truth=False)
    (root / ilsvrc.ILSVRC2010.test_truth).unlink()
    with pytest.raises(AlexNetError, match="lacks ILSVRC2010_test_ground_truth.txt"):
        ilsvrc.scan_ilsvrc(root)
    (root / ilsvrc.ILSVRC2010.test_truth).write_text("1\n2\n")
    with pytest.raises(
        AlexNetError, match="ILSVRC2010_images_test.tar has 6 images, ILSVRC2010_test_ground_truth.txt 2"
    ):
        ilsvrc.scan_ilsvrc(root)
    (root / ilsvrc.ILSVRC2010.test_truth).write_text("1\n2\n3\n4\n1\n1\n")  # 4 is not a leaf synset
    with pytest.raises(AlexNetError, match="names synsets that are not classes: n0000"):
        ilsvrc.scan_ilsvrc(root)


def test_2010_store_test_split_evaluates_as_the_same_images_in_a_folder(tmp_path: Path, capsys) -> None:
    # The reference: the same JPEGs as an ImageFolder tree, evaluated by the folder path.
    from alexnet.cli import main
    from conftest import write_tiny_checkpoint

    root = tmp_path / "ilsvrc2010"
    files = make_ilsvrc2010(root)
    report = prepare(root, tmp_path / "store", image_size=32, workers=0, chunk_size=4, progress=False)
    assert report.skipped == []  # the gzipped JPEG decoded
    s = store.open_store(tmp_path / "store")
    assert s.header["prepare"]["params"]["source"] == "ilsvrc2010" and {n: len(p) for n, p in s.splits.items()} == {
        "train": 6,
        "val": 5,
        "test": 6,
    }
    out = np.empty((6, 32, 32, 3), np.uint8)
    s.split("train").gather(list(range(6)), out)
    np.testing.assert_array_equal(out[3], _decode(files["train"]["n0200/n0200_1.JPEG"], 32))

    classes = ["n0100", "n0200", "n0300"]
    wnid_of_id = {i: w for i, w, _, _ in SYNSETS}
    for (name, data), sid in zip(files["test"].items(), TEST_IDS):
        path = tmp_path / "folder" / "test" / wnid_of_id[sid] / Path(name).name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    ckpt = write_tiny_checkpoint(tmp_path / "m.pt", classes)
    results = {}
    for name, data in (("store", tmp_path / "store"), ("folder", tmp_path / "folder")):
        argv = ["evaluate", str(ckpt), "--data", str(data), "--split", "test", "--device", "cpu", "--workers", "0"]
        assert main([*argv, "--json", str(tmp_path / f"{name}.json")]) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert "(test split): 6 images, 3 classes" in capsys.readouterr().out
    for patches in ("centre", "ten_patches"):
        a, b = results["store"][patches], results["folder"][patches]
        assert a["images"] == b["images"] == 6 and results["store"]["split"] == "test"
        assert (a["top1_error"], a["top5_error"]) == (b["top1_error"], b["top5_error"])
    assert main(["evaluate", str(ckpt), "--data", str(tmp_path / "ilsvrc2010"), "--split", "test"]) == 2
    assert "has no test/ folder" in capsys.readouterr().err


def test_gzipped_members_are_bounded_and_damage_is_a_bad_image(monkeypatch) -> None:
    import gzip

    from alexnet.data import chunks
    from alexnet.data.images import BadImage

    assert chunks._gunzip(gzip.compress(b"\xff\xd8 jpeg bytes")) == b"\xff\xd8 jpeg bytes"
    with pytest.raises(BadImage, match="does not decompress"):
        chunks._gunzip(gzip.compress(b"x" * 1000)[:12] + b"\0" * 20)
    monkeypatch.setattr(chunks, "_MAX_GUNZIPPED", 1 << 20)
    with pytest.raises(BadImage, match="of over 1 MiB"):
        chunks._gunzip(gzip.compress(b"\0" * (2 << 20)))  # a tiny member that inflates hugely
