"""Fine-tuning (train/finetune.py): --init-from, --freeze, optim.backbone_lr_scale, reset_classifier.

End-to-end runs use tiny networks (conftest.TINY) on a few 32 px images, one thread each
so that bit-exact comparisons hold (see test_reliability.one_thread).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
import yaml
from torch import nn

from alexnet.checkpoint import load_checkpoint, load_pretrained
from alexnet.cli import main
from alexnet.config import OptimConfig
from alexnet.data.augment import IMAGENET_MEAN, IMAGENET_STD
from alexnet.data.synthetic import CLASSES as SHAPES
from alexnet.data.synthetic import make_shapes_dataset
from alexnet.errors import AlexNetError
from alexnet.models.alexnet import LAYER_NAMES, create_model
from alexnet.train.finetune import finetune_config, freeze, init_model, load_source
from alexnet.train.optim import PaperSGD, param_groups, plateau_schedule
from conftest import TINY, write_tree

BASE = ["--preset", "paper", *TINY, "--set", "run.tensorboard=false", "--batch-size", "4"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("trees")
    return {
        "source": write_tree(root / "source", train=4, val=2, classes=("ant", "bee", "cat")),
        "target": write_tree(root / "target", train=4, val=2, classes=("dog", "eel")),
    }


@pytest.fixture(scope="module")
def source(trees: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint trained here for one epoch on the three source classes."""
    out = tmp_path_factory.mktemp("source") / "run"
    assert main(["train", "--data", str(trees["source"]), "--out", str(out), *BASE, "--epochs", "1"]) == 0
    return out / "last.pt"


def finetune(trees: dict[str, Path], source: Path, out: Path, *extra: str) -> int:
    """``alexnet train --init-from source`` on the two target classes (extra: --epochs N ...)."""
    return main(["train", "--data", str(trees["target"]), "--out", str(out), "--init-from", str(source), *TINY,
                 "--set", "run.tensorboard=false", "--batch-size", "4", *extra])  # fmt: skip


def tiny_paper(num_classes: int = 3, **options: Any) -> nn.Module:
    options = {**dict(width=0.125, fc_width=32, conv1_kernel=5, conv1_stride=1, input_size=28), **options}
    return create_model("paper", num_classes, **options)


# --------------------------------------------------------------------------------------
# (a) transfer: fine-tuned from a related task beats the same run from scratch after one epoch


def shapes_split(root: Path, out: Path, classes: tuple[str, ...], train: int) -> Path:
    """out/{train,val}/<class>/ with the first ``train`` (train) and all val images of ``classes``."""
    for split, n in (("train", train), ("val", None)):
        for c in classes:
            (out / split / c).mkdir(parents=True)
            for f in sorted((root / split / c).iterdir())[:n]:
                shutil.copy(f, out / split / c / f.name)
    return out


@pytest.mark.slow
def test_finetuned_from_other_shapes_beats_scratch_after_one_epoch(tmp_path: Path) -> None:
    """Source: 5 of the shapes classes (200 images each, 8 epochs; 20-90 s on the 2-core machine, by load);
    target: the other 5 (30 each), one epoch, with and without --init-from.

    Measured 2026-12-02 on the loaded 2-core Xeon (this command, seeds 0-3 of the target
    runs): val top-1 error 56/61/65/62% fine-tuned against 77/80/82/80% from scratch
    (chance 80%), loss 1.49-1.62 against 2.01-2.10. The margin asserted is 10 points.
    """
    root = make_shapes_dataset(tmp_path / "all", image_size=64, train_per_class=200, val_per_class=20, seed=1)
    source = shapes_split(root, tmp_path / "A", SHAPES[:5], 200)
    target = shapes_split(root, tmp_path / "B", SHAPES[5:], 30)
    recipe = ["--preset", "shapes", "--workers", "0", "--no-progress", "--set", "run.tensorboard=false",
              "--batch-size", "16"]  # fmt: skip
    assert main(["train", "--data", str(source), "--out", str(tmp_path / "s"), *recipe, "--epochs", "8"]) == 0
    rows = {}
    for name, extra in (("finetuned", ["--init-from", str(tmp_path / "s" / "last.pt")]), ("scratch", [])):
        out = tmp_path / name
        assert main(["train", "--data", str(target), "--out", str(out), *recipe, *extra, "--epochs", "1"]) == 0
        rows[name] = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    ft, scratch = rows["finetuned"], rows["scratch"]
    assert ft["val_top1_error"] < scratch["val_top1_error"] - 0.10, rows
    assert ft["train_loss"] < scratch["train_loss"] - 0.2, rows


# --------------------------------------------------------------------------------------
# (g) reset_classifier and the layer names


@pytest.mark.parametrize("init", ["paper", "kaiming"])
def test_reset_classifier_paper_variant(init: str) -> None:
    torch.manual_seed(0)
    model = tiny_paper(3, fc_width=512, init=init)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fc8.")}
    model.reset_classifier(50)
    assert model.fc8.weight.shape == (50, 512) and model.config.num_classes == 50
    assert model.get_classifier() is model.fc8 and model(torch.randn(2, 3, 28, 28)).shape == (2, 50)
    # Section 5's N(0, 0.01) for init=paper, He normal sqrt(2 / fan_in) for kaiming; bias 0.
    expected_std = 0.01 if init == "paper" else math.sqrt(2 / 512)
    assert abs(model.fc8.weight.std().item() - expected_std) < 0.05 * expected_std
    assert torch.equal(model.fc8.bias, torch.zeros(50))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_reset_classifier_torchvision_variant_matches_torchvision_init() -> None:
    model = create_model("torchvision", 1000)
    features = model.features[0].weight.clone()
    torch.manual_seed(3)
    model.reset_classifier(4)
    torch.manual_seed(3)
    reference = nn.Linear(4096, 4)  # torchvision's AlexNet keeps nn.Linear's default init
    assert torch.equal(model.classifier[6].weight, reference.weight)
    assert torch.equal(model.classifier[6].bias, reference.bias)
    assert model.config.num_classes == 4 and torch.equal(model.features[0].weight, features)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 4)
    with pytest.raises(AlexNetError, match="num_classes must be an integer in 1"):
        model.reset_classifier(0)


def test_named_layers_are_torchvision_modules_by_paper_name() -> None:
    model = create_model("torchvision", 10)
    modules = dict(model.named_modules())
    expected = ["features.0", "features.3", "features.6", "features.8", "features.10",
                "classifier.1", "classifier.4", "classifier.6"]  # fmt: skip
    assert list(model.named_layers()) == list(LAYER_NAMES)
    assert all(model.named_layers()[n] is modules[m] for n, m in zip(LAYER_NAMES, expected))
    assert list(tiny_paper(remove_conv=4).named_layers()) == [n for n in LAYER_NAMES if n != "conv4"]


def test_load_pretrained_keeps_every_layer_but_a_new_head(source: Path) -> None:
    state = load_checkpoint(source)
    torch.manual_seed(0)
    model = load_pretrained(source, num_classes=7)
    assert model.training and model.fc8.weight.shape[0] == 7 and model.config.num_classes == 7
    for key, value in state["model"].items():
        if not key.startswith("fc8."):
            assert torch.equal(model.state_dict()[key], value), key
    same = load_pretrained(source)
    assert torch.equal(same.fc8.weight, state["model"]["fc8.weight"])


# --------------------------------------------------------------------------------------
# (c) frozen parameters: no gradient, no weight decay, no velocity


@pytest.mark.parametrize("decay_biases", [True, False])
def test_frozen_parameters_get_no_gradient_decay_or_velocity(decay_biases: bool) -> None:
    torch.manual_seed(0)
    model = tiny_paper(3)
    assert freeze(model, "conv5") == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    frozen = {n: p.clone() for n, p in model.named_parameters() if n.startswith("conv")}
    groups = param_groups(model, 5e-4, decay_biases)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) not in in_optimizer for n, p in model.named_parameters() if n in frozen)
    assert len(in_optimizer) == 6  # fc6, fc7, fc8: weight and bias each
    optimizer = PaperSGD(groups, lr=0.1, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, 3, 28, 28)), torch.tensor([0, 1, 2, 0])).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert not p.requires_grad and p.grad is None and p not in optimizer.state
            assert torch.equal(p, frozen[name]), f"{name} moved (weight decay or velocity)"
        else:
            assert "velocity" in optimizer.state[p]


def test_freeze_maps_paper_names_onto_torchvision_modules() -> None:
    model = create_model("torchvision", 10)
    assert freeze(model, "fc6") == list(LAYER_NAMES[:6])
    fixed = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if not p.requires_grad})
    assert fixed == ["classifier.1", "features.0", "features.10", "features.3", "features.6", "features.8"]
    assert freeze(create_model("torchvision", 10), "") == []


# --------------------------------------------------------------------------------------
# (d) backbone_lr_scale: per group, through plateau drops and resume


def test_backbone_lr_is_per_group_and_drops_with_the_head() -> None:
    model = tiny_paper(3)
    groups = param_groups(model, 5e-4, False, backbone_lr=0.001)
    optimizer = PaperSGD(groups, lr=0.01, momentum=0.9)
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs == [0.01, 0.01, 0.001, 0.001]  # head weights, head biases, then the rest
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0, 5e-4, 0.0]
    head = {id(p) for p in model.fc8.parameters()}
    assert {id(p) for g in optimizer.param_groups[:2] for p in g["params"]} == head
    schedule = plateau_schedule(optimizer, OptimConfig(lr=0.01, lr_drops=3, plateau_patience=0))
    for _ in range(10):  # a flat error: a drop at every step after the first, three at most
        schedule.step(0.5)
    for group, start in zip(optimizer.param_groups, lrs):
        assert group["lr"] == pytest.approx(start * 1e-3, rel=1e-9)


def test_backbone_lr_scale_survives_plateau_drops_and_resume_bit_exactly(
    trees: dict[str, Path], source: Path, tmp_path: Path
) -> None:
    # threshold 1: no epoch ever improves enough, so the lr drops after epochs 2 and 3.
    recipe = ["--set", "optim.backbone_lr_scale=0.1", "--set", "optim.plateau_patience=0",
              "--set", "optim.plateau_threshold=1", "--lr", "0.01", "--seed", "2"]  # fmt: skip
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert finetune(trees, source, whole, *recipe, "--epochs", "3") == 0
    assert finetune(trees, source, split, *recipe, "--epochs", "1") == 0
    assert main(["train", "--resume", str(split), "--epochs", "3", "--no-progress"]) == 0
    a, b = (torch.load(run / "last.pt", weights_only=True) for run in (whole, split))
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == pytest.approx([1e-4, 1e-5], rel=1e-9)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["schedule"] == b["schedule"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        assert torch.equal(state["velocity"], b["optimizer"]["state"][index]["velocity"]), index


# --------------------------------------------------------------------------------------
# (b) --freeze conv5 end to end; the run records its source and is an ordinary run


def test_freeze_conv5_keeps_conv_weights_bit_for_bit(trees: dict[str, Path], source: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert finetune(trees, source, out, "--freeze", "conv5", "--epochs", "2") == 0
    before, after = load_checkpoint(source)["model"], torch.load(out / "last.pt", weights_only=True)
    for key, value in before.items():
        if key.startswith("conv"):
            assert torch.equal(after["model"][key], value), key
        elif key.startswith(("fc6", "fc7")):
            assert not torch.equal(after["model"][key], value), f"{key} did not train"
    assert after["model"]["fc8.weight"].shape[0] == 2 and after["classes"] == ["dog", "eel"]
    assert len(after["optimizer"]["state"]) == 6  # velocities for fc6-fc8 only
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["run"]["init_from"] == str(source.resolve()) and cfg["optim"]["freeze"] == "conv5"
    assert cfg["run"]["init_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert after["config"]["run"]["init_sha256"] == cfg["run"]["init_sha256"]
    # An ordinary run: evaluate, export and serve read it.
    assert main(["evaluate", str(out / "best.pt"), "--data", str(trees["target"]), "--centre-only"]) == 0
    assert main(["export", str(out / "best.pt"), "--format", "torchscript", "--out", str(tmp_path / "ts.pt")]) == 0
    testclient = pytest.importorskip("fastapi.testclient")
    from alexnet.tools.serve import create_app

    image = next((trees["target"] / "val" / "dog").iterdir()).read_bytes()
    reply = testclient.TestClient(create_app(out / "best.pt")).post("/predict", files={"file": ("x.jpg", image)})
    assert reply.status_code == 200 and {c["name"] for c in reply.json()["top"]} == {"dog", "eel"}


def test_same_classes_keep_fc8_also_from_safetensors(
    trees: dict[str, Path], source: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exported = tmp_path / "source.safetensors"
    assert main(["export", str(source), "--format", "safetensors", "--out", str(exported)]) == 0
    out = tmp_path / "run"
    data = ["--data", str(trees["source"])]
    assert main(["train", *data, "--out", str(out), "--init-from", str(exported), *BASE[2:], "--epochs", "0"]) == 0
    assert "all 8 layers copied, fc8 kept" in caplog.text
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["data"]["normalize"] == "mean-image-std" and cfg["model"]["fc_width"] == 32
    assert cfg["run"]["init_sha256"] == hashlib.sha256(exported.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------
# (e) torchvision weights: ImageNet mean/std at 256/224, never a mean image


@pytest.fixture(scope="module")
def torchvision_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tv")
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(num_classes=3).state_dict(), root / "tv.pth")
    (root / "classes.txt").write_text("k0\nk1\nk2\n")
    out = root / "tv.pt"
    command = ["import-weights", str(root / "tv.pth"), "--format", "torchvision", "--out", str(out)]
    assert main([*command, "--classes", str(root / "classes.txt")]) == 0
    return out


def test_torchvision_preprocessing_is_taken_from_the_checkpoint(torchvision_checkpoint: Path) -> None:
    cfg = finetune_config(torchvision_checkpoint, None, {"data.root": "x"})
    assert (cfg.model.name, cfg.data.normalize, cfg.data.image_size, cfg.data.crop_size) == (
        "torchvision", "imagenet", 256, 224,
    )  # fmt: skip
    mine = finetune_config(torchvision_checkpoint, None, {"data.crop_size": 200})
    assert (mine.data.crop_size, mine.data.image_size) == (200, 256)


def test_torchvision_finetune_normalises_with_imagenet_mean_and_std(
    trees: dict[str, Path], torchvision_checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    command = ["train", "--data", str(trees["target"]), "--out", str(out), "--init-from", str(torchvision_checkpoint)]
    small = ["--set", "data.image_size=72", "--set", "data.crop_size=64", "--batch-size", "4", "--workers", "0"]
    assert main([*command, *small, "--epochs", "1", "--no-progress", "--set", "run.tensorboard=false"]) == 0
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["config"]["data"]["normalize"] == "imagenet" and state["config"]["model"]["name"] == "torchvision"
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1).expand(3, 72, 72)
    assert torch.equal(state["preprocess"]["mean"], mean)  # per-channel constants, not this data's mean image
    assert torch.equal(state["preprocess"]["std"], torch.tensor(IMAGENET_STD))
    assert state["model"]["classifier.6.weight"].shape == (2, 4096)
    source = load_checkpoint(torchvision_checkpoint)["model"]
    assert not torch.equal(state["model"]["features.0.weight"], source["features.0.weight"])  # trained


# --------------------------------------------------------------------------------------
# (f) bad input: one line each, exit status 2


def error_of(capsys: pytest.CaptureFixture[str], status: int) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("alexnet: error:")]
    assert status == 2 and len(lines) == 1, lines
    return lines[0]


def test_bad_inputs_say_what_is_wrong(
    trees: dict[str, Path], source: Path, torchvision_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    other = finetune(trees, torchvision_checkpoint, out, "--model", "paper", "--epochs", "1")
    assert "holds a 'torchvision' network; this run asks for 'paper'" in error_of(capsys, other)
    # 28 px crops reach pool5 at 2x2 (24 px ones too); 20 px at 1x1, which fc6 cannot take.
    crop = finetune(trees, source, out, "--set", "data.crop_size=20", "--epochs", "1")
    message = error_of(capsys, crop)
    assert "data.crop_size 20 does not fit" in message and "use data.crop_size=28" in message
    unknown = finetune(trees, source, out, "--freeze", "conv6")
    assert "unknown layer 'conv6' for optim.freeze (--freeze) (did you mean 'conv5'?)" in error_of(capsys, unknown)
    both = main(["train", "--resume", str(source.parent), "--init-from", str(source)])
    assert "--init-from starts a new run" in error_of(capsys, both)
    missing = finetune(trees, tmp_path / "nothing.pt", out)
    assert "nothing.pt does not exist" in error_of(capsys, missing)
    bare = tmp_path / "bare.pt"
    torch.save({"features.0.weight": torch.zeros(1)}, bare)
    assert "not an alexnet checkpoint" in error_of(capsys, finetune(trees, bare, out))
    assert not (out / "last.pt").exists()


def test_same_classes_in_another_order_permute_fc8_rows(source: Path) -> None:
    src = load_source(source)
    model = init_model(src.config.model, src, ["cat", "ant", "bee"], seed=0)  # saved: ant, bee, cat
    order = torch.tensor([2, 0, 1])
    assert torch.equal(model.fc8.weight, src.state["model"]["fc8.weight"][order])
    assert torch.equal(model.fc8.bias, src.state["model"]["fc8.bias"][order])
    with pytest.raises(AlexNetError, match="sha256 .* not the 000000000000... that run.init_sha256 names"):
        load_source(source, "0" * 64)
