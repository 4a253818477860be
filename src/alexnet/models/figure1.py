"""The network of the paper's Figure 1 (ReLU against tanh on CIFAR-10).

The paper does not give its four layers; :class:`Figure1Net` takes them from the CIFAR-10
example network of Krizhevsky's cuda-convnet (``layers-80sec.cfg``), the code the paper's
network was trained with and the likeliest source of "four-layer". The experiment that
trains it is :mod:`alexnet.experiments.figure1`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from alexnet.errors import AlexNetError


class Figure1Net(nn.Module):
    """Four weight layers, after cuda-convnet's CIFAR-10 ``layers-80sec.cfg``:

    conv 5x5 32 -> act -> max-pool 3/2 -> conv 5x5 32 -> act -> max-pool 3/2
    -> conv 5x5 64 -> act -> max-pool 3/2 -> fully connected 10.

    cuda-convnet's file averages in its last two poolings; max pooling everywhere keeps
    the net within the paper's own vocabulary and changes nothing the comparison depends
    on, since both activations get the same net. No LRN, dropout or weight decay: the
    figure used no regularisation. Convolution weights are He-normal with the gain of the
    activation (sqrt(2) for ReLU, 5/3 for tanh), so neither starts saturated or dead;
    ``init="paper"`` draws them from the paper's N(0, 0.01) instead (for raw-scale input).
    """

    def __init__(
        self,
        activation: str = "relu",
        num_classes: int = 10,
        widths: tuple[int, int, int] = (32, 32, 64),
        init: str = "he",
    ) -> None:
        super().__init__()
        if activation not in ("relu", "tanh"):
            raise AlexNetError(f"activation must be relu or tanh; got {activation!r}")
        if init not in ("he", "paper"):
            raise AlexNetError(f"init must be he or paper; got {init!r}")
        self.activation = activation
        act = nn.ReLU if activation == "relu" else nn.Tanh
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 5, padding=2), act(), nn.MaxPool2d(3, 2),  # (B, 32, 32, 32) -> (B, 32, 15, 15)
            nn.Conv2d(c1, c2, 5, padding=2), act(), nn.MaxPool2d(3, 2),  # (B, 32, 15, 15) -> (B, 32, 7, 7)
            nn.Conv2d(c2, c3, 5, padding=2), act(), nn.MaxPool2d(3, 2),  # (B, 64, 7, 7) -> (B, 64, 3, 3)
        )  # fmt: skip
        self.classifier = nn.Linear(c3 * 3 * 3, num_classes)  # 576 -> 10
        for m in self.features:
            if isinstance(m, nn.Conv2d):
                if init == "he":
                    nn.init.kaiming_normal_(m.weight, nonlinearity=activation)
                else:  # the paper's section 5, with zero biases (it gives no bias rule for Figure 1)
                    nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
        # The output layer takes the paper's N(0, 0.01), which keeps both nets' starting loss
        # near the chance level ln 10 = 2.30 (measured on unit-scale noise, three seeds:
        # tanh 2.32, ReLU 2.5-2.8; the ReLU features are larger, RMS about 4 against 0.7).
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, 32, 32) -> (B, 10)
        return self.classifier(torch.flatten(self.features(x), 1))
