"""Optional dependencies, imported only where a command needs them.

``pip install alexnet`` holds what inference and the default ``alexnet train`` need (torch,
torchvision, numpy, pillow, pyyaml, tqdm, tensorboard, safetensors); each extra in
pyproject.toml adds the packages of a few commands. A missing one is a one-line
AlexNetError naming the command's need and the pip line that installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from alexnet.errors import AlexNetError

# module -> (distribution to name, extra that installs it); pyproject.toml's optional-dependencies.
EXTRAS: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "plots"),
    "google.protobuf": ("protobuf", "caffe"),
    "scipy": ("scipy", "imagenet"),
    "onnx": ("onnx", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "fastapi": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
}


def require(module: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, or an AlexNetError: '<purpose> needs <dist>: pip install ...'."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = next((m for m in EXTRAS if module == m or module.startswith(m + ".")), module)
        dist, extra = EXTRAS.get(top, (top, "all"))
        raise AlexNetError(f"{purpose} needs {dist}: pip install 'alexnet[{extra}]'") from None
