"""jpegstore.py: a JPEG store against the raw store of the same tree, which is the reference.

Same labels and order, pixels within JPEG tolerance (PSNR from numpy), the same
augmentation draws, refusal of damaged files in one line, byte-identical resume, and a
loader whose memory does not grow with the store.
"""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from alexnet.cli import main
from alexnet.data import jpegstore, store
from alexnet.data import prepare as prepare_mod
from alexnet.data.augment import make_preprocess, train_batch
from alexnet.data.loader import EpochBatchSampler
from alexnet.data.prepare import prepare
from alexnet.data.store import StoreLoader, StoreSplit, open_store
from alexnet.data.verify import verify_store
from alexnet.errors import AlexNetError
from conftest import write_jpeg

SIZE = 32


def smooth_tree(root: Path, train: int = 6, val: int = 2, classes: tuple[str, ...] = ("ant", "bee")) -> Path:
    """Photograph-like sources: smooth colour fields with mild noise, landscape and portrait, 48x40 / 40x56."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in classes:
            for i in range(n):
                h, w = (40, 48) if i % 2 else (56, 40)
                y, x = np.mgrid[0:h, 0:w] / max(h, w)
                base = rng.uniform(40, 215, 3) + 40 * np.stack([np.sin(5 * x + i), np.cos(4 * y), x * y], -1)
                pixels = np.clip(base + rng.normal(0, 3, (h, w, 3)), 0, 255).astype(np.uint8)
                write_jpeg(root / split / c / f"{i}.jpg", pixels, quality=98)
    return root


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("jpeg")
    tree = smooth_tree(root / "src")
    prepare(tree, root / "raw", image_size=SIZE, workers=0, chunk_size=4, progress=False)
    prepare(tree, root / "jpeg", image_size=SIZE, workers=0, chunk_size=4, progress=False, encoding="jpeg")
    return tree, root / "raw", root / "jpeg"


def _all(split) -> tuple[np.ndarray, np.ndarray]:
    out = np.empty((len(split), SIZE, SIZE, 3), np.uint8)
    return out, split.gather(list(range(len(split))), out)


# --------------------------------------------------------------------------------------
# Same images within JPEG tolerance, same labels, order, statistics and draws


def test_jpeg_store_gives_the_raw_images_within_tolerance_labels_and_order(both) -> None:
    _, raw, jpeg = both
    r, j = open_store(raw, SIZE), open_store(jpeg, SIZE)
    assert j.header["encoding"] == "jpeg" and r.header["encoding"] == "raw"
    assert j.header["quality"] == jpegstore.DEFAULT_QUALITY and j.classes == r.classes
    for name in ("train", "val"):
        (a, la), (b, lb) = _all(r.split(name)), _all(j.split(name))
        assert la.tolist() == lb.tolist()
        for i in range(len(a)):  # every image, not only the average, meets the promise
            assert psnr(a[i], b[i]) >= 40.0
        sse = int(((a.astype(np.int64) - b) ** 2).sum())
        # The PSNR prepare reports is that of exactly these decoded pixels, over every image.
        assert j.header["splits"][name]["psnr_db"] == pytest.approx(10 * math.log10(255**2 * a.size / sse))
        assert j.header["splits"][name]["bytes_per_image"] < 3 * SIZE * SIZE
    for key in store.STATS_KEYS[:2]:  # the mean image and std of the decoded pixels
        torch.testing.assert_close(getattr(j.stats(), key), getattr(r.stats(), key), atol=1.5, rtol=0)


def test_loaders_give_the_same_batches_and_augmentation_draws(both) -> None:
    _, raw, jpeg = both
    r, j = open_store(raw, SIZE).split("train"), open_store(jpeg, SIZE).split("train")
    st = open_store(raw, SIZE).stats()
    pre = make_preprocess("mean-image", SIZE, 24, st.mean_image, st.pixel_std, st.eigvals, st.eigvecs)
    # The same crops and flips applied to the difference of the two batches, with no mean and no lighting.
    diff_pre = make_preprocess(
        "mean-image", SIZE, 24, torch.zeros_like(st.mean_image), st.pixel_std, st.eigvals, st.eigvecs
    )
    loaders = [
        StoreLoader(split, EpochBatchSampler(len(split), 5, shuffle=True, seed=3), threads=2) for split in (r, j)
    ]
    gens = [torch.Generator().manual_seed(7) for _ in range(3)]
    for br, bj in zip(*loaders, strict=True):
        assert br.labels.tolist() == bj.labels.tolist()
        out_r, out_j = (train_batch(b.images, pre, generator=g) for b, g in zip((br, bj), gens))
        # Augmentation is affine in the pixels: with the same crop, flip and lighting
        # draws the mean and lighting cancel, leaving the JPEG error cropped and flipped.
        d = bj.images.float() - br.images.float()
        expected = train_batch(d, diff_pre, generator=gens[2], lighting_std=0.0)
        torch.testing.assert_close(out_j - out_r, expected, atol=1e-3, rtol=0)
        torch.randn(len(d), 3, generator=gens[2])  # the lighting draw the third call skipped
    assert all(torch.equal(gens[0].get_state(), g.get_state()) for g in gens[1:])


def test_jpeg_gather_equals_decoding_each_file(both) -> None:
    _, _, jpeg = both
    split = open_store(jpeg, SIZE).split("train")
    positions = [3, 0, 7, 7]
    out = np.zeros((4, SIZE, SIZE, 3), np.uint8)
    split.gather(positions, out)
    for p, image in zip(positions, out):
        s = split.index[p]
        blob = np.asarray(split.offsets[s : s + 2])
        data = Path(split.data_path).read_bytes()[blob[0] : blob[1]]
        np.testing.assert_array_equal(image, jpegstore.decode_one(data).numpy())


def test_training_and_evaluation_read_a_jpeg_store(both) -> None:
    from alexnet.data.source import open_eval_data, open_training_data

    _, raw, jpeg = both
    data = open_training_data(jpeg, SIZE)
    assert data.counts == {"train": 12, "val": 4} and data.description == f"store {jpeg}"
    stats, skipped = data.stats()
    assert skipped == [] and stats.count == 12
    batches = list(data.loader("train", EpochBatchSampler(12, 5, shuffle=True, seed=0)))
    assert [len(b.labels) for b in batches] == [5, 5, 2] and batches[0].images.shape == (5, 3, SIZE, SIZE)
    _, evaluation = open_eval_data(jpeg, data.classes, SIZE, 3, workers=0)
    _, reference = open_eval_data(raw, data.classes, SIZE, 3, workers=0)
    for a, b in zip(evaluation, reference, strict=True):
        assert a.labels.tolist() == b.labels.tolist() and psnr(a.images.numpy(), b.images.numpy()) >= 40


# --------------------------------------------------------------------------------------
# Damage is refused in one line


@pytest.fixture
def copy(both, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(both[2], tmp_path / "store"))


def test_truncated_data_file_is_refused(copy: Path) -> None:
    path = copy / jpegstore.data_file("train")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(AlexNetError, match="train_images.jpegs is truncated") as e:
        open_store(copy)
    assert "\n" not in str(e.value)


def test_truncated_or_altered_index_is_refused(copy: Path) -> None:
    path = copy / jpegstore.index_file("train")
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(AlexNetError, match="train_index.npy is truncated"):
        open_store(copy)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(AlexNetError, match="train_index.npy does not match its checksum"):
        open_store(copy)


def test_damaged_bytes_are_found_by_verify_and_by_the_decoder(copy: Path) -> None:
    assert verify_store(copy, workers=1) == []
    split = open_store(copy).split("train")
    start = int(split.offsets[5])  # slot 5: chunk 1 of chunk_size 4
    with open(copy / jpegstore.data_file("train"), "r+b") as f:
        f.seek(start)
        f.write(b"\x00" * 64)  # its JPEG header: no decoder gets past this
    problems = verify_store(copy, workers=1)
    assert len(problems) == 1 and "images 4-7 (chunk 1)" in problems[0]
    with pytest.raises(AlexNetError, match="does not decode.*alexnet prepare --verify"):
        open_store(copy).split("train").gather([5], np.empty((1, SIZE, SIZE, 3), np.uint8))


# --------------------------------------------------------------------------------------
# Preparation: resume, process pool, CLI


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file() and p.name != store.HEADER}


def _header(root: Path) -> dict:
    header = json.loads((root / store.HEADER).read_text())
    del header["prepare"]["created"]
    return header


def test_interrupted_jpeg_prepare_resumes_byte_identical(both, tmp_path: Path, monkeypatch) -> None:
    tree, _, reference = both
    real = prepare_mod.write_chunk
    calls: list[tuple[str, int]] = []

    def dies_on_fourth(task):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append((task.split, task.chunk))
        return real(task)

    monkeypatch.setattr(prepare_mod, "write_chunk", dies_on_fourth)
    kwargs = dict(image_size=SIZE, chunk_size=4, progress=False, encoding="jpeg")
    with pytest.raises(KeyboardInterrupt):
        prepare(tree, tmp_path / "store", workers=0, **kwargs)
    with pytest.raises(AlexNetError, match="unfinished store"):
        open_store(tmp_path / "store")
    redone: list[tuple[str, int]] = []

    def counting(task):
        redone.append((task.split, task.chunk))
        return real(task)

    monkeypatch.setattr(prepare_mod, "write_chunk", counting)
    report = prepare(tree, tmp_path / "store", workers=0, **kwargs)
    # 12 training images (chunks 0-2) and 4 for val (chunk 0): only the unrecorded chunk is redone.
    assert redone == [("val", 0)] and calls == [("train", 0), ("train", 1), ("train", 2)]
    assert report.images == 4
    assert _files(tmp_path / "store") == _files(reference)
    assert _header(tmp_path / "store") == _header(reference)
    assert not (tmp_path / "store" / store.PROGRESS).exists()
    assert not (tmp_path / "store" / jpegstore.parts_dir("train")).exists()


def test_process_pool_writes_the_same_bytes(both, tmp_path: Path) -> None:
    tree, _, reference = both
    prepare(tree, tmp_path / "pool", image_size=SIZE, chunk_size=4, workers=2, progress=False, encoding="jpeg")
    assert _files(tmp_path / "pool") == _files(reference)


def test_cli_reports_bytes_and_psnr_and_checks_flags(both, tmp_path: Path, capsys) -> None:
    tree = both[0]
    dest = tmp_path / "q80"
    args = ["prepare", str(tree), str(dest), "--image-size", str(SIZE), "--workers", "0", "--no-progress"]
    assert main([*args, "--format", "jpeg", "--quality", "80"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["encoding"] == "jpeg" and 0 < report["bytes_per_image"] < 3 * SIZE * SIZE
    assert 25 < report["psnr_db"] < open_store(both[2]).header["splits"]["train"]["psnr_db"]
    assert open_store(dest).header["quality"] == 80
    assert main([*args, "--quality", "80"]) == 2  # raw has no quality
    assert main([*args, "--format", "jpeg", "--quality", "101"]) == 2
    assert "JPEG quality must be 1-100" in capsys.readouterr().err


def test_unreadable_sources_are_empty_slots_left_out(tmp_path: Path) -> None:
    tree = smooth_tree(tmp_path / "src", train=3, val=1)
    (tree / "train" / "bee" / "empty.jpg").write_bytes(b"")
    report = prepare(tree, tmp_path / "s", image_size=SIZE, workers=0, chunk_size=4, progress=False, encoding="jpeg")
    assert [Path(x.split(":")[0]).name for x in report.skipped] == ["empty.jpg"]
    s = open_store(tmp_path / "s", SIZE)
    train = s.split("train")
    assert train.slots == 7 and len(train) == 6 and s.stats().count == 6
    empty = [k for k in range(7) if train.offsets[k + 1] == train.offsets[k]]
    assert empty == [int(np.flatnonzero(train.labels == -1)[0])]
    out, labels = _all(train)
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1] and out.std() > 10  # six real images
    assert report.bytes_per_image == pytest.approx(s.header["splits"]["train"]["bytes"] / 6)


def test_unknown_encoding_is_refused(copy: Path) -> None:
    header = json.loads((copy / store.HEADER).read_text())
    header["encoding"] = "webp"
    (copy / store.HEADER).write_text(json.dumps(header))
    with pytest.raises(AlexNetError, match="unknown image encoding 'webp'"):
        open_store(copy)


def test_version_one_raw_store_is_still_read(both, tmp_path: Path) -> None:
    import shutil

    old = Path(shutil.copytree(both[1], tmp_path / "v1"))
    header = json.loads((old / store.HEADER).read_text())
    del header["encoding"], header["quality"]
    header["version"] = 1
    (old / store.HEADER).write_text(json.dumps(header))
    s = open_store(old, SIZE)
    assert s.split("train").encoding == "raw" and len(s.split("train")) == 12


# --------------------------------------------------------------------------------------
# Memory stays bounded over an epoch, whatever the store's size


def _raw_split(path: Path, n: int, size: int) -> StoreSplit:
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    images[:] = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
    images.flush()
    return StoreSplit("train", np.load(path, mmap_mode="r"), np.arange(n, dtype=np.int32) % 3, {})


def _jpeg_split(root: Path, n: int, size: int) -> jpegstore.JpegSplit:
    y, x = np.mgrid[0:size, 0:size]
    blobs = [jpegstore.encode(np.stack([x * 4 + i, y * 4, x + y], -1).astype(np.uint8), 90) for i in range(n)]
    (root / "d.jpegs").write_bytes(b"".join(blobs))
    np.save(root / "i.npy", np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64))
    labels = np.arange(n, dtype=np.int32) % 3
    return jpegstore.JpegSplit("train", root / "d.jpegs", root / "i.npy", labels, {}, size)


def _epoch_memory(split) -> tuple[int, int]:
    """(most batches alive at once, growth of the process's anonymous memory in bytes) over one epoch."""

    def anon() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    alive, most = [0], 0

    def gone() -> None:
        alive[0] -= 1

    loader = StoreLoader(split, EpochBatchSampler(len(split), 16, shuffle=True, seed=0), threads=2, prefetch=3)
    before = peak = anon()
    for batch in loader:
        alive[0] += 1
        weakref.finalize(batch.images, gone)
        most = max(most, alive[0])
        peak = max(peak, anon())
        del batch
    return most, peak - before


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from /proc")
@pytest.mark.parametrize("kind", ["raw", "jpeg"])
def test_loader_memory_does_not_grow_with_the_store(kind: str, tmp_path: Path) -> None:
    make = (lambda d, n: _raw_split(d / "x.npy", n, 64)) if kind == "raw" else (lambda d, n: _jpeg_split(d, n, 64))
    (tmp_path / "small").mkdir(), (tmp_path / "large").mkdir()
    small, large = make(tmp_path / "small", 64), make(tmp_path / "large", 4096)  # large: 50 MB of pixels
    _epoch_memory(small)  # warm up: thread arenas, the decoder's tables
    most_small, _ = _epoch_memory(small)
    most_large, grew = _epoch_memory(large)
    # Batches in flight: the prefetch and the one the consumer holds, never the epoch.
    assert most_small <= 3 + 1 and most_large <= 3 + 1
    # Holding the epoch would take 50 MB; what the loader keeps is a few batches of
    # 196 KB (16 x 64 x 64 x 3) plus malloc's arenas, measured 0-6 MB over store sizes of
    # 64-4096 images, not growing with the size.
    assert grew < 16 * 2**20


# --------------------------------------------------------------------------------------
# CUDA: nvJPEG and the pinned ring


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loaders_match_the_cpu(both) -> None:
    for path in both[1:]:
        split = open_store(path, SIZE).split("train")
        cpu, gpu = (
            list(StoreLoader(split, EpochBatchSampler(len(split), 2, shuffle=True, seed=1), device=d))
            for d in ("cpu", "cuda")
        )
        assert len(cpu) == len(gpu) == 6  # more batches than the ring has buffers (threads + 2 = 4)
        for a, b in zip(cpu, gpu):
            assert torch.equal(a.labels, b.labels.cpu())
            if split.encoding == "raw":
                assert torch.equal(a.images, b.images.cpu())
            else:  # nvJPEG may round its IDCT otherwise than libjpeg-turbo
                assert psnr(a.images.numpy(), b.images.cpu().numpy()) >= 40
