"""The Triton LRN kernels (models/lrn_triton.py) through Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton is first imported, so the checks run in a
subprocess (this test process may already have imported triton through torch). They
compare against the numpy formula in float64 and against the CPU path (models/lrn.py),
values and gradients, both tower layouts, the three conventions, NCHW and channels_last,
float32 and bf16.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import SUBPROCESS_ENV

pytest.importorskip("triton")

CHECKS = textwrap.dedent(
    """
    import numpy as np
    import torch
    from alexnet.models import lrn as L, lrn_triton as T

    def numpy_lrn(a, groups, n, alpha, beta, k):
        # Section 3.3 literally, per tower: sums over max(0, i-n/2) .. min(N-1, i+n/2).
        out = np.empty_like(a)
        tower = a.shape[1] // groups
        for c in range(a.shape[1]):
            t0 = (c // tower) * tower
            lo, hi = max(t0, c - n // 2), min(t0 + tower - 1, c + (n - 1) // 2)
            out[:, c] = a[:, c] / (k + alpha * (a[:, lo : hi + 1] ** 2).sum(1)) ** beta
        return out

    torch.manual_seed(0)
    for convention, (k, alpha, beta, n, divide, per_tower) in L.LRN_CONVENTIONS.items():
        layer = L.LocalResponseNorm(convention, groups=2)
        args = (layer.groups, n, layer.alpha / n, beta, k)
        for layout in (torch.contiguous_format, torch.channels_last):
            a = (torch.rand(2, SHAPE_C, 5, 3, dtype=torch.float64) * 30).contiguous(memory_format=layout)
            y, s = T.lrn_forward(a.float().contiguous(memory_format=layout), *args)
            assert y.dtype == torch.float32 and y.is_contiguous(memory_format=layout), (convention, layout)
            np.testing.assert_allclose(y.double().numpy(), numpy_lrn(a.numpy(), *args), rtol=1e-5)
            g = torch.randn_like(a)
            x = a.clone().requires_grad_()
            (want,) = torch.autograd.grad(L.lrn_function(x, *args), x, g)
            got = T.lrn_backward(g.float(), a.float().contiguous(memory_format=layout), s, *args[:4])
            assert got.is_contiguous(memory_format=layout)
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
            # bf16 in, bf16 out, layout kept; the sum in float32 (the CPU path's answer to bf16 rounding).
            yb, _ = T.lrn_forward(a.to(torch.bfloat16), *args)
            assert yb.dtype == torch.bfloat16 and yb.is_contiguous(memory_format=layout)
            ref = L.lrn_reference(a.to(torch.bfloat16), *args)[0]
            torch.testing.assert_close(yb.float(), ref.float(), rtol=2**-7, atol=1e-6)
    # The window's two ends for an even n (before n/2, after n/2 - 1) in both directions.
    a = torch.rand(1, 12, 2, 2, dtype=torch.float64) * 5
    y, s = T.lrn_forward(a.float(), 2, 4, 0.3, 0.75, 2.0)
    np.testing.assert_allclose(y.double().numpy(), numpy_lrn(a.numpy(), 2, 4, 0.3, 0.75, 2.0), rtol=1e-5)
    g = torch.randn_like(a)
    x = a.clone().requires_grad_()
    (want,) = torch.autograd.grad(L.lrn_function(x, 2, 4, 0.3, 0.75, 2.0), x, g)
    torch.testing.assert_close(T.lrn_backward(g.float(), a.float(), s, 2, 4, 0.3, 0.75).double(), want, rtol=1e-4, atol=1e-6)
    # The custom op (the CUDA path's entry) differentiates through the backward kernel.
    x = a.float().requires_grad_()
    (through_op,) = torch.autograd.grad(T.lrn_op(x, 2, 4, 0.3, 0.75, 2.0), x, g.float())
    torch.testing.assert_close(through_op.double(), want, rtol=1e-4, atol=1e-6)
    print("ok")
    """
)


def _run_interpreted(channels: int) -> None:
    env = {**SUBPROCESS_ENV, "TRITON_INTERPRET": "1"}
    code = CHECKS.replace("SHAPE_C", str(channels))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_triton_lrn_matches_formula_and_cpu_path_in_the_interpreter():
    # 40 channels: two towers of 20, the second crossing the first BLOCK_C tile's edge (32).
    _run_interpreted(40)


@pytest.mark.slow
def test_triton_lrn_in_the_interpreter_across_channel_tiles():
    # 96 channels (conv1's) span three BLOCK_C tiles: the window crosses tile edges.
    _run_interpreted(96)


def test_lrn_on_cpu_does_not_take_the_triton_path(monkeypatch):
    from alexnet.models import lrn, lrn_triton

    def refuse(*args: object) -> None:
        raise AssertionError("the Triton op ran for a CPU tensor")

    monkeypatch.setattr(lrn_triton, "lrn_op", refuse)
    x = torch.rand(2, 8, 3, 3, requires_grad=True)
    lrn.LocalResponseNorm("paper", groups=2)(x).sum().backward()
    assert x.grad is not None


@pytest.mark.gpu
def test_triton_lrn_on_cuda_matches_the_cpu_path_and_compiles():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from alexnet.models import lrn

    layer = lrn.LocalResponseNorm("paper", groups=2)
    x = (torch.rand(8, 96, 55, 55) * 20).contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    cpu_x = x.double().requires_grad_()
    (want,) = torch.autograd.grad(layer(cpu_x), cpu_x, g.double())
    for fn in (layer, torch.compile(layer)):
        xc = x.cuda().requires_grad_()
        y = fn(xc)
        assert y.is_contiguous(memory_format=torch.channels_last)
        (got,) = torch.autograd.grad(y, xc, g.cuda())
        torch.testing.assert_close(y.detach().cpu().double(), layer(x.double()), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-6)
