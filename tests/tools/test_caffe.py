"""Importing Caffe's weights (caffe.py): the .caffemodel and the converted .npy.

Each format is written here in miniature with its own conventions (BGR input, grouped
filters, TensorFlow layout for the .npy), and the imported checkpoint must compute what
an independent reference of that framework computes: a forward pass written out with
Caffe's semantics (explicit groups, Caffe's LRN formula in NumPy, ceil-mode pooling,
BGR input).
"""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alexnet.checkpoint import load_model
from alexnet.data.augment import eval_patches
from alexnet.errors import AlexNetError
from alexnet.tools.caffe import CAFFE_MEAN_BGR, caffe_message
from alexnet.tools.weights import import_weights, write_checkpoint

# A Caffe AlexNet at a quarter of the conv widths and 32 fc units: bvlc_alexnet's pattern
# (two towers in conv2/4/5, 11x11/4 conv1 on 227 inputs) in a file of a few hundred KB.
C1, C2, C3, C4, C5, FC = 24, 64, 96, 96, 64, 32


def caffe_blobs(num_classes: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random weights in Caffe's layout: (out, in / group, kh, kw) and (out, in)."""
    rng = np.random.default_rng(seed)
    shapes = {
        "conv1": (C1, 3, 11, 11),
        "conv2": (C2, C1 // 2, 5, 5),
        "conv3": (C3, C2, 3, 3),
        "conv4": (C4, C3 // 2, 3, 3),
        "conv5": (C5, C4 // 2, 3, 3),
        "fc6": (FC, C5 * 6 * 6),
        "fc7": (FC, FC),
        "fc8": (num_classes, FC),
    }
    blobs = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:]))
        w = rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32)
        blobs[name] = (w, rng.normal(0, 0.1, shape[0]).astype(np.float32))
    return blobs


def caffe_lrn(x: torch.Tensor) -> torch.Tensor:
    """Caffe's LRN (ACROSS_CHANNELS, local_size 5, alpha 1e-4, beta 0.75, k 1) in NumPy:
    b_c = a_c / (1 + alpha/5 * sum_{j=c-2}^{c+2} a_j^2)^0.75, over all channels of the layer."""
    a = x.double().numpy()
    sq = a**2
    total = np.stack([sq[:, max(0, c - 2) : c + 3].sum(1) for c in range(a.shape[1])], 1)
    return torch.from_numpy(a / (1.0 + 1e-4 / 5 * total) ** 0.75).float()


def caffe_conv(
    x: torch.Tensor, w: np.ndarray, b: np.ndarray, stride: int = 1, pad: int = 0, group: int = 1
) -> torch.Tensor:
    """Caffe's grouped convolution: group g's filters see the g-th slice of the input channels."""
    ws, bs, xs = torch.from_numpy(w).chunk(group), torch.from_numpy(b).chunk(group), x.chunk(group, 1)
    return torch.cat([F.conv2d(xi, wi, bi, stride, pad) for xi, wi, bi in zip(xs, ws, bs)], 1)


def caffe_conv_layers(x: torch.Tensor, conv) -> torch.Tensor:
    def pool(t: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(t, 3, 2, ceil_mode=True)

    x = pool(caffe_lrn(F.relu(conv("conv1", x, stride=4))))  # (B, 24, 55, 55) -> 27
    x = pool(caffe_lrn(F.relu(conv("conv2", x, pad=2, group=2))))  # -> 13
    x = F.relu(conv("conv3", x, pad=1))
    x = F.relu(conv("conv4", x, pad=1, group=2))
    return pool(F.relu(conv("conv5", x, pad=1, group=2)))  # (B, 64, 6, 6)


def caffe_forward(blobs, bgr: torch.Tensor) -> torch.Tensor:
    """bvlc_alexnet's deploy net on mean-subtracted BGR 227x227 input (Caffe layout weights)."""
    x = caffe_conv_layers(bgr, lambda name, t, **kw: caffe_conv(t, *blobs[name], **kw))
    x = x.flatten(1)  # Caffe flattens (C, H, W)
    for name in ("fc6", "fc7"):
        x = F.relu(x @ torch.from_numpy(blobs[name][0]).T + torch.from_numpy(blobs[name][1]))
    return x @ torch.from_numpy(blobs["fc8"][0]).T + torch.from_numpy(blobs["fc8"][1])


def tf_forward(arrays, bgr: torch.Tensor) -> torch.Tensor:
    """The converted .npy's network as TensorFlow runs it: (kh, kw, in, out) kernels, NHWC
    flattening before fc6, (in, out) fully connected weights."""

    def conv(name, t, **kw):
        w, b = arrays[name]
        return caffe_conv(t, np.ascontiguousarray(w.transpose(3, 2, 0, 1)), b, **kw)

    x = caffe_conv_layers(bgr, conv)
    x = x.permute(0, 2, 3, 1).flatten(1)  # NHWC: (h, w, c) order
    for name in ("fc6", "fc7"):
        x = F.relu(x @ torch.from_numpy(arrays[name][0]) + torch.from_numpy(arrays[name][1]))
    return x @ torch.from_numpy(arrays["fc8"][0]) + torch.from_numpy(arrays["fc8"][1])


def to_tf_layout(blobs):
    """What caffe-tensorflow writes: kernels (kh, kw, in, out); fc6 re-wired for NHWC input; fc (in, out)."""
    out = {}
    for name, (w, b) in blobs.items():
        if w.ndim == 4:
            w = w.transpose(2, 3, 1, 0)
        elif name == "fc6":
            w = w.reshape(w.shape[0], C5, 6, 6).transpose(2, 3, 1, 0).reshape(-1, w.shape[0])
        else:
            w = w.T
        out[name] = [np.ascontiguousarray(w), b]
    return out


def caffe_reference_input(images: torch.Tensor, mean_bgr: torch.Tensor) -> torch.Tensor:
    """Caffe's input from RGB uint8 (B, 3, 256, 256): BGR, mean subtracted, central 227 crop."""
    bgr = images.flip(1).float() - mean_bgr
    return bgr[:, :, 14:241, 14:241]  # Caffe's centre crop offset: (256 - 227) / 2 = 14


def our_logits(ckpt: Path, images: torch.Tensor) -> torch.Tensor:
    loaded = load_model(ckpt)
    with torch.no_grad():
        return loaded.model(eval_patches(images, loaded.preprocess, ten=False)[:, 0])


def random_images(n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 256, 256), generator=g, dtype=torch.uint8)


def write_caffemodel(path: Path, blobs, v1: bool = False, v0: bool = False) -> Path:
    """A NetParameter like bvlc_alexnet.caffemodel: data/relu/pool layers without blobs
    around the eight with weights. ``v1``: the 2014 ``layers`` field with 4-d legacy dims;
    ``v0``: the older layout, a V0LayerParameter inside each of those."""
    net = caffe_message("NetParameter")
    net.name = "AlexNet"
    order = [
        "data",
        "conv1",
        "relu1",
        "norm1",
        "pool1",
        "conv2",
        "conv3",
        "conv4",
        "conv5",
        "fc6",
        "fc7",
        "fc8",
        "prob",
    ]
    v1 = v1 or v0
    for name in order:
        layer = net.layers.add() if v1 else net.layer.add()
        if v0:
            layer = layer.layer
        layer.name = name
        if not v1:
            layer.type = (
                "Convolution" if name.startswith("conv") else "InnerProduct" if name.startswith("fc") else "ReLU"
            )
        if name not in blobs:
            continue
        for array in blobs[name]:
            blob = layer.blobs.add()
            if v1:
                dims = (1,) * (4 - array.ndim) + array.shape  # fc (1, 1, out, in), bias (1, 1, 1, out)
                blob.num, blob.channels, blob.height, blob.width = dims
            else:
                blob.shape.dim.extend(array.shape)
            blob.data.extend(array.ravel())
    path.write_bytes(net.SerializeToString())
    return path


def write_classes(path: Path, n: int) -> Path:
    path.write_text("".join(f"k{i}\tkind {i}\n" for i in range(n)))
    return path


# --------------------------------------------------------------------------------------
# Caffe .caffemodel


@pytest.mark.parametrize("layout", ["layer", "v1", "v0"])
def test_caffemodel_import_matches_caffe_forward(tmp_path, layout):
    blobs = caffe_blobs(10)
    path = write_caffemodel(tmp_path / "net.caffemodel", blobs, v1=layout == "v1", v0=layout == "v0")
    ckpt = write_checkpoint(
        import_weights(path, "caffemodel", classes_file=write_classes(tmp_path / "c.txt", 10)), tmp_path / "c.pt"
    )
    images = random_images()
    mean = torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)
    expected = caffe_forward(blobs, caffe_reference_input(images, mean))
    torch.testing.assert_close(our_logits(ckpt, images), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_caffe_config_is_the_deploy_net(tmp_path):
    state = import_weights(write_caffemodel(tmp_path / "n.caffemodel", caffe_blobs(1000)), "caffemodel")
    model = state["config"]["model"]
    assert (model["name"], model["lrn"], model["towers"], model["conv1_padding"], model["input_size"]) == (
        "paper",
        "caffe",
        2,
        0,
        227,
    )
    assert state["config"]["data"]["crop_size"] == 227
    # Caffe's Dropout layer scales kept units in training (inverted), so its fc7 and fc8
    # expect unscaled test-time inputs: the import must not take the paper net's default.
    assert model["dropout_style"] == "inverted"
    assert state["classes"][0] == "n01440764" and state["class_names"][0] == "tench"
    # conv1 takes RGB: its input channels are Caffe's BGR ones reversed.
    conv1 = caffe_blobs(1000)["conv1"][0]
    np.testing.assert_array_equal(state["model"]["conv1.weight"][:, 0].numpy(), conv1[:, 2])


def test_caffe_mean_image_from_binaryproto(tmp_path):
    blobs = caffe_blobs(10)
    model_path = write_caffemodel(tmp_path / "n.caffemodel", blobs)
    rng = np.random.default_rng(5)
    mean_bgr = rng.uniform(80, 140, (3, 256, 256)).astype(np.float32)
    blob = caffe_message("BlobProto")
    blob.num, blob.channels, blob.height, blob.width = 1, 3, 256, 256
    blob.data.extend(mean_bgr.ravel())
    (tmp_path / "mean.binaryproto").write_bytes(blob.SerializeToString())
    state = import_weights(
        model_path,
        "caffemodel",
        classes_file=write_classes(tmp_path / "c.txt", 10),
        mean_file=tmp_path / "mean.binaryproto",
    )
    np.testing.assert_array_equal(state["preprocess"]["mean"].numpy(), mean_bgr[::-1])  # stored as RGB
    ckpt = write_checkpoint(state, tmp_path / "m.pt")
    images = random_images()
    expected = caffe_forward(blobs, caffe_reference_input(images, torch.from_numpy(mean_bgr)))
    torch.testing.assert_close(our_logits(ckpt, images), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    np.save(tmp_path / "mean64.npy", mean_bgr[:, :64, :64])
    with pytest.raises(AlexNetError, match="mean image is 64x64; expected 256x256"):
        import_weights(model_path, "caffemodel", classes_file=tmp_path / "c.txt", mean_file=tmp_path / "mean64.npy")


def test_caffemodel_wrong_layout(tmp_path):
    blobs = caffe_blobs(10)
    blobs["conv2"] = (np.zeros((C2, C1, 5, 5), np.float32), blobs["conv2"][1])  # one tower: in = 24, not 12
    path = write_caffemodel(tmp_path / "n.caffemodel", blobs)
    with pytest.raises(AlexNetError, match=r"conv2 weight has shape \(64, 24, 5, 5\); .*expects \(64, 12, 5, 5\)"):
        import_weights(path, "caffemodel", classes_file=write_classes(tmp_path / "c.txt", 10))
    del blobs["fc7"]
    with pytest.raises(AlexNetError, match="lacks layer.s. fc7"):
        import_weights(write_caffemodel(tmp_path / "m.caffemodel", blobs), "caffemodel")
    (tmp_path / "junk.caffemodel").write_bytes(os.urandom(64))
    with pytest.raises(AlexNetError, match="not a .caffemodel|no layers with weights"):
        import_weights(tmp_path / "junk.caffemodel", "caffemodel")


# --------------------------------------------------------------------------------------
# Caffe converted .npy


def test_converted_npy_import_matches_tensorflow_forward(tmp_path):
    blobs = caffe_blobs(10, seed=3)
    arrays = to_tf_layout(blobs)
    path = tmp_path / "bvlc_alexnet.npy"
    np.save(path, arrays, allow_pickle=True)
    state = import_weights(path, "caffe-npy", classes_file=write_classes(tmp_path / "c.txt", 10))
    ckpt = write_checkpoint(state, tmp_path / "n.pt")
    images = random_images()
    mean = torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)
    expected = tf_forward(arrays, caffe_reference_input(images, mean))
    torch.testing.assert_close(our_logits(ckpt, images), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # and it is the same network as the Caffe blobs it came from
    np.testing.assert_allclose(state["model"]["fc6.weight"].numpy(), blobs["fc6"][0])


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose opcode writers can be swapped
    """Writes bytes as protocol-2 BINSTRING, as Python 2 wrote its str -- the layout of the
    original bvlc_alexnet.npy -- and names numpy.core.multiarray, as NumPy 1 did."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", "") == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch[type(len)] = save_global


def test_python2_style_npy_with_weights_biases_dicts(tmp_path):
    blobs = caffe_blobs(10, seed=4)
    arrays = {name: {"weights": w, "biases": b} for name, (w, b) in to_tf_layout(blobs).items()}
    path = tmp_path / "py2.npy"
    from numpy.lib import format as npformat

    with open(path, "wb") as f:
        npformat.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        _Py2Pickler(f, protocol=2).dump(np.array(arrays, dtype=object))
    state = import_weights(path, "caffe-npy", classes_file=write_classes(tmp_path / "c.txt", 10))
    np.testing.assert_allclose(state["model"]["conv3.weight"].numpy(), blobs["conv3"][0])
    np.testing.assert_allclose(state["model"]["fc6.weight"].numpy(), blobs["fc6"][0])


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch EXPLOITED",))


def test_npy_with_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.npy"
    np.save(path, np.array({"conv1": [_Exploit(), np.zeros(1)]}, dtype=object), allow_pickle=True)
    with pytest.raises(AlexNetError, match="refusing .*evil.npy: its pickle holds more than NumPy arrays"):
        import_weights(path, "caffe-npy")
    assert not (tmp_path / "EXPLOITED").exists()


def test_npy_wrong_layouts(tmp_path):
    np.save(tmp_path / "plain.npy", np.zeros((3, 4), np.float32))
    with pytest.raises(AlexNetError, match=r"plain float32 array of shape \(3, 4\); expected .* dict"):
        import_weights(tmp_path / "plain.npy", "caffe-npy")
    arrays = to_tf_layout(caffe_blobs(10))
    arrays["conv1"][0] = np.zeros((5, 5, 3, 96), np.float32)
    np.save(tmp_path / "odd.npy", arrays, allow_pickle=True)
    with pytest.raises(AlexNetError, match=r"conv1 weight has shape \(5, 5, 3, 96\); expected \(11, 11, 3, 96\)"):
        import_weights(tmp_path / "odd.npy", "caffe-npy")
    np.save(tmp_path / "list.npy", np.array([np.zeros(2), np.zeros(3)], dtype=object), allow_pickle=True)
    with pytest.raises(AlexNetError, match="expected a dict"):
        import_weights(tmp_path / "list.npy", "caffe-npy")


@pytest.mark.slow
def test_full_size_bvlc_alexnet_caffemodel(tmp_path):
    """bvlc_alexnet's real shapes (60,965,224 parameters, 244 MB of protobuf) import as the paper net."""
    from alexnet.models.alexnet import count_parameters, create_model

    reference = create_model("paper", lrn="caffe", conv1_padding=0, input_size=227)
    blobs = {}
    for name in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        layer = getattr(reference, name)
        blobs[name] = (layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy())
    blobs["conv1"] = (blobs["conv1"][0][:, ::-1].copy(), blobs["conv1"][1])  # Caffe's BGR order
    path = write_caffemodel(tmp_path / "bvlc_alexnet.caffemodel", blobs, v1=True)
    ckpt = write_checkpoint(import_weights(path, "caffemodel"), tmp_path / "bvlc.pt")
    loaded = load_model(ckpt)
    assert count_parameters(loaded.model) == 60_965_224
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
