"""Datasets: ImageFolder trees, robust decoding, the paper's fixed-size images, and training-set statistics.

Section 2 of the paper: every image is rescaled so its shorter side is 256 and the
central 256x256 patch is kept. That is done here, in worker processes, once per image
read; what leaves this module is a uint8 tensor (3, S, S). Cropping, flipping, PCA
lighting and mean subtraction happen later on whole batches (augment.py), on the device
that trains.

A dataset of a million files has broken ones. A file that cannot be decoded is never
fatal: the worker returns it as skipped with its reason, the batch shrinks by one, and
the trainer reports each such file once.
"""

from __future__ import annotations

import hashlib
import os
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from .errors import AlexNetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")

# Refuse decompression bombs outright (PIL only warns between 89M and 179M pixels).
# The largest ILSVRC-2012 training image is about 20M pixels.
MAX_IMAGE_PIXELS = 64_000_000


class BadImage(Exception):
    """An image file that cannot be used; the message is the reason."""


class ImageTooLarge(BadImage):
    """An image over the pixel limit, or a decompression bomb (a small file of huge dimensions)."""


@dataclass(frozen=True)
class ImageList:
    """The files of one split: paths, integer labels, and class names in label order."""

    root: Path
    paths: list[str]
    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def scan_image_folder(root: str | Path, classes: list[str] | None = None) -> ImageList:
    """List ``root/<class>/<image>`` files; class labels follow sorted folder names (torchvision's order).

    ``classes`` fixes the label order (the training split's) for a validation split.
    Hidden files and files without an image extension (Thumbs.db, .DS_Store) are ignored.
    """
    root = Path(root)
    if not root.exists():
        raise AlexNetError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise AlexNetError(f"data folder {root} is not a folder")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise AlexNetError(f"data folder {root} has no class folders (expected {root}/<class>/<image>)")
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise AlexNetError(
                f"{root} has class folder(s) {', '.join(unknown[:5])} that the training set "
                f"(or checkpoint) does not have; expected a subset of its {len(classes)} classes"
            )
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue  # a validation split may lack some classes
        files = sorted(
            entry.path
            for entry in os.scandir(folder)
            if entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not files:
            raise AlexNetError(f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
        paths += files
        labels += [label] * len(files)
    return ImageList(root, paths, labels, list(classes))


def find_splits(root: str | Path) -> tuple[Path, Path]:
    """``root/train`` and ``root/val`` (``root/test`` is accepted for val, as in CIFAR-10 trees)."""
    root = Path(root)
    if not root.is_dir():
        raise AlexNetError(f"data folder {root} does not exist")
    train = root / "train"
    val = next((root / v for v in ("val", "validation", "test") if (root / v).is_dir()), None)
    if not train.is_dir() or val is None:
        raise AlexNetError(
            f"{root} must hold train/<class>/<image> and val/<class>/<image>; "
            f"found: {', '.join(sorted(p.name for p in root.iterdir())) or 'nothing'}"
        )
    return train, val


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float greyscale: PIL's convert("RGB") clips instead of scaling.
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I") and a.max() > 255 else max(a.max(), 1.0)
        img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if img.mode in ("P", "PA", "LA") or (img.mode == "RGBA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def load_image(path: str | Path | BinaryIO, size: int) -> np.ndarray:
    """Decode, rescale the shorter side to ``size`` and keep the central square: (size, size, 3) uint8.

    ``path`` may also be an open binary file (an archive member read into memory).

    Handles grayscale, CMYK, palette, 16-bit and EXIF-rotated files, and a PNG saved
    with a .jpg name (PIL reads the content, not the name). ``path`` may also be an open
    binary file (an upload). Raises BadImage otherwise, ImageTooLarge for oversized images.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Damaged metadata in an image that still decodes ("Corrupt EXIF data", "Tag
            # data larger than file"): one line per file on stderr, from every worker,
            # would bury the log of a run over millions of files.
            warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
            with Image.open(path) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise ImageTooLarge(f"{img.width}x{img.height} pixels is over the {MAX_IMAGE_PIXELS:,} limit")
                # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale when that still
                # leaves the shorter side >= size: several times faster on ImageNet.
                img.draft("RGB", (size, size))
                img = ImageOps.exif_transpose(img)
                img = _to_rgb(img)
                w, h = img.size
                scale = size / min(w, h)
                nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                img = img.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
                left, top = (nw - size) // 2, (nh - size) // 2
                return np.array(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"refused as a decompression bomb: {e}") from None
    except FileNotFoundError:
        raise BadImage("file vanished") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.UnidentifiedImageError) as e:
        raise BadImage(str(e) or type(e).__name__) from None


class ImageFolderDataset(Dataset):
    """Items are ``(uint8 image (3, S, S) or None, label, reason)``; reason is '' for a good image."""

    def __init__(self, images: ImageList, image_size: int) -> None:
        self.images = images
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str]:
        path, label = self.images.paths[index], self.images.labels[index]
        try:
            array = load_image(path, self.image_size)
        except BadImage as e:
            return None, label, f"{path}: {e}"
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), label, ""


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) uint8
    labels: torch.Tensor  # (B,) int64
    skipped: list[str]  # "path: reason" for each file of the batch that could not be decoded


def collate(items: list[tuple[torch.Tensor | None, int, str]]) -> Batch:
    good = [(x, y) for x, y, _ in items if x is not None]
    skipped = [reason for x, _, reason in items if x is None]
    if not good:
        return Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), skipped)
    return Batch(torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), skipped)


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of indices, shuffled by a generator seeded with (seed, epoch).

    The order of epoch e depends on nothing but the seed and e, so a resumed run replays
    it exactly, and ``start_batch`` skips the batches an interrupted epoch already did.

    ``batch_size`` is the global batch. With ``world_size > 1`` every global batch of the
    one permutation is cut into world_size consecutive shares and rank r takes share r:
    no sample is seen twice in an epoch, and global batch k holds the same samples for
    any world size (what makes N ranks compute the update of one). ``start_batch``
    counts global batches, so a position carries over to another world size.
    ``drop_last`` drops a last global batch that is not whole (training with several
    ranks: every rank must make the same number of steps); otherwise the last batch's
    shares are as even as possible and a rank with an empty share skips it (evaluation).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if drop_last and batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by world_size {world_size}")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def global_batches(self) -> int:
        """Global batches in a whole epoch."""
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def _share(self, size: int) -> tuple[int, int]:
        """(start, stop) of this rank's share of a global batch of `size` samples."""
        per, extra = divmod(size, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return start, start + per + (self.rank < extra)

    def __len__(self) -> int:
        """Batches this rank will still yield (global batches where its share is not empty)."""
        full = self.n // self.batch_size
        count = max(0, full - self.start_batch)
        last = self.n - full * self.batch_size
        if last and not self.drop_last and self.start_batch <= full:
            start, stop = self._share(last)
            count += stop > start
        return count

    def __iter__(self):
        order = self._order()
        for b in range(self.start_batch, self.global_batches()):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            start, stop = self._share(len(batch))
            if stop > start:
                yield batch[start:stop]


def resolve_workers(workers: int) -> int:
    return (os.cpu_count() or 1) if workers < 0 else workers


def _ignore_stop_signals(worker_id: int) -> None:
    """Decoding workers leave SIGINT and SIGTERM to the main process.

    Ctrl-C reaches the whole process group and ``scancel`` every process of a job step; a
    worker that died of it would make the main process fail on its next batch instead of
    finishing the step and saving a checkpoint. Workers still exit with their parent.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: Dataset, sampler: EpochBatchSampler, workers: int) -> DataLoader:
    workers = resolve_workers(workers)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_ignore_stop_signals if workers > 0 else None,
        # Without its own generator, every iter() of a DataLoader draws a worker seed from
        # the global RNG, which also drives dropout: a resumed epoch would then see other
        # dropout masks than the uninterrupted one.
        generator=torch.Generator().manual_seed(0),
    )


# --------------------------------------------------------------------------------------
# Training-set statistics: the mean image (section 2) and the RGB PCA (section 4.1)


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
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "DataStats":
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


def cache_dir() -> Path:
    return Path(os.environ.get("ALEXNET_CACHE", Path.home() / ".cache" / "alexnet"))


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
    loader = DataLoader(dataset, batch_size=64, num_workers=workers, collate_fn=collate)
    acc = StatsAccumulator(image_size)
    skipped: list[str] = []
    from tqdm import tqdm

    for batch in tqdm(loader, desc="mean image and PCA", disable=not progress, unit="batch", leave=False):
        if len(batch.images):
            acc.add(batch.images)
        skipped += batch.skipped
    stats = acc.result()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    arrays = {k: v.numpy() for k, v in stats.to_tensors().items()}
    np.savez(tmp, skipped=np.array(skipped, dtype=str), **arrays)
    os.replace(tmp, path)
    return stats, skipped

