"""Checkpoints that describe themselves, written atomically and read without running code.

A checkpoint is one ``torch.save`` file of plain containers and tensors: the resolved
config, the (unwrapped) model's state_dict, optimizer and schedule state, epoch, batch
and step, random states, the preprocessing (mean image, PCA eigens) and the class
names. It is read with ``torch.load(weights_only=True)``, which refuses pickled code, so
a checkpoint from a stranger cannot execute anything; its structure, tensor shapes and
the network its config describes are checked before anything is built from it.

Writes go to a temporary file in the same folder, are fsynced, then renamed over the
old file: a crash at any moment leaves either the old or the new checkpoint, never half
of one. A write that fails (a full disk) removes its temporary file and raises an
AlexNetError that says the previous checkpoint is intact.

In a run directory, ``last.pt`` is the newest checkpoint, ``best.pt`` the one with the
lowest validation error, and ``checkpoints/step-N.pt`` a short history (hard links to
the same bytes, so the history costs no extra writes) that resume falls back on when
``last.pt`` is damaged.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from . import config as config_lib
from .augment import Preprocess
from .errors import AlexNetError
from .model import AlexNet, build_model

log = logging.getLogger("alexnet")

FORMAT = "alexnet-checkpoint"
VERSION = 2  # 2 added the position inside an epoch, partial epoch sums and random states
HISTORY = "checkpoints"  # run_dir/checkpoints/step-N.pt


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: on ext4/xfs the new directory entry survives a power cut only after this."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # some filesystems (and Windows) cannot fsync a directory; the rename is still atomic


class _RecordingWriter:
    """A file wrapper that remembers the OSError of a failed write.

    ``torch.save`` turns a failing write (ENOSPC, EFBIG) into a RuntimeError "unexpected
    pos 704 vs 598" that has lost the errno (measured with RLIMIT_FSIZE, torch 2.14);
    this keeps the real reason so the message can say "No space left on device".
    """

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file beside path, fsync, then rename it into place.

    On any failure the temporary file is removed and path is untouched. An OSError from a
    write is raised as itself, even when the writer (torch.save) wrapped it in another type.
    """
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            recorder = _RecordingWriter(f)
            try:
                write(recorder)
            except Exception:
                if recorder.error is not None:
                    raise recorder.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_error(path: Path, e: OSError) -> AlexNetError:
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
        raise _write_error(path, e) from None


def link_or_copy(source: Path, target: Path) -> None:
    """Make target hold source's bytes, atomically: a hard link (no I/O), or a copy where
    the filesystem has no hard links (FAT, some network and FUSE mounts)."""
    tmp = _tmp_name(target)
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            with open(source, "rb") as src:
                atomic_write(target, lambda f: _copy(src, f))
            return
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(target, e) from None
    _fsync_dir(target.parent)


def _copy(src: BinaryIO, dst: Any) -> None:
    while chunk := src.read(1 << 24):
        dst.write(chunk)


def history(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoints in run_dir/checkpoints, oldest first."""
    found = []
    for p in (Path(run_dir) / HISTORY).glob("step-*.pt"):
        try:
            found.append((int(p.stem.removeprefix("step-")), p))
        except ValueError:
            continue  # not one of ours
    return sorted(found)


def save_run_checkpoint(run_dir: Path, state: dict[str, Any], *, best: bool = False, keep: int = 0) -> Path:
    """Write run_dir/last.pt; best.pt too if ``best``; with ``keep`` > 0, also checkpoints/step-N.pt,
    deleting all but the newest ``keep`` of those.

    The order makes a failure at any point harmless: every file is complete before a name
    refers to it, and old history is deleted only after the new entry exists, so the run
    directory always holds at least one loadable checkpoint.
    """
    run_dir = Path(run_dir)
    last = run_dir / "last.pt"
    save_checkpoint(last, state)
    if best:
        link_or_copy(last, run_dir / "best.pt")
    if keep > 0:
        (run_dir / HISTORY).mkdir(exist_ok=True)
        link_or_copy(last, run_dir / HISTORY / f"step-{state['step']:09d}.pt")
        for _, old in history(run_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return last


def remove_partial_writes(run_dir: Path) -> list[Path]:
    """Delete temporary files left by a process killed while writing a checkpoint."""
    run_dir = Path(run_dir)
    partial = [p for folder in (run_dir, run_dir / HISTORY) for p in folder.glob(".*.pt.tmp*")]
    for p in partial:
        p.unlink(missing_ok=True)
    return partial


def load_checkpoint(path: str | Path, *, for_training: bool = False) -> dict[str, Any]:
    """Load and check a checkpoint; every failure is a one-line AlexNetError."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"  # a run directory stands for its latest checkpoint
    if not path.exists():
        raise AlexNetError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            # A raw pickle of another protocol draws a warning before being refused anyway.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
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
    version = state.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise AlexNetError(f"{path} was written by a newer alexnet (format {version!r}, this one reads up to {VERSION})")
    _check_structure(state, path, for_training)
    return state


# What a checkpoint must hold, by use; anything else in the file is ignored.
_INFERENCE_KEYS: dict[str, type | tuple[type, ...]] = {"config": dict, "model": dict, "preprocess": dict, "classes": list}
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
    pre = state["preprocess"]
    expected = {"mean": 3, "std": 1, "eigvals": 1, "eigvecs": 2}
    for key, ndim in expected.items():
        if not isinstance(pre.get(key), torch.Tensor) or pre[key].ndim != ndim or not pre[key].is_floating_point():
            raise _malformed(path, f"preprocess '{key}' should be a {ndim}-d float tensor")
    mean = pre["mean"]
    crop = pre.get("crop_size")
    if (
        mean.shape[0] != 3
        or mean.shape[1] != mean.shape[2]
        or tuple(pre["std"].shape) != (3,)
        or tuple(pre["eigvals"].shape) != (3,)
        or tuple(pre["eigvecs"].shape) != (3, 3)
        or not isinstance(crop, int)
        or not 0 < crop <= mean.shape[-1]
    ):
        raise _malformed(path, "preprocess should hold a (3, S, S) mean image, (3,) std and eigenvalues, (3, 3) "
                         "eigenvectors and a crop size of at most S")


def _type_name(kind: type | tuple[type, ...]) -> str:
    names = {dict: "a mapping", list: "a list", int: "an integer", float: "a number"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def model_from_checkpoint(state: dict[str, Any], path: str | Path = "(in memory)") -> AlexNet:
    """The network the checkpoint's config describes, with its weights.

    The network is first built on the meta device (no memory) and its parameter shapes
    compared with the tensors in the file: a crafted config that asks for a huge network
    is refused before anything is allocated, and real memory is only ever as large as
    the weights actually present in the file.
    """
    cfg = config_lib.from_dict(state["config"], f"checkpoint {path}")
    with torch.device("meta"):
        model = build_model(cfg.model)
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
    model = model.to_empty(device="cpu")
    model.load_state_dict(weights)
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


def load_for_resume(run_dir: Path) -> tuple[dict[str, Any], Path]:
    """The newest loadable checkpoint of a run: last.pt, else the newest of checkpoints/step-N.pt.

    Each candidate that cannot be used is named in a warning with its reason; when none
    can, the error names last.pt's problem.
    """
    run_dir = Path(run_dir)
    removed = remove_partial_writes(run_dir)
    if removed:
        log.warning("removed %d partial checkpoint file(s) left by an interrupted write: %s",
                    len(removed), ", ".join(p.name for p in removed))
    candidates = [run_dir / "last.pt"] + [p for _, p in reversed(history(run_dir))]
    first_error: AlexNetError | None = None
    for candidate in candidates:
        try:
            state = load_checkpoint(candidate, for_training=True)
        except AlexNetError as e:
            first_error = first_error or e
            if candidate.exists():
                log.warning("cannot resume from %s: %s", candidate, e)
            continue
        if candidate != candidates[0]:
            log.warning("resuming from %s instead of %s", candidate, candidates[0].name)
        return state, candidate
    assert first_error is not None
    raise first_error
