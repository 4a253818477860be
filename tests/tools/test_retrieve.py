"""Nearest neighbours in fc7 space against a NumPy brute force, and the Figure 4 grid layout."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.checkpoint import load_model
from alexnet.cli import main
from alexnet.errors import AlexNetError
from alexnet.tools.features import extract_features, save_index
from alexnet.tools.retrieve import Retrieval, draw_grid, nearest, retrieve
from conftest import write_tiny_checkpoint


def brute_force(index: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The definition: every Euclidean distance, sorted stably."""
    d = np.sqrt(((queries[:, None, :].astype(np.float64) - index[None].astype(np.float64)) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), order


@pytest.mark.parametrize("block", [7, 65536])  # many blocks, one block
def test_nearest_matches_brute_force(block):
    rng = np.random.default_rng(0)
    index = rng.normal(size=(50, 64)).astype(np.float32)
    queries = rng.normal(size=(5, 64)).astype(np.float32)
    dist, idx = nearest(torch.from_numpy(index), torch.from_numpy(queries), k=6, block=block)
    ref_d, ref_i = brute_force(index, queries, 6)
    np.testing.assert_array_equal(idx.numpy(), ref_i)
    np.testing.assert_allclose(dist.numpy(), ref_d, rtol=1e-12)


def test_nearest_ties_and_small_index():
    index = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 3.0]])
    dist, idx = nearest(index, torch.zeros(1, 2), k=10, block=2)
    assert idx.tolist() == [[0, 1, 2, 3]]  # k clipped to N; equal distances keep index order
    assert dist[0, :3].tolist() == [1.0, 1.0, 1.0] and dist[0, 3].item() == pytest.approx(18**0.5)


COLOURS = [(250, 20, 20), (20, 250, 20), (20, 20, 250), (240, 240, 20), (20, 240, 240), (240, 20, 240), (128, 128, 128)]


@pytest.fixture
def index_setup(tmp_path, tiny_checkpoint) -> tuple[Path, Path, Path]:
    root = tmp_path / "index"
    root.mkdir()
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (40, 40), colour).save(root / f"{i}.png")
    save_index(extract_features(load_model(tiny_checkpoint), root), tmp_path / "f.npz")
    query = tmp_path / "query.png"
    Image.new("RGB", (40, 40), (230, 40, 30)).save(query)
    return root, tmp_path / "f.npz", query


def test_retrieve_ranks_the_index_by_fc7_distance(index_setup, tiny_checkpoint):
    _, index_path, query = index_setup
    [result], index = retrieve(tiny_checkpoint, index_path, [str(query)], k=4)
    loaded = load_model(tiny_checkpoint)
    from alexnet.data.images import load_image
    from alexnet.tools.features import image_features

    q = image_features(loaded, torch.from_numpy(load_image(query, 32)).permute(2, 0, 1)[None]).numpy()
    ref_d, ref_i = brute_force(index.features, q, 4)
    assert [p for p, _ in result.neighbours] == [str(index.absolute(j)) for j in ref_i[0]]
    np.testing.assert_allclose([d for _, d in result.neighbours], ref_d[0], rtol=1e-6)


def _features_of(checkpoint: Path, path: str) -> np.ndarray:
    from alexnet.data.images import load_image
    from alexnet.tools.features import image_features

    return image_features(load_model(checkpoint), torch.from_numpy(load_image(path, 32)).permute(2, 0, 1)[None]).numpy()


def test_grid_layout_puts_each_image_in_its_cell(index_setup, tiny_checkpoint):
    root, index_path, query = index_setup
    results, _ = retrieve(tiny_checkpoint, index_path, [str(query), str(root / "2.png")], k=3)
    thumb, gap, label = 20, 4, 14
    grid = np.asarray(draw_grid(results, thumb=thumb, gap=gap, label=label))
    assert grid.shape == (2 * (thumb + label + gap), 4 * (thumb + gap) + 3 * gap, 3)
    for r, result in enumerate(results):
        y = r * (thumb + label + gap) + thumb // 2
        expected = [Image.open(result.query).getpixel((20, 20))]
        expected += [Image.open(p).getpixel((20, 20)) for p, _ in result.neighbours]
        xs = [thumb // 2] + [c * (thumb + gap) + 3 * gap + thumb // 2 for c in (1, 2, 3)]
        for x, colour in zip(xs, expected):
            np.testing.assert_allclose(grid[y, x], colour, atol=2)
    # an image in the index is its own nearest neighbour, at distance 0 up to float32
    # rounding (the index was computed in a batch of 7, the query in a batch of 2)
    path, distance = results[1].neighbours[0]
    assert path == str(root / "2.png") and distance < 1e-4 * np.linalg.norm(_features_of(tiny_checkpoint, path))


def test_cli_retrieve_and_errors(index_setup, tiny_checkpoint, tmp_path, capsys):
    root, index_path, query = index_setup
    out = tmp_path / "grid.png"
    assert (
        main(["retrieve", str(tiny_checkpoint), str(query), "--index", str(index_path), "--k", "6", "--out", str(out)])
        == 0
    )
    text = capsys.readouterr().out
    assert str(query) in text and text.count(str(root)) == 6
    assert Image.open(out).size == (7 * 132 + 12, 146)
    other = write_tiny_checkpoint(tmp_path / "other.pt", [f"c{i}" for i in range(6)], seed=1)
    assert main(["retrieve", str(other), str(query), "--index", str(index_path)]) == 2
    assert "built by another network" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"no")
    assert main(["retrieve", str(tiny_checkpoint), str(bad), str(query), "--index", str(index_path)]) == 1
    assert "cannot read" in capsys.readouterr().out
    with pytest.raises(AlexNetError, match="no query image could be decoded"):
        draw_grid([Retrieval(str(bad), [], error="x")])
