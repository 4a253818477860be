"""runtime.keep_freed_memory: glibc keeps what torch frees, in a fresh process each time
(mallopt changes the whole process, so never this one)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
import torch

from alexnet.runtime import keep_freed_memory

_GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")

# Allocates and frees a 96 MB tensor, then prints the bytes free inside malloc's heap
# (mallinfo2's fordblks): memory glibc kept for the next allocation instead of unmapping it.
_PROBE = """
import ctypes, sys, torch
from alexnet.runtime import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
kept = keep_freed_memory(torch.device("cpu")) if sys.argv[1] == "tuned" else False
t = torch.ones(24 * 2**20)  # 96 MiB, above glibc's own largest mmap threshold (32 MiB)
del t
print(kept, libc.mallinfo2().fordblks)
"""


def _probe(mode: str, env: dict[str, str] | None = None) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, env=env)
    kept, free = out.stdout.split()
    return kept == "True", int(free)


@pytest.mark.skipif(not _GLIBC, reason="glibc's mallopt and mallinfo2 (Linux)")
def test_freed_activations_stay_in_the_heap_only_when_tuned() -> None:
    kept, free = _probe("tuned")
    assert kept and free >= 96 * 2**20
    kept, free = _probe("default")
    assert not kept and free < 96 * 2**20  # unmapped on free: the next step faults it in again


@pytest.mark.skipif(not _GLIBC, reason="glibc's mallopt and mallinfo2 (Linux)")
def test_a_users_own_malloc_tuning_is_left_alone() -> None:
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"}
    kept, _ = _probe("tuned", env)
    assert not kept


def test_nothing_is_tuned_for_a_gpu_run() -> None:
    assert keep_freed_memory(torch.device("cuda")) is False
    assert keep_freed_memory(torch.device("meta")) is False
