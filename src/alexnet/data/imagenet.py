"""The 1000 ILSVRC-2012 classes, shipped with the package so that ImageNet weights print names.

Label i of every common ImageNet checkpoint (torchvision's, Caffe's bvlc_alexnet, the
converted .npy) is the i-th WordNet id in sorted order -- the order ImageFolder gives the
class folders of an ImageNet tree. ``imagenet_classes.txt`` holds ``wnid<TAB>name`` lines
in that order; its header says where the ids and names come from.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

NUM_CLASSES = 1000


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(WordNet ids, readable names), both in label order."""
    wnids: list[str] = []
    names: list[str] = []
    text = resources.files("alexnet.data").joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        wnid, name = line.split("\t")
        wnids.append(wnid)
        names.append(name)
    return tuple(wnids), tuple(names)
