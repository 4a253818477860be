"""Named weights (named_weights.py): fetched from a server on 127.0.0.1, never the internet.

The served file is a torchvision AlexNet state_dict (random weights) named as torchvision
names its files, with the first hex digits of its SHA-256; ``$ALEXNET_WEIGHTS_URL`` points
the download at it and ``$TORCH_HOME`` puts torch.hub's cache in the test's folder.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models import AlexNet_Weights

from alexnet.checkpoint import load_model
from alexnet.cli import main
from alexnet.errors import AlexNetError
from alexnet.models import create_model
from alexnet.tools import named_weights

PUBLISHED = AlexNet_Weights.IMAGENET1K_V1


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, Path, torch.nn.Module, list[str]]]:
    """(base URL, served folder, the reference network, request log) of a local file server."""
    folder = tmp_path_factory.mktemp("served")
    torch.manual_seed(0)
    reference = torchvision.models.alexnet(weights=None).eval()
    raw = folder / "raw.pth"
    torch.save(reference.state_dict(), raw)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    raw.rename(folder / f"alexnet-owt-{digest[:8]}.pth")
    (folder / "alexnet-owt-00000000.pth").write_bytes((folder / f"alexnet-owt-{digest[:8]}.pth").read_bytes())
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", folder, reference, requests
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def good_url(served, tmp_path, monkeypatch) -> str:
    base, folder, _, requests = served
    [name] = [p.name for p in folder.glob("alexnet-owt-*.pth") if not p.name.endswith("00000000.pth")]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(named_weights.URL_ENV, f"{base}/{name}")
    requests.clear()
    return f"{base}/{name}"


def test_named_weights_download_once_convert_and_carry_torchvisions_metadata(served, good_url, tmp_path):
    _, _, reference, requests = served
    model = create_model("torchvision", weights="torchvision:IMAGENET1K_V1")
    cached = tmp_path / "torch" / "hub" / "checkpoints" / good_url.rsplit("/", 1)[1]
    assert cached.is_file() and requests == ["/" + cached.name]
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name]  # no temporary file left
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    meta = model.meta
    assert meta["categories"] == PUBLISHED.meta["categories"]
    assert meta["_metrics"] == PUBLISHED.meta["_metrics"] and meta["recipe"] == PUBLISHED.meta["recipe"]
    assert meta["num_params"] == PUBLISHED.meta["num_params"] == 61_100_840
    assert meta["input_size"] == (3, 224, 224) and meta["resize_size"] == 256
    np.testing.assert_allclose(meta["mean"], PUBLISHED.transforms().mean, atol=1e-6)
    np.testing.assert_allclose(meta["std"], PUBLISHED.transforms().std, atol=1e-6)
    # The enum itself is accepted too, and the second time the cache answers: no request.
    again = create_model("torchvision", weights=PUBLISHED)
    assert requests == ["/" + cached.name]
    torch.testing.assert_close(again.classifier[6].weight, model.classifier[6].weight)


def test_named_transforms_equal_torchvisions_own(served, good_url):
    model = create_model("torchvision", weights="AlexNet_Weights.IMAGENET1K_V1")
    ours, theirs = model.transforms(), PUBLISHED.transforms()
    rng = np.random.default_rng(0)
    # 256 x 320: the resize is the identity, so PIL and tensor paths take the same pixels.
    pixels = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
    torch.testing.assert_close(ours(Image.fromarray(pixels)), theirs(Image.fromarray(pixels)), atol=1e-5, rtol=0)
    # A float tensor in [0, 1] that needs resizing: both resize with antialiased bilinear.
    image = torch.from_numpy(rng.random((3, 300, 400), dtype=np.float32))
    torch.testing.assert_close(ours(image), theirs(image), atol=1e-4, rtol=0)
    batch = torch.from_numpy(rng.integers(0, 256, (2, 3, 256, 300), dtype=np.uint8))
    assert ours(batch).shape == (2, 3, 224, 224)


def test_bad_hash_is_refused_and_not_cached(served, good_url, tmp_path, monkeypatch):
    base = served[0]
    monkeypatch.setenv(named_weights.URL_ENV, f"{base}/alexnet-owt-00000000.pth")
    with pytest.raises(AlexNetError, match="SHA-256 starts .* its name promises 00000000"):
        create_model("torchvision", weights="torchvision:IMAGENET1K_V1")
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert not checkpoints.exists() or list(checkpoints.iterdir()) == []


def test_offline_says_so_in_one_line_with_the_url_and_the_path(tmp_path, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nothing listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/alexnet-owt-7be5be79.pth"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(named_weights.URL_ENV, url)
    with pytest.raises(AlexNetError) as e:
        create_model("torchvision", weights="torchvision:IMAGENET1K_V1")
    message = str(e.value)
    assert "\n" not in message and "offline" in message and url in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth") in message


def test_unknown_name_and_other_variants_are_refused():
    with pytest.raises(AlexNetError, match="published: torchvision:IMAGENET1K_V1"):
        named_weights.resolve("torchvision:IMAGENET9K")
    with pytest.raises(AlexNetError, match="torchvision's 1000-class network"):
        create_model("paper", weights="torchvision:IMAGENET1K_V1")


def test_cli_imports_named_weights_to_a_checkpoint_with_their_meta(served, good_url, tmp_path, capsys):
    out = tmp_path / "tv.safetensors"
    assert main(["import-weights", "torchvision:IMAGENET1K_V1", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    loaded = load_model(out)
    assert loaded.names == PUBLISHED.meta["categories"]
    assert loaded.model.meta["_metrics"]["ImageNet-1K"]["acc@1"] == PUBLISHED.meta["_metrics"]["ImageNet-1K"]["acc@1"]
    assert loaded.model.meta["weights"] == "torchvision:IMAGENET1K_V1"
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        torch.testing.assert_close(loaded.model(x), served[2](x), rtol=0, atol=0)
