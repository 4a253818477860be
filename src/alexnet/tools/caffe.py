"""Caffe's bvlc_alexnet weights, read without Caffe, as the paper variant's state_dict and preprocessing.

Two files hold them (``alexnet import-weights``, weights.py, turns either into a checkpoint):

``caffemodel``
    Caffe's ``bvlc_alexnet.caffemodel``, a protobuf ``NetParameter``. We parse it with
    the ``protobuf`` package against a schema built at run time from the few messages
    and fields we need, with the field numbers of Caffe's public ``caffe.proto``
    (NetParameter, LayerParameter, V1LayerParameter and V0LayerParameter, BlobProto,
    BlobShape). Fields outside that subset are skipped by the parser, so the whole
    ``caffe.proto`` is not needed. Layers in the current ``layer`` (100), the 2014
    ``layers`` (2) and the pre-2014 V0 layout are read.

``caffe-npy``
    The widely used conversion of the same weights to a NumPy file (``bvlc_alexnet.npy``,
    made with caffe-tensorflow): a pickled dict ``{layer: [W, b]}`` (or ``{layer:
    {"weights": W, "biases": b}}``). Pickle can run code, so it is read by files.py's
    ArrayUnpickler, which builds NumPy arrays and plain containers and refuses the rest.
    Its arrays are in TensorFlow layout, which we undo: convolutions are (kh, kw, in,
    out) and become (out, in, kh, kw); fully connected layers are (in, out) and are
    transposed; and fc6's 9216 inputs are ordered (h, w, c) -- caffe-tensorflow
    re-wires the first fully connected layer for NHWC flattening -- and are put back in
    Caffe's and PyTorch's (c, h, w) order. A file whose conv1 is (96, 3, 11, 11) is
    taken to be in Caffe's own layout and used as it is.

Both go into the paper variant set up as Caffe's network: two towers
(Caffe's ``group: 2`` stores conv2, conv4 and conv5 as (out, in / 2, kh, kw) with the
first half of the filters seeing the first half of the inputs, which is PyTorch's
``groups=2`` layout, so they load as they are; shapes are checked), conv1 without
padding on 227x227 crops (Caffe's input size), and ``lrn="caffe"`` (k=1, alpha/n, the
window crossing the tower boundary). Caffe's input is BGR in 0-255 with the mean
subtracted: we reverse conv1's input channels so the network takes RGB like every other
checkpoint here, and put Caffe's mean, converted to RGB, into the preprocessing -- by
default the per-channel pixel mean (B, G, R) = (104, 117, 123) of Caffe's deploy
examples, or the full mean image with ``mean_file`` (``ilsvrc_2012_mean.binaryproto``
or its ``.npy``). One difference remains: Caffe's examples warp the whole image to
256x256, while we rescale the shorter side to 256 and keep the central square (the
paper's section 2), as for every other checkpoint.
"""

from __future__ import annotations

import math
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alexnet.data.augment import Preprocess
from alexnet.errors import AlexNetError
from alexnet.files import ArrayUnpickler, load_array_pickle
from alexnet.models.alexnet import ModelConfig

# Caffe's deploy examples subtract these per-channel means (B, G, R), the rounded
# channel means of ilsvrc_2012_mean.binaryproto (104.0, 116.7, 122.7).
CAFFE_MEAN_BGR = (104.0, 117.0, 123.0)
CAFFE_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")

Blobs = dict[str, tuple[np.ndarray, np.ndarray]]  # layer -> (weight, bias), Caffe layout


# --------------------------------------------------------------------------------------
# Caffe: .caffemodel through a minimal protobuf schema


def _protobuf_decode_error(what: str) -> type[Exception]:
    """protobuf's DecodeError; protobuf is the 'caffe' extra, so a missing one says how to install it."""
    from alexnet.extras import require

    return require("google.protobuf.message", f"reading {what}").DecodeError


@lru_cache(maxsize=1)
def _caffe_messages() -> dict[str, type]:
    """Message classes for the part of caffe.proto that holds weights.

    Field numbers are caffe.proto's; the descriptor is built here rather than shipping
    generated code, which would tie the package to one protobuf release.
    """
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(
        name="alexnet_caffe_subset.proto", package="alexnet_caffe", syntax="proto2"
    )

    def message(name: str, fields: list[tuple[str, int, int, int, str]]) -> None:
        m = proto.message_type.add(name=name)
        for field_name, number, ftype, label, type_name in fields:
            field = m.field.add(name=field_name, number=number, type=ftype, label=label)
            if type_name:
                field.type_name = f".alexnet_caffe.{type_name}"
            if label == f.LABEL_REPEATED and ftype in (f.TYPE_FLOAT, f.TYPE_DOUBLE, f.TYPE_INT64):
                field.options.packed = True

    opt, rep = f.LABEL_OPTIONAL, f.LABEL_REPEATED
    message("BlobShape", [("dim", 1, f.TYPE_INT64, rep, "")])
    message(
        "BlobProto",
        [
            ("num", 1, f.TYPE_INT32, opt, ""),
            ("channels", 2, f.TYPE_INT32, opt, ""),
            ("height", 3, f.TYPE_INT32, opt, ""),
            ("width", 4, f.TYPE_INT32, opt, ""),
            ("data", 5, f.TYPE_FLOAT, rep, ""),
            ("shape", 7, f.TYPE_MESSAGE, opt, "BlobShape"),
            ("double_data", 8, f.TYPE_DOUBLE, rep, ""),
        ],
    )
    message("V0LayerParameter", [("name", 1, f.TYPE_STRING, opt, ""), ("blobs", 50, f.TYPE_MESSAGE, rep, "BlobProto")])
    message(
        "V1LayerParameter",
        [
            ("layer", 1, f.TYPE_MESSAGE, opt, "V0LayerParameter"),
            ("name", 4, f.TYPE_STRING, opt, ""),
            ("blobs", 6, f.TYPE_MESSAGE, rep, "BlobProto"),
        ],
    )
    message(
        "LayerParameter",
        [
            ("name", 1, f.TYPE_STRING, opt, ""),
            ("type", 2, f.TYPE_STRING, opt, ""),
            ("blobs", 7, f.TYPE_MESSAGE, rep, "BlobProto"),
        ],
    )
    message(
        "NetParameter",
        [
            ("name", 1, f.TYPE_STRING, opt, ""),
            ("layers", 2, f.TYPE_MESSAGE, rep, "V1LayerParameter"),
            ("layer", 100, f.TYPE_MESSAGE, rep, "LayerParameter"),
        ],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    if hasattr(message_factory, "GetMessageClass"):  # protobuf >= 4.22
        make = message_factory.GetMessageClass
    else:  # older protobuf (3.20 - 4.21)
        make = message_factory.MessageFactory(pool).GetPrototype
    return {
        name: make(pool.FindMessageTypeByName(f"alexnet_caffe.{name}"))
        for name in ("BlobShape", "BlobProto", "V0LayerParameter", "V1LayerParameter", "LayerParameter", "NetParameter")
    }


def caffe_message(name: str) -> Any:
    """A new, empty message of the caffe.proto subset (tests write synthetic files with these)."""
    return _caffe_messages()[name]()


def blob_array(blob: Any) -> np.ndarray:
    """A BlobProto's values as float32, shaped by ``shape`` or the legacy num/channels/height/width."""
    values = np.asarray(blob.data if len(blob.data) else blob.double_data, dtype=np.float32)
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    else:
        shape = tuple(int(d) for d in (blob.num, blob.channels, blob.height, blob.width))
        # A 2014 V1 file stores fc weights as (1, 1, out, in) and biases as (1, 1, 1, out).
        while len(shape) > 1 and shape[0] == 1:
            shape = shape[1:]
    if int(np.prod(shape)) != values.size:
        raise AlexNetError(f"a blob declares shape {shape} but holds {values.size} values")
    return values.reshape(shape)


def read_caffemodel(path: Path) -> Blobs:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AlexNetError(f"cannot read {path}: {e.strerror}") from None
    decode_error = _protobuf_decode_error(".caffemodel files")
    net = _caffe_messages()["NetParameter"]()
    try:
        net.ParseFromString(data)
    except decode_error as e:
        raise AlexNetError(f"{path} is not a .caffemodel (protobuf NetParameter): {e}") from None
    layers: list[tuple[str, Any]] = [(layer.name, layer.blobs) for layer in net.layer]
    for v1 in net.layers:
        if v1.HasField("layer"):  # V0, wrapped in V1
            layers.append((v1.layer.name, v1.layer.blobs))
        else:
            layers.append((v1.name, v1.blobs))
    blobs: Blobs = {}
    for name, layer_blobs in layers:
        if len(layer_blobs) == 0:
            continue
        if len(layer_blobs) != 2:
            raise AlexNetError(f"{path}: layer {name} has {len(layer_blobs)} blobs; expected weight and bias")
        try:
            blobs[name] = (blob_array(layer_blobs[0]), blob_array(layer_blobs[1]).reshape(-1))
        except AlexNetError as e:
            raise AlexNetError(f"{path}: layer {name}: {e}") from None
    if not blobs:
        raise AlexNetError(f"{path} holds no layers with weights; expected Caffe's bvlc_alexnet (conv1 ... fc8)")
    return blobs


def read_caffe_mean(path: Path) -> np.ndarray:
    """Caffe's mean image (3, H, W) in BGR order, 0-255, from a .binaryproto BlobProto or a .npy array."""
    if path.suffix == ".npy":
        try:
            mean = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise AlexNetError(f"cannot read mean image {path}: {e}") from None
    else:
        decode_error = _protobuf_decode_error("Caffe's .binaryproto mean")
        blob = _caffe_messages()["BlobProto"]()
        try:
            blob.ParseFromString(path.read_bytes())
            mean = blob_array(blob)
        except (OSError, decode_error, AlexNetError) as e:
            raise AlexNetError(f"cannot read mean image {path} (a Caffe .binaryproto): {e}") from None
    mean = np.asarray(mean, dtype=np.float32)
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3 or mean.shape[0] != 3:
        raise AlexNetError(f"mean image {path} has shape {mean.shape}; expected (3, H, W) in BGR order")
    return mean


# --------------------------------------------------------------------------------------
# Caffe: the converted .npy, through an unpickler that only builds NumPy arrays (files.py)


class _NpyUnpickler(ArrayUnpickler):
    """files.py's array-only unpickler, with the refusal worded for a weights file."""

    def refusal(self, module: str, name: str) -> str:
        return f"{module}.{name} is not a NumPy array part"


def load_pickled_npy(path: Path) -> Any:
    """The object in an ``np.save``'d object array (a pickled dict), without running code."""
    from numpy.lib import format as npformat

    try:
        with open(path, "rb") as f:
            version = npformat.read_magic(f)
            if version == (1, 0):
                _, _, dtype = npformat.read_array_header_1_0(f)
            elif version == (2, 0):
                _, _, dtype = npformat.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            if not dtype.hasobject:
                f.seek(0)
                array = np.load(f, allow_pickle=False)
                raise AlexNetError(
                    f"{path} holds a plain {array.dtype} array of shape {array.shape}; "
                    "expected the converted bvlc_alexnet layout, a dict {layer: [W, b]}"
                )
            # Python 2 pickles (the original bvlc_alexnet.npy) need latin1 for their array bytes.
            obj = load_array_pickle(f, encoding="latin1", unpickler=_NpyUnpickler)
    except AlexNetError:
        raise
    except pickle.UnpicklingError as e:
        raise AlexNetError(f"refusing {path}: its pickle holds more than NumPy arrays ({e})") from None
    except (OSError, ValueError, EOFError, TypeError, AttributeError, IndexError) as e:
        raise AlexNetError(f"cannot read {path}: damaged or not a .npy file ({e})") from None
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    return obj


def read_caffe_npy(path: Path) -> Blobs:
    """The converted bvlc_alexnet.npy as Caffe-layout (weight, bias) pairs."""
    obj = load_pickled_npy(path)
    if not isinstance(obj, dict):
        raise AlexNetError(f"{path} holds a {type(obj).__name__}; expected a dict {{layer: [W, b]}}")
    raw: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, value in obj.items():
        if isinstance(value, dict) and {"weights", "biases"} <= set(value):
            value = (value["weights"], value["biases"])
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(a, np.ndarray) for a in value)):
            raise AlexNetError(f"{path}: layer {name!r} is not a [weight, bias] pair of arrays")
        raw[str(name)] = (np.asarray(value[0], dtype=np.float32), np.asarray(value[1], dtype=np.float32).reshape(-1))
    if "conv1" not in raw:
        raise AlexNetError(f"{path} has layers {', '.join(sorted(raw)) or 'none'}; expected conv1 ... fc8")
    conv1 = raw["conv1"][0].shape
    if len(conv1) == 4 and conv1[1:] == (3, 11, 11):
        check_layers(raw, path)
        return raw  # already Caffe's layout, e.g. (96, 3, 11, 11)
    if len(conv1) != 4 or conv1[:3] != (11, 11, 3):
        raise AlexNetError(
            f"{path}: conv1 weight has shape {conv1}; expected (11, 11, 3, 96) (converted TensorFlow layout) "
            "or (96, 3, 11, 11) (Caffe layout)"
        )
    blobs: Blobs = {}
    for name, (w, b) in raw.items():
        if w.ndim == 4:
            w = w.transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
        elif w.ndim == 2:
            w = w.T  # (in, out) -> (out, in)
        blobs[name] = (np.ascontiguousarray(w), b)
    check_layers(blobs, path)
    # fc6's inputs were re-ordered for NHWC flattening: (h, w, c) -> (c, h, w). c is
    # conv5's output count (256), h = w = 6 for 227 inputs.
    w6, channels = blobs["fc6"][0], blobs["conv5"][0].shape[0]
    side = math.isqrt(w6.shape[1] // channels)
    if side * side * channels != w6.shape[1]:
        raise AlexNetError(
            f"{path}: fc6 has {w6.shape[1]} inputs; expected conv5's {channels} maps times a square (256 x 6 x 6 = 9216)"
        )
    w6 = w6.reshape(w6.shape[0], side, side, channels).transpose(0, 3, 1, 2).reshape(w6.shape[0], -1)
    blobs["fc6"] = (np.ascontiguousarray(w6), blobs["fc6"][1])
    return blobs


# --------------------------------------------------------------------------------------
# Caffe blobs -> the paper variant


def check_layers(blobs: Blobs, source: Path) -> None:
    missing = [name for name in CAFFE_LAYERS if name not in blobs]
    if missing:
        raise AlexNetError(
            f"{source} lacks layer(s) {', '.join(missing)}; found {', '.join(blobs) or 'none'} "
            f"(expected bvlc_alexnet's {', '.join(CAFFE_LAYERS)})"
        )


def caffe_model_config(blobs: Blobs) -> ModelConfig:
    """The paper variant as Caffe's bvlc_alexnet: 227 input, no conv1 padding, Caffe's LRN.

    Widths come from the file (96 conv1 filters and 4096 fc units for bvlc_alexnet, so
    ``width=1``); a network of the same pattern at another width loads too, which is what
    lets the tests use small files. :func:`caffe_state_dict` checks every shape.
    """
    return ModelConfig(
        name="paper",
        num_classes=blobs["fc8"][0].shape[0],
        lrn="caffe",
        conv1_padding=0,
        input_size=227,
        towers=2,
        width=blobs["conv1"][0].shape[0] / 96,
        fc_width=blobs["fc7"][0].shape[0],
        dropout_style="inverted",  # Caffe's Dropout layer scales kept units by 1/(1-p) in training
    )


def caffe_state_dict(blobs: Blobs, expected: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Caffe-layout blobs as the paper variant's state_dict, conv1 turned from BGR to RGB input."""
    check_layers(blobs, source)
    state: dict[str, torch.Tensor] = {}
    for name in CAFFE_LAYERS:
        w, b = blobs[name]
        if name == "conv1" and w.ndim == 4 and w.shape[1] == 3:
            w = w[:, ::-1]  # input channels B, G, R -> R, G, B
        for suffix, value in (("weight", w), ("bias", b)):
            key = f"{name}.{suffix}"
            if tuple(value.shape) != tuple(expected[key].shape):
                raise AlexNetError(
                    f"{source}: {name} {suffix} has shape {tuple(value.shape)}; "
                    f"bvlc_alexnet's layout (two towers, 227 input) expects {tuple(expected[key].shape)}"
                )
            state[key] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    return state


def caffe_preprocess(mean_bgr: np.ndarray | None, image_size: int = 256, crop_size: int = 227) -> Preprocess:
    """Caffe's mean (per-pixel image or the per-channel default) as RGB 0-255; no scaling (Caffe's scale is 1)."""
    if mean_bgr is None:
        mean = torch.tensor(CAFFE_MEAN_BGR[::-1]).view(3, 1, 1).expand(3, image_size, image_size).contiguous()
    else:
        if mean_bgr.shape[1:] != (image_size, image_size):
            raise AlexNetError(
                f"the mean image is {mean_bgr.shape[1]}x{mean_bgr.shape[2]}; expected {image_size}x{image_size}, "
                "the size images are rescaled to before the 227 crop"
            )
        mean = torch.from_numpy(np.ascontiguousarray(mean_bgr[::-1], dtype=np.float32))
    return Preprocess(mean.float(), torch.ones(3), torch.zeros(3), torch.eye(3), crop_size)
