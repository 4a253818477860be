"""AlexNet (Krizhevsky, Sutskever & Hinton, NeurIPS 2012): the paper's network, data
pipeline, training recipe and evaluation, and torchvision's variant."""

from alexnet.checkpoint import load_model, load_pretrained
from alexnet.errors import AlexNetError
from alexnet.models import (
    LocalResponseNorm,
    ModelConfig,
    PaperAlexNet,
    TorchvisionAlexNet,
    TowerParallelAlexNet,
    count_parameters,
    create_model,
)
from alexnet.runtime import package_version

__all__ = [
    "AlexNetError",
    "LocalResponseNorm",
    "ModelConfig",
    "PaperAlexNet",
    "TorchvisionAlexNet",
    "TowerParallelAlexNet",
    "count_parameters",
    "create_model",
    "load_model",
    "load_pretrained",
]

__version__ = package_version()
