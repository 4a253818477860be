"""conv1 as space-to-depth (models/conv1.py): the direct convolution's function, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alexnet.errors import AlexNetError
from alexnet.models.alexnet import create_model
from alexnet.models.conv1 import Conv1, conv_space_to_depth, set_conv1, space_to_depth_weight


@pytest.mark.parametrize(
    "size, kernel, stride, padding",
    [(224, 11, 4, 2), (227, 11, 4, 0), (230, 11, 4, 2), (57, 5, 2, 1), (31, 7, 3, 0)],
    ids=["paper-224", "caffe-227", "ragged-230", "small-5/2", "7/3"],
)
def test_space_to_depth_equals_the_direct_convolution_in_float64(size, kernel, stride, padding):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=g)
    w = torch.randn(8, 3, kernel, kernel, dtype=torch.float64, generator=g)
    b = torch.randn(8, dtype=torch.float64, generator=g)
    want = F.conv2d(x, w, b, stride, padding)
    got = conv_space_to_depth(x, w, b, stride, padding)
    assert got.shape == want.shape  # (2, 8, 55, 55) for both paper crops
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_folded_weight_by_hand():
    # One input channel, a 3x3 kernel at stride 2: padded to 4x4, folded to (4, 2, 2);
    # folded channel dy*2+dx at block (by, bx) holds w[2*by+dy, 2*bx+dx], zero past the kernel.
    w = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    folded = space_to_depth_weight(w, 2)
    assert folded.shape == (1, 4, 2, 2)
    assert folded[0, 0].tolist() == [[1.0, 3.0], [7.0, 9.0]]  # dy=0, dx=0
    assert folded[0, 3].tolist() == [[5.0, 0.0], [0.0, 0.0]]  # dy=1, dx=1


def test_paper_conv1_modes_share_state_dict_and_gradients():
    model = create_model("paper", 10, width=0.25, fc_width=16).double()
    assert isinstance(model.conv1, Conv1)
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    outs, grads = [], []
    for impl in ("direct", "space-to-depth"):
        set_conv1(model, impl)
        model.zero_grad()
        y = model.conv1(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append(model.conv1.weight.grad.clone())
        assert list(model.state_dict()) == keys and model.conv1.weight.shape == (24, 3, 11, 11)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-10)


def test_set_conv1_refuses_an_unknown_implementation():
    with pytest.raises(AlexNetError, match="conv1 must be one of direct, space-to-depth"):
        set_conv1(create_model("paper", 10, width=0.25, fc_width=16), "fft")
