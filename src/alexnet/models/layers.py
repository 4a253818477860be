"""Two layers of the paper's network beside nn's: the two-tower convolution and the paper's dropout.

Used by alexnet.PaperAlexNet and re-exported from alexnet.models.alexnet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alexnet.errors import AlexNetError

DROPOUT_STYLES = ("paper", "inverted")


class TowerConv2d(nn.Conv2d):
    """A convolution over two towers: ``groups=2``, computed as one grouped convolution or,
    with ``split = True``, as one convolution per tower whose outputs are concatenated.

    Both compute the same function from the same parameters (weight (out, in/groups, k, k)),
    so state_dicts are interchangeable; which is faster depends on the device and library
    (cuDNN has been slow on grouped convolutions), and benchmarks choose (speed.tower_convs).
    """

    split: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if not self.split or self.groups == 1:
            return super().forward(x)
        g = self.groups
        biases = self.bias.chunk(g) if self.bias is not None else [None] * g
        towers = [
            F.conv2d(xi, wi, bi, self.stride, self.padding, self.dilation)
            for xi, wi, bi in zip(x.chunk(g, 1), self.weight.chunk(g), biases)
        ]
        return torch.cat(towers, 1)


def set_tower_convs(model: nn.Module, impl: str) -> None:
    """``"grouped"`` or ``"split"`` for every two-tower convolution of model (a no-op for torchvision's)."""
    if impl not in ("grouped", "split"):
        raise AlexNetError(f"tower convolutions must be 'grouped' or 'split'; got {impl!r}")
    for module in model.modules():
        if isinstance(module, TowerConv2d):
            module.split = impl == "split"


class Dropout(nn.Module):
    """Dropout of fc6 and fc7's outputs, as the paper (section 4.2) or as ``nn.Dropout``.

    ``"paper"``: in training each unit is kept (times 1) with probability 1 - p and set to
    zero otherwise; at test all units are kept and "multiplied by 0.5" (1 - p), so a unit's
    test output equals its expected training output. ``"inverted"``: kept units are
    multiplied by 1 / (1 - p) in training and test is the identity, as torch's nn.Dropout,
    cuda-convnet's successors and Caffe do. Both have the same expectations up to the
    factor 1 - p, which the next layer's weights absorb: a paper-style network equals an
    inverted-style one whose fc7 and fc8 weights are multiplied by 1 - p
    (tests/models/test_dropout.py), but with the paper's init and learning rate the inverted
    style makes fc7 and fc8 see activations 1/(1-p) times larger in training.
    """

    def __init__(self, p: float, style: str = "paper") -> None:
        super().__init__()
        if style not in DROPOUT_STYLES:
            raise AlexNetError(f"dropout style must be one of {', '.join(DROPOUT_STYLES)}; got {style!r}")
        self.p, self.style = float(p), style

    def forward(self, x: Tensor) -> Tensor:
        if self.style == "inverted":
            return F.dropout(x, self.p, self.training)
        if not self.training:
            return x * (1.0 - self.p)  # an exact no-op for p = 0
        if self.p == 0.0:
            return x
        return x * torch.empty_like(x).bernoulli_(1.0 - self.p)  # mask of 0s and 1s, unscaled

    def extra_repr(self) -> str:
        return f"p={self.p}, style={self.style}"
