"""Crafted checkpoints from strangers: each is a valid checkpoint with one field changed,
and every tool that reads one answers with a single ``alexnet: error: ...`` line naming
the field (exit status 2), never a traceback nor a huge allocation."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from alexnet.checkpoint import load_checkpoint, save_checkpoint, save_safetensors
from alexnet.cli import main
from alexnet.errors import AlexNetError
from conftest import write_jpeg, write_tiny_checkpoint, write_tree

IDS = [f"c{i}" for i in range(6)]
NAMES = [f"class {i}" for i in range(6)]


def edit_metadata(path: Path, **changes: Any) -> None:
    """Rewrite a .safetensors header's metadata: each change is a value JSON-encoded as the
    metadata holds it (a str), the tensors' bytes untouched."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    for key, value in changes.items():
        header["__metadata__"][key] = json.dumps(value)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])


def _pt(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        good = write_tiny_checkpoint(folder / "good.pt", IDS, NAMES)
        state = load_checkpoint(good)
        change(state)
        save_checkpoint(folder / "bad.pt", state)
        return folder / "bad.pt"

    return make


def _st(change: Callable[[dict[str, Any]], None] | None = None, **changes: Any) -> Callable[[Path], Path]:
    """A .safetensors file: ``change`` applied to the state before writing, ``changes`` to its metadata after."""

    def make(folder: Path) -> Path:
        good = write_tiny_checkpoint(folder / "good.pt", IDS, NAMES)
        state = load_checkpoint(good)
        if change is not None:
            change(state)
        save_safetensors(folder / "bad.safetensors", state)
        edit_metadata(folder / "bad.safetensors", **changes)
        return folder / "bad.safetensors"

    return make


def _set(*keys: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(state: dict[str, Any]) -> None:
        d = state
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value

    return change


def _nan_weight(state: dict[str, Any]) -> None:
    state["model"]["fc7.weight"][0, 0] = float("nan")


def _nan_mean(state: dict[str, Any]) -> None:
    state["preprocess"]["mean"][0, 1, 2] = float("nan")


# (how to make the file, words the error must contain)
HOSTILE = {
    "no-model-section": (_pt(lambda s: s["config"].pop("model")), "config section 'model'"),
    "more-classes-than-outputs": (
        _pt(lambda s: s.update(classes=[*IDS, "c6"], class_names=[*NAMES, "class 6"])),
        "'classes' lists 7 classes for a network with 6 outputs",
    ),
    "class-names-an-int": (_pt(_set("class_names", value=7)), "'class_names' should be a list"),
    "classes-an-int": (_pt(_set("classes", value=6)), "'classes' should be a list"),
    "config-a-list": (_st(config=[1, 2]), "'config' should be a mapping"),
    "config-a-string": (_st(config="model"), "'config' should be a mapping"),
    "mean-wrong-shape": (_pt(_set("preprocess", "mean", value=torch.zeros(3, 32, 16))), "(3, S, S) mean image"),
    "crop-size-true": (_pt(_set("preprocess", "crop_size", value=True)), "crop_size True"),
    "crop-size-huge": (_st(crop_size=100_000), "crop_size 100000"),
    "nan-weights": (_pt(_nan_weight), "weights 'fc7.weight' hold NaN"),
    "nan-mean": (_pt(_nan_mean), "preprocess 'mean' holds NaN"),
    "classes-an-int-safetensors": (_st(classes=6), "'classes' should be a list"),
    "class-names-a-string-safetensors": (_st(class_names="c0"), "'class_names' should be a list"),
    "mean-wrong-shape-safetensors": (
        _st(_set("preprocess", "mean", value=torch.zeros(3, 16, 16))),
        "crop size of at most S",
    ),
    "crop-network-cannot-take": (_pt(_set("preprocess", "crop_size", value=8)), "'crop_size' 8 does not fit"),
}


@pytest.fixture(params=sorted(HOSTILE))
def hostile(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    make, message = HOSTILE[request.param]
    return make(tmp_path), message


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)  # a non-AlexNetError would escape here and fail the test with its traceback
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("tool", ["predict", "evaluate", "export"])
def test_each_tool_names_the_bad_field_in_one_line(
    hostile: tuple[Path, str], tool: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, message = hostile
    argv = {
        "predict": ["predict", str(path), str(write_jpeg(tmp_path / "x.jpg"))],
        "evaluate": ["evaluate", str(path), "--data", str(write_tree(tmp_path / "data", 1, 1, tuple(IDS[:2])))],
        "export": ["export", str(path), "--format", "safetensors", "--out", str(tmp_path / "out.safetensors")],
    }[tool]
    if tool == "evaluate":
        argv += ["--device", "cpu", "--workers", "0"]
    rc, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("alexnet: error: "), err
    assert message in lines[0], err
    assert "Traceback" not in err


def test_serve_refuses_to_start(hostile: tuple[Path, str]) -> None:
    pytest.importorskip("fastapi")
    from alexnet.tools.serve import create_app

    path, message = hostile
    with pytest.raises(AlexNetError) as info:
        create_app(path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_untouched_files_still_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The crafted files' sources (.pt, and the same as .safetensors) predict normally."""
    good = write_tiny_checkpoint(tmp_path / "good.pt", IDS, NAMES)
    save_safetensors(tmp_path / "good.safetensors", load_checkpoint(good))
    image = str(write_jpeg(tmp_path / "x.jpg"))
    for path in (good, tmp_path / "good.safetensors"):
        rc, err = run_cli(["predict", str(path), image], capsys)
        assert rc == 0, err
