"""torch.hub entry points: ``torch.hub.load(REPO, "alexnet_paper")`` and ``"alexnet_torchvision"``.

Arguments follow torchvision's hubconf: ``weights`` (a name such as
``"torchvision:IMAGENET1K_V1"``, ``"DEFAULT"``, torchvision's ``AlexNet_Weights`` member, or
the path of an alexnet checkpoint) and the older ``pretrained=True`` (the default weights).
Both return a network with ``.transforms()`` and ``.meta`` (see alexnet.models.interface).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# Module names torch.hub looks for before calling an entry point (PIL is pillow, yaml is pyyaml).
dependencies = ["torch", "torchvision", "numpy", "PIL", "yaml", "safetensors"]

# A checkout fetched by torch.hub is not installed: its sources are in src/. An alexnet
# already imported (an installed copy, or this checkout via PYTHONPATH) is used as it is.
_SRC = Path(__file__).resolve().parent / "src"
if "alexnet" not in sys.modules and _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))

from alexnet.checkpoint import load_model  # noqa: E402
from alexnet.errors import AlexNetError  # noqa: E402
from alexnet.models import create_model  # noqa: E402
from alexnet.tools import named_weights  # noqa: E402


def _from_checkpoint(path: Any, name: str, num_classes: int | None) -> Any:
    return load_model(path, name=name, num_classes=num_classes).model


def alexnet_paper(*, pretrained: bool = False, weights: Any = None, progress: bool = True, **kwargs: Any) -> Any:
    """The paper's two-tower network (Figure 2); options as ``create_model("paper", ...)``.

    No weights for it are published (the paper's were never released): ``weights`` may be
    the path of a checkpoint you trained (``alexnet train``) or imported from Caffe.
    """
    if pretrained or (weights is not None and named_weights.is_named(weights)):
        raise AlexNetError(
            "no published weights exist for the paper's network: train one (alexnet train) and pass "
            "weights=PATH, or load 'alexnet_torchvision' with weights='torchvision:IMAGENET1K_V1'"
        )
    if weights is not None:
        return _from_checkpoint(weights, "paper", kwargs.get("num_classes"))
    return create_model("paper", **kwargs)


def alexnet_torchvision(*, pretrained: bool = False, weights: Any = None, progress: bool = True, **kwargs: Any) -> Any:
    """torchvision's one-tower network; ``pretrained=True`` is ``weights="torchvision:IMAGENET1K_V1"``."""
    if pretrained and weights is None:
        weights = "DEFAULT"
    if weights is None:
        return create_model("torchvision", **kwargs)
    if named_weights.is_named(weights):
        if kwargs:
            raise AlexNetError(f"published weights {weights!s} take no options; got {', '.join(kwargs)}")
        return named_weights.load_named(weights, progress=progress)
    return _from_checkpoint(weights, "torchvision", kwargs.get("num_classes"))
