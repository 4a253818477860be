"""The official ILSVRC-2012 and ILSVRC-2010 archives, read in place: no extraction to disk.

A folder holding what image-net.org distributes for 2012::

    ILSVRC2012_img_train.tar       one uncompressed tar per class, nXXXXXXXX.tar, each of JPEGs
    ILSVRC2012_img_val.tar         50,000 JPEGs, ILSVRC2012_val_00000001.JPEG ...
    ILSVRC2012_devkit_t12.tar.gz   data/meta.mat (ILSVRC2012_ID -> WNID) and
                                   data/ILSVRC2012_validation_ground_truth.txt (one ID per val image)

or for 2010, the year of the paper's Table 1 and the only one whose test labels are public::

    ILSVRC2010_images_train.tar    one tar per class, nXXXXXXXX.tar (1,261,406 images)
    ILSVRC2010_images_val.tar      50,000 JPEGs, ILSVRC2010_val_00000001.JPEG ...
    ILSVRC2010_images_test.tar     150,000 JPEGs, ILSVRC2010_test_00000001.JPEG ... (optional)
    ILSVRC2010_devkit-1.0.tar.gz   devkit-1.0/data/meta.mat (ILSVRC2010_ID -> WNID) and
                                   devkit-1.0/data/ILSVRC2010_validation_ground_truth.txt
    ILSVRC2010_test_ground_truth.txt  one ILSVRC2010_ID per test image (needed with the test tar)

The 2010 names are those of the devkit's readme ("ILSVRC2010 Development Kit": the
meta.mat fields ILSVRC2010_ID, WNID, words, num_children; val and test file names;
ground truth "in the ascending alphabetical order of the image file names") and of
fuel's ILSVRC-2010 converter (mila-iqia/fuel, fuel/converters/ilsvrc2010.py: the archive
names, devkit paths and the test ground truth file beside the archives). That converter
also notes that some 2010 JPEGs are stored gzip-compressed under a .JPEG name; the
workers (chunks.py) decompress those. Its optional patch_images.tar (replacements for a
few blank images) is not read: those images are decoded as the archives hold them.

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


@dataclass(frozen=True)
class Release:
    year: int
    train_tar: str
    val_tar: str
    devkit: str
    test_tar: str | None = None  # with public labels: 2010 only
    test_truth: str | None = None  # beside the archives

    @property
    def id_field(self) -> str:
        return f"ILSVRC{self.year}_ID"  # meta.mat's synset number, used by the ground truth

    @property
    def val_truth(self) -> str:
        return f"data/ILSVRC{self.year}_validation_ground_truth.txt"

    def image_name(self, split: str) -> re.Pattern[str]:
        return re.compile(rf"ILSVRC{self.year}_{split}_(\d{{8}})\.JPEG$")


ILSVRC2012 = Release(2012, "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz")
ILSVRC2010 = Release(
    2010,
    "ILSVRC2010_images_train.tar",
    "ILSVRC2010_images_val.tar",
    "ILSVRC2010_devkit-1.0.tar.gz",
    test_tar="ILSVRC2010_images_test.tar",
    test_truth="ILSVRC2010_test_ground_truth.txt",
)
RELEASES = (ILSVRC2012, ILSVRC2010)

TRAIN_TAR, VAL_TAR, DEVKIT = ILSVRC2012.train_tar, ILSVRC2012.val_tar, ILSVRC2012.devkit
META = "data/meta.mat"
GROUND_TRUTH = ILSVRC2012.val_truth
VAL_NAME = ILSVRC2012.image_name("val")

Member = tuple[str, int, int]  # (name inside the archive, byte offset in the archive file, size)


def find_release(path: str | Path) -> Release | None:
    """The release whose training archive the folder holds, if any."""
    return next((r for r in RELEASES if (Path(path) / r.train_tar).is_file()), None)


def is_ilsvrc_folder(path: str | Path) -> bool:
    return find_release(path) is not None


@dataclass
class Devkit:
    wnids: list[str]  # the leaf synsets (the classes), sorted
    words: dict[str, str]  # WNID -> "tench, Tinca tinca"
    val_wnids: list[str]  # the class of val image i+1
    id_to_wnid: dict[int, str]  # the synset table, for other ground truth files (2010's test)


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


def scan_val(path: Path, pattern: re.Pattern[str] = VAL_NAME) -> list[tuple[int, Member]]:
    """(image number, member) for every ILSVRC2012_val_NNNNNNNN.JPEG (or ``pattern``) of an archive, in number order."""
    size = path.stat().st_size
    expected = pattern.pattern.replace("(\\d{8})", "NNNNNNNN").replace("\\", "").rstrip("$")
    found = []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                match = pattern.search(m.name)
                if match is None:
                    if _is_image(m.name):
                        raise AlexNetError(f"{path} holds {m.name}; expected {expected} names")
                    continue
                _check_inside(m, size, path, m.name)
                found.append((int(match.group(1)), (m.name, m.offset_data, m.size)))
    except tarfile.ReadError as e:
        raise AlexNetError(f"{path} is not a readable uncompressed tar ({e})") from None
    return sorted(found)


def read_devkit(path: Path, release: Release = ILSVRC2012) -> Devkit:
    """Leaf synsets and the validation ground truth from the devkit, read from the .tar.gz in memory."""
    try:
        import scipy.io
    except ImportError:
        raise AlexNetError(
            f"reading the ILSVRC-{release.year} devkit's meta.mat needs scipy: pip install 'alexnet[imagenet]'"
        ) from None
    truth_name = release.val_truth
    wanted: dict[str, bytes | None] = {META: None, truth_name: None}
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
        ids = [int(i) for i in synsets[release.id_field]]
        wnids = [str(w) for w in synsets["WNID"]]
        words = [str(w) for w in synsets["words"]]
        children = [int(c) for c in synsets["num_children"]]
    except (ValueError, KeyError, TypeError, NotImplementedError, scipy.io.matlab.MatReadError) as e:
        raise AlexNetError(f"{path}: {META} is not the devkit's synset table ({e})") from None
    id_to_wnid = dict(zip(ids, wnids))
    leaves = sorted(w for w, c in zip(wnids, children) if c == 0)
    truth = read_truth(wanted[truth_name], f"{path}: {truth_name}", id_to_wnid, release)
    return Devkit(leaves, dict(zip(wnids, words)), truth, id_to_wnid)


def read_truth(data: bytes, where: str, id_to_wnid: dict[int, str], release: Release) -> list[str]:
    """The WNID per image of a ground truth file: one synset number per line, in image-name order."""
    try:
        truth = [int(line) for line in data.decode().split()]
    except (ValueError, UnicodeDecodeError):
        raise AlexNetError(f"{where} should hold one integer {release.id_field} per line") from None
    unknown = sorted({i for i in truth if i not in id_to_wnid})
    if unknown:
        where = where.split(":")[0]
        raise AlexNetError(
            f"{where}: the ground truth names {release.id_field}s {unknown[:5]} that meta.mat does not define"
        )
    return [id_to_wnid[i] for i in truth]


def _numbered_split(
    archive: Path, truth: list[str], release: Release, split: str, index: dict[str, int], what: str
) -> tuple[Path, list[Member], list[int]]:
    """A flat archive of numbered images (val, 2010's test) against its ground truth."""
    wrong = sorted({w for w in truth if w not in index})
    if wrong:
        raise AlexNetError(
            f"the ground truth of {archive.name} names synsets that are not classes: {', '.join(wrong[:3])}"
        )
    found = scan_val(archive, release.image_name(split))
    numbers = [n for n, _ in found]
    if numbers != list(range(1, len(truth) + 1)):
        absent = sorted(set(range(1, len(truth) + 1)) - set(numbers))
        beyond = [n for n in numbers if n > len(truth)]
        raise AlexNetError(
            f"{archive.name} has {len(found)} images, {what} {len(truth)}"
            + (f"; missing e.g. ILSVRC{release.year}_{split}_{absent[0]:08d}.JPEG" if absent else "")
            + (f"; image {beyond[0]} has no ground truth" if beyond else "")
        )
    return archive, [m for _, m in found], [index[truth[n - 1]] for n in numbers]


def scan_ilsvrc(
    folder: str | Path,
) -> tuple[list[str], dict[str, str], dict[str, tuple[Path, list[Member], list[int]]]]:
    """Classes, their words, and per split (archive, members, labels) of an ILSVRC-2012 or -2010
    folder; 2010's test split when its archive is there."""
    folder = Path(folder)
    release = find_release(folder) or ILSVRC2012
    needed = [release.train_tar, release.val_tar, release.devkit]
    has_test = release.test_tar is not None and (folder / release.test_tar).is_file()
    if has_test:
        needed.append(str(release.test_truth))  # the test images are useless without their labels
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise AlexNetError(
            f"{folder} lacks {', '.join(missing)} (an ILSVRC-{release.year} folder holds {', '.join(needed)})"
        )
    devkit = read_devkit(folder / release.devkit, release)
    classes, train_members, train_labels = scan_train(folder / release.train_tar)
    extra = sorted(set(classes) - set(devkit.wnids))
    lacking = sorted(set(devkit.wnids) - set(classes))
    if extra or lacking:
        raise AlexNetError(
            f"{release.train_tar} has {len(classes)} classes, the devkit {len(devkit.wnids)}: "
            + (f"not in the devkit: {', '.join(extra[:3])}; " if extra else "")
            + (f"missing from the archive: {', '.join(lacking[:3])}" if lacking else "")
        )
    index = {w: i for i, w in enumerate(classes)}
    splits = {
        "train": (folder / release.train_tar, train_members, train_labels),
        "val": _numbered_split(
            folder / release.val_tar, devkit.val_wnids, release, "val", index, "the devkit's ground truth"
        ),
    }
    if has_test:
        path = folder / str(release.test_truth)
        truth = read_truth(path.read_bytes(), str(path), devkit.id_to_wnid, release)
        splits["test"] = _numbered_split(folder / str(release.test_tar), truth, release, "test", index, f"{path.name}")
    return classes, {w: devkit.words.get(w, "") for w in classes}, splits
