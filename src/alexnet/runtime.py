"""Where and how a process computes: the device, the cores it may use, and a record of both.

Every command that takes ``--device`` resolves it here; every measurement (bench,
experiments) records the environment it ran in with :func:`environment`.
"""

from __future__ import annotations

import os
import platform
import signal
import sys
import time
from importlib import metadata
from typing import Any

import torch

from alexnet.errors import AlexNetError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AlexNetError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AlexNetError(f"device {name} requested but CUDA is not available on this machine")
    return device


def package_version() -> str:
    """alexnet's version: pyproject.toml is the one source, read back from the installed metadata."""
    try:
        return metadata.version("alexnet")
    except metadata.PackageNotFoundError:  # the sources on PYTHONPATH without an install
        return "0+unknown"


def cpu_cores() -> int:
    """The cores this process may run on: its affinity mask (a container's or a job's share), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU with its cores and torch threads (what a timing depends on)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu_cores()} cores, {torch.get_num_threads()} torch threads, {cpu})"


def environment(device: torch.device, command: str | None = None) -> dict[str, Any]:
    """What a measurement ran on, recorded beside its numbers: versions, device, date and command."""
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "alexnet": package_version(),
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": cpu_cores(),
        "device": str(device),
        # bench's key since its first results: the GPU's name, or "cpu"
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "device_description": describe_device(device),
    }
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    if command is not None:
        env["command"] = command
    return env


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


def keep_freed_memory(device: torch.device) -> bool:
    """On the CPU with glibc, keep the memory torch frees for its next allocations; True if set.

    glibc gives every allocation above its mmap threshold (at most 32 MiB when it adapts
    the threshold itself) fresh pages from the kernel and unmaps them when freed, so a
    training step that allocates the same activations every time pays a page fault and a
    zeroing for every 4 KiB of them, every step. The batched seeds hold K runs'
    activations in one tensor (58 MB for 3 runs of conv1 at width 0.5), which is always
    above the threshold: with the threshold at 1 GiB and trimming at 2 GiB, one step of 3
    runs took 1.38-1.48 s instead of 2.12 s, and 3 runs alone 1.43-1.49 s instead of 1.78 s
    (2-core AMD EPYC, experiments/RESULTS.md). What is freed stays in the process (its
    resident size stays near its peak, as it does on CUDA with torch's caching allocator).

    Leaves glibc alone where the user tuned it already (``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_`` or ``GLIBC_TUNABLES`` set), and off Linux or glibc.
    """
    tuned = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
    if device.type != "cpu" or not sys.platform.startswith("linux") or any(v in os.environ for v in tuned):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl, or no glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Make this (worker) process die with SIGKILL when its parent dies, however the parent dies.

    Called first thing in every worker the program starts (DataLoader worker_init_fn,
    process-pool initializer) with the pid of the process that started it. Without it a
    worker orphaned by kill -9 of its parent lives on, blocked on its queue, and holds
    what it inherited by fork: the flock of a store being prepared or of a run directory,
    which then refuses the re-run. Linux only (prctl PR_SET_PDEATHSIG); elsewhere, or
    where libc cannot be loaded, a no-op: workers then rely on their own checks (torch's
    DataLoader workers poll their parent every few seconds).

    The signal fires when the *thread* that forked this process exits, not only the
    process: the DataLoader and the process pools here fork from the main thread, whose
    end is the end of the program. After prctl, the parent's pid is compared with the
    expected one: a parent that died before prctl ran would never send the signal.
    """
    if not sys.platform.startswith("linux"):
        return  # no prctl: PR_SET_PDEATHSIG exists only on Linux
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return
    if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:  # pragma: no cover - never fails for SIGKILL
        return
    if os.getppid() != parent_pid:  # the parent died before prctl: nobody would signal us
        os._exit(1)
