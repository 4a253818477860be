"""Training-set statistics: the per-pixel mean image (section 2) and the RGB PCA (section 4.1).

Computed once per dataset and cached under :func:`alexnet.files.cache_dir`; a prepared
store carries its own.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from alexnet.data.images import ImageFolderDataset, ImageList
from alexnet.data.loader import collate, die_with_parent_init, resolve_workers
from alexnet.errors import AlexNetError
from alexnet.files import atomic_write, cache_dir


@dataclass
class DataStats:
    mean_image: torch.Tensor  # (3, S, S) float32, 0-255: the per-pixel mean over the training set
    pixel_std: torch.Tensor  # (3,) float32, 0-255: per-channel standard deviation
    eigvals: torch.Tensor  # (3,) float32: eigenvalues of the RGB covariance, pixels scaled to [0, 1]
    eigvecs: torch.Tensor  # (3, 3) float32: eigenvectors as columns, matching eigvals
    count: int  # images that went into the statistics

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "mean_image": self.mean_image,
            "pixel_std": self.pixel_std,
            "eigvals": self.eigvals,
            "eigvecs": self.eigvecs,
            "count": torch.tensor(self.count),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> DataStats:
        return cls(t["mean_image"], t["pixel_std"], t["eigvals"], t["eigvecs"], int(t["count"]))


class StatsAccumulator:
    """Sums in float64 from which the mean image and the 3x3 RGB covariance follow."""

    def __init__(self, size: int) -> None:
        self.image_sum = torch.zeros(3, size, size, dtype=torch.float64)
        self.rgb_sum = torch.zeros(3, dtype=torch.float64)
        self.rgb_outer = torch.zeros(3, 3, dtype=torch.float64)
        self.count = 0

    def add(self, images: torch.Tensor) -> None:
        x = images.to(torch.float64)  # (B, 3, S, S), 0-255
        self.image_sum += x.sum(0)
        pixels = x.permute(1, 0, 2, 3).reshape(3, -1) / 255.0
        self.rgb_sum += pixels.sum(1)
        self.rgb_outer += pixels @ pixels.T
        self.count += images.shape[0]

    def add_sums(self, image_sum: np.ndarray, rgb_sum: list[int], rgb_outer: list[list[int]], count: int) -> None:
        """Add sums taken elsewhere (prepare's workers) over ``count`` images, all in 0-255 units:
        the per-pixel sum (3, S, S), the RGB sum (3,) and the RGB products (3, 3) over all pixels."""
        self.image_sum += torch.from_numpy(np.asarray(image_sum, dtype=np.float64))
        self.rgb_sum += torch.tensor(rgb_sum, dtype=torch.float64) / 255.0
        self.rgb_outer += torch.tensor(rgb_outer, dtype=torch.float64) / 255.0**2
        self.count += count

    def result(self) -> DataStats:
        if self.count == 0:
            raise AlexNetError("no readable training images to compute the mean image from")
        n_pixels = self.count * self.image_sum.shape[1] * self.image_sum.shape[2]
        mean = self.rgb_sum / n_pixels
        cov = self.rgb_outer / n_pixels - torch.outer(mean, mean)
        eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
        eigvals, eigvecs = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)
        return DataStats(
            mean_image=(self.image_sum / self.count).float(),
            pixel_std=(cov.diagonal().clamp_min(1e-12).sqrt() * 255.0).float(),
            eigvals=eigvals.float(),
            eigvecs=eigvecs.float(),
            count=self.count,
        )


def _fingerprint(images: ImageList, image_size: int, max_images: int) -> str:
    h = hashlib.sha256(f"v1 {image_size} {max_images} {images.root.resolve()}".encode())
    for p in images.paths:
        st = os.stat(p)
        h.update(f"{p} {st.st_size} {st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def compute_stats(
    images: ImageList, image_size: int, workers: int = -1, max_images: int = 0, progress: bool = False
) -> tuple[DataStats, list[str]]:
    """Mean image and RGB PCA over the training set (or the first ``max_images`` of a fixed shuffle).

    Cached under ``$ALEXNET_CACHE`` (default ~/.cache/alexnet) keyed by the file list,
    sizes and modification times, so it runs once per dataset. Also returns the files
    that could not be decoded.
    """
    key = _fingerprint(images, image_size, max_images)
    path = cache_dir() / "stats" / f"{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                stats = DataStats.from_tensors({k: torch.from_numpy(z[k]) for k in z.files if k != "skipped"})
                return stats, [str(s) for s in z["skipped"]]
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache is recomputed
    subset = list(range(len(images)))
    if 0 < max_images < len(images):
        subset = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:max_images].tolist()
    dataset = torch.utils.data.Subset(ImageFolderDataset(images, image_size), subset)
    workers = resolve_workers(workers)
    loader = DataLoader(
        dataset,
        batch_size=64,
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=die_with_parent_init() if workers > 0 else None,
    )
    acc = StatsAccumulator(image_size)
    skipped: list[str] = []
    from tqdm import tqdm

    for batch in tqdm(loader, desc="mean image and PCA", disable=not progress, unit="batch", leave=False):
        if len(batch.images):
            acc.add(batch.images)
        skipped += batch.skipped
    stats = acc.result()
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: v.numpy() for k, v in stats.to_tensors().items()}
    atomic_write(path, lambda f: np.savez(f, skipped=np.array(skipped, dtype=str), **arrays))
    return stats, skipped
