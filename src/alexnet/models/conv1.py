"""conv1 computed directly or as space-to-depth: the same function, the same parameters.

conv1 (11x11, stride 4, on 3 channels) keeps a GPU's tensor cores poorly fed: 3 input
channels is a K of 3 x 121 per output in an implicit GEMM with a ragged 11x11 window.
Space-to-depth rewrites it exactly: zero-pad the kernel to 12x12 (3 blocks of 4), fold each
4x4 pixel block of the (padded) input into 48 channels (``F.pixel_unshuffle(x, 4)``), and
convolve 3x3 at stride 1 with the weight rearranged the same way. The padded kernel
entries are zero, so only summation order changes (equal to 1e-12 in float64,
tests/models/test_conv1.py). Which is faster is a GPU measurement (benchmarks/gpu.sh);
until one says so, ``speed.conv1=auto`` is direct.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from alexnet.errors import AlexNetError

CONV1_IMPLS = ("direct", "space-to-depth")


def space_to_depth_weight(weight: Tensor, stride: int) -> Tensor:
    """(O, C, K, K) -> (O, C*s*s, q, q), q = ceil(K / s): the kernel zero-padded to q*s and folded."""
    o, c, k, _ = weight.shape
    q = -(-k // stride)
    w = F.pad(weight, (0, q * stride - k, 0, q * stride - k))  # (O, C, q*s, q*s)
    w = w.reshape(o, c, q, stride, q, stride).permute(0, 1, 3, 5, 2, 4)  # (O, C, dy, dx, by, bx)
    return w.reshape(o, c * stride * stride, q, q)  # pixel_unshuffle's channel order: c, dy, dx


def conv_space_to_depth(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` for a square kernel, as a stride-1 convolution
    on ``pixel_unshuffle(x, stride)``. Output o reads padded rows s*o .. s*o + q*s - 1, so the
    padded input is cut (or zero-extended) to s * (out + q - 1) rows and columns."""
    k = weight.shape[-1]
    q = -(-k // stride)
    h, w = x.shape[-2:]
    out_h, out_w = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    if out_h < 1 or out_w < 1:
        raise AlexNetError(f"input {h}x{w} is smaller than conv1's {k}x{k} kernel")
    # F.pad takes negative amounts as cropping: the rows past the last window are never read.
    extra_h, extra_w = stride * (out_h + q - 1) - h - padding, stride * (out_w + q - 1) - w - padding
    x = F.pad(x, (padding, extra_w, padding, extra_h))
    x = F.pixel_unshuffle(x, stride)  # (B, C*s*s, out + q - 1, out + q - 1)
    return F.conv2d(x, space_to_depth_weight(weight, stride), bias)


class Conv1(nn.Conv2d):
    """nn.Conv2d whose forward is direct or space-to-depth (``impl``); its weight stays (O, C, K, K),
    so state_dicts are those of a plain convolution whichever runs."""

    impl: str = "direct"

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride[0]
        square = self.stride[0] == self.stride[1] and self.padding[0] == self.padding[1]  # type: ignore[index]
        if self.impl == "direct" or s == 1 or not square or self.groups != 1 or self.padding_mode != "zeros":
            return super().forward(x)
        return conv_space_to_depth(x, self.weight, self.bias, s, self.padding[0])  # type: ignore[index]


def set_conv1(model: nn.Module, impl: str) -> None:
    """``"direct"`` or ``"space-to-depth"`` for every :class:`Conv1` of model."""
    if impl not in CONV1_IMPLS:
        raise AlexNetError(f"conv1 must be one of {', '.join(CONV1_IMPLS)}; got {impl!r}")
    for module in model.modules():
        if isinstance(module, Conv1):
            module.impl = impl
