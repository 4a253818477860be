"""config.py: the paper's defaults, presets, YAML files and command-line overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from alexnet import config
from alexnet.config import (
    Config,
    apply_overrides,
    from_dict,
    load_preset,
    parse_assignments,
    preset_names,
    resolve,
    save,
)
from alexnet.errors import AlexNetError


def _yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_the_papers() -> None:
    cfg = Config()
    # Section 5: SGD, batch 128, momentum 0.9, weight decay 0.0005, lr 0.01 divided by 10 three times, ~90 epochs.
    assert (cfg.optim.batch_size, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (128, 0.01, 0.9, 5e-4)
    assert (cfg.optim.epochs, cfg.optim.lr_drops) == (90, 3)
    # Sections 2 and 4.1: 256x256 images, 224x224 patches, PCA alphas ~ N(0, 0.1), mean image.
    assert (cfg.data.image_size, cfg.data.crop_size, cfg.data.lighting_std) == (256, 224, 0.1)
    assert cfg.data.normalize == "mean-image" and cfg.data.flip is True and cfg.data.root is None
    # Section 3: the two-tower net with the paper's LRN, dropout 0.5, N(0, 0.01) init.
    assert (cfg.model.name, cfg.model.lrn, cfg.model.init, cfg.model.dropout) == ("paper", "paper", "paper", 0.5)
    assert (cfg.model.towers, cfg.model.pooling, cfg.model.num_classes) == (2, "overlap", 1000)


def test_paper_preset_is_exactly_the_defaults() -> None:
    assert resolve("paper", {}) == Config()


def test_presets_are_packaged() -> None:
    assert {"paper", "shapes", "small"} <= set(preset_names())


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_resolves(name: str) -> None:
    cfg = resolve(name, {})
    assert isinstance(cfg, Config)
    assert cfg.data.crop_size <= cfg.data.image_size
    # Every key a preset sets reaches the config unchanged in value.
    for section, values in load_preset(name).items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{name}: {section}.{key}"


def test_preset_overrides_layer_on_top() -> None:
    cfg = resolve("shapes", {"optim.lr": "0.05"})
    assert cfg.optim.lr == 0.05 and cfg.data.image_size == 64  # override wins, the rest of the preset stays
    assert cfg.optim.momentum == 0.9  # what the preset does not set stays the paper's


# --------------------------------------------------------------------------------------
# Unknown keys


def test_unknown_key_in_file_names_it_and_suggests(tmp_path: Path) -> None:
    p = _yaml(tmp_path / "c.yaml", "optim:\n  lr: 0.1\n  momentun: 0.5\n")
    expected = r"unknown config key 'optim.momentun' in preset .*c.yaml.*did you mean 'momentum'"
    with pytest.raises(AlexNetError, match=expected):
        resolve(str(p), {})


def test_unknown_key_in_override_names_it_and_suggests() -> None:
    with pytest.raises(
        AlexNetError, match=r"unknown config key 'data.crop' in command line \(did you mean 'crop_size'\?\)"
    ):
        resolve(None, parse_assignments(["data.crop=200"]))


@pytest.mark.parametrize(
    "values, suggestion",
    [({"optm.lr": "0.1"}, "optim.lr"), ({"optm": {"lr": 0.1}}, "optim.lr"), ({"daat": {"root": "x"}}, "data.root")],
)
def test_unknown_section_names_it_and_suggests(values: dict, suggestion: str) -> None:
    with pytest.raises(AlexNetError, match=rf"unknown config key '\w+\.\w+'.*did you mean '{suggestion}'"):
        from_dict(values, "test")


def test_key_without_section_is_an_error() -> None:
    with pytest.raises(AlexNetError, match="unknown config key 'lr'"):
        resolve(None, {"lr": "0.1"})


def test_unknown_preset_suggests() -> None:
    with pytest.raises(AlexNetError, match=r"unknown preset 'papr' \(did you mean 'paper'\?\); presets: .*shapes"):
        resolve("papr", {})


# --------------------------------------------------------------------------------------
# Types and coercion


@pytest.mark.parametrize(
    "key, value",
    [
        ("optim.batch_size", "abc"),
        ("optim.batch_size", "12.5"),
        ("optim.batch_size", "true"),  # a bool is not an int
        ("optim.lr", "fast"),
        ("optim.lr", "[0.1"),  # not even YAML
        ("optim.lr", "true"),
        ("data.flip", "maybe"),
        ("data.flip", "1"),
        ("run.seed", "null"),
    ],
)
def test_wrong_types_from_the_command_line(key: str, value: str) -> None:
    with pytest.raises(AlexNetError, match=rf"config {key} expects"):
        resolve(None, parse_assignments([f"{key}={value}"]))


@pytest.mark.parametrize(
    "text", ["optim:\n  lr: [1, 2]\n", "optim:\n  epochs: 2.5\n", "data:\n  flip: yes please\n", "data:\n  root: [a]\n"]
)
def test_wrong_types_in_a_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(AlexNetError, match="expects"):
        resolve(str(_yaml(tmp_path / "c.yaml", text)), {})


def test_string_overrides_are_coerced() -> None:
    cfg = resolve(
        None,
        parse_assignments(
            [
                "optim.lr=0.02",
                "optim.weight_decay=1e-4",  # YAML 1.1 reads this as a string
                "optim.momentum=1",  # int -> float
                "optim.epochs=3",
                "data.flip=false",
                "data.root=null",
                "run.device = cpu",
                "model.dropout=0",
            ]
        ),
    )
    assert cfg.optim.lr == 0.02 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.weight_decay == 1e-4 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.optim.momentum == 1.0 and isinstance(cfg.optim.momentum, float)
    assert cfg.optim.epochs == 3 and isinstance(cfg.optim.epochs, int)
    assert cfg.data.flip is False
    assert cfg.data.root is None
    assert cfg.run.device == "cpu"
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)


def test_file_values_are_coerced(tmp_path: Path) -> None:
    p = _yaml(tmp_path / "c.yaml", "optim:\n  weight_decay: 1e-4\n  lr: 1\ndata:\n  root: /data/imagenet\n")
    cfg = resolve(str(p), {})
    assert cfg.optim.weight_decay == 1e-4 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.root == "/data/imagenet"


@pytest.mark.parametrize("root", ["/data/imagenet", "~/data", "0x10", "on", "2012", "@archive/x", "data: raw"])
def test_root_paths_stay_verbatim(root: str) -> None:
    assert resolve(None, {"data.root": root}).data.root == root


def test_root_null_resets_a_root_set_earlier(tmp_path: Path) -> None:
    p = _yaml(tmp_path / "c.yaml", "data:\n  root: /data/imagenet\n")
    assert resolve(str(p), {}).data.root == "/data/imagenet"
    assert resolve(str(p), parse_assignments(["data.root=null"])).data.root is None


def test_empty_section_in_a_file_is_allowed(tmp_path: Path) -> None:
    p = _yaml(tmp_path / "c.yaml", "data:\n  # root: /data\noptim:\n  lr: 0.05\n")
    cfg = resolve(str(p), {})
    assert cfg.optim.lr == 0.05 and cfg.data == Config().data


def test_invalid_model_choice() -> None:
    with pytest.raises(AlexNetError, match=r"model.lrn must be one of .*got 'foo'"):
        resolve(None, parse_assignments(["model.lrn=foo"]))


@pytest.mark.parametrize("pair", ["optim.lr", "=3", "optim.lr0.1"])
def test_malformed_assignments(pair: str) -> None:
    with pytest.raises(AlexNetError, match="must look like section.key=value"):
        parse_assignments([pair])


def test_parse_assignments_strips_and_keeps_later_equals() -> None:
    assert parse_assignments([" data.root = /a=b ", "optim.lr=0.1"]) == {"data.root": "/a=b", "optim.lr": "0.1"}


# --------------------------------------------------------------------------------------
# Files


def test_bad_yaml_file(tmp_path: Path) -> None:
    p = _yaml(tmp_path / "bad.yaml", "optim:\n  lr: [0.1\n")
    with pytest.raises(AlexNetError, match="is not valid YAML"):
        resolve(str(p), {})


def test_yaml_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    p = _yaml(tmp_path / "list.yml", "- optim\n- data\n")
    with pytest.raises(AlexNetError, match="must hold a mapping of sections, got list"):
        resolve(str(p), {})


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(AlexNetError, match="cannot read config file"):
        resolve(str(tmp_path / "nope.yaml"), {})


def test_empty_yaml_file_gives_defaults(tmp_path: Path) -> None:
    assert resolve(str(_yaml(tmp_path / "empty.yaml", "# nothing\n")), {}) == Config()


def test_save_then_load_round_trip(tmp_path: Path) -> None:
    cfg = resolve(
        "shapes",
        parse_assignments(
            ["optim.lr=0.03", "optim.plateau_threshold=1e-12", "data.root=/data/x", "data.flip=false", "run.out=runs/y"]
        ),
    )
    path = tmp_path / "config.yaml"
    save(cfg, path)
    assert resolve(str(path), {}) == cfg
    assert from_dict(yaml.safe_load(path.read_text()), str(path)) == cfg
    # The saved file is complete: every section and key, in declaration order.
    saved = yaml.safe_load(path.read_text())
    assert list(saved) == ["data", "model", "optim", "run", "speed"]
    for name, section in config.SECTIONS.items():
        assert list(saved[name]) == [f.name for f in dataclasses.fields(section)]


def test_apply_overrides_does_not_mutate_its_input() -> None:
    base = Config()
    changed = apply_overrides(base, {"optim": {"lr": 0.5}}, "test")
    assert changed.optim.lr == 0.5 and base.optim.lr == 0.01


# --------------------------------------------------------------------------------------
# Config files from strangers: YAML that would build objects is refused, broken YAML is one line


@pytest.mark.parametrize(
    "payload",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
        "!!python/name:os.system",
        "!!python/module:os",
    ],
)
def test_yaml_tags_that_build_objects_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payload: str
) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "EXPLOITED"
    p = _yaml(tmp_path / "evil.yaml", "optim:\n  lr: " + payload.format(marker=marker) + "\n")
    with pytest.raises(
        AlexNetError, match=r"evil.yaml is refused at line 2: could not determine a constructor .*python"
    ) as info:
        resolve(str(p), {})
    assert "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "text, where",
    [
        ("optim:\n  lr: [0.1\n", "line 3"),  # unclosed flow sequence: reported where YAML gave up
        ("optim:\n\tlr: 0.1\n", "line 2, column 1"),  # a tab as indentation
        ("optim: {lr: 0.1\n", "line 2"),
        ("a: b: c\n", "line 1, column 5"),
    ],
)
def test_broken_yaml_is_one_line_with_position(tmp_path: Path, text: str, where: str) -> None:
    p = _yaml(tmp_path / "broken.yaml", text)
    with pytest.raises(AlexNetError, match=rf"broken.yaml is not valid YAML at {where}") as info:
        resolve(str(p), {})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ["- optim\n- run\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping(tmp_path: Path, text: str) -> None:
    with pytest.raises(AlexNetError, match="must hold a mapping of sections"):
        resolve(str(_yaml(tmp_path / "c.yaml", text)), {})


def test_binary_garbage_as_config(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_bytes(b"\xff\xfe\x00garbage\x00\x81")
    with pytest.raises(AlexNetError, match="c.yaml") as info:
        resolve(str(p), {})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key", ["run.checkpoint_every", "run.keep_checkpoints"])
def test_negative_checkpoint_settings(key: str) -> None:
    with pytest.raises(AlexNetError, match=rf"{key} must be 0 or more; got -1"):
        resolve(None, {key: "-1"})
