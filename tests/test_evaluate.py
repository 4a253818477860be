"""evaluate.py: top-k error counts, softmax averaged over test patches and models, the evaluation loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from alexnet.data.augment import Preprocess
from alexnet.data.loader import Batch
from alexnet.evaluate import (
    EvalResult,
    evaluate,
    patch_probs,
    predict_probs,
    topk_errors,
)

# --------------------------------------------------------------------------------------
# topk_errors


def _counts(scores, targets, ks=(1, 5)) -> dict[int, int]:
    out = topk_errors(torch.tensor(scores, dtype=torch.float32), torch.tensor(targets), ks)
    assert list(out) == list(ks)
    return {k: int(v) for k, v in out.items()}


def test_topk_hand_computed() -> None:
    scores = [
        [0.1, 0.5, 0.2, 0.9, 0.0],  # target 3: rank 1
        [0.1, 0.5, 0.2, 0.9, 0.0],  # target 1: rank 2
        [3.0, 2.0, 1.0, 0.0, -1.0],  # target 4: rank 5
        [0.0, 0.0, 0.0, 5.0, 1.0],  # target 0: behind 3 and 4, first of the three tied zeros: rank 3
    ]
    assert _counts(scores, [3, 1, 4, 0], ks=(1, 2, 3, 5)) == {1: 3, 2: 2, 3: 1, 5: 0}


def test_topk_k_larger_than_classes_is_clipped() -> None:
    scores = [[0.2, 0.3, 0.5], [0.9, 0.05, 0.05]]
    assert _counts(scores, [0, 1]) == {1: 2, 5: 0}  # top-5 of 3 classes: always right
    assert _counts(scores, [2, 0], ks=(1, 3, 1000)) == {1: 0, 3: 0, 1000: 0}


def test_topk_ties_go_to_the_lower_index() -> None:
    # A dead network (constant scores): class 0 comes first, then 1, 2, ...
    assert _counts(np.zeros((10, 10)), list(range(10))) == {1: 9, 5: 5}
    assert _counts([[1.0, 1.0, 1.0]] * 3, [0, 1, 2], ks=(1, 2, 3)) == {1: 2, 2: 1, 3: 0}
    assert _counts([[0.0, 2.0, 2.0, 2.0, 1.0, 2.0]], [5], ks=(1, 3, 4)) == {1: 1, 3: 1, 4: 0}


def test_topk_matches_a_rank_reference_and_sums_over_batches() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(200, 7, generator=g)
    targets = torch.randint(0, 7, (200,), generator=g)
    s = scores.numpy()
    rank = (s > s[np.arange(200), targets.numpy()][:, None]).sum(1)  # classes scored above the target
    ks = (1, 2, 5, 10)
    whole = topk_errors(scores, targets, ks)
    parts = [topk_errors(scores[i : i + 64], targets[i : i + 64], ks) for i in range(0, 200, 64)]
    for k in ks:
        assert int(whole[k]) == int((rank >= k).sum()) == sum(int(p[k]) for p in parts)


# --------------------------------------------------------------------------------------
# patch_probs / predict_probs


SIZE, CROP, CLASSES = 8, 6, 4
# centre, top-left, top-right, bottom-left, bottom-right (8 - 6 = 2: centre offset 1)
OFFSETS = [(1, 1), (0, 0), (0, 2), (2, 0), (2, 2)]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(3 * CROP * CROP, CLASSES))
    with torch.no_grad():
        m[1].weight.mul_(0.3)  # logits of several units: softmax far from linear
    return m.eval()


def _pre(seed: int, std: tuple[float, float, float]) -> Preprocess:
    g = torch.Generator().manual_seed(seed)
    return Preprocess(
        torch.rand(3, SIZE, SIZE, generator=g) * 255, torch.tensor(std), torch.ones(3), torch.eye(3), CROP
    )


def _manual_patch_probs(model: nn.Module, pre: Preprocess, images: torch.Tensor, ten: bool) -> np.ndarray:
    """(B, P, classes) by slicing each patch by hand and applying a numpy softmax to the model's logits."""
    views = [(t, l, False) for t, l in OFFSETS] + [(t, l, True) for t, l in OFFSETS] if ten else [(1, 1, False)]
    out = []
    for top, left, mirrored in views:
        patch = (
            images[..., top : top + CROP, left : left + CROP].float()
            - pre.mean[:, top : top + CROP, left : left + CROP]
        )
        patch = patch / pre.std.view(1, 3, 1, 1)
        if mirrored:
            patch = patch.flip(-1)
        with torch.no_grad():
            out.append(_softmax(model(patch).double().numpy()))
    return np.stack(out, 1)


@pytest.fixture
def ensemble():
    images = torch.randint(0, 256, (3, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    return images, [_tiny_model(2), _tiny_model(3)], [_pre(4, (1.0, 1.0, 1.0)), _pre(5, (60.0, 50.0, 40.0))]


def test_patch_probs_single_model_ten_patches(ensemble) -> None:
    images, models, pres = ensemble
    got = patch_probs(models[:1], pres[:1], images, ten=True)
    assert got.shape == (3, 10, CLASSES)
    expected = _manual_patch_probs(models[0], pres[0], images, ten=True)
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, atol=1e-6)
    # predict_probs averages the ten softmaxes (probabilities, not logits).
    mean = predict_probs(models[:1], pres[:1], images, ten=True)
    np.testing.assert_allclose(mean.double().numpy(), expected.mean(1), atol=1e-6)


def test_predict_probs_centre_only(ensemble) -> None:
    images, models, pres = ensemble
    got = predict_probs(models[:1], pres[:1], images, ten=False)
    assert got.shape == (3, CLASSES)
    expected = _manual_patch_probs(models[0], pres[0], images, ten=False)[:, 0]
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-6)


def test_ensemble_averages_softmax_over_models_and_patches(ensemble) -> None:
    images, models, pres = ensemble
    per_model = [
        _manual_patch_probs(m, p, images, ten=True) for m, p in zip(models, pres)
    ]  # each its own preprocessing
    got = patch_probs(models, pres, images, ten=True)
    np.testing.assert_allclose(got.double().numpy(), (per_model[0] + per_model[1]) / 2, atol=1e-6)
    final = predict_probs(models, pres, images, ten=True).double().numpy()
    np.testing.assert_allclose(final, (per_model[0].mean(1) + per_model[1].mean(1)) / 2, atol=1e-6)
    np.testing.assert_allclose(final.sum(-1), 1.0, atol=1e-6)
    # The reference is discriminating: averaging logits instead would give something else.
    logits = []
    for m, p in zip(models, pres):
        for t, l in OFFSETS:
            x = images[..., t : t + CROP, l : l + CROP].float() - p.mean[:, t : t + CROP, l : l + CROP]
            x = x / p.std.view(1, 3, 1, 1)
            with torch.no_grad():
                logits += [m(x).double().numpy(), m(x.flip(-1)).double().numpy()]
    assert np.abs(_softmax(np.mean(logits, 0)) - final).max() > 1e-3


# --------------------------------------------------------------------------------------
# evaluate


class Nearest(nn.Module):
    """Scores class k by -|m - 10 k|, m the mean of the patch's first channel: class = intensity / 10."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("centres", 10.0 * torch.arange(classes))
        self.dropout = nn.Dropout(0.5)  # must be off in evaluation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.dropout(x[:, 0]).mean((1, 2))
        return -(m[:, None] - self.centres).abs()


def _const(values: list[int], size: int = 8) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, size, size).contiguous()


def _target_image() -> torch.Tensor:
    """22 in the central 4x4 (the centre patch: class 2), 90 around it; each 4x4 corner patch
    sees 4 pixels of 22 and 12 of 90, mean 73 (class 7)."""
    img = torch.full((1, 3, 8, 8), 90, dtype=torch.uint8)
    img[..., 2:6, 2:6] = 22
    return img


def _batches() -> list[Batch]:
    return [
        # Constant 22: ranking 2, 3, 1, 4, 0, 5, ... Label 2 right, 3 in the top 5, 9 not.
        Batch(_const([22, 22, 22]), torch.tensor([2, 3, 9]), []),
        # 53: class 5. The target image: centre says 2 (right), eight of ten patches say 7.
        Batch(torch.cat([_const([53]), _target_image()]), torch.tensor([5, 2]), ["a.jpg: image file is truncated"]),
        Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), ["b.jpg: cannot identify"]),
    ]


def _zero_pre() -> Preprocess:
    return Preprocess(torch.zeros(3, 8, 8), torch.ones(3), torch.ones(3), torch.eye(3), 4)


def test_evaluate_counts_centre_and_ten_patches() -> None:
    model = Nearest().train()
    results, skipped = evaluate([model], [_zero_pre()], _batches(), torch.device("cpu"), ten=True)
    assert not model.training
    assert skipped == ["a.jpg: image file is truncated", "b.jpg: cannot identify"]
    assert set(results) == {"centre", "ten_patches"}
    centre, ten = results["centre"], results["ten_patches"]
    assert centre.images == ten.images == 5
    assert (centre.top1_error, centre.top5_error) == pytest.approx((2 / 5, 1 / 5))  # labels 3 and 9 / label 9
    assert (ten.top1_error, ten.top5_error) == pytest.approx((3 / 5, 1 / 5))  # the target image now says 7


def test_evaluate_ten_patch_average_by_hand() -> None:
    # The target image's ten-patch probabilities: 2 patches at m=22, 8 at m=73.
    logits = lambda m: -np.abs(m - 10.0 * np.arange(10))  # noqa: E731
    expected = 0.2 * _softmax(logits(22.0)) + 0.8 * _softmax(logits(73.0))
    got = predict_probs([Nearest().eval()], [_zero_pre()], _target_image(), ten=True)[0]
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-6)
    assert list(np.argsort(-expected)[:2]) == [7, 2]


def test_evaluate_centre_only_and_ensemble() -> None:
    results, skipped = evaluate([Nearest(), Nearest()], [_zero_pre(), _zero_pre()], _batches(), torch.device("cpu"))
    assert list(results) == ["centre"] and len(skipped) == 2
    assert results["centre"] == EvalResult(2 / 5, 1 / 5, 5)


def test_evaluate_no_images() -> None:
    empty = Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), ["c.jpg: x"])
    results, skipped = evaluate([Nearest()], [_zero_pre()], [empty], torch.device("cpu"), ten=True)
    assert skipped == ["c.jpg: x"]
    for r in results.values():
        assert r.images == 0 and math.isnan(r.top1_error) and math.isnan(r.top5_error)


def test_eval_result_as_dict() -> None:
    assert EvalResult(0.25, 0.125, 8).as_dict("val_") == {
        "val_top1_error": 0.25,
        "val_top5_error": 0.125,
        "val_images": 8,
    }
