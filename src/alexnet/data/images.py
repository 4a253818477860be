"""Images: ImageFolder trees, robust decoding, and the paper's fixed-size images.

Section 2 of the paper: every image is rescaled so its shorter side is 256 and the
central 256x256 patch is kept. That is done here, in worker processes, once per image
read; what leaves this module is a uint8 tensor (3, S, S). Cropping, flipping, PCA
lighting and mean subtraction happen later on whole batches (augment.py), on the device
that trains.

A dataset of a million files has broken ones: decoding raises :class:`BadImage` with
the reason, which the loader turns into a skipped file instead of an error.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from alexnet.errors import AlexNetError

log = logging.getLogger("alexnet")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")

# Refuse decompression bombs outright (PIL only warns between 89M and 179M pixels).
# The largest ILSVRC-2012 training image is about 20M pixels.
MAX_IMAGE_PIXELS = 64_000_000

_ORIENTATION = 0x0112  # the EXIF tag


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


def _shown(name: str) -> str:
    """A file name fit for a message: bytes that are not UTF-8 as \\xNN (a log file is UTF-8)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _entries(folder: Path, what: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise AlexNetError(f"cannot read {what} {_shown(str(folder))}: {e.strerror or e}") from None


def _kind(entry: os.DirEntry) -> str:
    """ "file", "dir", or why the entry is neither (a symlink loop, a broken link, a socket)."""
    try:
        if entry.is_file():
            return "file"
        if entry.is_dir():
            return "dir"
    except OSError as e:
        return "a symlink loop" if e.errno == errno.ELOOP else f"unreadable ({e.strerror or e})"
    if not entry.is_symlink():
        return "not a regular file"  # a socket, a FIFO, a device
    try:
        os.stat(entry.path)
    except OSError as e:
        return "a symlink loop" if e.errno == errno.ELOOP else "a broken link"
    return "a broken link"


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode keeps bytes that are not UTF-8 as surrogates
        return False
    return True


def scan_image_folder(root: str | Path, classes: list[str] | None = None) -> ImageList:
    """List ``root/<class>/<image>`` files; class labels follow sorted folder names (torchvision's order).

    ``classes`` fixes the label order (the training split's) for a validation split.

    Hidden files and folders (.DS_Store, .git) are ignored silently. Everything else that
    is not read is counted and named in one warning per scan: files without an image
    extension (Thumbs.db, notes.txt), sub-folders of a class folder (images go directly in
    ``<class>/``; sub-folders are not searched), files beside the class folders, symlink
    loops, broken links, and names that are not UTF-8 (the run's statistics cache and
    stores record names as UTF-8: rename them). A folder that cannot be listed (no
    permission) is an AlexNetError naming it.
    """
    root = Path(root)
    try:
        if not root.exists():
            looped = root.is_symlink()
            raise AlexNetError(
                f"data folder {root} {'is a broken link or a symlink loop' if looped else 'does not exist'}"
            )
        if not root.is_dir():
            raise AlexNetError(f"data folder {root} is not a folder")
    except OSError as e:
        raise AlexNetError(f"cannot read data folder {root}: {e.strerror or e}") from None
    ignored: dict[str, list[str]] = {}  # reason -> names relative to root
    found = _class_folders(root, ignored)
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise AlexNetError(
                f"{root} has class folder(s) {', '.join(unknown[:5])} that the training set "
                f"(or checkpoint) does not have; expected a subset of its {len(classes)} classes"
            )
    present = set(found)
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        if name not in present:
            continue  # a validation split may lack some classes
        files = _class_images(root, name, ignored)
        paths += files
        labels += [label] * len(files)
    _report_ignored(root, ignored)
    return ImageList(root, paths, labels, list(classes))


def _ignore(ignored: dict[str, list[str]], reason: str, name: str) -> None:
    ignored.setdefault(reason, []).append(_shown(name))


def _class_folders(root: Path, ignored: dict[str, list[str]]) -> list[str]:
    """The class folders' names under root, sorted; what else is there goes to ``ignored``."""
    found = []
    for entry in _entries(root, "data folder"):
        if entry.name.startswith("."):
            continue
        kind = _kind(entry)
        if kind == "dir" and _utf8(entry.name):
            found.append(entry.name)
        elif kind == "dir":
            _ignore(ignored, "folder names not UTF-8", entry.name + "/")
        else:
            _ignore(ignored, "not in a class folder" if kind == "file" else kind, entry.name)
    if not found:
        raise AlexNetError(f"data folder {root} has no class folders (expected {root}/<class>/<image>)")
    return found


def _class_images(root: Path, name: str, ignored: dict[str, list[str]]) -> list[str]:
    """The image files directly in root/name, sorted; what else is there goes to ``ignored``."""
    files = []
    for entry in _entries(root / name, "class folder"):
        if entry.name.startswith("."):
            continue
        kind, rel = _kind(entry), f"{name}/{entry.name}"
        if kind == "dir":
            _ignore(ignored, "sub-folders (not searched)", rel + "/")
        elif kind != "file":
            _ignore(ignored, kind, rel)
        elif not entry.name.lower().endswith(IMAGE_EXTENSIONS):
            _ignore(ignored, "not image files", rel)
        elif not _utf8(entry.name):
            _ignore(ignored, "names not UTF-8", rel)
        else:
            files.append(entry.path)
    if not files:
        raise AlexNetError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
    return files


def _report_ignored(root: Path, ignored: dict[str, list[str]]) -> None:
    """One warning for the whole scan: how many files were not read, by reason, and a few names."""
    if not ignored:
        return
    names = [n for group in ignored.values() for n in group]
    log.warning(
        "%s: %d files ignored (%s), e.g. %s",
        root,
        len(names),
        ", ".join(f"{len(group)} {reason}" for reason, group in ignored.items()),
        ", ".join(names[:3]),
    )


def val_folder(root: Path) -> Path | None:
    """root/val, root/validation or root/test (CIFAR-10 trees), the first that is a folder."""
    return next((root / v for v in ("val", "validation", "test") if (root / v).is_dir()), None)


def find_splits(root: str | Path) -> tuple[Path, Path]:
    """``root/train`` and ``root/val`` (``root/test`` is accepted for val, as in CIFAR-10 trees)."""
    root = Path(root)
    try:
        if not root.is_dir():
            if root.is_symlink():
                raise AlexNetError(
                    f"data folder {root} is a symbolic link that does not resolve (a loop, or a missing target)"
                )
            if root.exists():
                raise AlexNetError(f"data folder {root} is not a folder")
            raise AlexNetError(f"data folder {root} does not exist")
        train = root / "train"
        val = val_folder(root)
        if train.is_dir() and val is not None:
            return train, val
        names = sorted(p.name for p in root.iterdir())
    except OSError as e:
        raise AlexNetError(f"cannot read data folder {_shown(str(root))}: {e.strerror or e}") from None
    raise AlexNetError(
        f"{root} must hold train/<class>/<image> and val/<class>/<image>; "
        f"found: {', '.join(_shown(n) for n in names) or 'nothing'}"
    )


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


def square_image(img: Image.Image, size: int) -> np.ndarray:
    """An open image as RGB, its shorter side rescaled to ``size``, the central square: (size, size, 3) uint8."""
    return _square(torch.from_numpy(np.array(_to_rgb(img), dtype=np.uint8)).permute(2, 0, 1), size)


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side ``size`` and the longer rounded, never below ``size``."""
    scale = size / min(w, h)
    return max(size, round(h * scale)), max(size, round(w * scale))


def _square(pixels: torch.Tensor, size: int) -> np.ndarray:
    """(3, H, W) uint8 -> (size, size, 3) uint8: shorter side to ``size``, antialiased bilinear, central square.

    torch's uint8 antialiased bilinear (a vectorised kernel on AVX2 CPUs) is 3.1x faster
    than PIL's resize on a 500x375 image (0.33 against 1.05 ms, one thread, AMX Xeon) and
    differs from it by at most 1 in about 0.2% of values: store format 3 (store.py).
    """
    h, w = pixels.shape[-2:]
    nh, nw = resized_shape(h, w, size)
    if (nh, nw) != (h, w):
        pixels = F.interpolate(pixels[None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0]
    left, top = (nw - size) // 2, (nh - size) // 2
    return pixels[:, top : top + size, left : left + size].permute(1, 2, 0).contiguous().numpy()


def _turbo_decode(img: Image.Image, data: bytes) -> torch.Tensor | None:
    """The JPEG ``data`` decoded by torchvision (libjpeg-turbo, as PIL, with identical pixels), or None.

    Only for what the two decode alike: a baseline or progressive YCbCr or greyscale JPEG
    that draft mode did not shrink and with no EXIF rotation. 1.2x faster to decode than
    PIL on the 500x375 bench JPEGs (1.06 against 1.25 ms), mostly PIL's per-image set-up
    and copies. Anything else, and a file torchvision refuses (truncated), goes to PIL,
    whose error messages are the readable ones.
    """
    if img.format != "JPEG" or img.mode not in ("RGB", "L") or img.getexif().get(_ORIENTATION, 1) != 1:
        return None
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None


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
            data = path.read() if hasattr(path, "read") else Path(path).read_bytes()
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise ImageTooLarge(f"{img.width}x{img.height} pixels is over the {MAX_IMAGE_PIXELS:,} limit")
                # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale when that still
                # leaves the shorter side >= size: several times faster on ImageNet.
                full = img.size
                img.draft("RGB", (size, size))
                pixels = _turbo_decode(img, data) if img.size == full else None
                if pixels is not None:
                    return _square(pixels, size)
                return square_image(ImageOps.exif_transpose(img), size)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLarge(f"refused as a decompression bomb: {e}") from None
    except FileNotFoundError:
        raise BadImage("file vanished") from None
    except Image.UnidentifiedImageError:
        # PIL's message names the in-memory file object ("<_io.BytesIO object at 0x...>"),
        # which differs on every read and says nothing; the caller names the file.
        raise BadImage("cannot identify image file: not in a format PIL reads") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
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


# --------------------------------------------------------------------------------------
# Training-set statistics: the mean image (section 2) and the RGB PCA (section 4.1)
