"""Checkpoints that describe themselves, written atomically and read without running code.

A checkpoint is one ``torch.save`` file of plain containers and tensors: the resolved
config, the (unwrapped) model's state_dict, optimizer and schedule state, epoch, batch
and step, random states, the preprocessing (mean image, PCA eigens) and the class names
(the label ids -- folder names, WordNet ids for ImageNet -- and optionally readable
``class_names``). It is read with ``torch.load(weights_only=True)``, which refuses pickled
code, so a checkpoint from a stranger cannot execute anything; its structure, tensor
shapes and the network its config describes are checked before anything is built from it.

The same content minus the training state can be written as ``.safetensors`` (tensors
``model.*`` and ``preprocess.*``; config, classes and the rest as JSON strings in the
header's metadata). :func:`load_checkpoint` reads either, so evaluate, predict, features
and serve accept both.

Writes go to a temporary file in the same folder, are fsynced, then renamed over the
old file: a crash at any moment leaves either the old or the new checkpoint, never half
of one. A write that fails (a full disk) removes its temporary file and raises an
AlexNetError that says the previous checkpoint is intact.

A run directory's files (``last.pt``, ``best.pt``, the ``checkpoints/step-N.pt`` history
and the fallback on it when ``last.pt`` is damaged) are alexnet.train.checkpoints'.
"""

from __future__ import annotations

import errno
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from alexnet import config as config_lib
from alexnet.data.augment import Preprocess, check_preprocess_state
from alexnet.errors import AlexNetError
from alexnet.files import atomic_write, torch_load
from alexnet.models.alexnet import AlexNet, build_model
from alexnet.models.interface import attach_inference

log = logging.getLogger("alexnet")

FORMAT = "alexnet-checkpoint"
VERSION = 2  # 2 added the position inside an epoch, partial epoch sums and random states


def write_error(path: Path, e: OSError) -> AlexNetError:
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += " (free space or raise the quota, then resume)"
    previous = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
    return AlexNetError(f"cannot write checkpoint {path}: {reason}; {previous}")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write state atomically; a failed write raises AlexNetError and leaves the old file."""
    path = Path(path)
    state = {"format": FORMAT, "version": VERSION, **state}
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except OSError as e:
        raise write_error(path, e) from None


def load_checkpoint(path: str | Path, *, for_training: bool = False) -> dict[str, Any]:
    """Load and check a checkpoint (.pt or .safetensors); every failure is a one-line AlexNetError.

    ``for_training`` also requires and checks the optimizer, schedule and position a resume reads.
    """
    return _load_checked(Path(path), for_training)[0]


def _load_checked(path: Path, for_training: bool) -> tuple[dict[str, Any], config_lib.Config, AlexNet]:
    """load_checkpoint's state, with the parsed config and the (meta-device) network the checks built."""
    if path.is_dir():
        path = path / "last.pt"  # a run directory stands for its latest checkpoint
    if not path.exists():
        raise AlexNetError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        if for_training:
            raise AlexNetError(f"{path} holds weights only (safetensors); resuming a run needs its last.pt")
        state = _load_safetensors(path)
    else:
        state = torch_load(path)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            hint = ""
            if isinstance(state, dict) and "features.0.weight" in state:
                hint = "; for torchvision weights run: alexnet import-weights FILE --format torchvision --out CKPT"
            raise AlexNetError(
                f"{path} is not an alexnet checkpoint (a bare state_dict or another program's file){hint}"
            )
    _check_version(state, path)
    _check_structure(state, path, for_training)
    parsed, model = _check_network(state, path)
    return state, parsed, model


def _check_version(state: dict[str, Any], path: Path) -> None:
    version = state.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise AlexNetError(
            f"{path} was written by a newer alexnet (format {version!r}, this one reads up to {VERSION})"
        )


# Metadata keys of a .safetensors checkpoint; each value is a JSON string (safetensors
# metadata is str -> str).
_SAFETENSORS_META = ("format", "version", "config", "classes", "class_names", "crop_size", "source", "meta")


def save_safetensors(path: Path, state: dict[str, Any]) -> None:
    """Write the inference part of a checkpoint state as .safetensors, atomically.

    Tensors are contiguous CPU copies (safetensors refuses views and shared storage).
    """
    pre = state["preprocess"]
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in state["model"].items()}
    tensors.update({f"preprocess.{k}": pre[k].cpu().contiguous() for k in ("mean", "std", "eigvals", "eigvecs")})
    values = {
        "format": FORMAT,
        "version": VERSION,
        "config": state["config"],
        "classes": list(state["classes"]),
        "class_names": list(state["class_names"]) if state.get("class_names") else None,
        "crop_size": int(pre["crop_size"]),
        "source": state.get("source", ""),
        "meta": state.get("meta"),
    }
    metadata = {k: json.dumps(v) for k, v in values.items()}
    data = safetensors_bytes(tensors, metadata=metadata)
    atomic_write(Path(path), lambda f: f.write(data))


def _load_safetensors(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, OSError, ValueError) as e:
        raise AlexNetError(f"cannot read {path}: damaged or not a safetensors file ({e})") from None
    if meta.get("format") != json.dumps(FORMAT):
        found = ", ".join(sorted(meta)) or "no metadata"
        raise AlexNetError(
            f"{path} is a safetensors file but not an alexnet checkpoint "
            f"(expected metadata format={FORMAT!r}; found {found})"
        )
    try:
        values = {k: json.loads(meta[k]) for k in _SAFETENSORS_META if k in meta}
        state: dict[str, Any] = {
            "format": values["format"],
            "version": values["version"],
            "config": values["config"],
            "classes": values["classes"],
            "model": {k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
            "preprocess": {
                **{k: tensors[f"preprocess.{k}"] for k in ("mean", "std", "eigvals", "eigvecs")},
                "crop_size": values["crop_size"],
            },
            "source": values.get("source", ""),
        }
    except (KeyError, json.JSONDecodeError) as e:
        raise AlexNetError(
            f"{path}: alexnet safetensors metadata is incomplete or damaged (missing or bad {e})"
        ) from None
    if values.get("class_names"):
        state["class_names"] = values["class_names"]
    if isinstance(values.get("meta"), dict):
        state["meta"] = values["meta"]
    return state


# What a checkpoint must hold, by use; anything else in the file is ignored.
_INFERENCE_KEYS: dict[str, type | tuple[type, ...]] = {
    "config": dict,
    "model": dict,
    "preprocess": dict,
    "classes": list,
}
_TRAINING_KEYS: dict[str, type | tuple[type, ...]] = {
    "optimizer": dict,
    "schedule": dict,
    "epoch": int,
    "step": int,
    "best_val_top1_error": (int, float),
}


def _malformed(path: Path, what: str) -> AlexNetError:
    return AlexNetError(f"checkpoint {path} is malformed: {what}")


def _check_structure(state: dict[str, Any], path: Path, for_training: bool) -> None:
    """Types and shapes of what inference and resume read, so a crafted file fails here
    with a clear message rather than deep inside the network or the optimizer."""
    required = {**_INFERENCE_KEYS, **(_TRAINING_KEYS if for_training else {})}
    for key, kind in required.items():
        if key not in state:
            raise _malformed(path, f"'{key}' is missing")
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise _malformed(path, f"'{key}' should be {_type_name(kind)}, found {type(state[key]).__name__}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()):
        raise _malformed(path, "'model' should map parameter names to tensors")
    classes = state["classes"]
    if not classes or not all(isinstance(c, str) for c in classes) or len(set(classes)) != len(classes):
        raise _malformed(path, "'classes' should be a non-empty list of distinct class names")
    names = state.get("class_names")
    if names is not None and (
        not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) != len(classes)
    ):
        found = f"{len(names)} names" if isinstance(names, list) else type(names).__name__
        raise _malformed(
            path, f"'class_names' should be a list of {len(classes)} strings, one per class; found {found}"
        )
    try:
        check_preprocess_state(state["preprocess"])
    except AlexNetError as e:
        raise _malformed(path, str(e)) from None
    cfg = state["config"]
    if not isinstance(cfg.get("model"), dict):
        raise _malformed(path, "config section 'model' is missing or not a mapping")
    for section, values in cfg.items():
        if not isinstance(section, str) or not isinstance(values, dict):
            raise _malformed(path, f"config section {section!r} should be a mapping, found {type(values).__name__}")
    if not for_training:
        # A NaN weight or mean makes every prediction NaN: refuse it rather than answer.
        for key, value in state["model"].items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise _malformed(path, f"weights '{key}' hold NaN or infinite values")


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {dict: "a mapping", list: "a list", int: "an integer", float: "a number"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _check_network(state: dict[str, Any], path: str | Path) -> tuple[config_lib.Config, AlexNet]:
    """The config, and the network it describes built on the meta device (no memory),
    checked against the file: parameter shapes, one class per output, and a crop size
    the network accepts. Returns the config and the (meta) network."""
    cfg = state["config"]
    if not isinstance(cfg, dict) or not all(isinstance(v, dict) for v in cfg.values()):
        raise _malformed(Path(path), "'config' should be a mapping of sections")
    if not isinstance(cfg.get("model"), dict):
        raise _malformed(Path(path), "config section 'model' is missing or not a mapping")
    parsed = config_lib.from_dict(cfg, f"checkpoint {path}")
    try:
        with torch.device("meta"):
            model = build_model(parsed.model)
    except (ValueError, RuntimeError, ZeroDivisionError, OverflowError, TypeError) as e:
        raise AlexNetError(
            f"checkpoint {path}: its config 'model' describes no network that can be built ({e})"
        ) from None
    weights = state["model"]
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items()}
    missing, unexpected = sorted(wanted.keys() - found.keys()), sorted(found.keys() - wanted.keys())
    if missing or unexpected:
        what = f"lack {', '.join(missing[:3])}" if missing else f"have unknown {', '.join(unexpected[:3])}"
        raise AlexNetError(f"checkpoint {path} does not match its own config: its weights {what}")
    for key, shape in wanted.items():
        if found[key] != shape:
            raise AlexNetError(
                f"checkpoint {path} does not match its own config: {key} is {found[key]} in the file, "
                f"{shape} for the configured network"
            )
    classes = state.get("classes")
    outputs = parsed.model.num_classes
    if isinstance(classes, list) and len(classes) != outputs:
        raise AlexNetError(
            f"checkpoint {path} is malformed: 'classes' lists {len(classes)} classes for a network with {outputs} outputs"
        )
    pre = state.get("preprocess")
    crop = pre.get("crop_size") if isinstance(pre, dict) else None
    if isinstance(crop, int) and not isinstance(crop, bool):
        # A forward pass on the meta device: shapes only, nothing allocated.
        try:
            out = model(torch.empty(1, 3, crop, crop, device="meta"))
        except RuntimeError as e:
            raise AlexNetError(
                f"checkpoint {path} is malformed: preprocess 'crop_size' {crop} does not fit its network "
                f"(configured for {parsed.model.input_size} px): {str(e).splitlines()[0]}"
            ) from None
        if tuple(out.shape) != (1, outputs):
            raise AlexNetError(
                f"checkpoint {path} is malformed: preprocess 'crop_size' {crop} gives outputs {tuple(out.shape)}"
            )
    return parsed, model


def model_from_checkpoint(state: dict[str, Any], path: str | Path = "(in memory)") -> AlexNet:
    """The network the checkpoint's config describes, with its weights.

    The network is first built on the meta device (no memory) and its parameter shapes
    compared with the tensors in the file: a crafted config that asks for a huge network
    is refused before anything is allocated, and real memory is only ever as large as
    the weights actually present in the file.
    """
    _, model = _check_network(state, path)
    return _with_weights(model, state)


def _with_weights(meta_model: AlexNet, state: dict[str, Any]) -> AlexNet:
    """The checked meta-device network, materialised on the CPU with the checkpoint's weights."""
    model = meta_model.to_empty(device="cpu")
    model.load_state_dict(state["model"])
    return model


@dataclass
class LoadedModel:
    """What inference needs from a checkpoint."""

    model: AlexNet  # eval mode, on the requested device
    preprocess: Preprocess
    classes: list[str]  # label ids: the class folder names (WordNet ids for ImageNet)
    names: list[str]  # readable names to show; the ids when the checkpoint has none
    config: dict[str, Any]


def load_model(
    path: str | Path, device: torch.device | str = "cpu", *, name: str | None = None, num_classes: int | None = None
) -> LoadedModel:
    """A checkpoint's model in eval mode with what inference needs; with ``name`` /
    ``num_classes``, refuse any other, e.g. ``load_model("best.pt", name="torchvision",
    num_classes=1000)`` names what the file holds instead of a wall of state_dict keys."""
    state, parsed, meta_model = _load_checked(Path(path), for_training=False)
    saved = parsed.model
    if (name is not None and saved.name != name) or (num_classes is not None and saved.num_classes != num_classes):
        want = f"'{name or saved.name}' with {num_classes or saved.num_classes} classes"
        raise AlexNetError(f"{path} holds a '{saved.name}' model with {saved.num_classes} classes; expected {want}")
    model = _with_weights(meta_model, state).to(device).eval()
    classes = list(state["classes"])
    names = list(state.get("class_names") or classes)
    pre = Preprocess.from_state_dict(state["preprocess"])
    meta = state.get("meta")  # what the weights' publisher says (named weights); absent from trained runs
    attach_inference(
        model, pre, classes, names, str(state.get("source") or path), meta if isinstance(meta, dict) else None
    )
    return LoadedModel(model=model, preprocess=pre.to(device), classes=classes, names=names, config=state["config"])


def load_for_inference(path: str | Path, device: torch.device | str = "cpu") -> tuple[AlexNet, Preprocess, list[str]]:
    """The model in eval mode on device, its preprocessing, and its class ids."""
    loaded = load_model(path, device)
    return loaded.model, loaded.preprocess, loaded.classes


def load_pretrained(path: str | Path, num_classes: int | None = None, device: torch.device | str = "cpu") -> AlexNet:
    """A checkpoint's network in train mode, to train further in Python; with ``num_classes``
    other than its own, fc8 re-initialised by ``reset_classifier`` and every other layer
    copied, as timm's ``create_model(..., pretrained=True, num_classes=N)`` does. Seed with
    ``torch.manual_seed`` first for a reproducible fc8. ``alexnet train --init-from`` is
    the same from the command line, with the checkpoint's preprocessing (train/finetune.py).
    """
    state = load_checkpoint(path)
    model = model_from_checkpoint(state, path)
    if num_classes is not None and num_classes != model.config.num_classes:
        model.reset_classifier(num_classes)
    return model.to(device).train()
