"""Where and how a process computes: the device, the cores it may use, and a record of both.

Every command that takes ``--device`` resolves it here; every measurement (bench,
experiments) records the environment it ran in with :func:`environment`.
"""

from __future__ import annotations

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
