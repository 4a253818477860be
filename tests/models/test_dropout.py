"""Dropout as the paper (section 4.2) against nn.Dropout's inverted style, derived by hand."""

import pytest
import torch

from alexnet import AlexNetError, create_model
from alexnet.config import Config, from_dict, parse_assignments, resolve
from alexnet.models.alexnet import Dropout

SMALL = dict(width=0.125, fc_width=16, conv1_kernel=5, conv1_stride=1, input_size=28, init="kaiming")


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_paper_eval_equals_inverted_with_fc7_and_fc8_weights_scaled(p):
    # Paper style at test: fc7 sees (1-p) h6 and fc8 sees (1-p) h7, so
    # W7 ((1-p) h6) + b7 = ((1-p) W7) h6 + b7, the same for fc8; biases are unchanged.
    torch.manual_seed(0)
    paper = create_model("paper", 7, dropout=p, dropout_style="paper", **SMALL).double().eval()
    inverted = create_model("paper", 7, dropout=p, dropout_style="inverted", **SMALL).double().eval()
    state = {k: v.clone() for k, v in paper.state_dict().items()}
    for key in ("fc7.weight", "fc8.weight"):
        state[key] *= 1 - p
    inverted.load_state_dict(state)
    x = torch.randn(3, 3, 28, 28, dtype=torch.float64)
    torch.testing.assert_close(paper(x), inverted(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(paper(x), create_model("paper", 7, dropout=p, **SMALL).double().eval()(x))


def test_paper_training_mask_is_unscaled_with_a_fixed_seed():
    x = torch.rand(64, 32) + 0.5
    layer = Dropout(0.5, "paper").train()
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)
    mask = torch.empty_like(x).bernoulli_(0.5)
    torch.testing.assert_close(got, x * mask, rtol=0, atol=0)  # kept units times 1, others 0
    assert set(torch.unique(got / x).tolist()) == {0.0, 1.0}
    torch.manual_seed(3)
    kept = Dropout(0.5, "inverted").train()(x) != 0
    assert set(torch.unique(Dropout(0.5, "inverted").eval()(x) / x).tolist()) == {1.0}
    assert kept.any() and (~kept).any()


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_training_expectation_matches_the_test_time_output(p):
    # E[mask * x] = (1-p) x: the paper's test-time output is the mean training output.
    torch.manual_seed(0)
    x = torch.rand(20_000) + 0.5
    draws = torch.stack([Dropout(p, "paper").train()(x) for _ in range(50)])
    ratio = (draws.mean(0) / Dropout(p, "paper").eval()(x)).mean()
    assert abs(ratio.item() - 1) < 0.01  # 1e6 Bernoulli draws: std of the mean well under 0.1%
    inverted = torch.stack([Dropout(p, "inverted").train()(x) for _ in range(50)]).mean(0)
    assert abs((inverted / x).mean().item() - 1) < 0.01


def test_defaults_by_variant_and_refusals():
    assert create_model("paper").dropout.style == "paper"
    assert create_model("paper", dropout_style="inverted").dropout.style == "inverted"
    assert create_model("torchvision").config.dropout_style == "inverted"
    with pytest.raises(AlexNetError, match="dropout_style 'paper' applies only to the paper variant"):
        create_model("torchvision", dropout_style="paper")
    with pytest.raises(AlexNetError, match="dropout_style must be one of paper, inverted"):
        create_model("paper", dropout_style="scaled")


def test_config_names_the_style_and_follows_the_variant():
    assert Config().model.dropout_style == "paper"
    assert resolve("shapes", {}).model.dropout_style == "paper"
    assert resolve("paper", {}).model.dropout_style == "paper"
    tv = resolve(None, parse_assignments(["model.name=torchvision"]))
    assert tv.model.dropout_style == "inverted" and tv.to_dict()["model"]["dropout_style"] == "inverted"
    given = resolve("shapes", parse_assignments(["model.dropout_style=inverted"]))
    assert given.model.dropout_style == "inverted"


def test_a_checkpoint_config_without_the_key_loads_as_inverted():
    # Checkpoints written before model.dropout_style existed were trained with nn.Dropout.
    old = Config().to_dict()
    del old["model"]["dropout_style"]
    assert from_dict(old, "old checkpoint").model.dropout_style == "inverted"
    assert "dropout_style" not in old["model"]  # the caller's dict is left as it was
    assert from_dict(Config().to_dict(), "new checkpoint").model.dropout_style == "paper"
