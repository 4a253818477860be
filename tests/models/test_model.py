"""The networks against the paper's numbers, a numpy LRN, and torchvision's own AlexNet."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alexnet import AlexNetError, LocalResponseNorm, count_parameters, create_model
from alexnet.models.alexnet import LRN_CONVENTIONS

# Per layer, from Caffe's bvlc_alexnet (the same grouped layout as the paper): PAPER.md.
CAFFE_LAYER_PARAMS = [34_944, 307_456, 885_120, 663_936, 442_624, 37_752_832, 16_781_312, 4_097_000]


def test_paper_parameter_counts_match_caffe_layer_by_layer():
    model = create_model("paper")
    layers = [model.conv1, model.conv2, model.conv3, model.conv4, model.conv5, model.fc6, model.fc7, model.fc8]
    assert [count_parameters(layer) for layer in layers] == CAFFE_LAYER_PARAMS
    assert count_parameters(model) == 60_965_224


def test_one_tower_and_torchvision_counts():
    assert count_parameters(create_model("paper", towers=1)) == 62_378_344
    assert count_parameters(create_model("torchvision")) == 61_100_840


def test_paper_shapes_conv1_55_and_pool5_6x6x256():
    model = create_model("paper").eval()
    x = torch.randn(2, 3, 224, 224)
    assert model.conv1(x).shape == (2, 96, 55, 55)
    assert model.forward_conv(x).shape == (2, 256, 6, 6)
    assert model.forward_features(x).shape == (2, 256, 6, 6)  # timm's name: the last convolutional map
    assert model.fc7_features(x).shape == (2, 4096)  # the Figure 4 feature space
    assert model(x).shape == (2, 1000)


def test_two_towers_are_grouped_where_the_paper_splits_them():
    model = create_model("paper")
    groups = [model.conv1.groups, model.conv2.groups, model.conv3.groups, model.conv4.groups, model.conv5.groups]
    assert groups == [1, 2, 1, 2, 2]
    # conv2's first tower reads only the first 48 conv1 maps: its outputs for tower 1
    # do not change when the second tower's inputs do.
    x = torch.randn(1, 96, 27, 27)
    y = x.clone()
    y[:, 48:] = torch.randn(1, 48, 27, 27)
    with torch.no_grad():
        assert torch.equal(model.conv2(x)[:, :128], model.conv2(y)[:, :128])
        assert not torch.allclose(model.conv2(x)[:, 128:], model.conv2(y)[:, 128:])


def test_paper_initialisation():
    torch.manual_seed(0)
    model = create_model("paper")
    for name in ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]:
        layer = getattr(model, name)
        assert abs(layer.weight.std().item() - 0.01) < 0.001, name
        assert abs(layer.weight.mean().item()) < 0.001, name
        expected_bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(layer.bias == expected_bias), name


def test_kaiming_initialisation_option():
    model = create_model("paper", init="kaiming")
    fan_in = 3 * 11 * 11
    assert abs(model.conv1.weight.std().item() - (2 / fan_in) ** 0.5) < 0.01
    assert torch.all(model.fc6.bias == 0)


def _lrn_numpy(a: np.ndarray, k: float, alpha: float, beta: float, n: int) -> np.ndarray:
    """The paper's section 3.3 formula, literally: sums over max(0, i-n/2) .. min(N-1, i+n/2)."""
    out = np.empty_like(a)
    channels = a.shape[1]
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        out[:, i] = a[:, i] / (k + alpha * (a[:, lo : hi + 1] ** 2).sum(1)) ** beta
    return out


@pytest.mark.parametrize("convention", ["paper", "cuda-convnet", "caffe"])
def test_lrn_matches_numpy_formula(convention):
    k, alpha, beta, n, divide, _ = LRN_CONVENTIONS[convention]
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 30, size=(2, 12, 3, 4)).astype(np.float64)  # post-ReLU magnitudes
    expected = _lrn_numpy(a, k, alpha / n if divide else alpha, beta, n)
    got = LocalResponseNorm(convention, groups=1)(torch.from_numpy(a)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_paper_lrn_constants_and_difference_from_torch():
    # Paper: k=2, n=5, alpha=1e-4 NOT divided by n. torch.nn.LocalResponseNorm divides by n,
    # so the paper's layer is torch's with alpha * n.
    x = torch.rand(1, 10, 4, 4) * 50
    ours = LocalResponseNorm("paper")(x)
    torch_equivalent = torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)(x)
    torch_naive = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(x)
    torch.testing.assert_close(ours, torch_equivalent)
    assert not torch.allclose(ours, torch_naive)


def test_lrn_per_tower_window_stays_inside_each_tower():
    a = np.random.default_rng(1).uniform(0, 30, size=(2, 8, 3, 3))
    got = LocalResponseNorm("paper", groups=2)(torch.from_numpy(a)).numpy()
    k, alpha, beta, n, _, _ = LRN_CONVENTIONS["paper"]
    expected = np.concatenate([_lrn_numpy(a[:, :4], k, alpha, beta, n), _lrn_numpy(a[:, 4:], k, alpha, beta, n)], 1)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # Caffe normalises across the tower boundary whatever the grouping.
    assert LocalResponseNorm("caffe", groups=2).groups == 1


@pytest.mark.parametrize("convention", ["paper", "cuda-convnet", "caffe"])
@pytest.mark.parametrize("groups", [1, 2])
def test_lrn_training_path_matches_the_formula_and_its_gradient(convention, groups):
    # With gradients on, the layer runs _LRNFunction; its values must be the numpy formula's
    # and its hand-written backward autograd's through F.local_response_norm.
    k, alpha, beta, n, divide, per_tower = LRN_CONVENTIONS[convention]
    a = np.random.default_rng(2).uniform(0, 30, size=(2, 8, 3, 4))
    parts = np.split(a, groups if per_tower else 1, axis=1)
    expected = np.concatenate([_lrn_numpy(p, k, alpha / n if divide else alpha, beta, n) for p in parts], 1)
    layer = LocalResponseNorm(convention, groups=groups)
    x = torch.from_numpy(a).requires_grad_()
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-10)
    ga = torch.randn(2, 8, 3, 4, dtype=torch.float64)
    (got,) = torch.autograd.grad(layer(x), x, ga)
    ref_x = x.detach().reshape(2 * layer.groups, 8 // layer.groups, 3, 4).requires_grad_()
    ref = F.local_response_norm(ref_x, n, alpha=layer.alpha, beta=beta, k=k)
    (want,) = torch.autograd.grad(ref, ref_x, ga.reshape(ref.shape))
    torch.testing.assert_close(got, want.reshape(2, 8, 3, 4), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("size", [1, 3, 4, 5])
@pytest.mark.parametrize("groups", [1, 2])
def test_lrn_function_gradcheck_odd_and_even_windows(size, groups):
    from alexnet.models.lrn import lrn_function

    x = (torch.rand(2, 12, 3, 2, dtype=torch.float64) * 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: lrn_function(t, groups, size, 0.3, 0.75, 2.0), (x,))


def test_lrn_training_path_in_channels_last_float32():
    x = (torch.rand(4, 16, 7, 7) * 20).contiguous(memory_format=torch.channels_last).requires_grad_()
    layer = LocalResponseNorm("paper", groups=2)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)  # pool1 and conv2 get it as it is
    ref = F.local_response_norm(x.detach().reshape(8, 8, 7, 7), 5, alpha=layer.alpha, beta=0.75, k=2.0)
    torch.testing.assert_close(y.detach(), ref.reshape(4, 16, 7, 7))
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_lrn_under_bf16_autocast_sums_in_float32_and_returns_bf16():
    # The window sum runs in float32 (in bf16, k + sum moves in steps of 1/64) and the result
    # is bf16 again, so pool1 and conv2 stay in bf16: the float32 formula to bf16 rounding.
    layer = LocalResponseNorm("paper", groups=2)
    x = (torch.rand(4, 96, 13, 13) * 20).to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        with torch.no_grad():
            y_inference = layer(x)
    assert y.dtype == y_inference.dtype == torch.bfloat16
    ref = F.local_response_norm(x.detach().float().reshape(8, 48, 13, 13), 5, alpha=layer.alpha, beta=0.75, k=2.0)
    torch.testing.assert_close(y.float(), ref.reshape(4, 96, 13, 13), rtol=2**-8, atol=1e-5)
    torch.testing.assert_close(y, y_inference, rtol=0, atol=0)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_lrn_scripts_with_torchscript():
    layer = LocalResponseNorm("paper", groups=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated upstream
        scripted = torch.jit.script(layer)
    x = torch.rand(2, 8, 3, 3) * 20
    torch.testing.assert_close(scripted(x), layer(x))


def test_torchvision_state_dict_loads_and_gives_the_same_logits():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    reference = torchvision.models.alexnet(weights=None).eval()
    ours = create_model("torchvision").eval()
    assert list(ours.state_dict()) == list(reference.state_dict())
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)
        # fc7 activations are the input of torchvision's last layer
        pooled = reference.avgpool(reference.features(x))
        torch.testing.assert_close(ours.forward_features(x), pooled, rtol=0, atol=0)
        fc7 = reference.classifier[:6](torch.flatten(pooled, 1))
        torch.testing.assert_close(ours.fc7_features(x), fc7)
        torch.testing.assert_close(ours.forward_head(pooled, pre_logits=True), fc7)
        torch.testing.assert_close(ours.forward_head(pooled), reference.classifier(torch.flatten(pooled, 1)))


@pytest.mark.parametrize("name", ["paper", "torchvision"])
def test_forward_is_forward_head_of_forward_features(name):
    # timm's split: forward_features gives the last convolutional map, forward_head the rest.
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        conv = model.forward_features(x)
        assert conv.shape == (2, 256, 6, 6)
        torch.testing.assert_close(model.forward_head(conv), model(x), rtol=0, atol=0)
        fc7 = model.forward_head(conv, pre_logits=True)
        assert fc7.shape == (2, 4096)
        torch.testing.assert_close(fc7, model.fc7_features(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["paper", "torchvision"])
def test_every_parameter_receives_a_gradient(name):
    model = create_model(name, num_classes=7)
    model(torch.randn(2, 3, 224, 224)).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize(
    "options",
    [
        dict(activation="tanh"),
        dict(lrn="none"),
        dict(lrn="caffe"),
        dict(pooling="non-overlap"),
        dict(towers=1),
        dict(dropout=0.0),
        dict(remove_conv=2),
        dict(remove_conv=3),
        dict(remove_conv=4),
        dict(remove_conv=5),
    ],
)
def test_ablation_options_build_and_run(options):
    model = create_model("paper", num_classes=10, **options).eval()
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_ablation_options_change_what_they_claim():
    assert isinstance(create_model("paper", activation="tanh").act, torch.nn.Tanh)
    assert isinstance(create_model("paper", lrn="none").lrn1, torch.nn.Identity)
    assert create_model("paper", pooling="non-overlap").pool.kernel_size == 2
    assert create_model("paper").pool.kernel_size == 3
    assert create_model("paper", remove_conv=4).conv4 is None
    # non-overlapping 2/2 pooling of 55 -> 27 -> 13 -> 6 keeps pool5 at 6x6, as in the paper's ablation
    assert create_model("paper", pooling="non-overlap").feature_shape == (256, 6, 6)


def test_small_variant_for_small_images():
    model = create_model(
        "paper", 10, width=0.25, fc_width=512, conv1_kernel=5, conv1_stride=2, conv1_padding=2, input_size=56
    )
    assert model.feature_shape == (64, 2, 2)
    assert model(torch.randn(3, 3, 56, 56)).shape == (3, 10)


def test_dropout_only_in_training():
    model = create_model("paper", num_classes=5, width=0.25, fc_width=64, conv1_stride=2, input_size=64)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_bad_options_are_clear_errors():
    with pytest.raises(AlexNetError, match="did you mean 'dropout'"):
        create_model("paper", dropuot=0.3)
    with pytest.raises(AlexNetError, match="lrn must be one of"):
        create_model("paper", lrn="foo")
    with pytest.raises(AlexNetError, match="name must be one of"):
        create_model("vgg")
    with pytest.raises(AlexNetError, match="only to the paper variant"):
        create_model("torchvision", lrn="caffe")
    with pytest.raises(AlexNetError, match="too small"):
        create_model("paper", input_size=32)
