"""models/figure1.py: Figure 1's four-layer network."""

from __future__ import annotations

import math

import pytest
import torch

from alexnet.errors import AlexNetError
from alexnet.models.alexnet import count_parameters
from alexnet.models.figure1 import Figure1Net


def test_figure1_net_shapes_and_parameter_count() -> None:
    for act in ("relu", "tanh"):
        net = Figure1Net(act)
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
        kinds = {type(m).__name__ for m in net.features}
        assert kinds == {"Conv2d", "MaxPool2d", "ReLU" if act == "relu" else "Tanh"}
    # conv 3->32 5x5, 32->32 5x5, 32->64 5x5, fc 64*3*3 -> 10, weights plus biases.
    expected = (3 * 25 * 32 + 32) + (32 * 25 * 32 + 32) + (32 * 25 * 64 + 64) + (576 * 10 + 10)
    assert count_parameters(Figure1Net()) == expected == 85_098
    with pytest.raises(AlexNetError, match="relu or tanh"):
        Figure1Net("sigmoid")


def test_figure1_net_starts_near_chance_loss() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))
    losses = {act: torch.nn.functional.cross_entropy(Figure1Net(act)(x), y).item() for act in ("relu", "tanh")}
    assert abs(losses["tanh"] - math.log(10)) < 0.05
    assert math.log(10) < losses["relu"] < 1.35 * math.log(10)


def test_figure1_net_paper_init() -> None:
    torch.manual_seed(0)
    net = Figure1Net("tanh", init="paper")
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    for m in convs:
        assert float(m.weight.detach().std()) == pytest.approx(0.01, rel=0.1) and not m.bias.any()
    with pytest.raises(AlexNetError, match="init must be he or paper"):
        Figure1Net("relu", init="xavier")
