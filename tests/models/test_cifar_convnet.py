"""models/cifar_convnet.py: locally connected layers against a loop, cuda-convnet's response
normalisation against numpy formulas, and the net's layer shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alexnet.errors import AlexNetError
from alexnet.models.alexnet import count_parameters
from alexnet.models.cifar_convnet import CudaConvnetCifar, LocallyConnected2d, ResponseNorm


@pytest.mark.parametrize(("size", "kernel", "padding"), [(6, 3, 1), (5, 3, 0), (4, 2, 1)])
def test_locally_connected_equals_a_loop_over_positions(size: int, kernel: int, padding: int) -> None:
    torch.manual_seed(0)
    layer = LocallyConnected2d(3, 4, size, kernel, padding)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    layer = layer.double()
    out = layer(x)
    o = layer.out_size
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    w = layer.weight.detach().numpy().reshape(o, o, 4, 3, kernel, kernel)  # (row, col, out, in, ky, kx)
    ref = np.zeros((2, 4, o, o))
    for i in range(o):
        for j in range(o):
            patch = xp[:, :, i : i + kernel, j : j + kernel]  # (B, in, k, k)
            ref[:, :, i, j] = np.einsum("bcyx,ocyx->bo", patch, w[i, j]) + layer.bias.detach().numpy()[:, i, j]
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-12, atol=1e-12)
    # Unshared: moving one position's weights changes that output position only.
    with torch.no_grad():
        layer.weight[0] += 1.0
    changed = (layer(x) != out).any(0).any(0)
    assert changed[0, 0] and changed.sum() == 1


def test_locally_connected_refuses_a_kernel_larger_than_its_input() -> None:
    with pytest.raises(AlexNetError, match="does not fit"):
        LocallyConnected2d(3, 4, 2, 5)


def _cross_map_ref(a: np.ndarray, size: int, scale: float, power: float) -> np.ndarray:
    # cuda-convnet: maps f - size//2 .. f - size//2 + size - 1, clipped; 1 + scale/size * sum.
    out = np.empty_like(a)
    c = a.shape[1]
    for f in range(c):
        lo, hi = max(0, f - size // 2), min(c, f - size // 2 + size)
        out[:, f] = a[:, f] / (1 + scale / size * (a[:, lo:hi] ** 2).sum(1)) ** power
    return out


def _spatial_ref(a: np.ndarray, size: int, scale: float, power: float) -> np.ndarray:
    out = np.empty_like(a)
    h, w = a.shape[2:]
    for y in range(h):
        for x in range(w):
            y0, x0 = max(0, y - size // 2), max(0, x - size // 2)
            y1, x1 = min(h, y - size // 2 + size), min(w, x - size // 2 + size)
            s = (a[:, :, y0:y1, x0:x1] ** 2).sum((2, 3))
            out[:, :, y, x] = a[:, :, y, x] / (1 + scale / size**2 * s) ** power
    return out


@pytest.mark.parametrize("size", [5, 4, 3])
def test_response_norm_matches_cuda_convnet_formulas(size: int) -> None:
    rng = np.random.default_rng(0)
    # Large activations, so the normalisation is far from the identity (scale 0.001 / 5).
    a = rng.normal(0, 30, (2, 7, 5, 6))
    got = ResponseNorm("cross-map", size, 0.001, 0.75)(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(got, _cross_map_ref(a, size, 0.001, 0.75), rtol=1e-10)
    assert np.abs(got - a).max() > 1.0
    got = ResponseNorm("spatial", size, 0.001, 0.75)(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(got, _spatial_ref(a, size, 0.001, 0.75), rtol=1e-10)
    with pytest.raises(AlexNetError, match="cross-map or spatial"):
        ResponseNorm("caffe")


def test_the_11pct_and_13pct_nets_have_the_layer_files_shapes() -> None:
    with_norm, without = CudaConvnetCifar("cross-map"), CudaConvnetCifar("none")
    x = torch.randn(3, 3, 24, 24)
    assert with_norm(x).shape == (3, 10)
    # conv1 3*25*64+64, conv2 64*25*64+64, local3 36 positions x 32 x 64*9 + 32*36,
    # local4 36 x 32 x 32*9 + 32*36, fc10 32*36*10 + 10: counted by hand from the layer file.
    expected = (3 * 25 * 64 + 64) + (64 * 25 * 64 + 64) + (36 * 32 * 576 + 1152) + (36 * 32 * 288 + 1152) + 11530
    assert count_parameters(with_norm) == count_parameters(without) == expected
    assert isinstance(with_norm.rnorm1, ResponseNorm) and isinstance(without.rnorm1, torch.nn.Identity)
    loss = with_norm(x).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in with_norm.parameters())
    with pytest.raises(AlexNetError, match="norm must be"):
        CudaConvnetCifar("lrn")
