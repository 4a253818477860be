"""hubconf.py through torch.hub.load(source="local"), as a user of torch.hub calls it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alexnet.errors import AlexNetError

REPO = str(Path(__file__).resolve().parents[1])


def hub_load(entry: str, **kwargs):
    return torch.hub.load(REPO, entry, source="local", trust_repo=True, **kwargs)


def test_hub_paper_network_with_options_and_no_published_weights():
    model = hub_load("alexnet_paper", num_classes=10, towers=1)
    assert model.config.towers == 1 and model.fc8.out_features == 10
    with pytest.raises(AlexNetError, match="no published weights exist for the paper's network"):
        hub_load("alexnet_paper", pretrained=True)


def test_hub_torchvision_network_equals_torchvision_without_weights():
    import torchvision

    model = hub_load("alexnet_torchvision")
    reference = torchvision.models.alexnet(weights=None).eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), reference(x), rtol=0, atol=0)
    assert model.meta["input_size"] == (3, 224, 224)


def test_hub_loads_a_checkpoint_path(tiny_checkpoint):
    model = hub_load("alexnet_paper", weights=str(tiny_checkpoint))
    assert model.meta["categories"][0] == "class zero" and not model.training
    with pytest.raises(AlexNetError, match="holds a 'paper' model"):
        hub_load("alexnet_torchvision", weights=str(tiny_checkpoint))


def test_hub_torchvision_pretrained_uses_the_named_weights(tmp_path, monkeypatch):
    # pretrained=True means the published weights: offline here (nothing listens), which
    # shows the download was asked for, of the right file, into torch.hub's cache.
    import socket

    from alexnet.tools import named_weights

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv(named_weights.URL_ENV, f"http://127.0.0.1:{port}/alexnet-owt-7be5be79.pth")
    with pytest.raises(AlexNetError, match=r"offline\?.*hub/checkpoints/alexnet-owt-7be5be79.pth"):
        hub_load("alexnet_torchvision", pretrained=True)
