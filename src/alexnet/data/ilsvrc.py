"""The official ILSVRC-2012 archives, read in place: no extraction to disk.

A folder holding what image-net.org distributes::

    ILSVRC2012_img_train.tar       one uncompressed tar per class, nXXXXXXXX.tar, each of JPEGs
    ILSVRC2012_img_val.tar         50,000 JPEGs, ILSVRC2012_val_00000001.JPEG ...
    ILSVRC2012_devkit_t12.tar.gz   data/meta.mat (ILSVRC2012_ID -> WNID) and
                                   data/ILSVRC2012_validation_ground_truth.txt (one ID per val image)

Both image archives are plain (uncompressed) tars, so every JPEG is a contiguous byte
range of the archive file. Scanning reads only the 512-byte tar headers (the outer tar's,
then each class tar's) and returns ``(name, offset, size)`` per image; the workers of
``alexnet prepare`` then read their images with ``os.pread`` in any order, in parallel.

Labels follow sorted WNIDs, which is the order of torchvision's ImageNet and of an
ImageFolder tree of WNID folders. Anything missing or damaged (a truncated archive, a
class tar that is not a tar, val images without ground truth) is an AlexNetError naming
the member; a JPEG that does not decode is skipped by prepare and listed in the store.
"""

from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from alexnet.data.images import IMAGE_EXTENSIONS
from alexnet.errors import AlexNetError

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
META = "data/meta.mat"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG$")

Member = tuple[str, int, int]  # (name inside the archive, byte offset in the archive file, size)


def is_ilsvrc_folder(path: str | Path) -> bool:
    return (Path(path) / TRAIN_TAR).is_file()


@dataclass
class Devkit:
    wnids: list[str]  # the leaf synsets (the classes), sorted
    words: dict[str, str]  # WNID -> "tench, Tinca tinca"
    val_wnids: list[str]  # the class of val image i+1


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not Path(name).name.startswith(".")


def _check_inside(member: tarfile.TarInfo, limit: int, archive: Path, name: str) -> None:
    if member.offset_data + member.size > limit:
        raise AlexNetError(
            f"{archive} is truncated: member {name} needs {member.offset_data + member.size:,} bytes, "
            f"the archive has {limit:,}"
        )


def scan_train(path: Path) -> tuple[list[str], list[Member], list[int]]:
    """Classes (sorted WNIDs), members and labels of the training archive, from tar headers only."""
    size = path.stat().st_size
    per_class: dict[str, list[Member]] = {}
    try:
        with tarfile.open(path, "r:") as outer:
            for sub in outer:
                if not sub.isfile():
                    continue
                if not sub.name.endswith(".tar"):
                    raise AlexNetError(f"{path} holds {sub.name}; expected one nXXXXXXXX.tar per class")
                _check_inside(sub, size, path, sub.name)
                wnid = Path(sub.name).stem
                members = []
                try:
                    with tarfile.open(fileobj=outer.extractfile(sub), mode="r:") as inner:
                        for m in inner:
                            if m.isfile() and _is_image(m.name):
                                _check_inside(m, sub.size, path, f"{sub.name}/{m.name}")
                                members.append((f"{sub.name}/{m.name}", sub.offset_data + m.offset_data, m.size))
                except (tarfile.TarError, EOFError) as e:
                    raise AlexNetError(f"{path}: class archive {sub.name} is not a readable tar ({e})") from None
                if not members:
                    raise AlexNetError(f"{path}: class archive {sub.name} holds no images")
                per_class[wnid] = sorted(members)
    except tarfile.ReadError as e:
        raise AlexNetError(f"{path} is not a readable uncompressed tar ({e})") from None
    if not per_class:
        raise AlexNetError(f"{path} holds no class archives")
    classes = sorted(per_class)
    members, labels = [], []
    for label, wnid in enumerate(classes):
        members += per_class[wnid]
        labels += [label] * len(per_class[wnid])
    return classes, members, labels


def scan_val(path: Path) -> list[tuple[int, Member]]:
    """(image number, member) for every ILSVRC2012_val_NNNNNNNN.JPEG of the validation archive, in number order."""
    size = path.stat().st_size
    found = []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                match = VAL_NAME.search(m.name)
                if match is None:
                    if _is_image(m.name):
                        raise AlexNetError(f"{path} holds {m.name}; expected ILSVRC2012_val_NNNNNNNN.JPEG names")
                    continue
                _check_inside(m, size, path, m.name)
                found.append((int(match.group(1)), (m.name, m.offset_data, m.size)))
    except tarfile.ReadError as e:
        raise AlexNetError(f"{path} is not a readable uncompressed tar ({e})") from None
    return sorted(found)


def read_devkit(path: Path) -> Devkit:
    """Leaf synsets and the validation ground truth from the devkit, read from the .tar.gz in memory."""
    try:
        import scipy.io
    except ImportError:
        raise AlexNetError(
            "reading the ILSVRC-2012 devkit's meta.mat needs scipy: pip install 'alexnet[imagenet]'"
        ) from None
    wanted = {META: None, GROUND_TRUTH: None}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                for suffix in wanted:
                    if m.isfile() and m.name.endswith(suffix):
                        wanted[suffix] = tar.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise AlexNetError(f"{path} is not a readable devkit archive ({e})") from None
    missing = [name for name, data in wanted.items() if data is None]
    if missing:
        raise AlexNetError(f"{path} lacks {', '.join(missing)}")
    try:
        synsets = scipy.io.loadmat(io.BytesIO(wanted[META]), squeeze_me=True)["synsets"]
        ids = [int(i) for i in synsets["ILSVRC2012_ID"]]
        wnids = [str(w) for w in synsets["WNID"]]
        words = [str(w) for w in synsets["words"]]
        children = [int(c) for c in synsets["num_children"]]
    except (ValueError, KeyError, TypeError, NotImplementedError, scipy.io.matlab.MatReadError) as e:
        raise AlexNetError(f"{path}: {META} is not the devkit's synset table ({e})") from None
    id_to_wnid = dict(zip(ids, wnids))
    leaves = sorted(w for w, c in zip(wnids, children) if c == 0)
    try:
        truth = [int(line) for line in wanted[GROUND_TRUTH].decode().split()]
    except ValueError:
        raise AlexNetError(f"{path}: {GROUND_TRUTH} should hold one integer ILSVRC2012_ID per line") from None
    unknown = sorted({i for i in truth if i not in id_to_wnid})
    if unknown:
        raise AlexNetError(f"{path}: the ground truth names ILSVRC2012_IDs {unknown[:5]} that meta.mat does not define")
    return Devkit(leaves, dict(zip(wnids, words)), [id_to_wnid[i] for i in truth])


def scan_ilsvrc(
    folder: str | Path,
) -> tuple[list[str], dict[str, str], dict[str, tuple[Path, list[Member], list[int]]]]:
    """Classes, their words, and per split (archive, members, labels) of an ILSVRC-2012 folder."""
    folder = Path(folder)
    missing = [name for name in (TRAIN_TAR, VAL_TAR, DEVKIT) if not (folder / name).is_file()]
    if missing:
        raise AlexNetError(f"{folder} lacks {', '.join(missing)} (an ILSVRC-2012 folder holds all three archives)")
    devkit = read_devkit(folder / DEVKIT)
    classes, train_members, train_labels = scan_train(folder / TRAIN_TAR)
    extra = sorted(set(classes) - set(devkit.wnids))
    lacking = sorted(set(devkit.wnids) - set(classes))
    if extra or lacking:
        raise AlexNetError(
            f"{TRAIN_TAR} has {len(classes)} classes, the devkit {len(devkit.wnids)}: "
            + (f"not in the devkit: {', '.join(extra[:3])}; " if extra else "")
            + (f"missing from the archive: {', '.join(lacking[:3])}" if lacking else "")
        )
    val = scan_val(folder / VAL_TAR)
    numbers = [n for n, _ in val]
    if numbers != list(range(1, len(devkit.val_wnids) + 1)):
        absent = sorted(set(range(1, len(devkit.val_wnids) + 1)) - set(numbers))
        beyond = [n for n in numbers if n > len(devkit.val_wnids)]
        raise AlexNetError(
            f"{VAL_TAR} has {len(val)} images, the devkit's ground truth {len(devkit.val_wnids)}"
            + (f"; missing e.g. ILSVRC2012_val_{absent[0]:08d}.JPEG" if absent else "")
            + (f"; image {beyond[0]} has no ground truth" if beyond else "")
        )
    index = {w: i for i, w in enumerate(classes)}
    val_labels = [index[devkit.val_wnids[n - 1]] for n in numbers]
    splits = {
        "train": (folder / TRAIN_TAR, train_members, train_labels),
        "val": (folder / VAL_TAR, [m for _, m in val], val_labels),
    }
    return classes, {w: devkit.words.get(w, "") for w in classes}, splits
