"""Config values out of range, YAML alias bombs and huge values in messages: one AlexNetError, fast."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from alexnet.config import from_dict, load_yaml, parse_assignments, resolve, short_repr
from alexnet.errors import AlexNetError
from alexnet.models.alexnet import ModelConfig

# Under 400 bytes of nested anchors: nine levels of nine aliases stand for 9**9 (387 million)
# strings, which "config optim.lr expects float; got ..." used to repr in full.
BOMB = (
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    + "".join(f"{b}: &{b} [{','.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
    + "optim:\n  lr: *i\n"
)


def _shared_graph(levels: int = 40) -> list:
    node: list = ["lol"]
    for _ in range(levels):
        node = [node, node]  # 2**40 leaves behind 80 list references
    return node


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-1", "optim.lr must be positive; got -1.0"),
        ("optim.lr=0", "optim.lr must be positive; got 0.0"),
        ("optim.lr=nan", "optim.lr must be positive; got nan"),
        ("optim.batch_size=0", "optim.batch_size must be 1 or more; got 0"),
        ("optim.epochs=-1", "optim.epochs must be 0 or more; got -1"),
        ("optim.momentum=1.5", r"optim.momentum must be in \[0, 1\]; got 1.5"),
        ("optim.momentum=-0.1", r"optim.momentum must be in \[0, 1\]; got -0.1"),
        ("optim.weight_decay=-1e-4", "optim.weight_decay must be 0 or more; got -0.0001"),
        ("optim.lr_drops=-1", "optim.lr_drops must be 0 or more; got -1"),
        ("model.width=1e9", r"model.width must be in \(0, 16\]; got 1000000000.0"),
        ("model.width=0", r"model.width must be in \(0, 16\]; got 0.0"),
        ("model.fc_width=0", "model.fc_width must be 1 or more; got 0"),
        ("model.fc_width=1000000", "would have 1,010,220,335,080 parameters, over the 2,147,483,648 limit"),
        ("model.fc_width=2000000", "model.fc_width must be at most 1048576; got 2000000"),
        ("model.num_classes=0", "model.num_classes must be at least 1; got 0"),
        ("model.num_classes=1000000", "over the 2,147,483,648 limit"),
        ("model.num_classes=10000000", "model.num_classes must be at most 1048576; got 10000000"),
        ("model.input_size=100000", r"model.input_size must be in 1..4096; got 100000"),
        ("model.dropout=1", r"model.dropout must be in \[0, 1\); got 1.0"),
        ("model.conv1_stride=0", "model.conv1_stride must be 1 or more; got 0"),
        ("data.image_size=0", r"data.image_size must be in 1..4096; got 0"),
        ("data.crop_size=100000", r"data.crop_size must be in 1..4096; got 100000"),
        ("data.workers=-2", r"data.workers must be -1 \(one per core\) or more; got -2"),
        ("data.stats_max_images=-1", "data.stats_max_images must be 0 or more; got -1"),
    ],
)
def test_values_out_of_range_are_refused(override: str, message: str) -> None:
    with pytest.raises(AlexNetError, match=message):
        resolve(None, parse_assignments([override]))


def test_edges_that_are_valid_still_resolve() -> None:
    cfg = resolve(None, parse_assignments(["optim.momentum=0", "optim.epochs=0", "data.workers=-1", "model.width=16"]))
    assert (cfg.optim.momentum, cfg.optim.epochs, cfg.data.workers, cfg.model.width) == (0.0, 0, -1, 16.0)
    assert ModelConfig(name="torchvision", num_classes=1000).num_classes == 1000
    # The largest width builds within the parameter limit (counted on the meta device).
    assert resolve(None, parse_assignments(["model.width=16"])).model.width == 16.0


def test_yaml_alias_bomb_is_refused_fast(tmp_path: Path) -> None:
    assert len(BOMB) < 400
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    start = time.monotonic()
    with pytest.raises(AlexNetError, match=r"bomb.yaml is refused at line 2: YAML aliases \(\*name\) are not allowed"):
        load_yaml(path)
    with pytest.raises(AlexNetError, match="aliases"):
        resolve(str(path), {})
    assert time.monotonic() - start < 2


def test_a_single_alias_is_refused_too(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: &lr 0.02\nrun:\n  seed: *lr\n")
    with pytest.raises(AlexNetError, match="line 4"):
        load_yaml(path)


def test_anchor_without_alias_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim: &o\n  lr: 0.02\n")
    assert resolve(str(path), {}).optim.lr == 0.02


def test_alias_bomb_in_an_override_is_a_short_type_error() -> None:
    bomb = "[&a [1,1,1,1,1,1,1,1], [*a,*a,*a,*a,*a,*a,*a,*a]]"
    with pytest.raises(AlexNetError, match="expects float") as e:
        resolve(None, parse_assignments([f"optim.lr={bomb}"]))
    assert len(str(e.value)) < 300


def test_shared_references_in_a_checkpoint_config_give_a_short_message() -> None:
    start = time.monotonic()
    with pytest.raises(AlexNetError, match="config model.name expects str; got") as e:
        from_dict({"model": {"name": _shared_graph()}}, "checkpoint x.pt")
    assert len(str(e.value)) < 300 and time.monotonic() - start < 2


def test_short_repr_is_bounded() -> None:
    assert len(short_repr(_shared_graph())) < 200
    assert len(short_repr("x" * 10**6)) < 200
    assert len(short_repr({str(i): i for i in range(10**5)})) < 200
    assert short_repr(0.5) == "0.5" and short_repr("paper") == "'paper'"


@pytest.mark.parametrize(
    "values",
    [
        _shared_graph(),
        {"model": {("x",) * 10**5: 1}},
        {"k" * 10**6: 1},
        {"model": {"k" * 10**6: 1}},
    ],
)
def test_odd_checkpoint_configs_give_a_short_message(values) -> None:
    with pytest.raises(AlexNetError, match="checkpoint x.pt") as e:
        from_dict(values, "checkpoint x.pt")
    assert len(str(e.value)) < 400
