"""fc7 feature extraction for folders: values, order, bad files, and the saved index."""

from pathlib import Path

import numpy as np
import pytest
import torch

from alexnet.checkpoint import load_model
from alexnet.cli import main
from alexnet.data.images import load_image
from alexnet.errors import AlexNetError
from alexnet.tools.features import (
    extract_features,
    list_images,
    load_index,
    model_fingerprint,
    save_index,
)


@pytest.fixture
def folder(tmp_path, make_jpeg) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name in ["b/two.jpg", "a/one.jpg", "three.jpg", "a/deeper/four.jpg"]:
        make_jpeg(root / name, rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    (root / "a" / "Thumbs.db").write_bytes(b"\0" * 8)
    (root / ".hidden.jpg").write_bytes(b"junk")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


def test_list_images_is_recursive_sorted_and_ignores_non_images(folder):
    assert list_images(folder) == ["a/deeper/four.jpg", "a/one.jpg", "b/two.jpg", "broken.jpg", "three.jpg"]


def test_features_are_fc7_of_the_centre_patch(folder, tiny_checkpoint):
    loaded = load_model(tiny_checkpoint)
    index = extract_features(loaded, folder, batch_size=2)
    assert index.paths == ["a/deeper/four.jpg", "a/one.jpg", "b/two.jpg", "three.jpg"]
    assert len(index.skipped) == 1 and "broken.jpg" in index.skipped[0]
    assert index.features.shape == (4, 32) and index.features.dtype == np.float32
    # The reference: decode one image, take the centre 28x28 of its 32x32, subtract the
    # mean image there, divide by the std, run fc6 and fc7 with their ReLUs; the tiny
    # checkpoint is paper-style dropout, so fc7 sees fc6's outputs times 0.5 (section 4.2)
    # and fc7's own outputs are returned unscaled (their 0.5 applies on the way to fc8).
    pre, model = loaded.preprocess, loaded.model
    image = torch.from_numpy(load_image(folder / "b" / "two.jpg", 32)).permute(2, 0, 1).float()
    patch = ((image - pre.mean)[:, 2:30, 2:30] / pre.std.view(3, 1, 1))[None]
    with torch.no_grad():
        x = model.forward_conv(patch).flatten(1)
        expected = torch.relu(model.fc7(0.5 * torch.relu(model.fc6(x))))
    np.testing.assert_allclose(index.features[2], expected[0].numpy(), rtol=1e-5, atol=1e-5)
    assert (index.features >= 0).all()  # after the ReLU


def test_index_round_trip(folder, tiny_checkpoint, tmp_path):
    loaded = load_model(tiny_checkpoint)
    index = extract_features(loaded, folder)
    save_index(index, tmp_path / "f.npz")
    again = load_index(tmp_path / "f.npz")
    assert again.paths == index.paths and again.root == str(folder.resolve())
    np.testing.assert_array_equal(again.features, index.features)
    assert again.fingerprint == model_fingerprint(loaded.model)
    assert again.absolute(0) == folder.resolve() / "a/deeper/four.jpg"


def test_cli_features(folder, tiny_checkpoint, tmp_path, capsys, caplog):
    with caplog.at_level("WARNING", logger="alexnet"):
        assert (
            main(["features", str(tiny_checkpoint), str(folder), "--out", str(tmp_path / "f.npz"), "--workers", "0"])
            == 0
        )
    assert "4 images x 32 features, 1 skipped" in capsys.readouterr().out
    assert "broken.jpg" in caplog.text
    with np.load(tmp_path / "f.npz", allow_pickle=False) as z:
        assert z["features"].shape == (4, 32)


def test_bad_inputs(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["features", str(tiny_checkpoint), str(tmp_path / "empty"), "--out", str(tmp_path / "f.npz")]) == 2
    assert "holds no images" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(AlexNetError, match="none of the 1 images"):
        extract_features(load_model(tiny_checkpoint), tmp_path / "bad")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(AlexNetError, match="not a feature index"):
        load_index(tmp_path / "other.npz")
