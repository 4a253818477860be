"""Top-k classes with probabilities for image files, from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import load_for_inference
from .data import BadImage, load_image
from .evaluate import predict_probs


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (class name, probability), best first
    error: str = ""  # why the image could not be classified


@torch.no_grad()
def predict(
    checkpoint: str | Path, paths: list[str], topk: int = 5, ten: bool = False, device: str | torch.device = "cpu"
) -> list[Prediction]:
    """Classify each image (decoded and resized as in training; centre patch, or ten patches)."""
    model, pre, classes = load_for_inference(checkpoint, device)
    results = []
    for path in paths:
        try:
            image = torch.from_numpy(load_image(path, pre.image_size)).permute(2, 0, 1)[None].to(device)
        except BadImage as e:
            results.append(Prediction(str(path), error=str(e)))
            continue
        probs = predict_probs([model], [pre], image, ten)[0]
        values, indices = probs.topk(min(topk, len(classes)))
        results.append(Prediction(str(path), [(classes[i], float(v)) for v, i in zip(values.tolist(), indices.tolist())]))
    return results
