"""Figure 3's kernel grid (layout checked pixel by pixel), Figure 4's prediction panels and run curves."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet import create_model
from alexnet.checkpoint import load_model
from alexnet.cli import main
from alexnet.errors import AlexNetError
from alexnet.tools.visualize import (
    conv1_weight,
    curves_figure,
    filter_grid,
    predictions,
    predictions_figure,
    read_metrics,
)

K, SCALE, GAP, TOWER_GAP, COLS = 11, 4, 1, 6, 16
CELL = K * SCALE  # 44 px


def test_paper_grid_has_one_row_block_per_tower():
    weight = torch.randn(96, 3, K, K)
    grid = filter_grid(weight, towers=2, columns=COLS, scale=SCALE, gap=GAP, tower_gap=TOWER_GAP)
    block = 3 * (CELL + GAP) - GAP  # 48 kernels per tower = 3 rows of 16
    assert grid.shape == (2 * block + TOWER_GAP, COLS * (CELL + GAP) - GAP, 3)
    # the gap between the two towers' blocks is white
    assert (grid[block : block + TOWER_GAP] == 255).all()


def test_a_known_kernel_lands_in_its_cell_contrast_normalised():
    weight = torch.zeros(96, 3, K, K)
    ramp = torch.linspace(-0.3, 0.5, K * K).view(K, K)
    weight[50] = torch.stack([ramp, -ramp, torch.zeros(K, K)])  # tower 2, its 3rd kernel
    grid = filter_grid(weight, towers=2, columns=COLS, scale=SCALE, gap=GAP, tower_gap=TOWER_GAP)
    block = 3 * (CELL + GAP) - GAP
    y, x = block + TOWER_GAP, 2 * (CELL + GAP)  # tower 2's block, row 0, column 2
    cell = grid[y : y + CELL, x : x + CELL].astype(float)
    # min-max over the whole kernel: -0.5 -> 0, 0.5 -> 255
    w = weight[50].double().numpy()
    expected = np.round((w - w.min()) / (w.max() - w.min()) * 255).transpose(1, 2, 0)
    np.testing.assert_array_equal(cell[::SCALE, ::SCALE], expected)
    np.testing.assert_array_equal(cell[1::SCALE, 3::SCALE], expected)  # each weight fills a 4x4 square
    # every other (constant) kernel is mid-grey
    np.testing.assert_array_equal(grid[0:CELL, 0:CELL], np.full((CELL, CELL, 3), 128))


def test_torchvision_grid_is_one_block():
    weight = create_model("torchvision").features[0].weight.detach()
    grid = filter_grid(weight, towers=1)
    assert grid.shape == (4 * (CELL + GAP) - GAP, COLS * (CELL + GAP) - GAP, 3)  # 64 kernels = 4 rows


def test_conv1_weight_of_both_variants(tiny_checkpoint):
    weight, towers = conv1_weight(load_model(tiny_checkpoint))
    assert towers == 2 and weight.shape[1:] == (3, 5, 5)
    with pytest.raises(AlexNetError, match="do not split into 2 towers"):
        filter_grid(torch.zeros(5, 3, 3, 3), towers=2)


@pytest.fixture
def val_images(tmp_path, make_jpeg) -> list[Path]:
    rng = np.random.default_rng(1)
    return [
        make_jpeg(tmp_path / "val" / "c2" / "a.jpg", rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)),
        make_jpeg(tmp_path / "misc" / "b.jpg", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)),
    ]


def test_predictions_know_the_truth_from_the_folder(tiny_checkpoint, val_images):
    from alexnet.tools.predict import predict

    shown = predictions(load_model(tiny_checkpoint), [str(p) for p in val_images])
    assert [s.truth for s in shown] == ["class two", None]  # folder c2 is class id c2
    reference = predict(tiny_checkpoint, [str(p) for p in val_images])
    for s, r in zip(shown, reference):
        assert [n for n, _ in s.top] == [n for n, _ in r.top]
        np.testing.assert_allclose([p for _, p in s.top], [p for _, p in r.top], rtol=1e-6)
        assert s.image.shape == (32, 32, 3)


def test_predictions_figure_draws_the_bars_it_was_given(tiny_checkpoint, val_images, tmp_path):
    shown = predictions(load_model(tiny_checkpoint), [str(p) for p in val_images])
    fig = predictions_figure(shown, per_row=4, cell=2.0, dpi=50)
    image_axes, bar_axes = fig.axes[0::2], fig.axes[1::2]
    for item, ax_img, ax_bar in zip(shown, image_axes, bar_axes):
        np.testing.assert_array_equal(ax_img.images[0].get_array(), item.image)
        bars = ax_bar.patches
        assert [b.get_width() for b in bars] == pytest.approx([p for _, p in item.top])
        assert [t.get_text() for t in ax_bar.get_yticklabels()] == [n for n, _ in item.top]
        red = [
            n
            for (n, _), b in zip(item.top, bars)
            if b.get_facecolor()[:3] == pytest.approx((0.839, 0.153, 0.157), abs=1e-3)
        ]
        assert red == ([item.truth] if item.truth in [n for n, _ in item.top] else [])
    from alexnet.tools.visualize import save_figure

    save_figure(fig, tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").size == (2 * 2.0 * 50, round(1 * 2.0 * 1.75 * 50))


def _write_run(run: Path, rows: list[dict]) -> Path:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_curves_plot_the_metrics(tmp_path):
    rows = [
        {
            "epoch": e,
            "train_loss": 2.3 / e,
            "train_error": 0.9 / e,
            "val_top1_error": 0.8 / e,
            "val_top5_error": 0.5 / e,
            "lr": 0.01 / 10 ** (e // 3),
        }
        for e in range(1, 7)
    ]
    run = _write_run(tmp_path / "run", rows)
    fig = curves_figure({"run": read_metrics(run)})
    ax_loss, ax_err, ax_lr = fig.axes
    np.testing.assert_allclose(ax_loss.lines[0].get_ydata(), [r["train_loss"] for r in rows])
    np.testing.assert_allclose(ax_err.lines[1].get_ydata(), [100 * r["val_top1_error"] for r in rows])
    np.testing.assert_allclose(ax_lr.lines[0].get_ydata(), [r["lr"] for r in rows])
    assert ax_lr.get_yscale() == "log"


def test_cli_visualize(tiny_checkpoint, val_images, tmp_path, capsys):
    assert main(["visualize", "filters", str(tiny_checkpoint), "--out", str(tmp_path / "f.png"), "--scale", "2"]) == 0
    # 12 kernels of 5x5 (width 0.125 of 96), two towers of 6 -> one row each, 6 columns
    assert Image.open(tmp_path / "f.png").size == (6 * 11 - 1, 2 * 10 + 6)
    assert (
        main(
            ["visualize", "predictions", str(tiny_checkpoint), *map(str, val_images), "--out", str(tmp_path / "p.png")]
        )
        == 0
    )
    assert Image.open(tmp_path / "p.png").size[0] > 0
    run = _write_run(
        tmp_path / "run",
        [{"epoch": 1, "train_loss": 1.0, "train_error": 0.5, "val_top1_error": 0.4, "val_top5_error": 0.1, "lr": 0.01}],
    )
    assert main(["visualize", "curves", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert "run (1 epochs)" in capsys.readouterr().out
    assert main(["visualize", "curves", str(tmp_path / "nope"), "--out", str(tmp_path / "c.png")]) == 2
    assert "expected a run directory holding metrics.jsonl" in capsys.readouterr().err
