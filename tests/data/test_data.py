"""data.py: folder scanning, robust decoding, the paper's fixed-size images, batching and statistics.

References are numpy formulas and hand-made images whose surviving region is known.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from alexnet.data import images as images_mod
from alexnet.data.chunks import sum_images
from alexnet.data.images import (
    BadImage,
    ImageFolderDataset,
    ImageList,
    find_splits,
    load_image,
    scan_image_folder,
    square_image,
)
from alexnet.data.loader import Batch, EpochBatchSampler, collate, make_loader
from alexnet.data.stats import DataStats, StatsAccumulator, compute_stats
from alexnet.errors import AlexNetError

COLOURS = {"ant": (220, 30, 30), "bee": (30, 220, 30), "cat": (30, 30, 220)}


def _tree(root: Path, counts: dict[str, int], make_jpeg) -> Path:
    """root/<class>/<i>.jpg, each class a flat colour."""
    for name, n in counts.items():
        for i in range(n):
            make_jpeg(root / name / f"{i}.jpg", COLOURS.get(name, (128, 128, 128)))
    return root


def _png(path: Path, img: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "PNG")
    return path


def _noise(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------
# scan_image_folder / find_splits


def test_scan_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(AlexNetError, match="does not exist"):
        scan_image_folder(tmp_path / "nope")


def test_scan_file_instead_of_folder(tmp_path: Path) -> None:
    f = tmp_path / "train.txt"
    f.write_text("not a folder")
    with pytest.raises(AlexNetError, match="is not a folder"):
        scan_image_folder(f)


def test_scan_no_class_folders(tmp_path: Path, make_jpeg) -> None:
    make_jpeg(tmp_path / "loose.jpg")  # an image directly under root is not a class
    (tmp_path / ".hidden").mkdir()  # hidden folders are not classes either
    with pytest.raises(AlexNetError, match="no class folders"):
        scan_image_folder(tmp_path)


def test_scan_class_folder_without_images(tmp_path: Path, make_jpeg) -> None:
    _tree(tmp_path, {"ant": 2}, make_jpeg)
    (tmp_path / "bee").mkdir()
    (tmp_path / "bee" / "notes.txt").write_text("no images here")
    with pytest.raises(AlexNetError, match=r"bee holds no images"):
        scan_image_folder(tmp_path)


def test_scan_ignores_hidden_and_non_image_files(tmp_path: Path, make_jpeg) -> None:
    _tree(tmp_path, {"ant": 2, "bee": 1}, make_jpeg)
    make_jpeg(tmp_path / "bee" / "UPPER.JPEG")  # extension match is case-insensitive
    for junk in ("Thumbs.db", ".DS_Store", "notes.txt", "._0.jpg"):
        (tmp_path / "ant" / junk).write_bytes(b"junk")
    (tmp_path / ".ipynb_checkpoints").mkdir()  # hidden folder: not a class
    (tmp_path / "ant" / "sub").mkdir()  # nested folders are not images
    images = scan_image_folder(tmp_path)
    assert images.classes == ["ant", "bee"]
    assert images.paths == [
        str(tmp_path / "ant" / "0.jpg"),
        str(tmp_path / "ant" / "1.jpg"),
        str(tmp_path / "bee" / "0.jpg"),
        str(tmp_path / "bee" / "UPPER.JPEG"),
    ]
    assert images.labels == [0, 0, 1, 1]
    assert len(images) == 4


def test_scan_labels_follow_sorted_class_names(tmp_path: Path, make_jpeg) -> None:
    # Created out of order; sorted() puts upper case first, as torchvision's ImageFolder does.
    _tree(tmp_path, {"zebra": 1, "apple": 2, "Mango": 1}, make_jpeg)
    images = scan_image_folder(tmp_path)
    assert images.classes == ["Mango", "apple", "zebra"]
    by_class = {Path(p).parent.name: y for p, y in zip(images.paths, images.labels)}
    assert by_class == {"Mango": 0, "apple": 1, "zebra": 2}
    assert images.labels == [0, 1, 1, 2]


def test_scan_val_split_with_subset_of_classes(tmp_path: Path, make_jpeg) -> None:
    train = scan_image_folder(_tree(tmp_path / "train", {"ant": 1, "bee": 1, "cat": 1}, make_jpeg))
    val = scan_image_folder(_tree(tmp_path / "val", {"cat": 2}, make_jpeg), classes=train.classes)
    assert val.classes == ["ant", "bee", "cat"]  # the training split's label order is kept
    assert val.labels == [2, 2]


def test_scan_unknown_class_in_val_is_an_error(tmp_path: Path, make_jpeg) -> None:
    _tree(tmp_path, {"ant": 1, "dog": 1}, make_jpeg)
    with pytest.raises(AlexNetError, match="dog"):
        scan_image_folder(tmp_path, classes=["ant", "bee"])


@pytest.mark.parametrize("val_name", ["val", "validation", "test"])
def test_find_splits_accepts_val_names(tmp_path: Path, val_name: str) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / val_name).mkdir()
    assert find_splits(tmp_path) == (tmp_path / "train", tmp_path / val_name)


def test_find_splits_prefers_val_over_test(tmp_path: Path) -> None:
    for name in ("train", "val", "test"):
        (tmp_path / name).mkdir()
    assert find_splits(tmp_path)[1] == tmp_path / "val"


@pytest.mark.parametrize("present", [["train"], ["val"], ["training", "valid"], []])
def test_find_splits_errors_name_what_was_found(tmp_path: Path, present: list[str]) -> None:
    for name in present:
        (tmp_path / name).mkdir()
    with pytest.raises(AlexNetError, match="must hold train/<class>/<image> and val") as e:
        find_splits(tmp_path)
    assert ("nothing" if not present else ", ".join(sorted(present))) in str(e.value)


def test_find_splits_missing_root(tmp_path: Path) -> None:
    with pytest.raises(AlexNetError, match="does not exist"):
        find_splits(tmp_path / "nope")


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "alexnet" and r.levelname == "WARNING"]


def test_scan_reports_ignored_files_once_with_reasons_and_names(tmp_path: Path, make_jpeg, caplog) -> None:
    _tree(tmp_path, {"ant": 2, "bee": 1}, make_jpeg)
    (tmp_path / "ant" / "Thumbs.db").write_bytes(b"junk")
    (tmp_path / "ant" / "notes.txt").write_text("x")
    make_jpeg(tmp_path / "bee" / "sub" / "nested.jpg")  # images in sub-folders are not searched
    (tmp_path / "README.txt").write_text("beside the class folders")
    (tmp_path / "ant" / ".DS_Store").write_bytes(b"junk")  # hidden: silent
    with caplog.at_level("WARNING", logger="alexnet"):
        images = scan_image_folder(tmp_path)
    assert len(images) == 3
    [message] = _warnings(caplog)
    assert message.startswith(f"{tmp_path}: 4 files ignored (")
    for part in (
        "1 not in a class folder",
        "2 not image files",
        "1 sub-folders (not searched)",
        "README.txt",
        "ant/Thumbs.db",
    ):
        assert part in message, part
    assert ".DS_Store" not in message


def test_scan_of_a_clean_tree_warns_nothing(tmp_path: Path, make_jpeg, caplog) -> None:
    _tree(tmp_path, {"ant": 2}, make_jpeg)
    (tmp_path / "ant" / ".DS_Store").write_bytes(b"junk")
    with caplog.at_level("WARNING", logger="alexnet"):
        scan_image_folder(tmp_path)
    assert _warnings(caplog) == []


def test_scan_skips_symlink_loops_and_broken_links_with_a_report(tmp_path: Path, make_jpeg, caplog) -> None:
    _tree(tmp_path, {"ant": 2}, make_jpeg)
    (tmp_path / "ant" / "loop.jpg").symlink_to("loop.jpg")  # points at itself: ELOOP
    (tmp_path / "ant" / "gone.jpg").symlink_to("nowhere.jpg")
    (tmp_path / "ant" / "up").symlink_to("..")  # a directory cycle is a sub-folder, not followed
    (tmp_path / "cycle").symlink_to("cycle")  # a looping class-folder candidate
    with caplog.at_level("WARNING", logger="alexnet"):
        images = scan_image_folder(tmp_path)
    assert images.classes == ["ant"] and len(images) == 2
    [message] = _warnings(caplog)
    assert "4 files ignored" in message
    assert "2 a symlink loop" in message and "1 a broken link" in message and "1 sub-folders" in message


def test_scan_unreadable_class_folder_is_an_error_naming_it(tmp_path: Path, make_jpeg, monkeypatch) -> None:
    _tree(tmp_path, {"ant": 1, "bee": 1}, make_jpeg)
    real = os.scandir

    def scandir(path):
        if Path(path) == tmp_path / "bee":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(images_mod.os, "scandir", scandir)
    with pytest.raises(AlexNetError, match=f"cannot read class folder {tmp_path / 'bee'}: Permission denied"):
        scan_image_folder(tmp_path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any folder")
def test_scan_and_find_splits_unreadable_folders_for_real(tmp_path: Path, make_jpeg) -> None:
    _tree(tmp_path / "d" / "train", {"ant": 1}, make_jpeg)
    (tmp_path / "d" / "val").mkdir()
    (tmp_path / "d" / "train" / "ant").chmod(0)
    try:
        with pytest.raises(AlexNetError, match="cannot read class folder .*ant"):
            scan_image_folder(tmp_path / "d" / "train")
    finally:
        (tmp_path / "d" / "train" / "ant").chmod(0o755)
    (tmp_path / "d").chmod(0)
    try:
        with pytest.raises(AlexNetError, match="cannot read data folder"):
            find_splits(tmp_path / "d")
    finally:
        (tmp_path / "d").chmod(0o755)


def test_find_splits_unreadable_root_is_an_error(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "train").mkdir()

    def is_dir(self):
        if self.parent == tmp_path:
            raise PermissionError(13, "Permission denied", str(self))
        return True

    monkeypatch.setattr(Path, "is_dir", is_dir)
    with pytest.raises(AlexNetError, match=f"cannot read data folder {tmp_path}: Permission denied"):
        find_splits(tmp_path)


def test_scan_names_that_are_not_utf8_are_skipped_and_reported(tmp_path: Path, make_jpeg, caplog) -> None:
    _tree(tmp_path, {"ant": 1}, make_jpeg)
    make_jpeg(tmp_path / "ant" / "café.jpg")  # UTF-8, not ASCII: an ordinary name
    latin1 = os.fsencode(tmp_path / "ant") + b"/caf\xe9.jpg"  # Latin-1 bytes: not UTF-8
    try:
        with open(latin1, "wb") as f:
            f.write((tmp_path / "ant" / "0.jpg").read_bytes())
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    with caplog.at_level("WARNING", logger="alexnet"):
        images = scan_image_folder(tmp_path)
    assert images.paths == [str(tmp_path / "ant" / "0.jpg"), str(tmp_path / "ant" / "café.jpg")]
    [message] = _warnings(caplog)
    assert "1 names not UTF-8" in message and "ant/caf\\xe9.jpg" in message
    message.encode("utf-8")  # fit for a UTF-8 log file


# --------------------------------------------------------------------------------------
# load_image: geometry


def _gradient(h: int, w: int) -> np.ndarray:
    """R = 6 * (col + 0.5), G = 10 * (row + 0.5), B = 77: linear, so bilinear resampling is exact inside."""
    a = np.empty((h, w, 3), np.uint8)
    a[..., 0] = (6 * np.arange(w) + 3)[None, :]
    a[..., 1] = (10 * np.arange(h) + 5)[:, None]
    a[..., 2] = 77
    return a


def test_load_image_rescales_shorter_side_and_keeps_horizontal_centre(tmp_path: Path) -> None:
    # 40x20 -> shorter side 16 (scale 0.8) gives 32x16, of which columns 8..24 survive:
    # original columns 10..30, the horizontal centre. Output column i samples original x = 1.25 (i + 8.5).
    out = load_image(_png(tmp_path / "wide.png", Image.fromarray(_gradient(20, 40))), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    i = np.arange(16)
    expected_r = 6 * 1.25 * (i + 8.5)  # 63.75 ... 176.25
    np.testing.assert_allclose(out[..., 0], np.broadcast_to(expected_r, (16, 16)), atol=1.0)
    # Vertically nothing is cut: row i samples original y = 1.25 (i + 0.5) (edges rows excluded).
    expected_g = 10 * 1.25 * (i[1:-1] + 0.5)
    np.testing.assert_allclose(out[1:-1, :, 1], np.broadcast_to(expected_g[:, None], (14, 16)), atol=1.0)
    assert np.all(out[..., 2] == 77)
    # The cut-away left and right quarters (R < 60 and R > 180) are gone.
    assert out[..., 0].min() >= 62 and out[..., 0].max() <= 178


def test_load_image_keeps_vertical_centre_of_portrait(tmp_path: Path) -> None:
    wide = _gradient(20, 40)
    tall = wide.transpose(1, 0, 2).copy()  # 20 wide, 40 tall: the same picture transposed
    out_wide = load_image(_png(tmp_path / "wide.png", Image.fromarray(wide)), 16)
    out_tall = load_image(_png(tmp_path / "tall.png", Image.fromarray(tall)), 16)
    np.testing.assert_allclose(out_tall.astype(int), out_wide.transpose(1, 0, 2).astype(int), atol=1)


def test_load_image_upscales_small_images(tmp_path: Path) -> None:
    a = np.zeros((8, 12, 3), np.uint8)
    a[:, :6] = 200  # left half bright
    out = load_image(_png(tmp_path / "small.png", Image.fromarray(a)), 16)
    # 12x8 -> 24x16, columns 4..20 kept: original columns 2..10, split at original column 6.
    assert out.shape == (16, 16, 3)
    assert np.all(out[:, :6] == 200) and np.all(out[:, 10:] == 0)


def test_load_image_same_size_png_is_exact(tmp_path: Path) -> None:
    a = _noise(1, 16, 16)
    assert np.array_equal(load_image(_png(tmp_path / "x.png", Image.fromarray(a)), 16), a)


@pytest.mark.parametrize(
    "mode, options",
    [("RGB", {"subsampling": 2}), ("RGB", {"subsampling": 0}), ("RGB", {"progressive": True}), ("L", {})],
    ids=["ycbcr-420", "ycbcr-444", "progressive", "grey"],
)
def test_load_image_libjpeg_turbo_path_equals_pil_decoding(tmp_path: Path, mode: str, options: dict) -> None:
    # JPEGs libjpeg-turbo decodes through torchvision must give the pixels of PIL's decoder
    # (square_image on the PIL image), and stay within 1 of PIL's own antialiased resize.
    p = tmp_path / "x.jpg"
    a = _noise(4, 45, 60) if mode == "RGB" else _noise(4, 45, 60)[..., 0]
    Image.fromarray(a).convert(mode).save(p, "JPEG", quality=90, **options)
    out = load_image(p, 32)
    with Image.open(p) as img:
        assert np.array_equal(out, square_image(img, 32))
        pil = np.asarray(img.convert("RGB").resize((43, 32), Image.BILINEAR, reducing_gap=None))[:, 5:37]
    assert np.abs(out.astype(int) - pil.astype(int)).max() <= 1


def test_load_image_drafted_jpeg_is_decoded_by_pil_at_reduced_scale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 130x66 for size 32: draft decodes at 1/2 (65x33), which torchvision cannot, so
    # torchvision is not asked; the result stays close to a full decode of the smooth image.
    a = np.zeros((66, 130, 3), np.uint8)
    a[..., 0] = (np.arange(130) * 1.9).astype(np.uint8)[None, :]
    a[..., 1] = (np.arange(66) * 3.8).astype(np.uint8)[:, None]
    p = tmp_path / "big.jpg"
    Image.fromarray(a).save(p, "JPEG", quality=95)
    monkeypatch.setattr(images_mod, "_turbo_decode", lambda img, data: pytest.fail("torchvision asked"))
    out = load_image(p, 32)
    with Image.open(p) as img:
        full = square_image(img, 32)
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(int) - full.astype(int)).mean() < 1.5


def test_sum_images_is_exact_at_the_integer_limits() -> None:
    # 130 saturated images cross the 64-image block (uint16 per-pixel sums: 64 * 255 fits)
    # and the uint16 channel products (255^2 = 65,025 fits); the reference is Python ints.
    images = np.full((130, 8, 8, 3), 255, np.uint8)
    images[7] = _noise(5, 8, 8)
    image_sum, rgb, outer, n = sum_images(images, 8)
    flat = images.reshape(-1, 3).astype(np.int64)
    assert n == 130 and image_sum.dtype == np.uint64
    assert np.array_equal(image_sum, images.astype(np.int64).sum(0))
    assert rgb == flat.sum(0).tolist()
    assert outer == (flat.T @ flat).tolist()


# --------------------------------------------------------------------------------------
# load_image: modes and odd files


def test_load_image_grayscale(tmp_path: Path) -> None:
    p = tmp_path / "g.jpg"
    Image.new("L", (20, 20), 100).save(p, "JPEG", quality=95)
    out = load_image(p, 16)
    assert out.shape == (16, 16, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    assert np.abs(out.astype(int) - 100).max() <= 2


def test_load_image_cmyk_jpeg(tmp_path: Path) -> None:
    p = tmp_path / "c.jpg"
    Image.new("RGB", (20, 20), (200, 50, 120)).convert("CMYK").save(p, "JPEG", quality=95)
    assert Image.open(p).mode == "CMYK"
    out = load_image(p, 16)
    assert np.abs(out.astype(int) - np.array([200, 50, 120])).max() <= 3


def test_load_image_palette_png(tmp_path: Path) -> None:
    img = Image.new("P", (32, 32), 0)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    img.paste(1, (16, 0, 32, 32))  # right half: palette entry 1 (blue)
    out = load_image(_png(tmp_path / "p.png", img), 16)
    assert np.all(out[:, :7] == [255, 0, 0])
    assert np.all(out[:, 9:] == [0, 0, 255])


def test_load_image_rgba_composites_on_white(tmp_path: Path) -> None:
    a = np.zeros((16, 16, 4), np.uint8)
    a[:, :8] = (0, 0, 200, 255)  # opaque blue
    a[:, 8:] = (0, 0, 0, 0)  # fully transparent (black underneath): white, not black
    out = load_image(_png(tmp_path / "a.png", Image.fromarray(a, "RGBA")), 16)
    assert np.all(out[:, :8] == [0, 0, 200])
    assert np.all(out[:, 8:] == 255)


def test_load_image_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    a = np.zeros((16, 16), np.uint16)
    a[:, :8] = 64 * 257  # 16448: grey level 64 in 16 bits
    a[:, 8:] = 192 * 257  # 49344: grey level 192
    p = _png(tmp_path / "deep.png", Image.fromarray(a))
    assert Image.open(p).mode == "I;16"
    out = load_image(p, 16)
    assert np.abs(out[:, :8].astype(int) - 64).max() <= 1
    assert np.abs(out[:, 8:].astype(int) - 192).max() <= 1
    assert out.max() < 250  # PIL's plain convert("RGB") would clip everything to 255


@pytest.mark.parametrize("orientation, k", [(6, -1), (8, 1)])  # 6: rotate 90 clockwise to show; 8: counter-clockwise
def test_load_image_applies_exif_orientation(tmp_path: Path, orientation: int, k: int, make_jpeg) -> None:
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (230, 20, 20)  # left half red
    a[:, 20:] = (20, 20, 230)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / "rotated.jpg"
    Image.fromarray(a).save(p, "JPEG", quality=95, exif=exif.tobytes())
    reference = make_jpeg(tmp_path / "reference.jpg", np.rot90(a, k=k).copy())
    out = load_image(p, 16)
    assert np.abs(out.astype(int) - load_image(reference, 16).astype(int)).mean() < 2
    red_on_top = orientation == 6  # clockwise: the left edge becomes the top
    top, bottom = out[:6].mean((0, 1)), out[10:].mean((0, 1))
    assert (top[0] > 200 and bottom[2] > 200) if red_on_top else (top[2] > 200 and bottom[0] > 200)


def test_load_image_png_with_jpg_name(tmp_path: Path) -> None:
    a = _noise(2, 16, 16)
    p = tmp_path / "actually_png.jpg"
    Image.fromarray(a).save(p, "PNG")
    assert np.array_equal(load_image(p, 16), a)


def test_bad_image_zero_bytes(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(BadImage):
        load_image(p, 16)


def test_bad_image_truncated_jpeg(tmp_path: Path, make_jpeg) -> None:
    full = make_jpeg(tmp_path / "full.jpg", _noise(3, 64, 64)).read_bytes()
    p = tmp_path / "half.jpg"
    p.write_bytes(full[: len(full) // 2])
    with pytest.raises(BadImage, match="truncated"):
        load_image(p, 16)


def test_bad_image_random_bytes(tmp_path: Path) -> None:
    p = tmp_path / "noise.jpg"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    with pytest.raises(BadImage):
        load_image(p, 16)


def test_bad_image_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadImage, match="vanished"):
        load_image(tmp_path / "gone.jpg", 16)


def test_bad_image_decompression_bomb_own_limit(tmp_path: Path, make_jpeg, monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_jpeg(tmp_path / "big.jpg", (1, 2, 3), size=(40, 20))  # 800 pixels
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(BadImage, match="40x20 pixels is over the 500 limit"):
        load_image(p, 16)
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 800)
    assert load_image(p, 16).shape == (16, 16, 3)


@pytest.mark.parametrize("pil_limit", [300, 500])  # PIL errors above 2x its limit and warns above 1x
def test_bad_image_decompression_bomb_pil_limit(
    tmp_path: Path, make_jpeg, monkeypatch: pytest.MonkeyPatch, pil_limit: int
) -> None:
    p = make_jpeg(tmp_path / "big.jpg", (1, 2, 3), size=(40, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    with pytest.raises(BadImage, match="decompression bomb"):
        load_image(p, 16)


# --------------------------------------------------------------------------------------
# ImageFolderDataset / collate / loaders


def _with_bad_files(root: Path, make_jpeg) -> ImageList:
    _tree(root, {"ant": 3, "bee": 2}, make_jpeg)
    (root / "ant" / "1.jpg").write_bytes(b"")  # zero bytes
    (root / "bee" / "0.jpg").write_bytes(b"\x00garbage" * 50)
    return scan_image_folder(root)


def test_dataset_items_and_skipped_reasons(tmp_path: Path, make_jpeg) -> None:
    images = _with_bad_files(tmp_path, make_jpeg)
    ds = ImageFolderDataset(images, 16)
    assert len(ds) == 5
    x, y, reason = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == 0 and reason == ""
    assert np.abs(x.float().mean((1, 2)).numpy() - COLOURS["ant"]).max() < 3  # channels first
    x, y, reason = ds[1]
    assert x is None and y == 0 and reason.startswith(f"{tmp_path / 'ant' / '1.jpg'}: ")
    x, y, reason = ds[3]
    assert x is None and y == 1 and reason.startswith(f"{tmp_path / 'bee' / '0.jpg'}: ")
    assert len(reason) > len(f"{tmp_path / 'bee' / '0.jpg'}: ")  # a reason follows the path


def test_collate_shrinks_batch_and_reports_skipped(tmp_path: Path, make_jpeg) -> None:
    ds = ImageFolderDataset(_with_bad_files(tmp_path, make_jpeg), 16)
    batch = collate([ds[i] for i in range(5)])
    assert batch.images.shape == (3, 3, 16, 16) and batch.images.dtype == torch.uint8
    assert batch.labels.tolist() == [0, 0, 1] and batch.labels.dtype == torch.int64
    assert [s.split(": ")[0] for s in batch.skipped] == [
        str(tmp_path / "ant" / "1.jpg"),
        str(tmp_path / "bee" / "0.jpg"),
    ]
    assert torch.equal(batch.images[0], ds[0][0]) and torch.equal(batch.images[2], ds[4][0])


def test_collate_all_bad_gives_empty_batch(tmp_path: Path, make_jpeg) -> None:
    ds = ImageFolderDataset(_with_bad_files(tmp_path, make_jpeg), 16)
    batch = collate([ds[1], ds[3]])
    assert len(batch.images) == 0 and batch.images.dtype == torch.uint8
    assert batch.labels.shape == (0,) and batch.labels.dtype == torch.int64
    assert len(batch.skipped) == 2


def test_loader_in_process_shrinks_batches(tmp_path: Path, make_jpeg) -> None:
    ds = ImageFolderDataset(_with_bad_files(tmp_path, make_jpeg), 16)
    batches = list(make_loader(ds, EpochBatchSampler(5, 2, shuffle=False), workers=0))
    assert [len(b.labels) for b in batches] == [1, 1, 1]  # [0, bad], [2, bad], [4]
    assert [len(b.skipped) for b in batches] == [1, 1, 0]
    assert all(isinstance(b, Batch) for b in batches)


def test_loader_two_workers_skips_bad_file_without_blocking(tmp_path: Path, make_jpeg) -> None:
    ds = ImageFolderDataset(_with_bad_files(tmp_path, make_jpeg), 16)
    sampler = EpochBatchSampler(5, 2, shuffle=True, seed=3)
    batch_loader = make_loader(ds, sampler, workers=2)
    got: list[Batch] = []

    def consume() -> None:
        for epoch in range(2):  # persistent workers: a second epoch reuses them
            sampler.set_epoch(epoch)
            got.extend(batch_loader)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "the 2-worker loader blocked"
    assert len(got) == 6
    assert sum(len(b.labels) for b in got) == 6 and sum(len(b.skipped) for b in got) == 4
    assert sorted(y for b in got for y in b.labels.tolist()) == [0, 0, 0, 0, 1, 1]
    batch_loader = None  # release the workers (the closure keeps the name)


# --------------------------------------------------------------------------------------
# EpochBatchSampler


def _flat(batches) -> list[int]:
    return [i for b in batches for i in b]


def test_sampler_order_depends_on_seed_and_epoch_only() -> None:
    a, b = EpochBatchSampler(50, 8, shuffle=True, seed=7), EpochBatchSampler(50, 8, shuffle=True, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    first = list(a)
    assert first == list(b) == list(a)  # same (seed, epoch), same order, every time
    assert sorted(_flat(first)) == list(range(50))  # a permutation
    a.set_epoch(4)
    assert list(a) != first
    c = EpochBatchSampler(50, 8, shuffle=True, seed=8)
    c.set_epoch(3)
    assert list(c) != first


def test_sampler_without_shuffle_is_in_order() -> None:
    s = EpochBatchSampler(10, 4, shuffle=False)
    assert list(s) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(s) == 3


@pytest.mark.parametrize("start", [0, 1, 4, 6, 7])
def test_sampler_start_batch_resumes_exactly(start: int) -> None:
    s = EpochBatchSampler(45, 7, shuffle=True, seed=1)  # 7 batches, the last of 3
    s.set_epoch(2)
    full = list(s)
    assert len(full) == len(s) == 7
    s.set_epoch(2, start_batch=start)
    resumed = list(s)
    assert len(s) == len(resumed) == 7 - start
    assert full[:start] + resumed == full


@pytest.mark.parametrize("n, batch", [(23, 4), (24, 4), (5, 8)])
def test_sampler_ranks_partition_each_epoch(n: int, batch: int) -> None:
    # batch is the global batch: each rank takes a consecutive share of every global batch.
    single = EpochBatchSampler(n, batch, shuffle=True, seed=5)
    ranks = [EpochBatchSampler(n, batch, shuffle=True, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for epoch in (0, 1):
        single.set_epoch(epoch)
        per_rank = []
        for s in ranks:
            s.set_epoch(epoch)
            per_rank.append(list(s))
            assert len(s) == len(per_rank[-1])
            assert all(0 < len(b) <= batch // 2 + 1 for b in per_rank[-1])
        for k, whole in enumerate(single):  # global batch k = rank 0's share + rank 1's share
            shares = [p[k] for p in per_rank if k < len(p)]
            assert _flat(shares) == whole
        seen = _flat(per_rank[0]) + _flat(per_rank[1])
        assert sorted(seen) == list(range(n))  # no index twice, none lost


# --------------------------------------------------------------------------------------
# StatsAccumulator / compute_stats


def _noise_tree(root: Path, size: int = 12) -> dict[str, np.ndarray]:
    """Two classes of lossless noise images, already size x size: decoded pixels are known exactly."""
    arrays = {}
    for i in range(6):
        a = _noise(10 + i, size, size)
        a[..., 1] = a[..., 1] // 2 + a[..., 0] // 3  # correlated channels, unequal variances
        p = _png(root / ("ant" if i < 3 else "bee") / f"{i}.png", Image.fromarray(a))
        arrays[str(p)] = a
    return arrays


def _reference(arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    stack = np.stack(arrays).astype(np.float64)  # (N, S, S, 3)
    pixels = stack.reshape(-1, 3).T / 255.0  # (3, N*S*S)
    return stack.mean(0).transpose(2, 0, 1), np.cov(pixels, bias=True)


def _check_stats(stats: DataStats, arrays: list[np.ndarray]) -> None:
    mean_image, cov = _reference(arrays)
    assert stats.count == len(arrays)
    np.testing.assert_allclose(stats.mean_image.numpy(), mean_image, atol=1e-4)
    l, v = stats.eigvals.double().numpy(), stats.eigvecs.double().numpy()
    assert np.all(np.diff(l) <= 0) and l[-1] >= 0  # descending, non-negative
    np.testing.assert_allclose(v @ np.diag(l) @ v.T, cov, atol=1e-6)
    np.testing.assert_allclose(v.T @ v, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(l, np.linalg.eigvalsh(cov)[::-1], atol=1e-6)
    np.testing.assert_allclose(stats.pixel_std.numpy(), np.sqrt(np.diag(cov)) * 255, rtol=1e-5)
    np.testing.assert_allclose(stats.pixel_std.numpy(), np.stack(arrays).reshape(-1, 3).std(0), rtol=1e-5)


def test_stats_accumulator_matches_numpy(tmp_path: Path) -> None:
    arrays = list(_noise_tree(tmp_path).values())
    acc = StatsAccumulator(12)
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    acc.add(batch[:4])  # in two batches: sums must combine exactly
    acc.add(batch[4:])
    _check_stats(acc.result(), arrays)


def test_stats_accumulator_empty_is_an_error() -> None:
    with pytest.raises(AlexNetError, match="no readable training images"):
        StatsAccumulator(8).result()


def test_datastats_tensor_round_trip(tmp_path: Path) -> None:
    arrays = list(_noise_tree(tmp_path).values())
    acc = StatsAccumulator(12)
    acc.add(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2))
    stats = acc.result()
    back = DataStats.from_tensors(stats.to_tensors())
    assert back.count == stats.count
    for name in ("mean_image", "pixel_std", "eigvals", "eigvecs"):
        assert torch.equal(getattr(back, name), getattr(stats, name))


def test_compute_stats_matches_numpy_reports_skipped_and_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _private_cache: Path
) -> None:
    arrays = _noise_tree(tmp_path / "train")
    bad = tmp_path / "train" / "bee" / "9.png"
    bad.write_bytes(b"not a png")
    images = scan_image_folder(tmp_path / "train")
    assert len(images) == 7

    calls = []
    real = images_mod.load_image
    monkeypatch.setattr(images_mod, "load_image", lambda path, size: calls.append(path) or real(path, size))

    stats, skipped = compute_stats(images, 12, workers=0)
    assert len(calls) == 7
    _check_stats(stats, [arrays[p] for p in images.paths if p in arrays])
    assert len(skipped) == 1 and skipped[0].startswith(f"{bad}: ")
    assert len(list((_private_cache / "stats").glob("*.npz"))) == 1

    calls.clear()
    again, skipped_again = compute_stats(images, 12, workers=0)
    assert calls == []  # served from the cache, nothing decoded
    assert skipped_again == skipped
    assert again.count == stats.count
    for name in ("mean_image", "pixel_std", "eigvals", "eigvecs"):
        assert torch.equal(getattr(again, name), getattr(stats, name))

    # A changed file (new modification time) invalidates the cache.
    st = os.stat(images.paths[0])
    os.utime(images.paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    compute_stats(images, 12, workers=0)
    assert len(calls) == 7


def test_compute_stats_damaged_cache_is_recomputed(tmp_path: Path, _private_cache: Path) -> None:
    arrays = _noise_tree(tmp_path)
    images = scan_image_folder(tmp_path)
    compute_stats(images, 12, workers=0)
    (cached,) = (_private_cache / "stats").glob("*.npz")
    cached.write_bytes(b"damaged")
    stats, skipped = compute_stats(images, 12, workers=0)
    _check_stats(stats, [arrays[p] for p in images.paths])
    assert skipped == []


def test_compute_stats_max_images(tmp_path: Path) -> None:
    arrays = _noise_tree(tmp_path)
    images = scan_image_folder(tmp_path)
    stats, skipped = compute_stats(images, 12, workers=0, max_images=3)
    assert stats.count == 3 and skipped == []
    # The subset is the first 3 of a fixed shuffle: its mean image is that of 3 of the 6 images.
    subset = torch.randperm(6, generator=torch.Generator().manual_seed(0))[:3].tolist()
    _check_stats(stats, [arrays[images.paths[i]] for i in subset])


# --------------------------------------------------------------------------------------
# Fuzzing the decoder: whatever bytes a file holds, load_image returns an image or raises BadImage


def _encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def _fuzz_seeds() -> list[bytes]:
    """Small valid files of every format and mode the decoder has a branch for."""
    rgb = Image.fromarray(_noise(0, 12, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: exercises the EXIF parser and exif_transpose
    gray16 = Image.fromarray(np.random.default_rng(1).integers(0, 65536, (8, 8)).astype(np.uint16))
    seeds = [
        _encoded(rgb, "JPEG"),
        _encoded(rgb, "JPEG", progressive=True),
        _encoded(rgb, "JPEG", exif=exif.tobytes()),
        _encoded(rgb.convert("CMYK"), "JPEG"),
        _encoded(rgb, "PNG"),
        _encoded(rgb.convert("P"), "PNG"),
        _encoded(rgb.convert("LA"), "PNG"),
        _encoded(gray16, "PNG"),
        _encoded(rgb, "GIF"),
        _encoded(rgb, "BMP"),
        _encoded(rgb, "TIFF"),
        _encoded(rgb, "PPM"),
    ]
    if features.check("webp"):
        seeds.append(_encoded(rgb, "WEBP"))
    return seeds


FUZZ_SEEDS = _fuzz_seeds()

# A mutation: xor a byte, truncate, insert bytes, or delete a run. Half of the positions
# fall in the first 64 bytes, where the headers (sizes, modes, chunk lengths) live.
_position = st.one_of(st.integers(0, 63), st.integers(0, 1 << 16))
_mutation = st.one_of(
    st.tuples(st.just("xor"), _position, st.integers(1, 255)),
    st.tuples(st.just("cut"), _position, st.just(0)),
    st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("delete"), _position, st.integers(1, 32)),
)


def _mutate(data: bytes, mutations: list[tuple]) -> bytes:
    out = bytearray(data)
    for op, pos, arg in mutations:
        pos %= max(len(out), 1)
        if op == "xor" and out:
            out[pos] ^= arg
        elif op == "cut":
            del out[pos:]
        elif op == "insert":
            out[pos:pos] = arg
        elif op == "delete":
            del out[pos : pos + arg]
    return bytes(out)


def _check_decoder_on(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        out = load_image(path, 16)
    except BadImage as e:
        assert str(e), "a BadImage must say why"
        return
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "input.img"


# Bounded for the default run: 1,000 inputs, about 3 s on 2 cores. No example database, so
# nothing is written into the source tree; a failure prints the input to reproduce it.
@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(FUZZ_SEEDS), mutations=st.lists(_mutation, min_size=1, max_size=6))
def test_fuzz_load_image_raises_only_badimage(fuzz_file: Path, seed: bytes, mutations: list[tuple]) -> None:
    _check_decoder_on(fuzz_file, _mutate(seed, mutations))


@pytest.mark.slow
@settings(max_examples=20_000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(FUZZ_SEEDS), mutations=st.lists(_mutation, min_size=1, max_size=12))
def test_fuzz_load_image_long(fuzz_file: Path, seed: bytes, mutations: list[tuple]) -> None:
    _check_decoder_on(fuzz_file, _mutate(seed, mutations))


@settings(max_examples=100, deadline=None, database=None)
@given(data=st.binary(max_size=512))
def test_fuzz_load_image_on_arbitrary_bytes(fuzz_file: Path, data: bytes) -> None:
    _check_decoder_on(fuzz_file, data)


def test_fuzz_seeds_are_valid_images(fuzz_file: Path) -> None:
    # Mutations of valid files reach deep into each decoder only if the seeds decode.
    for seed in FUZZ_SEEDS:
        fuzz_file.write_bytes(seed)
        assert load_image(fuzz_file, 16).shape == (16, 16, 3)


def test_find_splits_names_a_file_or_a_dangling_link_for_what_it_is(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(AlexNetError, match="file is not a folder"):
        find_splits(tmp_path / "file")
    for name in ("loop", "dangling"):
        with pytest.raises(AlexNetError, match=f"{name} is a symbolic link that does not resolve"):
            find_splits(tmp_path / name)
    with pytest.raises(AlexNetError, match="missing does not exist"):
        find_splits(tmp_path / "missing")
