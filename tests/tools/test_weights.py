"""Importing pretrained weights (weights.py): torchvision's state_dict, the command line, the file formats.

The imported checkpoint must compute what torchvision's own model and transforms
compute. Caffe's .caffemodel and the converted .npy: test_caffe.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from alexnet.checkpoint import load_checkpoint
from alexnet.cli import main
from alexnet.data.imagenet import imagenet_classes
from alexnet.errors import AlexNetError
from alexnet.tools.weights import import_weights, write_checkpoint


def write_classes(path: Path, n: int) -> Path:
    path.write_text("".join(f"k{i}\tkind {i}\n" for i in range(n)))
    return path


# --------------------------------------------------------------------------------------
# torchvision


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    reference = torchvision.models.alexnet(weights=None).eval()
    path = tmp_path_factory.mktemp("tv") / "alexnet-owt-test.pth"
    torch.save(reference.state_dict(), path)
    return path, reference


def test_torchvision_import_predicts_like_torchvision(torchvision_file, tmp_path):
    path, reference = torchvision_file
    ckpt = write_checkpoint(import_weights(path, "torchvision"), tmp_path / "tv.pt")
    # 320x256: torchvision's Resize(256) + CenterCrop(224) and our shorter-side 256 + centre
    # 256 + centre 224 take the same pixels, so the inputs are identical, not just close.
    rng = np.random.default_rng(0)
    image_file = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)).save(image_file)
    from torchvision import transforms as T

    tv_pre = T.Compose(
        [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    )
    with torch.no_grad():
        expected = reference(tv_pre(Image.open(image_file).convert("RGB"))[None]).softmax(1)[0]
    from alexnet.tools.predict import predict

    [result] = predict(ckpt, [str(image_file)], topk=5)
    wnids, names = imagenet_classes()
    top = expected.topk(5)
    assert [name for name, _ in result.top] == [names[i] for i in top.indices.tolist()]
    assert result.classes == [wnids[i] for i in top.indices.tolist()]
    np.testing.assert_allclose([p for _, p in result.top], top.values.numpy(), rtol=1e-4, atol=1e-6)


def test_torchvision_checkpoint_carries_imagenet_classes_and_preprocessing(torchvision_file):
    state = import_weights(torchvision_file[0], "torchvision")
    wnids, names = imagenet_classes()
    assert state["classes"] == list(wnids) and state["class_names"] == list(names)
    assert state["config"]["model"]["name"] == "torchvision"
    assert (state["config"]["data"]["image_size"], state["config"]["data"]["crop_size"]) == (256, 224)
    pre = state["preprocess"]
    torch.testing.assert_close(pre["mean"][:, 0, 0], torch.tensor([0.485, 0.456, 0.406]) * 255)
    torch.testing.assert_close(pre["std"], torch.tensor([0.229, 0.224, 0.225]) * 255)


def test_torchvision_wrapped_and_dataparallel_state_dicts(torchvision_file, tmp_path):
    reference = torchvision_file[1]
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}, "epoch": 90}, wrapped)
    state = import_weights(wrapped, "torchvision")
    torch.testing.assert_close(state["model"]["features.0.weight"], reference.features[0].weight)


def test_torchvision_other_class_count_needs_a_classes_file(tmp_path):
    model = torchvision.models.alexnet(weights=None, num_classes=7)
    path = tmp_path / "seven.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(AlexNetError, match="has 7 outputs; expected 1000.*--classes FILE with 7 lines"):
        import_weights(path, "torchvision")
    with pytest.raises(AlexNetError, match="lists 5 classes; the weights .* have 7 outputs"):
        import_weights(path, "torchvision", classes_file=write_classes(tmp_path / "five.txt", 5))
    state = import_weights(path, "torchvision", classes_file=write_classes(tmp_path / "seven.txt", 7))
    assert state["classes"] == [f"k{i}" for i in range(7)] and state["class_names"][6] == "kind 6"


def test_torchvision_wrong_layout_says_what_was_expected(tmp_path):
    paper = tmp_path / "paper.pth"
    from alexnet import create_model

    torch.save(create_model("paper").state_dict(), paper)
    with pytest.raises(AlexNetError, match="no classifier.6.weight among conv1.weight"):
        import_weights(paper, "torchvision")
    bad_shape = torchvision.models.alexnet(weights=None).state_dict()
    bad_shape["features.3.weight"] = torch.zeros(192, 32, 5, 5)
    torch.save(bad_shape, tmp_path / "shape.pth")
    with pytest.raises(
        AlexNetError, match=r"features.3.weight has shape \(192, 32, 5, 5\); .* expects \(192, 64, 5, 5\)"
    ):
        import_weights(tmp_path / "shape.pth", "torchvision")


# --------------------------------------------------------------------------------------
# Command line and file formats


def test_cli_import_then_predict_prints_imagenet_names(torchvision_file, tmp_path, capsys):
    out = tmp_path / "imported.safetensors"
    assert main(["import-weights", str(torchvision_file[0]), "--format", "torchvision", "--out", str(out)]) == 0
    image = tmp_path / "x.png"
    Image.fromarray(np.full((240, 300, 3), 90, np.uint8)).save(image)
    capsys.readouterr()
    assert main(["predict", str(out), str(image), "--json"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    _, names = imagenet_classes()
    assert len(result["top"]) == 5 and all(name in names for name, _ in result["top"])


def test_safetensors_checkpoint_round_trip(torchvision_file, tmp_path):
    state = import_weights(torchvision_file[0], "torchvision")
    write_checkpoint(state, tmp_path / "w.safetensors")
    loaded = load_checkpoint(tmp_path / "w.safetensors")
    assert loaded["classes"] == state["classes"] and loaded["class_names"] == state["class_names"]
    assert loaded["config"] == state["config"] and "torchvision weights" in loaded["source"]
    for key, value in state["model"].items():
        assert torch.equal(loaded["model"][key], value), key
    for key in ("mean", "std", "eigvals", "eigvecs", "crop_size"):
        assert torch.equal(torch.as_tensor(loaded["preprocess"][key]), torch.as_tensor(state["preprocess"][key]))


def test_malformed_safetensors(tmp_path, capsys):
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(200))
    assert main(["predict", str(tmp_path / "junk.safetensors"), "x.jpg"]) == 2
    assert "damaged or not a safetensors file" in capsys.readouterr().err
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors", metadata={"framework": "pt"})
    with pytest.raises(AlexNetError, match="not an alexnet checkpoint .*found framework"):
        load_checkpoint(tmp_path / "other.safetensors")


def test_bare_torchvision_state_dict_gets_an_import_hint(torchvision_file, capsys):
    assert main(["predict", str(torchvision_file[0]), "x.jpg"]) == 2
    err = capsys.readouterr().err
    assert "not an alexnet checkpoint" in err and "alexnet import-weights" in err and "Traceback" not in err
