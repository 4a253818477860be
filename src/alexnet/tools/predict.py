"""Top-k classes with probabilities for image files, from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from alexnet.checkpoint import LoadedModel, load_model
from alexnet.data.images import BadImage, load_image
from alexnet.evaluate import predict_probs


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (readable name, probability), best first
    classes: list[str] = field(default_factory=list)  # the same classes' ids (e.g. WordNet ids)
    error: str = ""  # why the image could not be classified


def top_classes(loaded: LoadedModel, probs: torch.Tensor, topk: int) -> tuple[list[tuple[str, float]], list[str]]:
    """The k most probable classes of one probability vector: (name, probability) pairs and ids."""
    values, indices = probs.topk(min(topk, len(loaded.classes)))
    idx = indices.tolist()
    return [(loaded.names[i], float(v)) for v, i in zip(values.tolist(), idx)], [loaded.classes[i] for i in idx]


@torch.no_grad()
def predict(
    checkpoint: str | Path, paths: list[str], topk: int = 5, ten: bool = False, device: str | torch.device = "cpu"
) -> list[Prediction]:
    """Classify each image (decoded and resized as in training; centre patch, or ten patches)."""
    loaded = load_model(checkpoint, device)
    results = []
    for path in paths:
        try:
            image = torch.from_numpy(load_image(path, loaded.preprocess.image_size)).permute(2, 0, 1)[None].to(device)
        except BadImage as e:
            results.append(Prediction(str(path), error=str(e)))
            continue
        probs = predict_probs([loaded.model], [loaded.preprocess], image, ten)[0]
        top, ids = top_classes(loaded, probs, topk)
        results.append(Prediction(str(path), top, ids))
    return results
