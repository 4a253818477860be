"""Local response normalisation (section 3.3 of the paper), its conventions and its fast paths.

b_c = a_c / (k + alpha' * sum_{j=c-n/2}^{c+n/2} a_j^2)^beta, the window clipped at each
tower's ends. Three implementations compute the same function:

* CUDA with Triton: one kernel each way (:mod:`alexnet.models.lrn_triton`), through the
  custom ops ``alexnet::lrn_forward`` / ``alexnet::lrn_backward`` so torch.compile keeps them.
* everywhere else (the CPU): :class:`_LRNFunction`, whose channel window is one banded 1x1
  convolution instead of a pad, a copy and n-1 additions.
* TorchScript and tracing (ONNX export): ``F.local_response_norm``.

Every path sums the window in float32 (in bf16, k + sum moves in steps of 1/64, which
rounds away much of LRN's few-percent effect) and returns the input's dtype and memory
format, so a bf16 channels_last conv1 output stays bf16 channels_last into pool1 and conv2.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

# LRN constants per convention: (k, alpha, beta, n, alpha divided by n?, per tower?).
# Paper, section 3.3: k=2, n=5, alpha=1e-4, beta=0.75 and the sum is multiplied by
# alpha itself. cuda-convnet (Krizhevsky's code) divides alpha by n; Caffe's
# bvlc_alexnet divides by n, uses k=1 and normalises across the tower boundary.
LRN_CONVENTIONS: dict[str, tuple[float, float, float, int, bool, bool]] = {
    "paper": (2.0, 1e-4, 0.75, 5, False, True),
    "cuda-convnet": (2.0, 1e-4, 0.75, 5, True, True),
    "caffe": (1.0, 1e-4, 0.75, 5, True, False),
}

_BANDS: dict[tuple[int, int, int, torch.dtype, torch.device], Tensor] = {}


def _band(channels: int, groups: int, before: int, after: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(C, C / groups, 1, 1) weight of a grouped 1x1 convolution: w[c, j] = 1 where channel j
    of c's tower is in c's window, else 0. Every tower has the same band (cached)."""
    tower = channels // groups
    key = (tower, before, after, dtype, device)
    if key not in _BANDS:
        i = torch.arange(tower)
        offset = i[None, :] - i[:, None]  # j - c
        band = (offset >= -before) & (offset <= after)
        _BANDS[key] = band.to(dtype)[:, :, None, None].to(device)
    return _BANDS[key].repeat(groups, 1, 1, 1)


def window_sum(t: Tensor, groups: int, before: int, after: int) -> Tensor:
    """sum_{j=c-before}^{c+after} t_j over the channels of (B, C, H, W), zero beyond each tower.

    One banded 1x1 convolution, grouped by tower: its 0/1 weights make every product exact,
    it keeps t's dtype and memory format, and it replaces the pad, clone and n-1
    whole-tensor additions of the loop it succeeds (benchmarks/RESULTS.md, "LRN window").
    Grouped, it multiplies no tower by another's zeros: for the batched seeds' 3 runs x 2
    towers (144 channels, 128 x 28 x 28, channels_last) 21 ms against 40 ms for the dense
    band, and for one two-tower run about equal (4.8 against 5.9 ms at 48 channels; 2-core
    AMD EPYC, experiments/RESULTS.md). Autocast is off inside: a bf16 convolution would
    round the squares the float32 sum exists to keep.
    """
    if t.device.type == "meta":
        # Shapes only (bench.flops.step_flops counts on meta tensors): additions, so that the
        # band's 0/1 products are not counted as the model's FLOPs.
        return _window_sum_added(t, groups, before, after)
    weight = _band(t.shape[1], groups, before, after, t.dtype, t.device)
    with torch.autocast(t.device.type, enabled=False):
        return F.conv2d(t, weight, groups=groups)


def _power(s: Tensor, beta: float) -> Tensor:
    """s^-beta. For the paper's beta = 3/4 as rsqrt(s) * sqrt(rsqrt(s)): 2.4-3x faster than
    pow on the CPU (46 against 19 ms for 128 x 144 x 28 x 28 floats, 2-core AMD EPYC), at
    2.3e-7 relative error against float64's pow, where float32 pow has 6e-8."""
    if beta == 0.75:
        r = s.rsqrt()
        # Not r.mul_: traced by torch.compile (the batched seeds' step), autograd saw rsqrt's
        # output modified in place.
        return r * r.sqrt()
    return s.pow(-beta)


def _window_sum_added(t: Tensor, groups: int, before: int, after: int) -> Tensor:
    """:func:`window_sum` as a pad and n-1 additions on the (B, G, C/G, H, W) view."""
    towers = t.unflatten(1, (groups, t.shape[1] // groups))
    c = towers.shape[2]
    padded = F.pad(towers, (0, 0, 0, 0, before, after))
    out = padded[:, :, 0:c].clone()
    for i in range(1, before + after + 1):
        out += padded[:, :, i : i + c]
    return out.flatten(1, 2)


def lrn_reference(x: Tensor, groups: int, size: int, alpha: float, beta: float, k: float) -> tuple[Tensor, Tensor]:
    """(b, s) without autograd: b in x's dtype and layout, s = k + alpha * window(a^2) in float32+."""
    a = x.to(torch.promote_types(x.dtype, torch.float32))  # float64 stays float64
    s = window_sum(a * a, groups, size // 2, (size - 1) // 2).mul_(alpha).add_(k)
    return _power(s, beta).mul_(a).to(x.dtype), s


class _LRNFunction(torch.autograd.Function):
    """LRN with a hand-written backward on (B, C, H, W); the window stays inside each of ``groups``.
    ``apply`` returns (b, s); s is not differentiable (:func:`lrn_function` returns b alone).

    With s_c = k + alpha' sum_{j in W(c)} a_j^2 and b_c = a_c s_c^-beta,
    dL/da_c = g_c s_c^-beta - 2 alpha' beta a_c sum_{j: c in W(j)} g_j a_j s_j^(-beta-1),
    and c in W(j) is j in the mirrored window. Saves a and s only; autograd through
    F.local_response_norm keeps the square, the padded copy, the 3-D average pooling and
    the power and replays each backward (1.6-1.8x slower paper-net step on the 2-core CPU,
    2026-11-24). Equal to F.local_response_norm, gradients by gradcheck (tests/models).

    Under ``torch.func.vmap`` (the batched seeds of alexnet.experiments.batched) its
    :meth:`vmap` rule folds the K runs into the channels, (B, K x C, H, W) with K x groups
    towers, and applies the function once: no run's window reaches another's channels, and
    with the runs' channels_last layout (B, H, W, K, C) the fold is a view, not a copy.
    """

    @staticmethod
    def forward(a: Tensor, groups: int, size: int, alpha: float, beta: float, k: float) -> tuple[Tensor, Tensor]:
        return lrn_reference(a, groups, size, alpha, beta, k)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        a, groups, size, alpha, beta, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(a, output[1])
        ctx.groups, ctx.size, ctx.alpha, ctx.beta = groups, size, alpha, beta

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor, _: Tensor | None) -> tuple[Tensor | None, ...]:
        a, s = ctx.saved_tensors
        if s.is_contiguous(memory_format=torch.channels_last) and not s.is_contiguous():
            # The gradient can arrive NCHW (max-pool's backward gives it so) while a and s are
            # channels_last: the elementwise ops would then follow g and the window's 1x1
            # convolution run NCHW. In the batched runs' folded (B, K x C, H, W) layout that
            # convolution took 30 ms against 4 ms channels_last (AMD EPYC, 2 cores, C = 36).
            g = g.contiguous(memory_format=torch.channels_last)
        a32, g32 = a.to(s.dtype), g.to(s.dtype)
        p = _power(s, ctx.beta)
        t = (g32 * a32).mul_(p).div_(s)  # g_j a_j s_j^(-beta-1)
        w = window_sum(t, ctx.groups, (ctx.size - 1) // 2, ctx.size // 2)
        grad = torch.addcmul(p.mul_(g32), a32, w, value=-2 * ctx.alpha * ctx.beta)
        return grad.to(a.dtype), None, None, None, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, a: Tensor, groups: int, size: int, alpha: float, beta: float, k: float) -> Any:
        runs = a.movedim(in_dims[0], 1)  # (B, K, C, H, W)
        b, s = _LRNFunction.apply(runs.flatten(1, 2), groups * runs.shape[1], size, alpha, beta, k)
        return (b.unflatten(1, runs.shape[1:3]), s.unflatten(1, runs.shape[1:3])), (1, 1)


def lrn_function(x: Tensor, groups: int, size: int, alpha: float, beta: float, k: float) -> Tensor:
    """b of :class:`_LRNFunction` (autograd through the hand-written backward)."""
    return _LRNFunction.apply(x, groups, size, alpha, beta, k)[0]


def lrn(x: Tensor, groups: int, size: int, alpha: float, beta: float, k: float) -> Tensor:
    """LRN of (B, C, H, W) with alpha per element of the window (alpha' above): Triton on CUDA
    when it imports, :class:`_LRNFunction` elsewhere."""
    # Inside vmap a tensor reports requires_grad False whatever the level below it records;
    # the Function's vmap rule is also the fast way through vmap, with or without gradients
    # (and the Triton op has no vmap rule).
    if torch._C._functorch.is_batchedtensor(x):
        return lrn_function(x, groups, size, alpha, beta, k)
    if x.is_cuda:
        from alexnet.models import lrn_triton

        if lrn_triton.available():
            return lrn_triton.lrn_op(x, groups, size, alpha, beta, k)
    if torch.is_grad_enabled() and x.requires_grad:
        return lrn_function(x, groups, size, alpha, beta, k)
    return lrn_reference(x, groups, size, alpha, beta, k)[0]


class LocalResponseNorm(nn.Module):
    """b_c = a_c / (k + alpha' * sum_{j=c-n/2}^{c+n/2} a_j^2)^beta, the window clipped at the ends.

    ``alpha' = alpha`` in the paper and ``alpha / n`` in cuda-convnet and Caffe. With
    ``groups=2`` the window stays inside each tower's channels, as it did on each GPU.
    Scripted or traced (TorchScript, ONNX), ``F.local_response_norm`` (which divides alpha
    by n, undone here); otherwise :func:`lrn`.
    """

    def __init__(self, convention: str = "paper", groups: int = 1) -> None:
        super().__init__()
        k, alpha, beta, n, divide_by_n, per_tower = LRN_CONVENTIONS[convention]
        self.size, self.beta, self.k = n, beta, k
        self.alpha = alpha if divide_by_n else alpha * n  # F.local_response_norm divides by n
        self.groups = groups if per_tower else 1

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # A TorchScript or ONNX graph cannot hold a Python autograd.Function or a custom op:
        # scripting skips this block, tracing takes the F.local_response_norm path below.
        if not torch.jit.is_scripting():
            if not torch.jit.is_tracing():
                return lrn(x, self.groups, self.size, self.alpha / self.size, self.beta, self.k)
        x = x.reshape(b * self.groups, c // self.groups, h, w)
        x = F.local_response_norm(x, self.size, alpha=self.alpha, beta=self.beta, k=self.k)
        return x.reshape(b, c, h, w)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha} (per n), beta={self.beta}, k={self.k}, groups={self.groups}"
