"""ONNX, TorchScript and safetensors exports: parity with PyTorch, metadata, dynamic batch, failures."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alexnet.checkpoint import load_model
from alexnet.cli import main
from alexnet.data.images import load_image
from alexnet.errors import AlexNetError
from alexnet.evaluate import predict_probs
from alexnet.tools import export as export_lib
from alexnet.tools.export import Deployable, export

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def centre_patch(image: np.ndarray, crop: int) -> np.ndarray:
    """What a deployment does before the exported graph: the central crop x crop, float RGB 0-255."""
    s = image.shape[0]
    o = (s - crop) // 2
    return image[o : o + crop, o : o + crop].transpose(2, 0, 1)[None].astype(np.float32)


@pytest.fixture
def photo(tmp_path, make_jpeg) -> Path:
    rng = np.random.default_rng(0)
    return make_jpeg(tmp_path / "photo.jpg", rng.integers(0, 256, (48, 60, 3), dtype=np.uint8))


def test_deployable_equals_the_evaluation_path(tiny_checkpoint, photo):
    loaded = load_model(tiny_checkpoint)
    image = load_image(photo, 32)
    expected = predict_probs(
        [loaded.model], [loaded.preprocess], torch.from_numpy(image).permute(2, 0, 1)[None], ten=False
    )
    with torch.no_grad():
        got = Deployable(loaded.model, loaded.preprocess).eval()(torch.from_numpy(centre_patch(image, 28))).softmax(1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_onnx_export_runs_in_onnxruntime_with_metadata(tiny_checkpoint, photo, tmp_path):
    report = export(tiny_checkpoint, "onnx", tmp_path / "m.onnx")
    assert report.max_abs_diff <= report.tolerance and report.path.exists()
    model = onnx.load(str(tmp_path / "m.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["alexnet.class_names"])[1] == "class one"
    assert (meta["alexnet.image_size"], meta["alexnet.crop_size"]) == ("32", "28")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    loaded = load_model(tiny_checkpoint)
    image = load_image(photo, 32)
    for batch in (1, 4):  # the batch axis is dynamic
        x = np.repeat(centre_patch(image, 28), batch, 0)
        [logits] = session.run(None, {"image": x})
        expected = predict_probs(
            [loaded.model], [loaded.preprocess], torch.from_numpy(image).permute(2, 0, 1)[None], ten=False
        )
        np.testing.assert_allclose(
            torch.from_numpy(logits).softmax(1).numpy(), expected.expand(batch, -1).numpy(), rtol=1e-4, atol=1e-6
        )
    assert not list(tmp_path.glob(".m.onnx.tmp*"))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_reloads_without_alexnet(tiny_checkpoint, tmp_path):
    report = export(tiny_checkpoint, "torchscript", tmp_path / "m.pt")
    assert report.max_abs_diff <= report.tolerance
    extra = {"alexnet.json": ""}
    module = torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    assert json.loads(json.loads(extra["alexnet.json"])["alexnet.classes"]) == [f"c{i}" for i in range(6)]
    reference = Deployable(load_model(tiny_checkpoint).model, load_model(tiny_checkpoint).preprocess).eval()
    x = torch.rand(5, 3, 28, 28) * 255
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference(x), rtol=1e-5, atol=1e-5)


def test_safetensors_export_loads_for_inference(tiny_checkpoint, tmp_path):
    report = export(tiny_checkpoint, "safetensors", tmp_path / "m.safetensors")
    assert report.max_abs_diff == 0.0
    again = load_model(tmp_path / "m.safetensors")
    assert again.names == load_model(tiny_checkpoint).names


def test_parity_failure_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    # An exporter that silently changes the network (a 1% weight error) must be caught.
    original = export_lib._write_torchscript

    def broken(net, loaded, tmp):
        run = original(net, loaded, tmp)
        return lambda x: run(x) * 1.01

    monkeypatch.setattr(export_lib, "_write_torchscript", broken)
    with pytest.raises(AlexNetError, match="torchscript export .* differs from PyTorch: max .diff. .* > tolerance"):
        export(tiny_checkpoint, "torchscript", tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == [tiny_checkpoint]


def test_cli_export(tiny_checkpoint, tmp_path, capsys):
    assert main(["export", str(tiny_checkpoint), "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) == 0
    out = capsys.readouterr().out
    assert "parity with PyTorch on random batches of 1, 3: max |diff|" in out
    assert main(["export", str(tmp_path / "missing.pt"), "--format", "onnx", "--out", str(tmp_path / "y.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_exports_follow_the_dropout_style(tiny_checkpoint, tmp_path):
    # The tiny checkpoint is paper style (fc6/fc7 outputs x0.5 at test). The same file as
    # inverted style with fc7 and fc8 weights halved is the same function (hand-derived:
    # W (0.5 h) = (0.5 W) h); an old file without the key loads as inverted, unhalved.
    from alexnet.checkpoint import save_checkpoint

    state = torch.load(tiny_checkpoint, weights_only=True)
    assert state["config"]["model"]["dropout_style"] == "paper"
    halved = {
        **state,
        "config": {**state["config"], "model": {**state["config"]["model"], "dropout_style": "inverted"}},
    }
    halved["model"] = {k: v * 0.5 if k in ("fc7.weight", "fc8.weight") else v for k, v in state["model"].items()}
    save_checkpoint(tmp_path / "halved.pt", halved)
    legacy = {**state, "config": {**state["config"], "model": dict(state["config"]["model"])}}
    del legacy["config"]["model"]["dropout_style"]
    save_checkpoint(tmp_path / "legacy.pt", legacy)
    assert load_model(tmp_path / "legacy.pt").model.dropout.style == "inverted"

    x = torch.rand(3, 3, 28, 28) * 255
    outputs = {}
    for name, path in (
        ("paper", tiny_checkpoint),
        ("halved", tmp_path / "halved.pt"),
        ("legacy", tmp_path / "legacy.pt"),
    ):
        export(path, "onnx", tmp_path / f"{name}.onnx")
        session = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        [outputs[name]] = session.run(None, {"image": x.numpy()})
        export(path, "torchscript", tmp_path / f"{name}.ts")
        with torch.no_grad():
            np.testing.assert_allclose(
                torch.jit.load(str(tmp_path / f"{name}.ts"))(x).numpy(), outputs[name], atol=1e-4
            )
    np.testing.assert_allclose(outputs["paper"], outputs["halved"], rtol=1e-4, atol=1e-5)
    assert not np.allclose(outputs["paper"], outputs["legacy"], rtol=1e-3, atol=1e-4)
