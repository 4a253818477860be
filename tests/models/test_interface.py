"""A model's ``.transforms()`` and ``.meta`` (models/interface.py), against the predict path and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.checkpoint import load_model
from alexnet.data.images import load_image
from alexnet.errors import AlexNetError
from alexnet.models import create_model
from alexnet.tools.predict import predict


def test_checkpoint_transform_is_the_predict_path_and_gives_its_probabilities(tiny_checkpoint, tmp_path):
    loaded = load_model(tiny_checkpoint)
    pre = loaded.preprocess
    rng = np.random.default_rng(0)
    path = tmp_path / "p.png"
    Image.fromarray(rng.integers(0, 256, (45, 60, 3), dtype=np.uint8)).save(path)
    x = loaded.model.transforms()(Image.open(path))
    # numpy: the centre crop of the decoded square, minus the mean image there, over the std.
    square = load_image(path, pre.image_size).astype(np.float64)  # (S, S, 3)
    c = (pre.image_size - pre.crop_size) // 2
    patch = square[c : c + pre.crop_size, c : c + pre.crop_size].transpose(2, 0, 1)
    mean = pre.mean.numpy()[:, c : c + pre.crop_size, c : c + pre.crop_size]
    expected = (patch - mean) / pre.std.numpy()[:, None, None]
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        probs = loaded.model(x[None]).softmax(1)[0]
    [result] = predict(tiny_checkpoint, [str(path)], topk=3)
    np.testing.assert_allclose(probs.topk(3).values.numpy(), [p for _, p in result.top], rtol=1e-4, atol=1e-6)


def test_checkpoint_meta_names_classes_sizes_and_the_mean_image(tiny_checkpoint):
    loaded = load_model(tiny_checkpoint)
    meta = loaded.model.meta
    assert meta["categories"] == loaded.names and meta["classes"] == loaded.classes
    assert meta["input_size"] == (3, 28, 28) and meta["resize_size"] == 32
    assert meta["mean_image"] is True  # the tiny checkpoint's mean varies per pixel
    np.testing.assert_allclose(meta["std"], [60 / 255] * 3, rtol=1e-6)
    assert meta["num_params"] == sum(p.numel() for p in loaded.model.parameters())
    assert str(tiny_checkpoint) in meta["source"]


def test_tensor_inputs_uint8_float_and_batches_agree():
    t = create_model("torchvision").transforms()
    rng = np.random.default_rng(1)
    u8 = torch.from_numpy(rng.integers(0, 256, (3, 256, 256), dtype=np.uint8))
    torch.testing.assert_close(t(u8), t(u8.float() / 255), atol=1e-4, rtol=0)
    torch.testing.assert_close(t(torch.stack([u8, u8]))[1], t(u8))
    # Uniform image 128 -> (128/255 - mean) / std per channel, as torchvision normalises.
    grey = t(torch.full((3, 300, 260), 128, dtype=torch.uint8))
    expected = (128 / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(grey.mean((1, 2)).numpy(), expected, rtol=1e-5)
    assert grey.shape == (3, 224, 224)
    with pytest.raises(AlexNetError, match="RGB tensor"):
        t(torch.zeros(1, 64, 64))


def test_untrained_models_get_imagenet_defaults():
    tv, paper = create_model("torchvision").meta, create_model("paper").meta
    assert tv["resize_size"] == paper["resize_size"] == 256 and tv["input_size"] == (3, 224, 224)
    assert tv["std"] == (0.229, 0.224, 0.225) and paper["std"] == pytest.approx(
        (1 / 255,) * 3, abs=1e-6
    )  # the paper divides by nothing
    assert tv["categories"] is None and tv["num_params"] == 61_100_840
    assert "no checkpoint" in paper["source"]
