"""experiments.py and ``alexnet experiment``: the pieces against hand-computed values, and
each experiment's reduced mode end to end on a tiny CIFAR-like tree (seconds)."""

from __future__ import annotations

import json
import math
import multiprocessing
import shlex
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from alexnet.cli import main
from alexnet.data.cifar import ArraySplit
from alexnet.errors import AlexNetError
from alexnet.experiments import (
    REDUCED_ABLATIONS,
    VARIANTS,
    AblationSettings,
    Figure1Net,
    Recipe,
    RunDir,
    _verdict,
    ablation_model_options,
    epochs_to,
    fit,
    lr_at,
    make_pre,
    resolve_settings,
    split_stats,
)
from alexnet.models.alexnet import PaperAlexNet, count_parameters, create_model

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _class_images(label: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 32, 32, 3): a class colour plus noise, so a small net can learn the classes."""
    colour = np.array([(label * 70) % 256, (label * 130 + 60) % 256, (label * 200 + 120) % 256])
    noise = rng.integers(-40, 41, (n, 32, 32, 3))
    return np.clip(colour + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def cifar_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-10-shaped ImageFolder tree: 10 classes, 12 training and 4 test PNGs each."""
    root = tmp_path_factory.mktemp("cifar-like")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i, img in enumerate(_class_images(label, n, rng)):
                Image.fromarray(img).save(root / split / name / f"{i:04d}.png")
    return root


def _split(n_per_class: int, classes: int = 2, seed: int = 0) -> ArraySplit:
    rng = np.random.default_rng(seed)
    imgs = np.concatenate([_class_images(c, n_per_class, rng) for c in range(classes)])
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return ArraySplit(torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), labels, CLASSES[:classes])


# --------------------------------------------------------------------------------------
# pieces


def test_figure1_net_shapes_and_parameter_count() -> None:
    for act in ("relu", "tanh"):
        net = Figure1Net(act)
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
        kinds = {type(m).__name__ for m in net.features}
        assert kinds == {"Conv2d", "MaxPool2d", "ReLU" if act == "relu" else "Tanh"}
    # conv 3->32 5x5, 32->32 5x5, 32->64 5x5, fc 64*3*3 -> 10, weights plus biases.
    expected = (3 * 25 * 32 + 32) + (32 * 25 * 32 + 32) + (32 * 25 * 64 + 64) + (576 * 10 + 10)
    assert count_parameters(Figure1Net()) == expected == 85_098
    with pytest.raises(AlexNetError, match="relu or tanh"):
        Figure1Net("sigmoid")


def test_figure1_net_starts_near_chance_loss() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))
    losses = {act: torch.nn.functional.cross_entropy(Figure1Net(act)(x), y).item() for act in ("relu", "tanh")}
    assert abs(losses["tanh"] - math.log(10)) < 0.05
    assert math.log(10) < losses["relu"] < 1.35 * math.log(10)


def test_lr_schedule_hand_computed() -> None:
    r = Recipe(epochs=8, lr=0.01, lr_drops=(0.5, 0.75))
    assert [lr_at(r, e) for e in range(8)] == pytest.approx([0.01] * 4 + [0.001] * 2 + [0.0001] * 2)
    assert lr_at(Recipe(epochs=3, lr=0.1), 2) == 0.1


def test_epochs_to_target() -> None:
    rows = [{"epoch": 0.5, "train_error": 0.4}, {"epoch": 1.0, "train_error": 0.25}, {"epoch": 1.5, "train_error": 0.1}]
    assert epochs_to(rows, 0.25) == 1.0
    assert epochs_to(rows, 0.05) is None


def test_fit_learns_records_windows_and_is_repeatable() -> None:
    train = _split(32)  # 64 images, 2 classes: 8 batches of 8
    recipe = Recipe(epochs=3, lr=0.01, batch_size=8, windows_per_epoch=4)
    pre = make_pre(split_stats(train), recipe)

    def run() -> list[dict]:
        torch.manual_seed(0)
        return fit(Figure1Net("relu", 2), train, pre, recipe, seed=0, device=torch.device("cpu")).rows

    rows = run()
    # 8 batches per epoch allow one window of >= 8 batches: one row per epoch.
    assert [r["epoch"] for r in rows] == [1.0, 2.0, 3.0]
    assert rows[-1]["train_error"] < 0.1 and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert [(r["train_loss"], r["train_error"]) for r in run()] == [(r["train_loss"], r["train_error"]) for r in rows]


def test_fit_stops_at_target_error() -> None:
    train = _split(64)
    recipe = Recipe(epochs=20, lr=0.01, batch_size=16, stop_at_error=0.2)
    pre = make_pre(split_stats(train), recipe)
    torch.manual_seed(0)
    result = fit(Figure1Net("relu", 2), train, pre, recipe, seed=0, device=torch.device("cpu"))
    assert result.rows[-1]["train_error"] <= 0.2 and len(result.rows) < 20
    assert result.images == 128 * len(result.rows) and not result.diverged


def test_fit_reports_divergence_instead_of_raising() -> None:
    train = _split(32)
    recipe = Recipe(epochs=5, lr=1e6, batch_size=16)
    pre = make_pre(split_stats(train), recipe)
    torch.manual_seed(0)
    result = fit(Figure1Net("relu", 2), train, pre, recipe, seed=0, device=torch.device("cpu"))
    assert result.diverged and not math.isfinite(result.rows[-1]["train_loss"]) and len(result.rows) < 5


@pytest.mark.parametrize(
    ("effect", "se", "n", "claimed", "expected"),
    [
        (0.02, 0.005, 3, True, "yes"),
        (-0.02, 0.005, 3, True, "no (the opposite)"),
        (0.005, 0.005, 3, True, "not resolved (within noise)"),
        (0.02, 0.005, 3, False, "helps"),
        (0.02, math.nan, 1, True, "undetermined (one seed: no spread)"),
    ],
)
def test_verdict(effect: float, se: float, n: int, claimed: bool, expected: str) -> None:
    assert _verdict(effect, se, n, claimed) == expected


def test_ablation_baseline_is_the_paper_layer_pattern_at_cifar_scale() -> None:
    settings = AblationSettings()
    options = ablation_model_options(settings, VARIANTS["baseline"])
    net = create_model("paper", 10, **options)
    assert isinstance(net, PaperAlexNet)
    assert [
        net.conv1.out_channels,
        net.conv2.out_channels,
        net.conv3.out_channels,
        net.conv4.out_channels,
        net.conv5.out_channels,
    ] == [48, 128, 192, 192, 128]
    assert net.conv2.groups == net.conv4.groups == net.conv5.groups == 2 and net.conv3.groups == 1
    assert net.feature_shape == (128, 2, 2)  # 28 -> conv1 28 -> pools 13, 6, 2
    assert options["lrn"] == "paper" and options["pooling"] == "overlap" and options["dropout"] == 0.5


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_changes_only_its_component(name: str) -> None:
    settings = REDUCED_ABLATIONS
    base = ablation_model_options(settings, VARIANTS["baseline"])
    options = ablation_model_options(settings, VARIANTS[name])
    changed = {k for k in options.keys() | base.keys() if options.get(k) != base.get(k)}
    expected = {
        "baseline": set(),
        "no-lrn": {"lrn"},
        "non-overlap-pool": {"pooling"},
        "no-dropout": {"dropout"},
        "no-pca-lighting": set(),  # a data change: the recipe's lighting_std
        "one-tower-half": {"towers", "width"},
        "one-tower": {"towers"},
        "no-conv4": {"remove_conv"},
    }[name]
    assert changed == expected
    net = create_model("paper", 10, **options)
    assert net(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
    if name == "one-tower-half":
        assert options["width"] == settings.width / 2


def test_resolve_settings_reduced_overrides_and_mistakes() -> None:
    s = resolve_settings("ablations", True, {"seeds": 3, "epochs": None})
    assert s.seeds == 3 and s.epochs == REDUCED_ABLATIONS.epochs and s.subset == 500
    assert resolve_settings("relu-vs-tanh", False, {}).target == 0.25
    with pytest.raises(AlexNetError, match="--variants apply to ablations, not relu-vs-tanh"):
        resolve_settings("relu-vs-tanh", False, {"variants": ("baseline",)})
    with pytest.raises(AlexNetError, match="--epochs must be at least 1; got 0"):
        resolve_settings("ablations", False, {"epochs": 0})
    with pytest.raises(AlexNetError, match="unknown ablation variant\\(s\\) no-relu"):
        resolve_settings("ablations", False, {"variants": ("baseline", "no-relu")})
    with pytest.raises(AlexNetError, match="--lrs must list positive"):
        resolve_settings("relu-vs-tanh", False, {"lrs": (0.01, -1.0)})


# --------------------------------------------------------------------------------------
# end to end, reduced


def test_relu_vs_tanh_reduced_writes_a_complete_run(
    cifar_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "rt"
    argv = ["experiment", "relu-vs-tanh", "--data", str(cifar_tree), "--reduced", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    assert "# Figure 1: ReLU against tanh" in capsys.readouterr().out
    for name in ("config.yaml", "metrics.jsonl", "log.txt", "figure1.png", "summary.json", "summary.md"):
        assert (out / name).is_file(), name
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["experiment"] == "relu-vs-tanh" and config["settings"]["subset"] == 500
    assert config["environment"]["torch"] == str(torch.__version__)
    assert config["environment"]["command"] == shlex.join(["alexnet", *argv])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training_images"] == 120 and summary["paper_ratio"] == 6.0
    for act in ("relu", "tanh"):
        a = summary["activations"][act]
        assert a["lr"] in (0.01, 0.1) and a["runs"] == 1 and len(summary["sweep"][act]) == 2
    runs = {p.stem for p in (out / "runs").glob("*.json")}
    assert runs == {
        "sweep-relu-lr0.01",
        "sweep-relu-lr0.1",
        "sweep-tanh-lr0.01",
        "sweep-tanh-lr0.1",
        "relu-seed0",
        "tanh-seed0",
    }
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["run"] for r in rows} == runs
    assert all(0.0 <= r["train_error"] <= 1.0 and r["epoch"] > 0 for r in rows)
    with Image.open(out / "figure1.png") as img:
        assert img.format == "PNG" and img.width > 300


def test_ablations_reduced_table_seeds_and_rerun(
    cifar_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "ab"
    argv = ["experiment", "ablations", "--data", str(cifar_tree), "--reduced", "--seeds", "2"]
    argv += ["--variants", "baseline,no-lrn", "--out", str(out), "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| no-lrn |" in printed and "LRN lowers top-1 by 1.4" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_images"] == 40 and summary["training_images"] == 120
    rows = {r["variant"]: r for r in summary["rows"]}
    assert set(rows) == {"baseline", "no-lrn", "baseline, centre patch only"}
    base = rows["baseline"]
    assert len(base["test_top1_errors"]) == 2
    assert base["mean"] == pytest.approx(np.mean(base["test_top1_errors"]))
    assert base["std"] == pytest.approx(np.std(base["test_top1_errors"], ddof=1))
    assert rows["no-lrn"]["effect"] == pytest.approx(rows["no-lrn"]["mean"] - base["mean"])
    ten = rows["baseline, centre patch only"]
    assert ten["effect"] == pytest.approx(base["mean"] - ten["ten_patch_mean"])
    for r in summary["rows"]:
        assert all(0.0 <= e <= 1.0 for e in r["test_top1_errors"]) and r["seeds"] == 2
    with Image.open(out / "ablations.png") as img:
        assert img.format == "PNG"

    # The same command again reuses every finished run, as does one asking for a subset
    # of the variants and seeds; other settings are refused.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert main(argv) == 0
    assert main([*argv, "--variants", "no-lrn", "--seeds", "1"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps
    assert [r["variant"] for r in json.loads((out / "summary.json").read_text())["rows"]] == ["no-lrn"]
    capsys.readouterr()
    assert main([*argv, "--epochs", "1"]) == 2
    assert "holds a ablations run with other settings" in capsys.readouterr().err


def _run_results(out: Path) -> dict[str, dict]:
    timing = ("seconds", "images_per_s", "concurrent_runs")
    return {
        p.stem: {k: v for k, v in json.loads(p.read_text()).items() if k not in timing}
        for p in (out / "runs").glob("*.json")
    }


def test_jobs_in_worker_processes_give_the_sequential_results(
    cifar_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # Each run is seeded on its own, so where it runs must not matter. One torch thread in
    # both cases, as each of two workers gets on two cores: the same arithmetic, bit for bit.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["experiment", "relu-vs-tanh", "--data", str(cifar_tree), "--reduced", "--device", "cpu"]
        assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main([*argv, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    one, two = _run_results(tmp_path / "one"), _run_results(tmp_path / "two")
    assert len(one) == 6 and one == two
    # Every worker's metric rows reached the shared file, each under its run's name.
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert {r["run"] for r in rows} == set(two)
    assert all(
        json.loads(p.read_text())["concurrent_runs"] == 2 for p in (tmp_path / "two" / "runs").glob("sweep-*.json")
    )
    assert "[sweep-relu-lr0.01] started in process" in (tmp_path / "two" / "log.txt").read_text()
    assert "with up to 2 runs training at once" in (tmp_path / "two" / "summary.md").read_text()
    assert "at once" not in (tmp_path / "one" / "summary.md").read_text()
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "three"), "--jobs", "0"]) == 2
    assert "--jobs must be at least 1" in capsys.readouterr().err


def _fail_or_wait(job: str, *, device: torch.device, on_row) -> dict:
    if job == "bad":
        raise AlexNetError("bad run diverged")
    time.sleep(120)  # stands for a long run that must not be waited for
    return {}


def test_a_failed_worker_run_stops_the_others_and_raises(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "x", "ablations", {"a": 1}, {"device": "cpu"})
    try:
        with pytest.raises(AlexNetError, match="bad run diverged"):
            run.run_all(_fail_or_wait, (), {"slow": "slow", "bad": "bad"}, torch.device("cpu"), workers=2)
    finally:
        run.close()
    assert not list((tmp_path / "x" / "runs").glob("*.json"))
    for _ in range(100):  # terminated, not left to finish their two minutes
        if not multiprocessing.active_children():
            break
        time.sleep(0.1)
    assert not multiprocessing.active_children()


def test_figure1_net_paper_init() -> None:
    torch.manual_seed(0)
    net = Figure1Net("tanh", init="paper")
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    for m in convs:
        assert float(m.weight.detach().std()) == pytest.approx(0.01, rel=0.1) and not m.bias.any()
    with pytest.raises(AlexNetError, match="init must be he or paper"):
        Figure1Net("relu", init="xavier")


def test_experiment_without_data_is_a_clean_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # no ../shared/data here
    assert main(["experiment", "ablations", "--reduced", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alexnet: error: no --data given") and "Traceback" not in err
    assert main(["experiment", "relu-vs-tanh", "--data", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_matches_the_cpu_schedule() -> None:
    # The same recipe on the GPU: data, generator and batches live on the device.
    train = _split(32)
    recipe = Recipe(epochs=2, lr=0.01, batch_size=8, flip=True, lighting_std=0.1)
    pre = make_pre(split_stats(train), recipe).to("cuda")
    torch.manual_seed(0)
    result = fit(Figure1Net("relu", 2).cuda(), train, pre, recipe, seed=0, device=torch.device("cuda"))
    assert [r["epoch"] for r in result.rows] == [1.0, 2.0] and not result.diverged
    assert result.images == 128
