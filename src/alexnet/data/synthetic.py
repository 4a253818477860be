"""The synthetic shapes dataset: rendered shapes for training anywhere.

The shapes: ``alexnet train`` falls back to them when no data is given, so the whole
pipeline (loading, augmentation, training, evaluation) runs with no download. Ten
classes carried only by geometry: foreground and background colours come from one
distribution for every class, and position, scale, rotation, aspect ratio, line
thickness, a lighting gradient and pixel noise vary within each class, so a small CNN
learns the task in a few epochs and a linear model on raw pixels does not. Each image is
drawn from its own generator seeded with ``(seed, split, class, index)``: any one image
can be rendered alone, in any order, and train and val never coincide. The layout is
the one torchvision's ImageFolder reads::

    ROOT/train/<class>/00000.jpg ...
    ROOT/val/<class>/00000.jpg ...
    ROOT/shapes-complete.json       # written last: the dataset is complete

The benchmark's ImageNet-sized JPEGs are made by benchimages.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from alexnet.errors import AlexNetError
from alexnet.files import atomic_write_text, cache_dir, exclusive_lock

log = logging.getLogger("alexnet")

# Sorted order is the order ImageFolder assigns labels in, so label i == CLASSES[i]
# whether a caller uses this tuple or the folder scan.
CLASSES: tuple[str, ...] = tuple("checker circle cross dots ring square star stripes-h stripes-v triangle".split())

# Bump whenever rendering changes, so caches made by older code are regenerated
# rather than silently mixed with new images (the marker records it).
DATASET_VERSION: int = 1

SPLITS: tuple[str, ...] = ("train", "val")
MARKER_NAME: str = "shapes-complete.json"
JPEG_QUALITY: int = 90

# Part of every image's seed so these streams cannot collide with other uses of
# the same user seed elsewhere in the project (e.g. weight init, shuffling).
_SEED_DOMAIN: int = 0x5A4E_5E7D
_SPLIT_IDS: dict[str, int] = {name: i for i, name in enumerate(SPLITS)}
_IMAGE_NAME = re.compile(r"^\d{5,}\.jpg$")

# Minimum luma gap between foreground and background (0..255 scale): low enough
# that some images are genuinely hard, high enough that the gradient and noise
# below never erase the shape.
_MIN_LUMA_CONTRAST: float = 55.0
_MAX_GRADIENT: float = 30.0
_NOISE_SIGMA: tuple[float, float] = (3.0, 12.0)


def default_dataset_dir() -> Path:
    """``datasets/shapes-v<DATASET_VERSION>`` in the cache folder (files.cache_dir); not created."""
    return cache_dir() / "datasets" / f"shapes-v{DATASET_VERSION}"


def image_rng(seed: int, split: str, label: int, index: int) -> np.random.Generator:
    """The generator that draws image ``index`` of class ``label`` in ``split``.

    Seeding from the full tuple (rather than one stream consumed in order) is what
    makes every image reproducible in isolation and the splits disjoint.
    """
    return np.random.default_rng([_SEED_DOMAIN, seed, _SPLIT_IDS[split], label, index])


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) of a size x size canvas, cached per size."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(coords, coords)  # type: ignore[return-value]


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background RGB, identically distributed for every class.

    Rejection sampling on the luma gap keeps the shape visible in grey-scale terms;
    which of the two is brighter is random, so brightness says nothing either.
    """
    while True:
        fg = rng.uniform(0.0, 255.0, 3)
        bg = rng.uniform(0.0, 255.0, 3)
        if abs(_luma(fg) - _luma(bg)) >= _MIN_LUMA_CONTRAST:
            return fg, bg


def _transform(
    points: np.ndarray, rng: np.random.Generator, size: int, radius: float, angle: float
) -> list[tuple[float, float]]:
    """Scale unit-radius ``points`` with a mild random aspect, rotate, and place them.

    The centre is drawn so the shape stays (almost) inside the canvas: a cut-off
    shape would be a label-noise source rather than useful difficulty.
    """
    aspect = rng.uniform(0.85, 1.15)
    scaled = points * radius * np.array([aspect, 1.0 / aspect])
    c, s = math.cos(angle), math.sin(angle)
    rotated = scaled @ np.array([[c, s], [-s, c]])
    extent = np.abs(rotated).max(axis=0)
    low = extent * 0.95
    high = np.maximum(size - extent * 0.95, low + 1.0)
    centre = rng.uniform(low, high)
    return [tuple(p) for p in (rotated + centre).tolist()]


def _regular_polygon(n: int, phase: float = 0.0) -> np.ndarray:
    t = phase + 2.0 * math.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star(inner: float) -> np.ndarray:
    outer = _regular_polygon(5, -math.pi / 2)
    inner_pts = _regular_polygon(5, -math.pi / 2 + math.pi / 5) * inner
    return np.stack([outer, inner_pts], axis=1).reshape(-1, 2)


def _cross(half_width: float) -> np.ndarray:
    a, w = 1.0, half_width
    return np.array(
        [(w, a), (w, w), (a, w), (a, -w), (w, -w), (w, -a), (-w, -a), (-w, -w), (-a, -w), (-a, w), (-w, w), (-w, a)]
    )


def _shape_mask(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A geometric class as a 0/255 mask on a size x size canvas."""
    radius = rng.uniform(0.20, 0.40) * size
    angle = rng.uniform(0.0, 2.0 * math.pi)
    # Relative stroke width for outlined variants: thin enough to read as an
    # outline, thick enough to survive the 2x downsample at small image sizes.
    stroke = rng.uniform(0.18, 0.40)
    outlined = False
    if name == "circle":
        unit = _regular_polygon(96)
    elif name == "ring":
        unit, outlined = _regular_polygon(96), True
    elif name == "square":
        unit, outlined = _regular_polygon(4, math.pi / 4), bool(rng.random() < 0.5)
    elif name == "triangle":
        # A triangle's circumradius overstates its size; enlarge it so its area
        # range overlaps the other shapes' and size is not a cue.
        unit, outlined = _regular_polygon(3, -math.pi / 2) * 1.15, bool(rng.random() < 0.5)
    elif name == "star":
        unit, outlined = _star(rng.uniform(0.38, 0.52)), bool(rng.random() < 0.5)
        # Scaling about the centre moves a star's edges much less than a convex
        # polygon's (they pass close to the centre), so it needs a wider stroke.
        stroke = min(stroke * 1.4, 0.5)
    elif name == "cross":
        unit = _cross(rng.uniform(0.18, 0.36))
    else:  # pragma: no cover - guarded by the CLASSES dispatch in render_image
        raise AssertionError(name)

    # Transforming outer and (scaled) inner outline together keeps them concentric.
    both = np.concatenate([unit, unit * (1.0 - stroke)])
    pts = _transform(both, rng, size, radius, angle)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon(pts[: len(unit)], fill=255)
    if outlined:
        draw.polygon(pts[len(unit) :], fill=0)
    return np.asarray(canvas)


def _texture_mask(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A texture class as a 0/255 mask covering the whole canvas."""
    xx, yy = _grid(size)
    if name in ("stripes-h", "stripes-v"):
        # Tilt is capped well below 45 degrees so the two stripe classes never meet.
        tilt = math.radians(rng.uniform(-20.0, 20.0))
        theta = tilt + (math.pi / 2 if name == "stripes-h" else 0.0)
        period = rng.uniform(0.12, 0.30) * size
        duty = rng.uniform(0.30, 0.60)
        u = xx * math.cos(theta) + yy * math.sin(theta) + rng.uniform(0.0, period)
        mask = np.mod(u, period) < duty * period
    elif name == "checker":
        theta = rng.uniform(0.0, math.pi / 2)
        cell = rng.uniform(0.08, 0.20) * size
        u = xx * math.cos(theta) + yy * math.sin(theta) + rng.uniform(0.0, 2 * cell)
        v = -xx * math.sin(theta) + yy * math.cos(theta) + rng.uniform(0.0, 2 * cell)
        mask = (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0
    elif name == "dots":
        theta = rng.uniform(0.0, math.pi / 2)
        spacing = rng.uniform(0.13, 0.25) * size
        dot_r = rng.uniform(0.20, 0.34) * spacing
        u = xx * math.cos(theta) + yy * math.sin(theta) + rng.uniform(0.0, spacing)
        v = -xx * math.sin(theta) + yy * math.cos(theta) + rng.uniform(0.0, spacing)
        du = np.mod(u, spacing) - spacing / 2
        dv = np.mod(v, spacing) - spacing / 2
        mask = du * du + dv * dv < dot_r * dot_r
    else:  # pragma: no cover - guarded by the CLASSES dispatch in render_image
        raise AssertionError(name)
    return mask.astype(np.uint8) * 255


_TEXTURES = frozenset({"stripes-h", "stripes-v", "checker", "dots"})


def render_image(label: int, image_size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB ``image_size`` x ``image_size`` image of class ``CLASSES[label]``.

    The mask is drawn at twice the size and box-downsampled, which anti-aliases
    edges for the cost of one extra reshape.
    """
    name = CLASSES[label]
    big = 2 * image_size
    mask_fn = _texture_mask if name in _TEXTURES else _shape_mask
    mask = mask_fn(name, rng, big).astype(np.float32) / 255.0
    alpha = mask.reshape(image_size, 2, image_size, 2).mean(axis=(1, 3))[..., None]

    fg, bg = _colours(rng)
    img = bg.astype(np.float32) * (1.0 - alpha) + fg.astype(np.float32) * alpha

    # Lighting gradient: a linear ramp in a random direction with a random colour
    # tint, so neither absolute pixel values nor flat regions identify anything.
    xx, yy = _grid(image_size)
    phi = rng.uniform(0.0, 2.0 * math.pi)
    ramp = (xx * math.cos(phi) + yy * math.sin(phi)) / image_size * 2.0 - 1.0
    tint = rng.uniform(-_MAX_GRADIENT, _MAX_GRADIENT, 3).astype(np.float32)
    img += ramp[..., None] * (tint / math.sqrt(2.0))

    sigma = rng.uniform(*_NOISE_SIGMA)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")


def _params(image_size: int, train_per_class: int, val_per_class: int, seed: int) -> dict:
    """The marker's content: everything that determines the dataset's bytes; AlexNetError for invalid values."""
    checks = (("image_size", image_size, 8), ("train_per_class", train_per_class, 1))
    for name, value, minimum in (*checks, ("val_per_class", val_per_class, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise AlexNetError(f"synthetic dataset: {name} must be an integer >= {minimum}, got {value!r}")
    return {
        "format": "alexnet-shapes",
        "version": DATASET_VERSION,
        "image_size": image_size,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "seed": seed,
        "jpeg_quality": JPEG_QUALITY,
        "classes": list(CLASSES),
    }


def _remove_old_images(root: Path) -> None:
    """Delete the numbered JPEGs (and their temporary files) in the class folders; nothing else.

    A smaller regeneration must leave no stale high-numbered images for ImageFolder to
    find; a ``root`` that holds other data loses none of it.
    """
    for split in SPLITS:
        for name in CLASSES:
            folder = root / split / name
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if entry.is_file() and (_IMAGE_NAME.match(entry.name) or entry.name.endswith(".jpg.tmp")):
                    os.unlink(entry.path)


def make_shapes_dataset(
    root: str | Path,
    *,
    image_size: int = 64,
    train_per_class: int = 500,
    val_per_class: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Write the dataset under ``root`` (created if needed), always anew, and return ``root``.

    Images of ``image_size`` pixels square, per class ``train_per_class`` in train/ and
    ``val_per_class`` in val/; the same seed gives the same files, byte for byte. The
    marker is removed first and written after the last image, so a run interrupted at
    any point leaves a folder :func:`ensure_shapes_dataset` regenerates. AlexNetError for
    invalid arguments or a ``root`` that is a file.
    """
    params = _params(image_size, train_per_class, val_per_class, seed)
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise AlexNetError(f"synthetic dataset: {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)

    marker = root / MARKER_NAME
    marker.unlink(missing_ok=True)
    _remove_old_images(root)

    per_class = {"train": train_per_class, "val": val_per_class}
    total = len(CLASSES) * sum(per_class.values())
    with tqdm(total=total, desc="synthetic shapes", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            for label, name in enumerate(CLASSES):
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for index in range(per_class[split]):
                    image = render_image(label, image_size, image_rng(seed, split, label, index))
                    # No per-file fsync/rename: the marker written last is what
                    # certifies completeness, which makes per-file atomicity moot.
                    image.save(folder / f"{index:05d}.jpg", format="JPEG", quality=JPEG_QUALITY)
                    bar.update(1)

    atomic_write_text(marker, json.dumps(params, indent=2, sort_keys=True) + "\n")
    return root


def _is_complete(root: Path, params: dict) -> bool:
    """True if the marker matches ``params`` and every class folder has its images.

    The file count is a cheap guard (two dozen directory listings) against images
    deleted after generation, which the marker alone cannot see.
    """
    try:
        recorded = json.loads((root / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if recorded != params:
        return False
    for split in SPLITS:
        for name in CLASSES:
            try:
                found = sum(1 for e in os.scandir(root / split / name) if _IMAGE_NAME.match(e.name))
            except OSError:
                return False
            if found != params[f"{split}_per_class"]:
                return False
    return True


def ensure_shapes_dataset(
    root: str | Path | None = None,
    *,
    image_size: int = 64,
    train_per_class: int = 500,
    val_per_class: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """A complete dataset at ``root`` (default :func:`default_dataset_dir`), generated only if needed.

    Regenerated when the marker is missing (never run, or interrupted), records other
    parameters or another DATASET_VERSION, or images are missing. Arguments as
    :func:`make_shapes_dataset`'s.
    """
    root = Path(root).expanduser() if root is not None else default_dataset_dir()
    params = _params(image_size, train_per_class, val_per_class, seed)
    if _is_complete(root, params):
        return root
    if root.exists() and not root.is_dir():
        raise AlexNetError(f"synthetic dataset: {root} exists and is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    # Several processes (data-parallel ranks) may ask at once: the first generates, the
    # others wait for the lock and then find the dataset complete.
    with exclusive_lock(root / ".lock"):
        if not _is_complete(root, params):
            make_shapes_dataset(
                root,
                image_size=image_size,
                train_per_class=train_per_class,
                val_per_class=val_per_class,
                seed=seed,
                progress=progress,
            )
    return root
