"""LRN forward and backward as one Triton kernel each, for CUDA tensors.

Each program takes a tile of BLOCK_P pixels (b, h, w) by BLOCK_C channels, reads the
window's n neighbours of every element (from cache: DRAM sees each input once), sums the
squares in float32 and writes b in the input's dtype, plus s = k + alpha' sum a^2 in
float32 for the backward. Addressing is by strides, so NCHW and channels_last both run
in place and the outputs keep the input's layout (``empty_like``). The backward reads
g, a and s and writes dL/da: one pass each way instead of the ~25 of the eager path.

ReLU and the following 3/2 max-pool are not fused: whether that pays can only be
measured on a GPU (benchmarks/gpu.sh), and none was lent when this was written.

Tested without a GPU through Triton's interpreter (TRITON_INTERPRET=1, CPU tensors),
tests/models/test_lrn_triton.py.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: lrn.lrn uses its CPU path
    triton = None

BLOCK_P = 64
BLOCK_C = 32


@functools.cache
def available() -> bool:
    """Whether the Triton kernels can be used (triton imports)."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _offsets(pid_p, pid_c, P, C, HW, W, sb, sc, sh, sw, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        b = p // HW
        hw = p % HW
        base = b.to(tl.int64) * sb + (hw // W).to(tl.int64) * sh + (hw % W).to(tl.int64) * sw
        valid = (p < P)[:, None] & (c < C)[None, :]
        return base[:, None], c, valid

    @triton.jit
    def _lrn_fwd_kernel(
        x_ptr, y_ptr, s_ptr, P, C, CG, HW, W, sb, sc, sh, sw, alpha, beta, k,
        BEFORE: tl.constexpr, AFTER: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        base, c, valid = _offsets(tl.program_id(0), tl.program_id(1), P, C, HW, W, sb, sc, sh, sw, BLOCK_P, BLOCK_C)
        cg = (c % CG)[None, :]  # position inside the tower: the window never crosses it
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for d in tl.static_range(0, BEFORE + AFTER + 1):
            off = d - BEFORE
            m = valid & (cg + off >= 0) & (cg + off < CG)
            v = tl.load(x_ptr + base + (c[None, :] + off).to(tl.int64) * sc, mask=m, other=0.0).to(tl.float32)
            acc += v * v
        ptr = base + c[None, :].to(tl.int64) * sc
        a = tl.load(x_ptr + ptr, mask=valid, other=0.0).to(tl.float32)
        s = k + alpha * acc
        y = a * tl.exp2(-beta * tl.log2(s))
        tl.store(y_ptr + ptr, y.to(y_ptr.dtype.element_ty), mask=valid)
        tl.store(s_ptr + ptr, s, mask=valid)

    @triton.jit
    def _lrn_bwd_kernel(
        g_ptr, x_ptr, s_ptr, dx_ptr, P, C, CG, HW, W, sb, sc, sh, sw, alpha, beta,
        BEFORE: tl.constexpr, AFTER: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # dL/da_c = g_c s_c^-beta - 2 alpha beta a_c sum_{j: c in W(j)} g_j a_j s_j^(-beta-1);
        # c in W(j) means j runs over c-AFTER .. c+BEFORE (the mirrored window).
        base, c, valid = _offsets(tl.program_id(0), tl.program_id(1), P, C, HW, W, sb, sc, sh, sw, BLOCK_P, BLOCK_C)
        cg = (c % CG)[None, :]
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for d in tl.static_range(0, BEFORE + AFTER + 1):
            off = d - AFTER
            m = valid & (cg + off >= 0) & (cg + off < CG)
            ptr_j = base + (c[None, :] + off).to(tl.int64) * sc
            gj = tl.load(g_ptr + ptr_j, mask=m, other=0.0).to(tl.float32)
            aj = tl.load(x_ptr + ptr_j, mask=m, other=0.0).to(tl.float32)
            sj = tl.load(s_ptr + ptr_j, mask=m, other=1.0)
            acc += gj * aj * tl.exp2((-beta - 1.0) * tl.log2(sj))
        ptr = base + c[None, :].to(tl.int64) * sc
        g = tl.load(g_ptr + ptr, mask=valid, other=0.0).to(tl.float32)
        a = tl.load(x_ptr + ptr, mask=valid, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + ptr, mask=valid, other=1.0)
        dx = g * tl.exp2(-beta * tl.log2(s)) - 2.0 * alpha * beta * a * acc
        tl.store(dx_ptr + ptr, dx.to(dx_ptr.dtype.element_ty), mask=valid)


def _dense(x: Tensor) -> Tensor:
    """x itself when NCHW- or channels_last-contiguous, else an NCHW copy (strides must be dense)."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _geometry(x: Tensor, groups: int) -> tuple[tuple[int, ...], tuple[int, int]]:
    b, c, h, w = x.shape
    p = b * h * w
    grid = (triton.cdiv(p, BLOCK_P), triton.cdiv(c, BLOCK_C))
    return (p, c, c // groups, h * w, w, *x.stride()), grid


def lrn_forward(x: Tensor, groups: int, size: int, alpha: float, beta: float, k: float) -> tuple[Tensor, Tensor]:
    """(b in x's dtype and layout, s in float32 and x's layout) for (B, C, H, W) x."""
    x = _dense(x)
    y = torch.empty_like(x)
    s = torch.empty_like(x, dtype=torch.float32)
    args, grid = _geometry(x, groups)
    _lrn_fwd_kernel[grid](x, y, s, *args, alpha, beta, k, size // 2, (size - 1) // 2, BLOCK_P, BLOCK_C)
    return y, s


def lrn_backward(g: Tensor, x: Tensor, s: Tensor, groups: int, size: int, alpha: float, beta: float) -> Tensor:
    """dL/dx for the output gradient g; x and s as :func:`lrn_forward` saw and returned them."""
    x = _dense(x)
    # The kernel addresses g, x, s and dx with one set of strides (s already has x's).
    if g.stride() != x.stride():
        g = torch.empty_like(x, dtype=g.dtype).copy_(g)
    dx = torch.empty_like(x)
    args, grid = _geometry(x, groups)
    _lrn_bwd_kernel[grid](g, x, s, dx, *args, alpha, beta, size // 2, (size - 1) // 2, BLOCK_P, BLOCK_C)
    return dx


# The custom ops keep torch.compile from tracing into Triton launches it need not see, and
# give the autograd link that an autograd.Function would.
@torch.library.custom_op("alexnet::lrn_forward", mutates_args=())
def _lrn_forward_op(x: Tensor, groups: int, size: int, alpha: float, beta: float, k: float) -> tuple[Tensor, Tensor]:
    return lrn_forward(x, groups, size, alpha, beta, k)


@_lrn_forward_op.register_fake
def _(x: Tensor, groups: int, size: int, alpha: float, beta: float, k: float) -> tuple[Tensor, Tensor]:
    x = _dense(x)
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.float32)


@torch.library.custom_op("alexnet::lrn_backward", mutates_args=())
def _lrn_backward_op(g: Tensor, x: Tensor, s: Tensor, groups: int, size: int, alpha: float, beta: float) -> Tensor:
    return lrn_backward(g, x, s, groups, size, alpha, beta)


@_lrn_backward_op.register_fake
def _(g: Tensor, x: Tensor, s: Tensor, groups: int, size: int, alpha: float, beta: float) -> Tensor:
    return torch.empty_like(_dense(x))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    x, groups, size, alpha, beta, _ = inputs
    ctx.save_for_backward(x, output[1])
    ctx.args = (groups, size, alpha, beta)


def _backward(ctx: Any, grad_y: Tensor, _grad_s: Tensor | None) -> tuple[Tensor | None, ...]:
    x, s = ctx.saved_tensors
    return _lrn_backward_op(grad_y, x, s, *ctx.args), None, None, None, None, None


_lrn_forward_op.register_autograd(_backward, setup_context=_setup_context)


def lrn_op(x: Tensor, groups: int, size: int, alpha: float, beta: float, k: float) -> Tensor:
    """LRN through the custom op (differentiable, compilable); alpha per window element."""
    return _lrn_forward_op(x, groups, size, alpha, beta, k)[0]
