"""Import pretrained AlexNet weights into ordinary alexnet checkpoints.

Three sources, each becoming a checkpoint that evaluate, predict, features, export and
serve use like a trained one (config, model, preprocessing and class names inside):

``torchvision``
    ``torchvision.models.alexnet``'s state_dict (e.g. ``alexnet-owt-7be5be79.pth``), read
    with ``torch.load(weights_only=True)``. Goes into the torchvision variant, whose
    module names are torchvision's, unchanged. Preprocessing is torchvision's:
    shorter side 256, centre 224, per-channel ImageNet mean and std.

``caffemodel``, ``caffe-npy``
    Caffe's ``bvlc_alexnet.caffemodel`` (a protobuf ``NetParameter``) and its widely used
    conversion to a pickled NumPy file (``bvlc_alexnet.npy``): read by caffe.py, without
    Caffe and without running code, into the paper variant set up as Caffe's network
    (two towers, 227x227 input, Caffe's LRN and mean), taking RGB like every other
    checkpoint here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from alexnet.checkpoint import save_checkpoint, save_safetensors
from alexnet.config import Config
from alexnet.data.augment import Preprocess, make_preprocess
from alexnet.data.imagenet import NUM_CLASSES, imagenet_classes
from alexnet.errors import AlexNetError
from alexnet.files import torch_load
from alexnet.models.alexnet import ModelConfig, build_model
from alexnet.tools.caffe import (
    caffe_model_config,
    caffe_preprocess,
    caffe_state_dict,
    check_layers,
    read_caffe_mean,
    read_caffe_npy,
    read_caffemodel,
)

FORMATS = ("torchvision", "caffe-npy", "caffemodel")


# --------------------------------------------------------------------------------------
# Classes


def resolve_classes(
    num_outputs: int, classes_file: str | Path | None, source: Path
) -> tuple[list[str], list[str] | None]:
    """Class ids and readable names for a final layer with ``num_outputs`` units.

    ``classes_file`` holds one class per line, ``id`` or ``id<TAB>name``; without it the
    layer must have the 1000 ILSVRC-2012 outputs, which get the packaged WordNet ids and names.
    """
    if classes_file is None:
        if num_outputs != NUM_CLASSES:
            raise AlexNetError(
                f"{source}: the last layer has {num_outputs} outputs; expected {NUM_CLASSES} (ILSVRC-2012). "
                f"For other classes pass --classes FILE with {num_outputs} lines"
            )
        wnids, names = imagenet_classes()
        return list(wnids), list(names)
    try:
        lines = [line.rstrip("\n") for line in Path(classes_file).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise AlexNetError(f"cannot read classes file {classes_file}: {e}") from None
    rows = [line.split("\t", 1) for line in lines if line.strip() and not line.startswith("#")]
    if len(rows) != num_outputs:
        raise AlexNetError(
            f"classes file {classes_file} lists {len(rows)} classes; the weights in {source} have {num_outputs} outputs"
        )
    ids = [r[0].strip() for r in rows]
    if len(set(ids)) != len(ids):
        raise AlexNetError(f"classes file {classes_file} repeats class ids")
    names = [r[1].strip() if len(r) > 1 else r[0].strip() for r in rows]
    return ids, names if any(len(r) > 1 for r in rows) else None


# --------------------------------------------------------------------------------------
# torchvision


def read_torchvision(path: Path) -> dict[str, torch.Tensor]:
    """A torchvision AlexNet state_dict from a ``torch.save`` file (bare, or under "state_dict"/"model")."""
    raw = torch_load(path, "weights file")
    if isinstance(raw, dict) and not any(isinstance(v, torch.Tensor) for v in raw.values()):
        inner = raw.get("state_dict", raw.get("model"))
        raw = inner if isinstance(inner, dict) else raw
    if not isinstance(raw, dict) or not raw:
        raise AlexNetError(f"{path}: expected a state_dict of tensors; found {type(raw).__name__}")
    # nn.DataParallel saves its wrapped module's keys under "module."
    return {k.removeprefix("module."): v for k, v in raw.items() if isinstance(v, torch.Tensor)}


def _check_state_dict(
    found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], source: Path, what: str
) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        raise AlexNetError(
            f"{source} does not hold {what} weights: expected keys {', '.join(list(expected)[:3])}, ...; "
            f"missing {', '.join(missing[:4]) or 'none'}; unexpected {', '.join(unexpected[:4]) or 'none'}"
        )
    for key, value in expected.items():
        if tuple(found[key].shape) != tuple(value.shape):
            raise AlexNetError(
                f"{source}: {key} has shape {tuple(found[key].shape)}; {what} expects {tuple(value.shape)}"
            )


def import_torchvision(path: Path, classes_file: str | Path | None = None) -> dict[str, Any]:
    weights = read_torchvision(path)
    if "classifier.6.weight" not in weights:
        raise AlexNetError(
            f"{path} does not hold torchvision AlexNet weights: no classifier.6.weight among "
            f"{', '.join(list(weights)[:4])}{', ...' if len(weights) > 4 else ''}"
        )
    num_classes = weights["classifier.6.weight"].shape[0]
    ids, names = resolve_classes(num_classes, classes_file, path)
    cfg = Config()
    cfg.model = ModelConfig(name="torchvision", num_classes=num_classes)
    cfg.data.image_size, cfg.data.crop_size, cfg.data.normalize = 256, 224, "imagenet"
    model = build_model(cfg.model)
    _check_state_dict(weights, model.state_dict(), path, "torchvision AlexNet")
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    pre = make_preprocess("imagenet", 256, 224, torch.zeros(3, 256, 256), torch.ones(3), torch.zeros(3), torch.eye(3))
    return _checkpoint_state(cfg, model.state_dict(), pre, ids, names, f"torchvision weights {path.name}")


# --------------------------------------------------------------------------------------
# Caffe (caffe.py)


def import_caffe(
    path: Path, fmt: str, classes_file: str | Path | None = None, mean_file: str | Path | None = None
) -> dict[str, Any]:
    blobs = read_caffemodel(path) if fmt == "caffemodel" else read_caffe_npy(path)
    check_layers(blobs, path)
    ids, names = resolve_classes(blobs["fc8"][0].shape[0], classes_file, path)
    cfg = Config()
    cfg.model = caffe_model_config(blobs)
    cfg.data.image_size, cfg.data.crop_size, cfg.data.normalize = 256, 227, "mean-image"
    model = build_model(cfg.model)
    model.load_state_dict(caffe_state_dict(blobs, model.state_dict(), path))
    pre = caffe_preprocess(read_caffe_mean(Path(mean_file)) if mean_file else None)
    return _checkpoint_state(cfg, model.state_dict(), pre, ids, names, f"Caffe bvlc_alexnet weights {path.name}")


# --------------------------------------------------------------------------------------


def _checkpoint_state(
    cfg: Config,
    model_state: dict[str, torch.Tensor],
    pre: Preprocess,
    ids: list[str],
    names: list[str] | None,
    source: str,
) -> dict[str, Any]:
    state: dict[str, Any] = {
        "config": cfg.to_dict(),
        "model": model_state,
        "preprocess": pre.state_dict(),
        "classes": ids,
        "source": source,
    }
    if names is not None:
        state["class_names"] = names
    return state


def import_weights(
    src: str | Path, fmt: str, classes_file: str | Path | None = None, mean_file: str | Path | None = None
) -> dict[str, Any]:
    """A checkpoint state (see checkpoint.py) from pretrained weights in one of :data:`FORMATS`."""
    path = Path(src)
    if fmt not in FORMATS:
        raise AlexNetError(f"unknown weights format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise AlexNetError(f"weights file {path} does not exist")
    if mean_file is not None and fmt == "torchvision":
        raise AlexNetError("--mean applies to Caffe weights; torchvision's use the ImageNet per-channel mean and std")
    if fmt == "torchvision":
        return import_torchvision(path, classes_file)
    return import_caffe(path, fmt, classes_file, mean_file)


def write_checkpoint(state: dict[str, Any], out: str | Path) -> Path:
    """``.safetensors`` by suffix, else a torch checkpoint (.pt)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        save_safetensors(out, state)
    else:
        save_checkpoint(out, state)
    return out
