"""Fine-tuning: a new run whose network starts from another checkpoint's weights.

``alexnet train --data DIR --init-from CKPT`` (``run.init_from``). CKPT is any alexnet
checkpoint, ``.pt`` or ``.safetensors``: trained here, or made by ``alexnet import-weights``
from torchvision's or Caffe's files. What the run takes from it:

* every layer's weights. fc8 too when the data has the checkpoint's classes (in another
  order its rows are permuted to match); otherwise fc8 is re-initialised for the data's
  classes with the model's rule (``reset_classifier``), seeded by ``run.seed``;
* the network's configuration (every ``model.*`` key but num_classes and input_size) and
  the preprocessing keys ``data.image_size``, ``data.crop_size``, ``data.normalize``, each
  unless the user sets it explicitly (``--set``, ``--model``, or a key of an explicit
  ``--preset``): torchvision's weights expect ImageNet's mean and std at 256/224, and a
  mean image computed afresh on other images would silently shift every input;
* the normalisation itself (the mean image, or mean and std) from the checkpoint's
  preprocessing while data.normalize and data.image_size are the checkpoint's. The PCA
  colour eigenvectors for the lighting augmentation come from the new training images
  (the paper computes them on the training set; imported weights carry none).

``optim.freeze`` (``--freeze LAYER``) fixes LAYER and every layer before it, by the
paper's names conv1 ... fc7 for both variants (torchvision's features.0/3/6/8/10,
classifier.1/4): their parameters get ``requires_grad`` False and are left out of the
optimizer, so they get no gradient, no weight decay and no velocity. ``optim.backbone_lr_scale``
multiplies the learning rate of every layer but fc8 (optim.param_groups); the plateau
schedule divides every group by 10 together, and resume restores each group's rate.

The run is an ordinary run from there on (resumable bit for bit, evaluable, exportable);
its config records the source's absolute path and sha256 (run.init_from, run.init_sha256).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alexnet import config as config_lib
from alexnet.checkpoint import load_checkpoint
from alexnet.config import Config, DataConfig, ModelConfig
from alexnet.data.augment import Preprocess, make_preprocess
from alexnet.data.stats import DataStats
from alexnet.data.store import sha256_file
from alexnet.errors import AlexNetError
from alexnet.models.alexnet import LAYER_NAMES, AlexNet, build_model

log = logging.getLogger("alexnet")

# The data keys that describe how the checkpoint's network saw its inputs.
INHERITED_DATA = ("image_size", "crop_size", "normalize")
# Model keys the data decides: the classes, and the crop (checked against fc6 instead).
NOT_INHERITED_MODEL = ("num_classes", "input_size")


@dataclass(frozen=True)
class Source:
    """The checkpoint a fine-tuning run starts from."""

    path: Path  # absolute; a run directory stands for its last.pt
    sha256: str
    state: dict[str, Any]  # as load_checkpoint returns it
    config: Config  # its parsed config


def source_file(init_from: str | Path) -> Path:
    path = Path(init_from).expanduser()
    return (path / "last.pt" if path.is_dir() else path).resolve()


def load_source(init_from: str | Path, expected_sha256: str = "") -> Source:
    """The checked checkpoint; AlexNetError when it is missing, not a checkpoint, or not the
    file whose sha256 the config names (a config reused from an earlier run)."""
    path = source_file(init_from)
    state = load_checkpoint(path)  # one-line errors: missing, a bare state_dict, damaged
    digest = sha256_file(path)
    if expected_sha256 and digest != expected_sha256:
        raise AlexNetError(
            f"{path} has sha256 {digest[:12]}..., not the {expected_sha256[:12]}... that run.init_sha256 names: "
            "the file changed since; set run.init_sha256= (empty) to start from it as it is now"
        )
    return Source(path, digest, state, config_lib.from_dict(state["config"], f"checkpoint {path}"))


def _flat_keys(values: dict[str, Any]) -> set[str]:
    keys = set()
    for key, value in values.items():
        if isinstance(value, dict):
            keys |= {f"{key}.{sub}" for sub in value}
        elif "." in str(key):
            keys.add(str(key))
    return keys


def finetune_config(
    init_from: str | Path,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    default_preset: str = "paper",
) -> Config:
    """The config of a run that fine-tunes ``init_from``: the checkpoint's network and
    preprocessing keys, except those that ``overrides`` (``section.key`` -> value) or an
    explicit ``preset`` set; ``default_preset`` supplies the rest (the optimiser's recipe)."""
    source = load_source(init_from)
    saved = source.config
    explicit = set(overrides or {}) | (_flat_keys(config_lib.load_preset(preset)) if preset else set())
    inherited = {f"data.{key}": getattr(saved.data, key) for key in INHERITED_DATA}
    for f in dataclasses.fields(ModelConfig):
        if f.name not in NOT_INHERITED_MODEL:
            inherited[f"model.{f.name}"] = getattr(saved.model, f.name)
    values = {k: v for k, v in inherited.items() if k not in explicit}
    values.update(overrides or {})
    values["run.init_from"] = str(source.path)
    cfg = config_lib.resolve(preset or default_preset, values)
    check_variant(cfg.model, source)
    return cfg


def check_variant(model: ModelConfig, source: Source) -> None:
    saved = source.config.model.name
    if model.name != saved:
        raise AlexNetError(
            f"{source.path} holds a '{saved}' network; this run asks for '{model.name}' (--model, --preset or "
            f"model.name): leave them out to take the checkpoint's, or give --model {saved}"
        )


def _head_keys(model: AlexNet) -> set[str]:
    head = {id(p) for p in model.get_classifier().parameters()}
    return {name for name, p in model.named_parameters() if id(p) in head}


def _check_shapes(model: AlexNet, source: Source, head: set[str]) -> None:
    """Every copied tensor has the shape the run's network needs; else one line naming why."""
    weights, saved = source.state["model"], source.config.model
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in head}
    source_head = _head_keys_of(source)
    found = {k: tuple(v.shape) for k, v in weights.items() if k not in source_head}
    if wanted.keys() != found.keys():
        odd = sorted(wanted.keys() ^ found.keys())
        raise AlexNetError(
            f"{source.path}: its layers differ from this run's network ({', '.join(odd[:3])}); "
            "leave the model.* options out to take the checkpoint's"
        )
    fc6 = "fc6.weight" if model.config.name == "paper" else "classifier.1.weight"
    for key, shape in wanted.items():
        if found[key] == shape:
            continue
        if key == fc6:
            c, s, _ = model.feature_shape
            raise AlexNetError(
                f"data.crop_size {model.config.input_size} does not fit {source.path}: its fc6 takes {found[key][1]} "
                f"inputs ({saved.input_size} px crops), this crop gives {c}x{s}x{s} = {shape[1]}; "
                f"use data.crop_size={saved.input_size}"
            )
        raise AlexNetError(
            f"{source.path}: {key} is {found[key]} there but {shape} in this run's network; "
            "leave the model.* options out to take the checkpoint's"
        )


def _head_keys_of(source: Source) -> set[str]:
    prefix = "fc8." if source.config.model.name == "paper" else "classifier.6."
    return {k for k in source.state["model"] if k.startswith(prefix)}


def init_model(model_cfg: ModelConfig, source: Source, classes: list[str], seed: int) -> AlexNet:
    """The run's network (``model_cfg``: the data's classes and crop) with the source's weights.

    fc8: kept when the classes are the checkpoint's, rows permuted when they are the same
    classes in another order, re-initialised (seeded by ``seed``) otherwise.
    """
    check_variant(model_cfg, source)
    try:
        with torch.device("meta"), torch.no_grad():
            model = build_model(model_cfg)
            model(torch.empty(1, 3, model_cfg.input_size, model_cfg.input_size))  # shapes only
    except RuntimeError as e:
        raise AlexNetError(
            f"data.crop_size {model_cfg.input_size} is too small for {source.path}'s network: {str(e).splitlines()[0]}"
        ) from None
    head = _head_keys(model)
    _check_shapes(model, source, head)
    model = model.to_empty(device="cpu")
    weights, source_head = source.state["model"], _head_keys_of(source)
    copied = {k: v for k, v in weights.items() if k not in source_head}
    missing, unexpected = model.load_state_dict(copied, strict=False)
    assert set(missing) == head and not unexpected, (missing, unexpected)
    saved_classes = list(source.state["classes"])
    layers = len(model.named_layers())
    if sorted(saved_classes) == sorted(classes):
        order = torch.tensor([saved_classes.index(c) for c in classes])
        model.get_classifier().load_state_dict({k.rsplit(".", 1)[1]: weights[k][order] for k in source_head})
        kept = "fc8 kept" if saved_classes == classes else "fc8's rows reordered to this data's class order"
        log.info(
            "initialised from %s (sha256 %s...): all %d layers copied, %s",
            source.path,
            source.sha256[:12],
            layers,
            kept,
        )
    else:
        torch.manual_seed(seed)
        model.reset_classifier(len(classes))
        log.info(
            "initialised from %s (sha256 %s...): %d layers copied; fc8 re-initialised for %d classes (the checkpoint has %d)",
            source.path, source.sha256[:12], layers - 1, len(classes), len(saved_classes),
        )  # fmt: skip
    return model


def init_preprocess(data: DataConfig, source: Source, stats: DataStats) -> Preprocess:
    """The normalisation the source's weights were trained with, the lighting eigenvectors of this data."""
    saved = source.config.data
    pre = Preprocess.from_state_dict(source.state["preprocess"])
    mode = data.normalize
    if mode == saved.normalize and (mode == "imagenet" or pre.image_size == data.image_size):
        if mode == "imagenet":  # per-channel constants: the same at any image size
            return make_preprocess(
                mode, data.image_size, data.crop_size, pre.mean, pre.std, stats.eigvals, stats.eigvecs
            )
        log.info("normalising as %s was trained: its %s (%d px)", source.path.name, mode, pre.image_size)
        return Preprocess(pre.mean, pre.std, stats.eigvals, stats.eigvecs, data.crop_size)
    log.warning(
        "data.normalize %s at %d px differs from %s's %s at %d px: normalising with this data's statistics, "
        "which its copied weights did not see",
        mode, data.image_size, source.path.name, saved.normalize, pre.image_size,
    )  # fmt: skip
    try:
        return make_preprocess(
            mode, data.image_size, data.crop_size, stats.mean_image, stats.pixel_std, stats.eigvals, stats.eigvecs
        )
    except ValueError as e:
        raise AlexNetError(f"data.normalize: {e}") from None


def freeze(model: nn.Module, layer: str) -> list[str]:
    """Fix ``layer`` and every layer before it (requires_grad False); returns the names frozen.

    A layer the network lacks (model.remove_conv) is skipped. optim.param_groups leaves
    frozen parameters out of the optimizer.
    """
    if layer in ("", "none"):
        return []
    present = model.named_layers()
    names = [n for n in LAYER_NAMES[: LAYER_NAMES.index(layer) + 1] if n in present]
    for name in names:
        for p in present[name].parameters():
            p.requires_grad_(False)
    return names
