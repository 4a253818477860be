"""End to end through the command line: train, resume, evaluate, predict, and bad input."""

import json
import os
from pathlib import Path

import pytest
import torch

from alexnet.cli import main
from alexnet.data.synthetic import make_shapes_dataset
from conftest import TINY


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(root, image_size=32, train_per_class=6, val_per_class=2, seed=3)


def run(*args: str) -> int:
    return main([str(a) for a in args])


def train_tiny(dataset: Path, out: Path, *extra: str) -> int:
    return run("train", "--data", dataset, "--out", out, "--preset", "paper", *TINY, *extra)


def test_train_writes_a_complete_run_directory(dataset, tmp_path, capsys):
    assert train_tiny(dataset, tmp_path / "run", "--epochs", "2") == 0
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ["train_loss", "train_error", "val_top1_error", "val_top5_error", "lr", "images_per_s"]:
        assert all(isinstance(r[key], float) for r in rows), key
    assert rows[0]["lr"] == 0.01
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())
    config = (run_dir / "config.yaml").read_text()
    assert "momentum: 0.9" in config and "num_classes: 10" in config
    state = torch.load(run_dir / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["classes"]) == 10
    assert state["preprocess"]["mean"].shape == (3, 32, 32)
    assert (run_dir / "best.pt").exists()
    assert "run directory" in capsys.readouterr().out


def test_resume_continues_exactly(dataset, tmp_path):
    assert train_tiny(dataset, tmp_path / "full", "--epochs", "3") == 0
    assert train_tiny(dataset, tmp_path / "split", "--epochs", "1") == 0
    assert run("train", "--resume", tmp_path / "split", "--epochs", "3", "--no-progress") == 0
    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    split = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for key, value in full["model"].items():
        assert torch.equal(value, split["model"][key]), key
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if k not in ("images_per_s", "epoch_seconds")}  # noqa: E731
    assert [strip(r) for r in rows(tmp_path / "full")] == [strip(r) for r in rows(tmp_path / "split")]


def test_existing_run_directory_is_not_overwritten(dataset, tmp_path, capsys):
    assert train_tiny(dataset, tmp_path / "run", "--epochs", "1") == 0
    before = (tmp_path / "run" / "last.pt").read_bytes()
    assert train_tiny(dataset, tmp_path / "run", "--epochs", "1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    assert train_tiny(dataset, out, "--epochs", "2") == 0
    return out


def test_evaluate_reports_centre_and_ten_patches(trained, dataset, tmp_path, capsys):
    capsys.readouterr()
    assert run("evaluate", trained / "last.pt", "--data", dataset, "--workers", "0", "--json", tmp_path / "r.json") == 0
    out = capsys.readouterr().out
    assert "centre" in out and "ten_patches" in out and "20 images" in out
    result = json.loads((tmp_path / "r.json").read_text())
    for view in ("centre", "ten_patches"):
        assert 0.0 <= result[view]["top5_error"] <= result[view]["top1_error"] <= 1.0
        assert result[view]["images"] == 20


def test_evaluate_ensemble_of_checkpoints(trained, dataset, capsys):
    capsys.readouterr()
    assert run("evaluate", trained / "last.pt", trained / "best.pt", "--data", dataset, "--workers", "0") == 0
    assert "ensemble of 2" in capsys.readouterr().out


def test_predict_prints_top5_class_names(trained, dataset, capsys):
    image = sorted((dataset / "val" / "circle").iterdir())[0]
    capsys.readouterr()
    assert run("predict", trained, image, "--json") == 0
    [result] = json.loads(capsys.readouterr().out)
    names = [name for name, _ in result["top"]]
    probs = [p for _, p in result["top"]]
    assert len(names) == 5 and set(names) <= set(os.listdir(dataset / "train"))
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6


def test_predict_bad_image_is_reported_not_fatal(trained, dataset, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = sorted((dataset / "val" / "ring").iterdir())[0]
    capsys.readouterr()
    assert run("predict", trained, bad, good) == 1
    out = capsys.readouterr().out
    assert "cannot read" in out and str(good) in out


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("alexnet: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_missing_data_folder(tmp_path, capsys):
    assert run("train", "--data", tmp_path / "nope", "--out", tmp_path / "r") == 2
    assert "does not exist" in _one_line_error(capsys)


def test_dataset_without_val_split(tmp_path, capsys):
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    assert run("train", "--data", tmp_path / "d", "--out", tmp_path / "r") == 2
    assert "val/<class>" in _one_line_error(capsys)


def test_empty_class_folder(dataset, tmp_path, capsys):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(dataset, copy)
    (copy / "train" / "empty-class").mkdir()
    (copy / "train" / "empty-class" / "Thumbs.db").write_bytes(b"\0" * 10)
    assert run("train", "--data", copy, "--out", tmp_path / "r", *TINY) == 2
    assert "holds no images" in _one_line_error(capsys)


def test_unknown_config_key(dataset, tmp_path, capsys):
    assert run("train", "--data", dataset, "--set", "optim.learning_rate=0.1", "--out", tmp_path / "r") == 2
    assert "unknown config key 'optim.learning_rate'" in _one_line_error(capsys)


def test_unknown_preset(capsys):
    assert run("config", "--preset", "papr") == 2
    assert "did you mean 'paper'" in _one_line_error(capsys)


def test_bad_files_in_dataset_are_skipped_and_counted(dataset, tmp_path, caplog):
    import shutil

    copy = tmp_path / "d"
    shutil.copytree(dataset, copy)
    (copy / "train" / "circle" / "zero.jpg").write_bytes(b"")
    good = sorted((copy / "train" / "ring").iterdir())[0].read_bytes()
    (copy / "train" / "ring" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (copy / "train" / "ring" / ".DS_Store").write_bytes(b"junk")
    (copy / "val" / "star" / "notes.jpg").write_text("not an image")
    with caplog.at_level("WARNING", logger="alexnet"):
        assert train_tiny(copy, tmp_path / "r", "--epochs", "1", "--workers", "2") == 0
    text = caplog.text
    assert "2 training files cannot be decoded" in text
    assert "notes.jpg" in text and ".DS_Store" not in text


def test_checkpoint_that_is_not_ours(tmp_path, dataset, capsys):
    path = tmp_path / "state_dict.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    assert run("evaluate", path, "--data", dataset) == 2
    assert "not an alexnet checkpoint" in _one_line_error(capsys)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(100))
    assert run("predict", garbage, "x.jpg") == 2
    assert "cannot read checkpoint" in _one_line_error(capsys)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch EXPLOITED",))


def test_checkpoint_with_code_never_executes(tmp_path, dataset, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format": "alexnet-checkpoint", "payload": _Exploit()}, path)
    assert run("evaluate", path, "--data", dataset) == 2
    assert "refusing" in _one_line_error(capsys)
    assert not (tmp_path / "EXPLOITED").exists()


def test_checkpoint_for_other_classes(trained, tmp_path, capsys):
    other = make_shapes_dataset(tmp_path / "o", image_size=32, train_per_class=1, val_per_class=1)
    (other / "val" / "hexagon").mkdir()
    sample = next((other / "val" / "ring").iterdir())
    (other / "val" / "hexagon" / "a.jpg").write_bytes(sample.read_bytes())
    assert run("evaluate", trained, "--data", other) == 2
    assert "training set (or checkpoint) does not have" in _one_line_error(capsys)


def test_resume_without_checkpoint(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert run("train", "--resume", tmp_path / "run") == 2
    assert "does not exist" in _one_line_error(capsys)


def test_resume_refuses_recipe_changes(trained, capsys):
    assert run("train", "--resume", trained, "--model", "torchvision") == 2
    assert "is a 'paper' model with 10 classes" in _one_line_error(capsys)
    assert run("train", "--resume", trained, "--lr", "0.5") == 2
    assert "--lr cannot change it" in _one_line_error(capsys)


def test_load_model_checks_variant_and_classes(trained):
    from alexnet import AlexNetError, load_model

    model = load_model(trained / "last.pt", name="paper", num_classes=10).model
    assert model.fc8.out_features == 10 and not model.training
    with pytest.raises(AlexNetError, match="holds a 'paper' model with 10 classes; expected 'torchvision'"):
        load_model(trained / "last.pt", name="torchvision")
    with pytest.raises(AlexNetError, match="expected 'paper' with 1000 classes"):
        load_model(trained / "last.pt", num_classes=1000)


@pytest.mark.parametrize(
    "args, message",
    [
        (["config", "--set", "optim.lr=-1"], "optim.lr must be positive; got -1.0"),
        (["train", "--batch-size", "0"], "optim.batch_size must be 1 or more; got 0"),
        (["config", "--set", "model.width=1e9"], "model.width must be in (0, 16]; got 1000000000.0"),
        (["train", "--workers", "-3"], "data.workers must be -1 (one per core) or more; got -3"),
        (["serve", "x.pt", "--port", "99999"], "--port must be in 1..65535; got 99999"),
        (["serve", "x.pt", "--port", "0"], "--port must be in 1..65535; got 0"),
    ],
)
def test_values_out_of_range_are_one_line(args, message, capsys):
    assert run(*args) == 2
    assert message in _one_line_error(capsys)


def test_yaml_alias_bomb_preset_is_refused_fast(tmp_path, capsys):
    import time

    levels = "".join(f"{b}: &{b} [{','.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))
    path = tmp_path / "bomb.yaml"
    path.write_text('a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + levels + "optim:\n  lr: *i\n")
    start = time.monotonic()
    assert run("config", "--preset", path) == 2
    assert "YAML aliases (*name) are not allowed" in _one_line_error(capsys)
    assert time.monotonic() - start < 5


def _copy(dataset: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(dataset, tmp_path / "d"))


def test_junk_nested_folders_loops_and_odd_names_are_skipped_and_reported(dataset, tmp_path, caplog):
    copy = _copy(dataset, tmp_path)
    sample = sorted((copy / "train" / "ring").iterdir())[0]
    (copy / "train" / "ring" / "Thumbs.db").write_bytes(b"\0" * 10)
    (copy / "train" / "ring" / "sub").mkdir()
    (copy / "train" / "ring" / "sub" / "nested.jpg").write_bytes(sample.read_bytes())
    (copy / "train" / "ring" / "loop.jpg").symlink_to("loop.jpg")
    with open(os.fsencode(copy / "val" / "ring") + b"/caf\xe9.jpg", "wb") as f:  # a Latin-1 name
        f.write(sample.read_bytes())
    with caplog.at_level("WARNING", logger="alexnet"):
        assert train_tiny(copy, tmp_path / "r", "--epochs", "1") == 0
    [train_line] = [m for m in caplog.messages if m.startswith(f"{copy / 'train'}: ")]
    assert "3 files ignored" in train_line and "ring/Thumbs.db" in train_line and "1 sub-folders" in train_line
    assert "1 a symlink loop" in train_line
    [val_line] = [m for m in caplog.messages if m.startswith(f"{copy / 'val'}: ")]
    assert "1 files ignored (1 names not UTF-8)" in val_line and "ring/caf\\xe9.jpg" in val_line


def test_unreadable_class_folder_is_one_line(dataset, tmp_path, capsys, monkeypatch):
    from alexnet.data import images

    copy = _copy(dataset, tmp_path)
    real = os.scandir

    def scandir(path):
        if Path(path) == copy / "train" / "star":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(images.os, "scandir", scandir)
    assert train_tiny(copy, tmp_path / "r", "--epochs", "1") == 2
    assert f"cannot read class folder {copy / 'train' / 'star'}: Permission denied" in _one_line_error(capsys)
    out = tmp_path / "store"
    assert run("prepare", copy, out, "--image-size", "8", "--workers", "0", "--no-progress") == 2
    assert "cannot read class folder" in _one_line_error(capsys)


def test_prepare_skips_a_name_that_is_not_utf8(dataset, tmp_path, caplog):
    copy = _copy(dataset, tmp_path)
    sample = sorted((copy / "train" / "ring").iterdir())[0]
    with open(os.fsencode(copy / "train" / "ring") + b"/caf\xe9.jpg", "wb") as f:
        f.write(sample.read_bytes())
    with caplog.at_level("WARNING", logger="alexnet"):
        assert run("prepare", copy, tmp_path / "store", "--image-size", "8", "--workers", "0", "--no-progress") == 0
    assert any("1 names not UTF-8" in m for m in caplog.messages)


def test_checkpoint_config_of_shared_references_is_one_line_fast(trained, dataset, tmp_path, capsys):
    import shutil
    import time

    run_dir = Path(shutil.copytree(trained, tmp_path / "run"))
    state = torch.load(run_dir / "last.pt", weights_only=True)
    node: list = ["lol"]
    for _ in range(40):
        node = [node, node]  # pickled as 41 shared lists; repr would be 2**40 strings
    state["config"]["optim"]["lr"] = node
    torch.save(state, run_dir / "last.pt")
    image = sorted((dataset / "val" / "circle").iterdir())[0]
    start = time.monotonic()
    assert run("predict", run_dir / "last.pt", image) == 2
    assert "config optim.lr expects float; got [[[[...], [...]]" in _one_line_error(capsys)
    # Without a good history checkpoint to fall back on (resume takes the newest loadable one).
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "best.pt").unlink()
    assert run("train", "--resume", run_dir, "--no-progress") == 2
    assert "config optim.lr expects float" in _one_line_error(capsys)
    assert time.monotonic() - start < 10
