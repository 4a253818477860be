"""fc7 feature vectors for folders of images, saved as a NumPy index for retrieval.

Figure 4 (right) of the paper compares images by the Euclidean distance between their
4096-d activations of the last hidden layer (fc7, after its ReLU). Here each image is
decoded and resized as in training (shorter side to the checkpoint's image size, central
square), its centre patch goes through the network in eval mode (no dropout), and
``fc7_features`` gives the vector.

The index is an ``.npz`` without pickles: ``features`` (N, D) float32, ``paths`` relative
to ``root``, and a fingerprint of the network's weights, so that retrieval can refuse an
index built by another network (its distances would mean nothing).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from alexnet.checkpoint import LoadedModel
from alexnet.data.augment import eval_patches
from alexnet.data.images import IMAGE_EXTENSIONS, ImageFolderDataset, ImageList
from alexnet.data.loader import EpochBatchSampler, make_loader
from alexnet.errors import AlexNetError
from alexnet.files import atomic_write


@dataclass
class FeatureIndex:
    root: str  # absolute folder the paths are relative to
    paths: list[str]
    features: np.ndarray  # (N, D) float32
    fingerprint: str  # of the network that computed them
    skipped: list[str] = field(default_factory=list)  # "path: reason" of files that could not be decoded

    def absolute(self, i: int) -> Path:
        return Path(self.root) / self.paths[i]


def list_images(folder: str | Path) -> list[str]:
    """Image files under folder, recursively, sorted; hidden files and non-images ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AlexNetError(f"image folder {folder} does not exist or is not a folder")
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [
            os.path.relpath(os.path.join(dirpath, f), folder)
            for f in filenames
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    if not found:
        raise AlexNetError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS[:4])}, ...)")
    return sorted(found)


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (first 16 hex digits) of the weights, in state_dict order."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def image_features(loaded: LoadedModel, images: torch.Tensor) -> torch.Tensor:
    """fc7 of the centre patches of a uint8 batch (B, 3, S, S): (B, D) float32."""
    patches = eval_patches(images, loaded.preprocess, ten=False)[:, 0]
    return loaded.model.fc7_features(patches).float()


def extract_features(
    loaded: LoadedModel,
    folder: str | Path,
    batch_size: int = 64,
    workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> FeatureIndex:
    """Features of every decodable image under folder; undecodable ones are listed in ``skipped``."""
    root = Path(folder).resolve()
    rel = list_images(root)
    # Labels carry each file's position, so the batches say which files survived decoding.
    images = ImageList(root, [str(root / p) for p in rel], list(range(len(rel))), ["all"])
    sampler = EpochBatchSampler(len(rel), batch_size, shuffle=False)
    loader = make_loader(ImageFolderDataset(images, loaded.preprocess.image_size), sampler, workers)
    feats: list[np.ndarray] = []
    kept: list[int] = []
    skipped: list[str] = []
    for batch in tqdm(loader, desc="features", unit="batch", disable=not progress, leave=False):
        skipped += batch.skipped
        if len(batch.labels):
            feats.append(image_features(loaded, batch.images.to(device)).cpu().numpy())
            kept += batch.labels.tolist()
    if not kept:
        raise AlexNetError(f"none of the {len(rel)} images under {root} could be decoded (e.g. {skipped[0]})")
    return FeatureIndex(
        str(root), [rel[i] for i in kept], np.concatenate(feats), model_fingerprint(loaded.model), skipped
    )


def save_index(index: FeatureIndex, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "features": index.features.astype(np.float32),
        "paths": np.array(index.paths, dtype=str),
        "root": np.array(index.root),
        "fingerprint": np.array(index.fingerprint),
        "skipped": np.array(index.skipped, dtype=str),
    }
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def load_index(path: str | Path) -> FeatureIndex:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return FeatureIndex(
                root=str(z["root"]),
                paths=[str(p) for p in z["paths"]],
                features=z["features"].astype(np.float32),
                fingerprint=str(z["fingerprint"]),
                skipped=[str(s) for s in z["skipped"]],
            )
    except FileNotFoundError:
        raise AlexNetError(f"feature index {path} does not exist") from None
    except KeyError as e:
        raise AlexNetError(f"{path} is not a feature index from 'alexnet features' (no {e} array)") from None
    except (OSError, ValueError) as e:
        raise AlexNetError(f"cannot read feature index {path}: {e}") from None
