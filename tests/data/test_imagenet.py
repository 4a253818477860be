"""The packaged ILSVRC-2012 class list: 1000 sorted WordNet ids, paired with torchvision's names."""

import re

from torchvision.models._meta import _IMAGENET_CATEGORIES

from alexnet.data.imagenet import NUM_CLASSES, imagenet_classes


def test_thousand_unique_wordnet_ids_in_sorted_order():
    wnids, names = imagenet_classes()
    assert len(wnids) == len(names) == NUM_CLASSES
    assert len(set(wnids)) == NUM_CLASSES
    assert list(wnids) == sorted(wnids)  # label i is the i-th sorted id (ImageFolder's order)
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)


def test_names_are_torchvisions_in_the_same_order():
    _, names = imagenet_classes()
    assert list(names) == list(_IMAGENET_CATEGORIES)


def test_known_pairs():
    # Labels every ImageNet model agrees on (torchvision's, Caffe's synset_words.txt).
    wnids, names = imagenet_classes()
    table = dict(zip(wnids, names))
    assert (wnids[0], names[0]) == ("n01440764", "tench")
    assert (wnids[999], names[999]) == ("n15075141", "toilet tissue")
    assert table["n02123045"] == "tabby" and wnids.index("n02123045") == 281
    assert table["n04552348"] == "warplane" and wnids.index("n04552348") == 895
