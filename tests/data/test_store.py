"""store.py: checks on open, chunk checksums, and the loader against the folder loader it replaces.

The folder path (data.ImageFolderDataset in a DataLoader) is the reference: with the
same sampler a store loader must give the same uint8 batches, so the shared
augmentation (augment.train_batch) gives the same network input, and a training run
gives the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alexnet.data import store
from alexnet.data.augment import make_preprocess, train_batch
from alexnet.data.images import ImageFolderDataset, scan_image_folder
from alexnet.data.loader import EpochBatchSampler, make_loader
from alexnet.data.prepare import prepare
from alexnet.data.source import open_training_data
from alexnet.data.store import StoreLoader, open_store
from alexnet.data.verify import verify_store
from alexnet.errors import AlexNetError
from conftest import write_tree


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("store")
    tree = write_tree(root / "src", train=7, val=3)
    prepare(tree, root / "store", image_size=16, workers=0, chunk_size=4, progress=False)
    return tree, root / "store"


@pytest.fixture
def copy(prepared, tmp_path: Path) -> Path:
    """A private copy of the store, to damage."""
    import shutil

    return Path(shutil.copytree(prepared[1], tmp_path / "store"))


# --------------------------------------------------------------------------------------
# Opening: every mismatch is a one-line AlexNetError


def test_open_reports_what_the_store_is(prepared) -> None:
    s = open_store(prepared[1], 16)
    assert s.image_size == 16 and s.classes == ["ant", "bee", "cat"]
    assert len(s.split("train")) == 21 and len(s.split("val")) == 9
    assert s.split("train").images.shape == (21, 16, 16, 3)
    with pytest.raises(AlexNetError, match="has no 'test' split"):
        s.split("test")


def test_other_resolution_is_refused(prepared) -> None:
    with pytest.raises(AlexNetError, match="holds 16x16 images but data.image_size is 256"):
        open_store(prepared[1], 256)


def test_not_a_store(tmp_path: Path) -> None:
    with pytest.raises(AlexNetError, match="not a prepared store"):
        open_store(tmp_path)


def _edit_header(path: Path, **changes) -> None:
    header = json.loads((path / store.HEADER).read_text())
    header.update(changes)
    (path / store.HEADER).write_text(json.dumps(header))


def test_other_version_and_format_are_refused(copy: Path) -> None:
    _edit_header(copy, version=store.VERSION + 1)
    with pytest.raises(
        AlexNetError, match=f"format version {store.VERSION + 1}; this alexnet reads version {store.VERSION}"
    ):
        open_store(copy)
    _edit_header(copy, format="something-else", version=store.VERSION)
    with pytest.raises(AlexNetError, match="not an alexnet store header"):
        open_store(copy)
    (copy / store.HEADER).write_text("{ not json")
    with pytest.raises(AlexNetError, match="cannot read"):
        open_store(copy)


def test_truncated_images_file_is_caught_on_open(copy: Path) -> None:
    path = copy / store.images_file("train")
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(AlexNetError, match=f"is truncated: {size - 100:,} bytes, expected {size:,}"):
        open_store(copy)


def test_images_file_of_another_shape_is_caught(copy: Path) -> None:
    np.save(copy / store.images_file("val"), np.zeros((9, 8, 8, 3), np.uint8))
    with pytest.raises(AlexNetError, match="the files do not belong together"):
        open_store(copy)


def test_damaged_labels_or_statistics_fail_their_checksum(copy: Path, prepared) -> None:
    labels = np.load(copy / store.labels_file("train"))
    labels[0] = (labels[0] + 1) % 3
    np.save(copy / store.labels_file("train"), labels)
    with pytest.raises(AlexNetError, match="does not match its checksum"):
        open_store(copy)
    np.save(copy / store.labels_file("train"), np.load(prepared[1] / store.labels_file("train")))
    open_store(copy)
    (copy / store.stats_file("eigvals")).unlink()
    with pytest.raises(AlexNetError, match="missing stats_eigvals.npy"):
        open_store(copy)


def test_verify_finds_the_damaged_chunk(copy: Path) -> None:
    assert verify_store(copy, workers=0) == []
    images = np.load(copy / store.images_file("train"), mmap_mode="r+")
    images[9, 3, 3, 1] ^= 0xFF  # slot 9 is in chunk 2 (slots 8-11)
    images.flush()
    del images
    problems = verify_store(copy, workers=0)
    assert len(problems) == 1 and "images 8-11 (chunk 2)" in problems[0]


# --------------------------------------------------------------------------------------
# The loader against the folder loader


def _folder_batches(tree: Path, split: str, sampler: EpochBatchSampler) -> list:
    listing = scan_image_folder(tree / split, classes=["ant", "bee", "cat"])
    return list(make_loader(ImageFolderDataset(listing, 16), sampler, workers=0))


@pytest.mark.parametrize("threads", [1, 3])
def test_loader_gives_the_folder_loaders_batches(prepared, threads: int) -> None:
    tree, path = prepared
    s = open_store(path)
    for epoch in (0, 1):
        sampler = EpochBatchSampler(21, 5, shuffle=True, seed=4)
        sampler.set_epoch(epoch)
        expected = _folder_batches(tree, "train", sampler)
        got = list(StoreLoader(s.split("train"), sampler, threads=threads, prefetch=2))
        assert len(got) == len(expected) == 5
        for a, b in zip(got, expected):
            assert a.images.shape == b.images.shape and a.images.dtype == torch.uint8
            assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
            assert a.skipped == []
            # HWC memory seen as (B, 3, S, S): the channels-last layout convolutions prefer.
            assert a.images.is_contiguous(memory_format=torch.channels_last)


def test_loader_honours_start_batch_and_sharding(prepared) -> None:
    tree, path = prepared
    split = open_store(path).split("train")
    full = EpochBatchSampler(21, 4, shuffle=True, seed=1)
    later = EpochBatchSampler(21, 4, shuffle=True, seed=1)
    later.set_epoch(0, start_batch=3)
    all_batches = list(StoreLoader(split, full))
    rest = list(StoreLoader(split, later))
    assert len(rest) == len(all_batches) - 3
    for a, b in zip(rest, all_batches[3:]):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.images, b.images)
    ranks = [
        list(StoreLoader(split, EpochBatchSampler(21, 4, shuffle=True, seed=1, rank=r, world_size=2))) for r in (0, 1)
    ]
    assert sum(len(b.labels) for r in ranks for b in r) == 21


def test_loader_stopped_early_does_not_hang_and_can_restart(prepared) -> None:
    split = open_store(prepared[1]).split("train")
    loader = StoreLoader(split, EpochBatchSampler(21, 2, shuffle=False), prefetch=4)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    assert len(list(loader)) == len(loader) == 11


def test_augmented_batches_equal_the_folder_paths(prepared) -> None:
    """Same uint8 in, same train_batch: the network input is identical, so its distribution is too."""
    tree, path = prepared
    s = open_store(path)
    stats = s.stats()
    pre = make_preprocess("mean-image", 16, 12, stats.mean_image, stats.pixel_std, stats.eigvals, stats.eigvecs)
    sampler = EpochBatchSampler(21, 7, shuffle=True, seed=2)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for a, b in zip(StoreLoader(s.split("train"), sampler), _folder_batches(tree, "train", sampler)):
        torch.testing.assert_close(
            train_batch(a.images, pre, generator=g1), train_batch(b.images, pre, generator=g2), rtol=0, atol=0
        )


@pytest.mark.gpu
def test_cuda_loader_matches_the_cpu_loader(prepared) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    split = open_store(prepared[1]).split("train")
    sampler = EpochBatchSampler(21, 5, shuffle=True, seed=4)
    for a, b in zip(StoreLoader(split, sampler, "cuda"), StoreLoader(split, sampler, "cpu")):
        assert a.images.device.type == "cuda"
        assert torch.equal(a.images.cpu(), b.images) and torch.equal(a.labels.cpu(), b.labels)


# --------------------------------------------------------------------------------------
# open_training_data: one interface for train.py


def test_training_data_from_a_store_and_from_a_folder_agree(prepared) -> None:
    tree, path = prepared
    from_store = open_training_data(path, 16)
    from_folder = open_training_data(tree, 16, workers=0)
    assert from_store.classes == from_folder.classes
    assert from_store.counts == from_folder.counts == {"train": 21, "val": 9}
    (a, skipped_a), (b, skipped_b) = from_store.stats(), from_folder.stats()
    assert skipped_a == skipped_b == []
    torch.testing.assert_close(a.mean_image, b.mean_image, rtol=1e-6, atol=1e-5)
    sampler = EpochBatchSampler(9, 4, shuffle=False)
    for x, y in zip(from_store.loader("val", sampler), from_folder.loader("val", sampler)):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
    with pytest.raises(AlexNetError, match="data.image_size is 32"):
        open_training_data(path, 32)


# --------------------------------------------------------------------------------------
# End to end: alexnet prepare, then train and evaluate on the store


TINY = [
    "--preset", "paper",
    "--set", "data.image_size=16",
    "--set", "data.crop_size=12",
    "--set", "model.width=0.125",
    "--set", "model.fc_width=16",
    "--set", "model.conv1_kernel=3",
    "--set", "model.conv1_stride=1",
    "--set", "model.pooling=non-overlap",
    "--set", "model.init=kaiming",
    "--set", "data.normalize=mean-image-std",
    "--batch-size", "8",
    "--workers", "0",
    "--epochs", "2",
    "--no-progress",
]  # fmt: skip


def test_training_on_the_store_equals_training_on_the_folder(prepared, tmp_path: Path, capsys) -> None:
    from alexnet.cli import main

    tree, path = prepared
    # Without dropout: torch's DataLoader draws from the global generator when an epoch
    # starts and the store loader does not, so dropout masks would differ. Everything
    # else -- order, pixels, augmentation draws -- must be the same.
    same = [*TINY, "--set", "model.dropout=0"]
    assert main(["train", "--data", str(tree), "--out", str(tmp_path / "folder"), *same]) == 0
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "store"), *same]) == 0
    a = torch.load(tmp_path / "folder" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "store" / "last.pt", weights_only=True)
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert a["metrics"]["val_top1_error"] == b["metrics"]["val_top1_error"]
    capsys.readouterr()
    assert (
        main(["evaluate", str(tmp_path / "store" / "last.pt"), "--data", str(path), "--json", str(tmp_path / "e.json")])
        == 0
    )
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["centre"]["images"] == 9
    assert result["centre"]["top1_error"] == pytest.approx(b["metrics"]["val_top1_error"])


def test_prepare_command_line(prepared, tmp_path: Path, capsys) -> None:
    from alexnet.cli import main

    tree, _ = prepared
    dest = tmp_path / "s"
    assert (
        main(["prepare", str(tree), str(dest), "--image-size", "8", "--workers", "0", "--no-progress", "--verify"]) == 0
    )
    out = capsys.readouterr().out
    assert json.loads(out.splitlines()[0])["images"] == 30 and "every chunk matches" in out
    with open(dest / store.images_file("val"), "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01")
    assert main(["prepare", "--verify", str(dest), "--workers", "0", "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "damaged:" in captured.out and "alexnet: error: 1 chunk(s)" in captured.err
    assert main(["prepare", str(tree)]) == 2
    assert main(["train", "--data", str(dest), "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "holds 8x8 images but data.image_size is 16" in capsys.readouterr().err
