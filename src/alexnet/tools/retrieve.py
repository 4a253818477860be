"""Nearest images in fc7 space, and the paper's Figure 4 (right) as a PNG grid.

:func:`nearest` is the pure part: exact Euclidean k-nearest neighbours, computed in
float64 over blocks of the index so that a million-image index needs Q x block memory,
not Q x N. :func:`retrieve` computes the queries' features with the same network that
built the index and ranks the index; :func:`draw_grid` lays the result out as the paper
does: one row per query, the query first, then its neighbours, nearest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from alexnet.checkpoint import load_model
from alexnet.data.images import BadImage, load_image
from alexnet.errors import AlexNetError
from alexnet.tools.features import (
    FeatureIndex,
    image_features,
    load_index,
    model_fingerprint,
)


def nearest(
    index: torch.Tensor, queries: torch.Tensor, k: int, block: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and indices (Q, k) of the k index rows closest to each query, nearest first.

    Equal distances keep index order (a stable sort), so results are reproducible.
    """
    k = min(k, index.shape[0])
    queries = queries.double()
    best_d = torch.empty(queries.shape[0], 0, dtype=torch.float64)
    best_i = torch.empty(queries.shape[0], 0, dtype=torch.long)
    for start in range(0, index.shape[0], block):
        chunk = index[start : start + block].double()
        d = torch.cdist(queries, chunk, compute_mode="donot_use_mm_for_euclid_dist")  # exact, (Q, block)
        ids = torch.arange(start, start + chunk.shape[0]).expand_as(d)
        cand_d, cand_i = torch.cat([best_d, d], 1), torch.cat([best_i, ids], 1)
        order = cand_d.sort(dim=1, stable=True).indices[:, :k]  # earlier blocks come first on ties
        best_d, best_i = cand_d.gather(1, order), cand_i.gather(1, order)
    return best_d, best_i


@dataclass
class Retrieval:
    query: str
    neighbours: list[tuple[str, float]]  # (absolute path, distance), nearest first
    error: str = ""


@torch.no_grad()
def retrieve(
    checkpoint: str | Path, index_path: str | Path, queries: list[str], k: int = 6, device: str | torch.device = "cpu"
) -> tuple[list[Retrieval], FeatureIndex]:
    """The k nearest index images for each query image (undecodable queries get ``error``)."""
    loaded = load_model(checkpoint, device)
    index = load_index(index_path)
    if index.fingerprint != model_fingerprint(loaded.model):
        raise AlexNetError(
            f"{index_path} was built by another network than {checkpoint}; distances between them mean nothing. "
            f"Rebuild it: alexnet features {checkpoint} {index.root} --out {index_path}"
        )
    results: list[Retrieval] = []
    good: list[int] = []
    images = []
    for q in queries:
        try:
            images.append(torch.from_numpy(load_image(q, loaded.preprocess.image_size)).permute(2, 0, 1))
            good.append(len(results))
            results.append(Retrieval(str(q), []))
        except BadImage as e:
            results.append(Retrieval(str(q), [], error=str(e)))
    if images:
        feats = image_features(loaded, torch.stack(images).to(device)).cpu()
        dist, idx = nearest(torch.from_numpy(index.features), feats, k)
        for row, r in enumerate(good):
            results[r].neighbours = [
                (str(index.absolute(i)), float(d)) for d, i in zip(dist[row].tolist(), idx[row].tolist())
            ]
    return results, index


def _thumbnail(path: str, size: int) -> Image.Image:
    try:
        return Image.fromarray(load_image(path, size))
    except BadImage:
        img = Image.new("RGB", (size, size), (200, 200, 200))
        ImageDraw.Draw(img).text((4, size // 2 - 6), "unreadable", fill=(0, 0, 0))
        return img


def draw_grid(results: list[Retrieval], thumb: int = 128, gap: int = 4, label: int = 14) -> Image.Image:
    """One row per query: the query, a wider gap, then its neighbours nearest first, each
    with its distance written under it. Cell (r, c) starts at x = c * (thumb + gap) plus
    ``3 * gap`` for neighbours, y = r * (thumb + label + gap)."""
    rows = [r for r in results if not r.error]
    if not rows:
        raise AlexNetError("no query image could be decoded; nothing to draw")
    k = max(len(r.neighbours) for r in rows)
    width = (k + 1) * (thumb + gap) + 3 * gap
    height = len(rows) * (thumb + label + gap)
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, result in enumerate(rows):
        y = r * (thumb + label + gap)
        grid.paste(_thumbnail(result.query, thumb), (0, y))
        draw.text((2, y + thumb + 1), "query", fill=(0, 0, 0))
        for c, (path, distance) in enumerate(result.neighbours, start=1):
            x = c * (thumb + gap) + 3 * gap
            grid.paste(_thumbnail(path, thumb), (x, y))
            draw.text((x + 2, y + thumb + 1), f"{distance:.4g}", fill=(0, 0, 0))
    return grid


def save_png(image: Image.Image, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, "PNG")
    return out
