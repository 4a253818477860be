"""Checkpoints that describe themselves, written atomically and read without running code.

A checkpoint is one ``torch.save`` file of plain containers and tensors: the resolved
config, the (unwrapped) model's state_dict, optimizer and schedule state, epoch and step,
random states, the preprocessing (mean image, PCA eigens) and the class names. It is
read with ``torch.load(weights_only=True)``, which refuses pickled code, so a checkpoint
from a stranger cannot execute anything.

Writes go to a temporary file in the same folder, are fsynced, then renamed over the
old file: a crash at any moment leaves either the old or the new checkpoint, never half
of one.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check a checkpoint; every failure is a one-line AlexNetError."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"  # a run directory stands for its latest checkpoint
    if not path.exists():
        raise AlexNetError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        unsupported = [line for line in lines if "unsupported global" in line.lower()]
        if unsupported:
            # weights_only's unpickler met a reference to code: refuse, never import it.
            raise AlexNetError(f"refusing {path}: it holds objects other than tensors and plain data ({unsupported[0]})") from None
        reason = next((line for line in lines if "Unsupported" in line), lines[0] if lines else type(e).__name__)
        raise AlexNetError(f"cannot read checkpoint {path}: damaged or not a PyTorch file ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise AlexNetError(
            f"{path} is not an alexnet checkpoint (a bare state_dict or another program's file)"
        )
    if state.get("version", 0) > VERSION:
        raise AlexNetError(f"{path} was written by a newer alexnet (format {state['version']} > {VERSION})")
    return state


def model_from_checkpoint(state: dict[str, Any], path: str | Path = "checkpoint") -> AlexNet:
    cfg = config_lib.from_dict(state["config"], f"checkpoint {path}")
    model = build_model(cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise AlexNetError(f"checkpoint {path} does not match its own config ({str(e).splitlines()[0]})") from None
    return model


def load_for_inference(path: str | Path, device: torch.device | str = "cpu") -> tuple[AlexNet, Preprocess, list[str]]:
    """The model in eval mode on device, its preprocessing, and its class names."""
    state = load_checkpoint(path)
    model = model_from_checkpoint(state, path).to(device).eval()
    return model, Preprocess.from_state_dict(state["preprocess"]).to(device), list(state["classes"])


def load_model(
    path: str | Path, name: str | None = None, num_classes: int | None = None, device: torch.device | str = "cpu"
) -> AlexNet:
    """The model of a checkpoint, in eval mode; with ``name`` / ``num_classes``, refuse any other.

    ``load_model("best.pt", "torchvision", 1000)`` fails with a message naming what the
    file holds instead of a wall of missing and unexpected state_dict keys.
    """
    state = load_checkpoint(path)
    saved = state["config"]["model"]
    if (name is not None and saved["name"] != name) or (num_classes is not None and saved["num_classes"] != num_classes):
        want = f"'{name or saved['name']}' with {num_classes or saved['num_classes']} classes"
        raise AlexNetError(f"{path} holds a '{saved['name']}' model with {saved['num_classes']} classes; expected {want}")
    return model_from_checkpoint(state, path).to(device).eval()
