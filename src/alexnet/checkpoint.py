"""Checkpoints that describe themselves, written atomically and read without running code.

A checkpoint is one ``torch.save`` file of plain containers and tensors: the resolved
config, the (unwrapped) model's state_dict, optimizer and schedule state, epoch and step,
random states, the preprocessing (mean image, PCA eigens) and the class names (the
label ids -- folder names, WordNet ids for ImageNet -- and optionally readable
``class_names``). It is read with ``torch.load(weights_only=True)``, which refuses pickled
code, so a checkpoint from a stranger cannot execute anything.

The same content minus the training state can be written as ``.safetensors`` (tensors
``model.*`` and ``preprocess.*``; config, classes and the rest as JSON strings in the
header's metadata). :func:`load_checkpoint` reads either, so evaluate, predict, features
and serve accept both.

Writes go to a temporary file in the same folder, are fsynced, then renamed over the
old file: a crash at any moment leaves either the old or the new checkpoint, never half
of one.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from . import config as config_lib
from .augment import Preprocess
from .errors import AlexNetError
from .model import AlexNet, build_model

FORMAT = "alexnet-checkpoint"
VERSION = 1


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file beside path, fsync, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    state = {"format": FORMAT, "version": VERSION, **state}
    atomic_write(path, lambda f: torch.save(state, f))


def torch_load(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` on CPU; a damaged file or one holding code is a one-line AlexNetError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        unsupported = [line for line in lines if "unsupported global" in line.lower()]
        if unsupported:
            # weights_only's unpickler met a reference to code: refuse, never import it.
            raise AlexNetError(f"refusing {path}: it holds objects other than tensors and plain data ({unsupported[0]})") from None
        reason = next((line for line in lines if "Unsupported" in line), lines[0] if lines else type(e).__name__)
        raise AlexNetError(f"cannot read {what} {path}: damaged or not a PyTorch file ({reason})") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint (.pt or .safetensors); every failure is a one-line AlexNetError."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"  # a run directory stands for its latest checkpoint
    if not path.exists():
        raise AlexNetError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state = _load_safetensors(path)
        _check_state(state, path)
        return state
    state = torch_load(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        hint = ""
        if isinstance(state, dict) and "features.0.weight" in state:
            hint = "; for torchvision weights run: alexnet import-weights FILE --format torchvision --out CKPT"
        raise AlexNetError(
            f"{path} is not an alexnet checkpoint (a bare state_dict or another program's file){hint}"
        )
    _check_state(state, path)
    return state


def _check_state(state: dict[str, Any], path: Path) -> None:
    if state.get("version", 0) > VERSION:
        raise AlexNetError(f"{path} was written by a newer alexnet (format {state['version']} > {VERSION})")
    missing = [k for k in ("config", "model", "preprocess", "classes") if k not in state]
    if missing:
        raise AlexNetError(f"checkpoint {path} lacks {', '.join(missing)}; expected a file written by alexnet")
    names = state.get("class_names")
    if names is not None and len(names) != len(state["classes"]):
        raise AlexNetError(
            f"checkpoint {path} has {len(names)} class names for {len(state['classes'])} classes"
        )


# Metadata keys of a .safetensors checkpoint; each value is a JSON string (safetensors
# metadata is str -> str).
_SAFETENSORS_META = ("format", "version", "config", "classes", "class_names", "crop_size", "source")


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
        raise AlexNetError(f"{path}: alexnet safetensors metadata is incomplete or damaged (missing or bad {e})") from None
    if values.get("class_names"):
        state["class_names"] = values["class_names"]
    return state


def model_from_checkpoint(state: dict[str, Any], path: str | Path = "checkpoint") -> AlexNet:
    cfg = config_lib.from_dict(state["config"], f"checkpoint {path}")
    model = build_model(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise AlexNetError(f"checkpoint {path} does not match its own config ({str(e).splitlines()[0]})") from None
    return model


@dataclass
class LoadedModel:
    """What inference needs from a checkpoint."""

    model: AlexNet  # eval mode, on the requested device
    preprocess: Preprocess
    classes: list[str]  # label ids: the class folder names (WordNet ids for ImageNet)
    names: list[str]  # readable names to show; the ids when the checkpoint has none
    config: dict[str, Any]


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    state = load_checkpoint(path)
    model = model_from_checkpoint(state, path).to(device).eval()
    classes = list(state["classes"])
    return LoadedModel(
        model=model,
        preprocess=Preprocess.from_state_dict(state["preprocess"]).to(device),
        classes=classes,
        names=list(state.get("class_names") or classes),
        config=state["config"],
    )


def load_for_inference(path: str | Path, device: torch.device | str = "cpu") -> tuple[AlexNet, Preprocess, list[str]]:
    """The model in eval mode on device, its preprocessing, and its class ids."""
    loaded = load_model(path, device)
    return loaded.model, loaded.preprocess, loaded.classes
