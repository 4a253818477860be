"""Where and how a process computes: the device, the cores it may use, and a record of both.

Every command that takes ``--device`` resolves it here; every measurement (bench,
experiments) records the environment it ran in with :func:`environment`.
"""

from __future__ import annotations

import os
import platform
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
