"""Files that survive a crash, and files from strangers that cannot run code.

Every file alexnet writes for later -- checkpoints, store headers, statistics, exports,
experiment results, dataset markers -- goes through :func:`atomic_write` (or, for a
writer that needs a path, :func:`replace_durably`): a crash at any moment leaves the old
file or the new one, never half of one. Every folder two processes could write at once
(a run directory, a store, the built-in dataset) is guarded by :func:`exclusive_lock`.

Pickles from elsewhere (CIFAR-10's python batches, the converted Caffe ``.npy``) are
read by :class:`ArrayUnpickler`, which can build plain containers and NumPy arrays and
refuses every other global before it is looked up, so no code in the file ever runs;
``torch.save`` files by :func:`torch_load` (``weights_only=True``), which refuses code too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np

from alexnet.errors import AlexNetError


def cache_dir() -> Path:
    """``$ALEXNET_CACHE`` if set and not empty, else ``~/.cache/alexnet`` (statistics, the built-in dataset)."""
    cache = os.environ.get("ALEXNET_CACHE")
    return Path(cache).expanduser() if cache else Path.home() / ".cache" / "alexnet"


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def fsync_dir(folder: Path) -> None:
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

    def __getattr__(self, name: str) -> Any:
        # Writers such as np.savez (a zip file) also seek, tell and read back.
        return getattr(self.f, name)


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary file beside path, fsync, then rename it into place.

    On any failure the temporary file is removed and path is untouched. An OSError from a
    write is raised as itself, even when the writer (torch.save) wrapped it in another type.
    """
    path = Path(path)
    tmp = temporary_name(path)
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
        rename_into_place(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def rename_into_place(tmp: Path, path: Path) -> None:
    """Rename the complete, fsynced ``tmp`` over ``path`` and make the rename durable."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def replace_durably(tmp: Path, path: Path) -> None:
    """Finish a write that went to ``tmp`` (a :func:`temporary_name`, written by a library that
    takes a path): fsync it, rename it over ``path``, fsync the folder. The caller removes
    ``tmp`` if anything fails before this."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    rename_into_place(tmp, path)


# The descriptors of the locks this process holds. A flock belongs to the open file, which
# a forked child shares: a decoding worker forked while the lock is held would keep it
# held after its parent is killed, for as long as the worker takes to notice (measured:
# `alexnet train --resume` right after kill -9 was refused as "in use" in 2 of 5 tries on
# a loaded 2-core machine, with no visible descriptor left in any process). Every forked
# child closes its copies at once, so only the process that took a lock can hold it.
_held_locks: set[int] = set()


def _drop_inherited_locks() -> None:
    for fd in _held_locks:
        with contextlib.suppress(OSError):
            os.close(fd)  # closes the child's copy only: the parent's lock stays
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextlib.contextmanager
def exclusive_lock(lock_file: Path, busy: str | None = None) -> Iterator[None]:
    """Hold an advisory flock on lock_file for the duration.

    ``busy`` given: raise AlexNetError(busy) at once if another process holds it (two
    trainers in one run directory, two prepares of one store would interleave their
    files). ``busy`` None: wait for it (several ranks generating one dataset: the first
    writes it, the others then find it complete). The lock dies with its process, so a
    killed process never leaves a stale one. Not on Windows (no flock): skipped there.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX if busy is None else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise AlexNetError(busy) from None
        _held_locks.add(f.fileno())
        try:
            yield
        finally:
            _held_locks.discard(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write` of a UTF-8 text file."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: Path, value: Any, **dumps: Any) -> None:
    """:func:`atomic_write` of ``json.dumps(value, **dumps)`` (default ``indent=1``)."""
    atomic_write_text(path, json.dumps(value, **({"indent": 1} | dumps)))


# --------------------------------------------------------------------------------------
# Pickles that may hold only arrays


def _numpy_reconstruct() -> Any:
    try:  # NumPy 2 moved it to numpy._core; NumPy 1 pickles name numpy.core
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _array_globals() -> dict[tuple[str, str], Any]:
    # Files written with NumPy 1.x (and Python 2's cPickle) name "numpy.core"; NumPy 2 "numpy._core".
    return {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }


class ArrayUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, strings, bytes, numbers and NumPy arrays; refuses every other global.

    Names resolve through the fixed table :attr:`allowed` to NumPy's own objects; nothing
    is imported by the name the file gives, so no code in the file runs. A subclass may
    add entries to ``allowed`` and word the refusal (:meth:`refusal`) for its files.
    """

    allowed: ClassVar[dict[tuple[str, str], Any]] = _array_globals()

    def refusal(self, module: str, name: str) -> str:
        return f"refusing global {module}.{name}: only NumPy arrays and plain containers are allowed"

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(self.refusal(module, name)) from None


def load_array_pickle(
    data: bytes | BinaryIO, *, encoding: str = "ASCII", unpickler: type[ArrayUnpickler] = ArrayUnpickler
) -> Any:
    """The object pickled in ``data`` (bytes, or a file positioned at the pickle), built by ``unpickler``.

    ``encoding`` is pickle's for Python 2 ``str`` objects ("bytes", "latin1"). Errors are
    the unpickler's own (pickle.UnpicklingError for a refused global, EOFError, ValueError,
    ...), for the caller to word for its files.
    """
    f = io.BytesIO(data) if isinstance(data, bytes) else data
    return unpickler(f, encoding=encoding).load()


def torch_load(path: Path, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` on CPU; a damaged file or one holding code is a one-line AlexNetError."""
    import torch

    try:
        with warnings.catch_warnings():
            # A raw pickle of another protocol draws a warning before being refused anyway.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    # Random bytes have made the unpickler raise IndexError and struct.error as well.
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        OSError,
        zipfile.BadZipFile,
        ValueError,
        IndexError,
        struct.error,
    ) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        unsupported = [line for line in lines if "unsupported global" in line.lower()]
        if unsupported:
            # weights_only's unpickler met a reference to code: refuse, never import it.
            raise AlexNetError(
                f"refusing {path}: it holds objects other than tensors and plain data ({unsupported[0]})"
            ) from None
        reason = next((line for line in lines if "Unsupported" in line), lines[0] if lines else type(e).__name__)
        raise AlexNetError(f"cannot read {what} {path}: damaged or not a PyTorch file ({reason})") from None
