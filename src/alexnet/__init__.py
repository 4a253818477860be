"""AlexNet (Krizhevsky, Sutskever & Hinton, NeurIPS 2012): the paper's network, data
pipeline, training recipe and evaluation, and torchvision's variant."""

from importlib import metadata as _metadata

from alexnet.checkpoint import load_model
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
]

try:  # one source for the version: pyproject.toml, read back from the installed metadata
    __version__ = _metadata.version("alexnet")
except _metadata.PackageNotFoundError:  # the sources on PYTHONPATH without an install
    __version__ = "0+unknown"
