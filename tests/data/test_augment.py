"""augment.py: random patches and reflections, PCA lighting, mean subtraction and the ten test patches.

The crop tests use images whose pixel values encode their own (row, col) position, so every
output patch says where it was cut from; the references are slices taken by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alexnet.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    eval_patches,
    lighting_shift,
    make_preprocess,
    patch_offsets,
    train_batch,
)

S, CROP = 12, 8  # 5 valid offsets per axis


def _coords(n: int, size: int = S, third: torch.Tensor | None = None) -> torch.Tensor:
    """(n, 3, size, size) uint8: channel 0 holds the row index, channel 1 the column index."""
    ar = torch.arange(size, dtype=torch.uint8)
    img = torch.zeros(3, size, size, dtype=torch.uint8)
    img[0] = ar[:, None]
    img[1] = ar[None, :]
    if third is not None:
        img[2] = third
    return img.expand(n, 3, size, size).contiguous()


def _pre(mean: torch.Tensor | None = None, std=(1.0, 1.0, 1.0), crop: int = CROP, size: int = S) -> Preprocess:
    rng = np.random.default_rng(0)
    eigvecs = torch.from_numpy(np.linalg.qr(rng.normal(size=(3, 3)))[0]).float()
    return Preprocess(
        torch.zeros(3, size, size) if mean is None else mean,
        torch.tensor(std),
        torch.tensor([0.2, 0.02, 0.005]),
        eigvecs,
        crop,
    )


def _window(img: np.ndarray, top: int, left: int, crop: int, flip: bool) -> np.ndarray:
    w = img[..., top : top + crop, left : left + crop]
    return w[..., ::-1] if flip else w


def _positions(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top, left, flipped) of each patch of a coordinate image (mean 0, std 1, no lighting)."""
    rows, cols = x[:, 0].numpy(), x[:, 1].numpy()
    return rows[:, 0, 0].astype(int), cols.min((1, 2)).astype(int), cols[:, 0, 0] > cols[:, 0, -1]


# --------------------------------------------------------------------------------------
# train_batch: crops and reflections


def test_train_patches_are_windows_at_valid_offsets_uniform_and_half_flipped() -> None:
    n = 4000
    images = _coords(n, third=torch.full((S, S), 9, dtype=torch.uint8))
    x = train_batch(images, _pre(), lighting_std=0.0, generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, 3, CROP, CROP) and x.dtype == torch.float32
    top, left, flipped = _positions(x)
    src = images[0].numpy().astype(np.float32)
    expected = np.stack([_window(src, t, l, CROP, f) for t, l, f in zip(top, left, flipped)])
    np.testing.assert_array_equal(x.numpy(), expected)  # contiguous windows, exactly
    # Every valid offset 0..S-CROP occurs, about equally often (expected n/5 = 800 each, sd ~25).
    for offsets in (top, left):
        counts = np.bincount(offsets, minlength=S - CROP + 1)
        assert len(counts) == S - CROP + 1
        assert counts.min() > 650 and counts.max() < 950, counts
    assert abs(flipped.mean() - 0.5) < 0.04
    # Flips are independent of the offsets: both halves of each offset's draws occur.
    assert all(0.3 < flipped[left == v].mean() < 0.7 for v in range(S - CROP + 1))


def test_train_without_flip_never_reflects() -> None:
    x = train_batch(_coords(500), _pre(), flip=False, lighting_std=0.0, generator=torch.Generator().manual_seed(1))
    assert not _positions(x)[2].any()


def test_train_crop_equal_to_image_is_the_whole_image_or_its_reflection() -> None:
    images = _coords(200)
    x = train_batch(images, _pre(crop=S), lighting_std=0.0, generator=torch.Generator().manual_seed(2))
    full = images[0].float()
    for patch in x:
        assert torch.equal(patch, full) or torch.equal(patch, full.flip(-1))


def test_train_subtracts_mean_image_at_the_patch_position() -> None:
    # Mean image: zero in the two coordinate channels, random in channel 2, so positions stay
    # readable while channel 2 shows which part of the mean image was subtracted.
    g = torch.Generator().manual_seed(3)
    mean = torch.zeros(3, S, S)
    mean[2] = torch.rand(S, S, generator=g) * 100
    third = torch.randint(0, 256, (S, S), generator=g, dtype=torch.uint8)
    images = _coords(600, third=third)
    x = train_batch(images, _pre(mean), lighting_std=0.0, generator=torch.Generator().manual_seed(4))
    top, left, flipped = _positions(x)
    diff = images[0].numpy().astype(np.float64) - mean.numpy()
    expected = np.stack([_window(diff[2], t, l, CROP, f) for t, l, f in zip(top, left, flipped)])
    np.testing.assert_allclose(x[:, 2].numpy(), expected, atol=1e-4)
    assert flipped.any() and (~flipped).any()


def test_train_divides_by_std_after_lighting() -> None:
    images = torch.randint(0, 256, (64, 3, S, S), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    mean = torch.rand(3, S, S, generator=torch.Generator().manual_seed(6)) * 255
    std = (2.0, 4.0, 0.5)
    plain = train_batch(images, _pre(mean), generator=torch.Generator().manual_seed(7))
    scaled = train_batch(images, _pre(mean, std), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(scaled, plain / torch.tensor(std).view(1, 3, 1, 1), rtol=1e-6, atol=1e-5)


def test_train_is_deterministic_given_the_generator() -> None:
    images = torch.randint(0, 256, (32, 3, S, S), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    pre = _pre(torch.rand(3, S, S) * 255, (50.0, 60.0, 70.0))
    a = train_batch(images, pre, generator=torch.Generator().manual_seed(11))
    b = train_batch(images, pre, generator=torch.Generator().manual_seed(11))
    c = train_batch(images, pre, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# --------------------------------------------------------------------------------------
# PCA lighting


def test_lighting_shift_is_the_paper_formula() -> None:
    pre = _pre()
    shift = lighting_shift(50, pre.eigvals, pre.eigvecs, 0.1, torch.Generator().manual_seed(9))
    alpha = (torch.randn(50, 3, generator=torch.Generator().manual_seed(9)) * 0.1).double().numpy()
    v, lam = pre.eigvecs.double().numpy(), pre.eigvals.double().numpy()
    expected = np.stack([255.0 * v @ (a * lam) for a in alpha])  # 255 [p1 p2 p3][a1 l1, a2 l2, a3 l3]^T
    np.testing.assert_allclose(shift.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_train_lighting_statistics_match_the_pca_covariance() -> None:
    n, size = 20000, 4
    pre = _pre(crop=size, size=size)
    images = torch.full((n, 3, size, size), 128, dtype=torch.uint8)
    x = train_batch(images, pre, lighting_std=0.1, generator=torch.Generator().manual_seed(10)).double()
    shift = x.amax((2, 3)) - 128.0  # (n, 3)
    # One shift per image, added to every pixel of it.
    assert (x.amax((2, 3)) - x.amin((2, 3))).abs().max() < 1e-4
    v, lam = pre.eigvecs.double().numpy(), pre.eigvals.double().numpy()
    expected_cov = 255.0**2 * v @ np.diag((0.1 * lam) ** 2) @ v.T
    s = shift.numpy()
    sem = np.sqrt(np.diag(expected_cov) / n)
    assert np.all(np.abs(s.mean(0)) < 5 * sem)
    np.testing.assert_allclose(np.cov(s.T), expected_cov, atol=0.04 * expected_cov.max())
    # In the eigenbasis the draws are independent alphas ~ N(0, 0.1).
    alpha = s @ v / (255.0 * lam)
    np.testing.assert_allclose(alpha.std(0), 0.1, rtol=0.03)
    corr = np.corrcoef(alpha.T)
    assert np.abs(corr - np.eye(3)).max() < 0.05


def test_lighting_off_adds_nothing() -> None:
    images = torch.full((20, 3, S, S), 100, dtype=torch.uint8)
    x = train_batch(images, _pre(), lighting_std=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.all(x == 100)


# --------------------------------------------------------------------------------------
# Test-time patches


def test_patch_offsets_by_hand() -> None:
    assert patch_offsets(12, 8) == [(2, 2), (0, 0), (0, 4), (4, 0), (4, 4)]
    assert patch_offsets(256, 224) == [(16, 16), (0, 0), (0, 32), (32, 0), (32, 32)]
    assert patch_offsets(8, 8) == [(0, 0)] * 5


def test_eval_ten_patches_match_hand_slices() -> None:
    g = torch.Generator().manual_seed(12)
    size, crop = 10, 6
    images = torch.randint(0, 256, (3, 3, size, size), generator=g, dtype=torch.uint8)
    mean = torch.rand(3, size, size, generator=g) * 255
    std = (2.0, 4.0, 8.0)
    out = eval_patches(images, _pre(mean, std, crop, size), ten=True)
    assert out.shape == (3, 10, 3, crop, crop)
    diff = (images.double() - mean.double()) / torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    # centre, top-left, top-right, bottom-left, bottom-right; then the same five mirrored
    by_hand = [
        diff[..., 2:8, 2:8],
        diff[..., 0:6, 0:6],
        diff[..., 0:6, 4:10],
        diff[..., 4:10, 0:6],
        diff[..., 4:10, 4:10],
    ]
    by_hand += [p.flip(-1) for p in by_hand]
    for i, expected in enumerate(by_hand):
        torch.testing.assert_close(out[:, i].double(), expected, rtol=1e-5, atol=1e-4)


def test_eval_patches_on_coordinate_image_name_their_corners() -> None:
    out = eval_patches(_coords(1), _pre(), ten=True)[0]  # (10, 3, 8, 8)
    top_left = [(int(p[0, 0, 0]), int(p[1, 0, 0])) for p in out]  # (row, col) of each patch's first pixel
    assert top_left[:5] == [(2, 2), (0, 0), (0, 4), (4, 0), (4, 4)]
    assert top_left[5:] == [(2, 9), (0, 7), (0, 11), (4, 7), (4, 11)]  # mirrored: the right edge comes first


def test_eval_centre_only() -> None:
    images = torch.randint(0, 256, (2, 3, S, S), generator=torch.Generator().manual_seed(13), dtype=torch.uint8)
    pre = _pre(torch.rand(3, S, S) * 255)
    one = eval_patches(images, pre, ten=False)
    assert one.shape == (2, 1, 3, CROP, CROP)
    torch.testing.assert_close(one[:, 0], images[..., 2:10, 2:10].float() - pre.mean[:, 2:10, 2:10])
    torch.testing.assert_close(one[:, 0], eval_patches(images, pre, ten=True)[:, 0])


# --------------------------------------------------------------------------------------
# make_preprocess


def _stats(size: int = 16):
    g = torch.Generator().manual_seed(14)
    mean_image = torch.rand(3, size, size, generator=g) * 255
    return mean_image, torch.tensor([60.0, 61.0, 62.0]), torch.tensor([0.3, 0.2, 0.1]), torch.eye(3)


def test_make_preprocess_mean_image() -> None:
    mean, pstd, l, v = _stats()
    pre = make_preprocess("mean-image", 16, 12, mean, pstd, l, v)
    assert torch.equal(pre.mean, mean) and torch.equal(pre.std, torch.ones(3))
    assert torch.equal(pre.eigvals, l) and torch.equal(pre.eigvecs, v)
    assert pre.crop_size == 12 and pre.image_size == 16


def test_make_preprocess_mean_image_std() -> None:
    mean, pstd, l, v = _stats()
    pre = make_preprocess("mean-image-std", 16, 12, mean, pstd, l, v)
    assert torch.equal(pre.mean, mean) and torch.equal(pre.std, pstd)


def test_make_preprocess_imagenet() -> None:
    mean, pstd, l, v = _stats()
    pre = make_preprocess("imagenet", 16, 12, mean, pstd, l, v)
    assert pre.mean.shape == (3, 16, 16) and pre.image_size == 16
    torch.testing.assert_close(pre.mean[:, 5, 7], torch.tensor([0.485 * 255, 0.456 * 255, 0.406 * 255]))
    assert torch.all(pre.mean == torch.tensor(IMAGENET_MEAN).view(3, 1, 1))
    torch.testing.assert_close(pre.std, torch.tensor([0.229 * 255, 0.224 * 255, 0.225 * 255]))
    assert torch.equal(pre.std, torch.tensor(IMAGENET_STD))
    # A grey image at the ImageNet mean becomes zeros.
    grey = torch.tensor(IMAGENET_MEAN).round().to(torch.uint8).view(1, 3, 1, 1).expand(1, 3, 16, 16)
    assert eval_patches(grey, pre, ten=False).abs().max() < 0.01


def test_make_preprocess_errors() -> None:
    mean, pstd, l, v = _stats()
    with pytest.raises(ValueError, match="crop_size 17 is larger than image_size 16"):
        make_preprocess("mean-image", 16, 17, mean, pstd, l, v)
    with pytest.raises(ValueError, match="unknown normalize mode 'zscore'"):
        make_preprocess("zscore", 16, 12, mean, pstd, l, v)


def test_preprocess_state_dict_round_trip() -> None:
    mean, pstd, l, v = _stats()
    pre = make_preprocess("mean-image-std", 16, 12, mean, pstd, l, v)
    back = Preprocess.from_state_dict(pre.state_dict())
    assert back.crop_size == 12
    for name in ("mean", "std", "eigvals", "eigvecs"):
        assert torch.equal(getattr(back, name), getattr(pre, name))
