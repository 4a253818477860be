"""The networks: the paper's two-tower AlexNet and torchvision's variant (alexnet.py), the
two towers on two processes (towers.py), and Figure 1's four-layer CIFAR-10 net."""

from alexnet.models.alexnet import (
    MODEL_NAMES,
    AlexNet,
    LocalResponseNorm,
    ModelConfig,
    PaperAlexNet,
    TorchvisionAlexNet,
    build_model,
    count_parameters,
    create_model,
    model_config,
)
from alexnet.models.figure1 import Figure1Net
from alexnet.models.towers import TowerParallelAlexNet

__all__ = [
    "MODEL_NAMES",
    "AlexNet",
    "Figure1Net",
    "LocalResponseNorm",
    "ModelConfig",
    "PaperAlexNet",
    "TorchvisionAlexNet",
    "TowerParallelAlexNet",
    "build_model",
    "count_parameters",
    "create_model",
    "model_config",
]
