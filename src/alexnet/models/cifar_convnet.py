"""The four-layer CIFAR-10 network of the paper's section 3.3 (Krizhevsky's cuda-convnet example).

Section 3.3: "On the CIFAR-10 dataset, a four-layer CNN achieved a 13% test error rate without
normalization and 11% with normalization." cuda-convnet's README lists the same two numbers
for its CIFAR-10 example nets, ``layers-conv-local-13pct.cfg`` and ``layers-conv-local-11pct.cfg``;
the layers below are those files' (read from the copy in the public repository
dnouri/cuda-convnet, ``example-layers/layers-conv-local-11pct.cfg`` at commit 3878e8f and
``layers-conv-local-13pct.cfg``, and its ``layer-params-conv-local-11pct.cfg``):

    conv1  5x5, 64 filters, padding 2, ReLU      initW 0.0001
    rnorm1 across 5 maps, scale 0.001, pow 0.75  (11pct only)
    pool1  max 3x3 stride 2
    conv2  5x5, 64 filters, padding 2, ReLU      initW 0.01
    rnorm2 across 5 maps, scale 0.001, pow 0.75  (11pct only)
    pool2  max 3x3 stride 2
    local3 3x3, 32 filters, padding 1, ReLU      initW 0.04, unshared weights
    local4 3x3, 32 filters, padding 1, ReLU      initW 0.04, unshared weights
    fc10   10 outputs                            initW 0.01

The paper's "four layers" are, we read, the four hidden layers (two convolutional, two
locally connected) under the fully connected classifier; the paper does not say. The
input is the 24x24 crops of cuda-convnet's ``cifar-cropped`` provider (``--crop-border=4``)
with reflections. cuda-convnet's pooling gives ceil((size - 3) / 2) + 1 outputs (its
``outputsX``), which is ``ceil_mode=True``: 24 -> 12 -> 6.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alexnet.errors import AlexNetError


class LocallyConnected2d(nn.Module):
    """A convolution whose filters are not shared: each output position has its own weights
    (cuda-convnet's ``type=local``) and its own biases (cuda-convnet: ``modules * filters``).

    weight (L, out, in * k * k) for the L = out_h * out_w positions, in ``F.unfold``'s patch
    order (channel, then kernel row, then column); output (B, out, out_h, out_w).
    """

    def __init__(self, in_channels: int, out_channels: int, in_size: int, kernel: int, padding: int = 0) -> None:
        super().__init__()
        self.kernel, self.padding = kernel, padding
        self.out_size = in_size + 2 * padding - kernel + 1
        if self.out_size < 1:
            raise AlexNetError(f"a {kernel}x{kernel} locally connected layer does not fit {in_size}x{in_size} input")
        positions = self.out_size**2
        self.weight = nn.Parameter(torch.empty(positions, out_channels, in_channels * kernel * kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels, self.out_size, self.out_size))

    def forward(self, x: Tensor) -> Tensor:
        b, k, o, p = x.shape[0], self.kernel, self.out_size, self.padding
        # The patches as a strided view, (B, in, o, o, k, k), then one matrix product per
        # position. F.unfold followed by an einsum computed the same 25x slower on the CPU
        # (im2col dominated; (128, 64, 6, 6), k 3, measured 2026-12-02 on the loaded 2-core Xeon).
        patches = F.pad(x, (p, p, p, p)).unfold(2, k, 1).unfold(3, k, 1)
        patches = patches.permute(2, 3, 0, 1, 4, 5).reshape(o * o, b, -1)  # (L, B, in*k*k)
        out = torch.bmm(patches, self.weight.transpose(1, 2))  # (L, B, out)
        return out.permute(1, 2, 0).unflatten(2, (o, o)) + self.bias  # (B, out, o, o)


class ResponseNorm(nn.Module):
    """cuda-convnet's response normalisation, b = a / (1 + (scale / N) * sum a^2)^pow:

    * ``"cross-map"`` (``cmrnorm``, or ``rnorm`` with ``crossMap=1``): the sum over the N maps
      f - N//2 .. f - N//2 + N - 1 at the same position, clipped at the ends (N = size);
    * ``"spatial"`` (``rnorm``): the sum over a size x size square of the same map starting at
      x - size//2, clipped at the borders, with N = size**2 (the parser divides scale by it).

    The constant is 1, where the paper's ImageNet formula (section 3.3) has k = 2 and no
    division by N (models/alexnet.py LocalResponseNorm).
    """

    def __init__(self, kind: str = "cross-map", size: int = 5, scale: float = 0.001, power: float = 0.75) -> None:
        super().__init__()
        if kind not in ("cross-map", "spatial"):
            raise AlexNetError(f"response normalisation must be cross-map or spatial; got {kind!r}")
        self.kind, self.size, self.scale, self.power = kind, size, scale, power

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "cross-map":
            # F.local_response_norm's window is c - size//2 .. c + (size-1)//2, cuda-convnet's.
            return F.local_response_norm(x, self.size, alpha=self.scale, beta=self.power, k=1.0)
        before, after = self.size // 2, (self.size - 1) // 2
        sq = F.pad(x * x, (before, after, before, after))
        sums = F.avg_pool2d(sq, self.size, stride=1) * self.size**2  # zeros outside: clipped
        return x * (1.0 + self.scale / self.size**2 * sums).pow(-self.power)

    def extra_repr(self) -> str:
        return f"{self.kind}, size={self.size}, scale={self.scale}, pow={self.power}"


class CudaConvnetCifar(nn.Module):
    """``layers-conv-local-11pct.cfg`` (``norm="cross-map"``) or ``-13pct.cfg`` (``norm="none"``)."""

    def __init__(self, norm: str = "cross-map", num_classes: int = 10, input_size: int = 24) -> None:
        super().__init__()
        if norm not in ("cross-map", "spatial", "none"):
            raise AlexNetError(f"norm must be cross-map, spatial or none; got {norm!r}")
        self.norm = norm
        self.conv1 = nn.Conv2d(3, 64, 5, padding=2)
        self.conv2 = nn.Conv2d(64, 64, 5, padding=2)
        self.rnorm1 = ResponseNorm(norm) if norm != "none" else nn.Identity()
        self.rnorm2 = ResponseNorm(norm) if norm != "none" else nn.Identity()
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)  # cuda-convnet's outputsX
        side = math.ceil((math.ceil((input_size - 3) / 2) + 1 - 3) / 2) + 1  # 24 -> 12 -> 6
        self.local3 = LocallyConnected2d(64, 32, side, 3, padding=1)
        self.local4 = LocallyConnected2d(32, 32, side, 3, padding=1)
        self.fc10 = nn.Linear(32 * side * side, num_classes)
        # initW of the layer file: the std of a zero-mean normal; biases 0.
        for layer, std in ((self.conv1, 1e-4), (self.conv2, 0.01), (self.local3, 0.04), (self.local4, 0.04)):
            nn.init.normal_(layer.weight, 0.0, std)
            nn.init.zeros_(layer.bias)
        nn.init.normal_(self.fc10.weight, 0.0, 0.01)
        nn.init.zeros_(self.fc10.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.rnorm1(F.relu(self.conv1(x))))  # (B, 64, 12, 12)
        x = self.pool(self.rnorm2(F.relu(self.conv2(x))))  # (B, 64, 6, 6)
        x = F.relu(self.local3(x))  # (B, 32, 6, 6)
        x = F.relu(self.local4(x))  # (B, 32, 6, 6)
        return self.fc10(torch.flatten(x, 1))  # logits (B, 10)
