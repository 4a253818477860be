"""The paper's qualitative figures, for any checkpoint, and training curves of a run.

* :func:`filter_grid` -- Figure 3: the conv1 kernels as RGB images. Each kernel is
  contrast-normalised on its own (its minimum to 0, its maximum to 255), as the figure's
  kernels evidently are, and enlarged by pixel repetition. With two towers the kernels of
  tower 1 fill the upper block of rows and those of tower 2 the lower one ("the top 48
  kernels were learned on GPU 1 while the bottom 48 kernels were learned on GPU 2").
* :func:`predictions_figure` -- Figure 4 (left): each image with its top-5 classes as
  bars; when the true class is known (the image sits in a folder named after one of the
  checkpoint's classes) it is written under the image and its bar is red.
* :func:`curves_figure` -- loss, error and learning rate per epoch from ``metrics.jsonl``.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot state), so
they work headless and from threads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from alexnet.checkpoint import LoadedModel
from alexnet.data.images import BadImage, load_image
from alexnet.errors import AlexNetError
from alexnet.evaluate import predict_probs
from alexnet.extras import require
from alexnet.tools.predict import top_classes

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _new_figure(**kwargs: object) -> Figure:
    # matplotlib is the 'plots' extra: the kernel grid (numpy and PIL) works without it.
    return require("matplotlib.figure", "drawing figures (alexnet visualize predictions/curves)").Figure(**kwargs)


# --------------------------------------------------------------------------------------
# Figure 3: conv1 kernels


def conv1_weight(loaded: LoadedModel) -> tuple[torch.Tensor, int]:
    """conv1's kernels (N, 3, k, k) and the number of towers they are split into."""
    model = loaded.model
    if hasattr(model, "conv1"):
        return model.conv1.weight.detach().cpu(), model.config.towers
    return model.features[0].weight.detach().cpu(), 1  # torchvision: one tower


def filter_grid(
    weight: torch.Tensor, towers: int = 1, columns: int = 16, scale: int = 4, gap: int = 1, tower_gap: int = 6
) -> np.ndarray:
    """An (H, W, 3) uint8 image of the kernels of ``weight`` (N, 3, k, k).

    Kernel i belongs to tower t = i // (N / towers); its index j inside the tower gives
    row j // columns and column j % columns of that tower's block. A cell is k * scale
    pixels with ``gap`` white pixels between cells and ``tower_gap`` between the blocks.
    """
    n, channels, kh, kw = weight.shape
    if channels != 3:
        raise AlexNetError(f"conv1 has {channels} input channels; an RGB picture of its kernels needs 3")
    if n % towers:
        raise AlexNetError(f"{n} kernels do not split into {towers} towers")
    w = weight.double().numpy()
    lo = w.min(axis=(1, 2, 3), keepdims=True)
    hi = w.max(axis=(1, 2, 3), keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    tiles = np.where(hi > lo, (w - lo) / span, 0.5)  # a constant kernel shows as mid-grey
    tiles = np.round(tiles * 255).astype(np.uint8).transpose(0, 2, 3, 1)  # (N, k, k, 3)
    tiles = tiles.repeat(scale, 1).repeat(scale, 2)  # (N, k*scale, k*scale, 3)
    per_tower = n // towers
    rows = math.ceil(per_tower / columns)
    ch, cw = kh * scale, kw * scale
    block_h = rows * (ch + gap) - gap
    height = towers * block_h + (towers - 1) * tower_gap
    width = min(columns, per_tower) * (cw + gap) - gap
    grid = np.full((height, width, 3), 255, np.uint8)
    for i in range(n):
        t, j = divmod(i, per_tower)
        y = t * (block_h + tower_gap) + (j // columns) * (ch + gap)
        x = (j % columns) * (cw + gap)
        grid[y : y + ch, x : x + cw] = tiles[i]
    return grid


# --------------------------------------------------------------------------------------
# Figure 4 (left): top-5 predictions


@dataclass
class ShownPrediction:
    image: np.ndarray  # (S, S, 3) uint8, as the network's input was cut from it
    top: list[tuple[str, float]]  # (name, probability), best first
    truth: str | None = None  # readable name of the true class, when known
    title: str = ""


@torch.no_grad()
def predictions(loaded: LoadedModel, paths: list[str], topk: int = 5, ten: bool = False) -> list[ShownPrediction]:
    """Top-k for each image; the true class is the image's folder name when that is a class id."""
    shown = []
    by_id = dict(zip(loaded.classes, loaded.names))
    device = next(loaded.model.parameters()).device
    for path in paths:
        try:
            image = load_image(path, loaded.preprocess.image_size)
        except BadImage as e:
            raise AlexNetError(f"cannot read {path}: {e}") from None
        batch = torch.from_numpy(image).permute(2, 0, 1)[None].to(device)
        probs = predict_probs([loaded.model], [loaded.preprocess], batch, ten)[0]
        top, _ = top_classes(loaded, probs, topk)
        shown.append(ShownPrediction(image, top, by_id.get(Path(path).parent.name), Path(path).name))
    return shown


def predictions_figure(items: list[ShownPrediction], per_row: int = 4, cell: float = 2.6, dpi: int = 100) -> Figure:
    """Images in rows of ``per_row``; under each image its top-k as horizontal bars, best on top."""
    if not items:
        raise AlexNetError("no images to draw")
    cols = min(per_row, len(items))
    rows = math.ceil(len(items) / cols)
    fig = _new_figure(figsize=(cols * cell, rows * cell * 1.75), dpi=dpi)
    grid = fig.add_gridspec(2 * rows, cols, height_ratios=[1.0, 0.75] * rows, hspace=0.35, wspace=0.9)
    for i, item in enumerate(items):
        r, c = divmod(i, cols)
        ax_img = fig.add_subplot(grid[2 * r, c])
        ax_img.imshow(item.image)
        ax_img.set_xticks([])
        ax_img.set_yticks([])
        ax_img.set_title(item.title, fontsize=8)
        if item.truth is not None:
            ax_img.set_xlabel(item.truth, fontsize=9, fontweight="bold")
        ax_bar = fig.add_subplot(grid[2 * r + 1, c])
        names = [name for name, _ in item.top]
        probs = [p for _, p in item.top]
        colours = ["tab:red" if name == item.truth else "tab:blue" for name in names]
        ax_bar.barh(range(len(probs)), probs, color=colours)
        ax_bar.set_yticks(range(len(names)), names, fontsize=8)
        ax_bar.invert_yaxis()  # best first, on top
        ax_bar.set_xlim(0, 1)
        ax_bar.tick_params(axis="x", labelsize=7)
    return fig


# --------------------------------------------------------------------------------------
# Training curves


def read_metrics(run: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl (a run directory or the file itself)."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise AlexNetError(
            f"cannot read {path}: {e.strerror} (expected a run directory holding metrics.jsonl)"
        ) from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            raise AlexNetError(f"{path} line {n} is not JSON") from None
    if not rows:
        raise AlexNetError(f"{path} holds no epochs yet")
    return rows


def _series(rows: list[dict], key: str, scale: float = 1.0) -> list[float]:
    """One metric per epoch; NaN (a gap in the line) where a row lacks it."""
    return [r[key] * scale if r.get(key) is not None else float("nan") for r in rows]


def curves_figure(runs: dict[str, list[dict]], dpi: int = 100) -> Figure:
    """Three panels against epoch: training loss; training and validation top-1/top-5 error
    (%); learning rate (log scale). One colour per run."""
    fig = _new_figure(figsize=(13, 3.8), dpi=dpi)
    ax_loss, ax_err, ax_lr = fig.subplots(1, 3)
    for i, (name, rows) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        epochs = [r["epoch"] for r in rows]
        ax_loss.plot(epochs, _series(rows, "train_loss"), color=colour, label=name)
        ax_err.plot(epochs, _series(rows, "train_error", 100), color=colour, linestyle=":", label=f"{name} train")
        ax_err.plot(epochs, _series(rows, "val_top1_error", 100), color=colour, label=f"{name} val top-1")
        ax_err.plot(
            epochs, _series(rows, "val_top5_error", 100), color=colour, linestyle="--", label=f"{name} val top-5"
        )
        ax_lr.plot(epochs, _series(rows, "lr"), color=colour, label=name)
    ax_loss.set(title="training loss", xlabel="epoch")
    ax_err.set(title="error (%)", xlabel="epoch")
    ax_lr.set(title="learning rate", xlabel="epoch", yscale="log")
    for ax in (ax_loss, ax_err, ax_lr):
        ax.grid(alpha=0.3)
    ax_err.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------


def save_figure(fig: Figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    require("matplotlib.backends.backend_agg", "drawing figures").FigureCanvasAgg(fig)
    fig.savefig(out, format="png")
    return out


def save_image(array: np.ndarray, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(out, "PNG")
    return out
