"""Named weights: ``torchvision:IMAGENET1K_V1`` fetched, checked, cached and converted.

The names, URLs, preprocessing and published figures are read from torchvision's own
``AlexNet_Weights`` enum (nothing is copied by hand): ``torchvision:NAME`` for every member
(today IMAGENET1K_V1, also reachable as ``AlexNet_Weights.IMAGENET1K_V1``, the enum itself,
or ``DEFAULT``).

The file is cached where ``torch.hub`` caches it (``torch.hub.get_dir()/checkpoints``, which
honours ``$TORCH_HOME``), so a file torchvision already downloaded is used as it is, and
checked as ``torch.hub.download_url_to_file`` checks it: torchvision's file names embed the
first hex digits of the file's SHA-256 (``alexnet-owt-7be5be79.pth``), which must match.
The download goes to a temporary name beside the cache file and is renamed into place
only once complete and verified, so an interrupted or corrupt download never remains.
The file is then read with ``weights_only=True`` (files.torch_load) and converted by
weights.import_torchvision, like a file given to ``alexnet import-weights --format torchvision``.

``$ALEXNET_WEIGHTS_URL`` (or the ``url`` argument) replaces the published URL: for a mirror,
and for the tests, which serve a file from 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch

from alexnet.errors import AlexNetError
from alexnet.files import rename_into_place, temporary_name

PREFIX = "torchvision:"
URL_ENV = "ALEXNET_WEIGHTS_URL"
HASH_REGEX = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's: the digits between the last '-' and the suffix
TIMEOUT_S = 30.0


def _enum() -> Any:
    from torchvision.models import AlexNet_Weights

    return AlexNet_Weights


def weight_names() -> list[str]:
    return [PREFIX + w.name for w in _enum()]


def is_named(spec: object) -> bool:
    """Whether spec names published weights (rather than a file)."""
    if isinstance(spec, _enum()):
        return True
    return isinstance(spec, str) and (
        spec.startswith(PREFIX) or spec.startswith("AlexNet_Weights.") or spec == "DEFAULT"
    )


def resolve(spec: object) -> Any:
    """The ``AlexNet_Weights`` member that spec names; AlexNetError listing the names otherwise."""
    weights = _enum()
    if isinstance(spec, weights):
        return spec
    if isinstance(spec, str):
        name = spec.removeprefix(PREFIX).removeprefix("AlexNet_Weights.")
        if name == "DEFAULT":
            return weights.DEFAULT
        if name in weights.__members__:
            return weights[name]
    raise AlexNetError(f"unknown weights {spec!r}; published: {', '.join(weight_names())}")


def cache_path(url: str) -> Path:
    """Where torch.hub keeps the file of url: ``torch.hub.get_dir()/checkpoints/<file name>``."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    if not name:
        raise AlexNetError(f"weights URL {url} names no file")
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def check_hash(path: Path, digest: str, url: str) -> None:
    """torch.hub's check: the hex digits in the file name must start the file's SHA-256."""
    match = HASH_REGEX.search(path.name)
    prefix = match.group(1) if match else ""
    if prefix and not digest.startswith(prefix):
        raise AlexNetError(
            f"{url} is corrupt or not the published file: its SHA-256 starts {digest[: len(prefix)]}, "
            f"its name promises {prefix}"
        )


def download(url: str, dst: Path, progress: bool = False) -> str:
    """url -> dst via a temporary file, verified before the rename; the file's SHA-256."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(dst)
    sha = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            from tqdm import tqdm

            with tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc=dst.name) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    sha.update(chunk)
                    bar.update(len(chunk))
            f.flush()
            os.fsync(f.fileno())
        digest = sha.hexdigest()
        check_hash(dst, digest, url)
        rename_into_place(tmp, dst)
        return digest
    except urllib.error.HTTPError as e:
        raise AlexNetError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise AlexNetError(
            f"cannot download {url} (offline? {reason}); fetch it on a connected machine and put it at {dst}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch(spec: object, url: str | None = None, progress: bool = False) -> tuple[Any, Path]:
    """The member spec names and its file in the torch.hub cache, downloaded if absent."""
    member = resolve(spec)
    url = url or os.environ.get(URL_ENV) or member.url
    path = cache_path(url)
    if not path.is_file():
        download(url, path, progress)
    else:
        # A file brought by hand (the offline message asks for one) is checked as a download is.
        from alexnet.data.store import sha256_file

        try:
            check_hash(path, sha256_file(path), url)
        except AlexNetError as e:
            raise AlexNetError(f"{path}: {e}; remove it to download again") from None
    return member, path


def named_checkpoint_state(spec: object, url: str | None = None, progress: bool = False) -> dict[str, Any]:
    """A checkpoint state (see checkpoint.py) of the named weights, with the publisher's
    transforms and metadata: its categories as class names, its resize and crop sizes,
    mean and std, and its accuracy (``meta["_metrics"]``) and recipe."""
    from alexnet.data.augment import Preprocess
    from alexnet.tools.weights import import_torchvision

    member, path = fetch(spec, url, progress)
    state = import_torchvision(path)
    published = member.transforms()  # torchvision's ImageClassification: the sizes and normalisation
    crop, resize = int(published.crop_size[0]), int(published.resize_size[0])
    mean = (torch.tensor(published.mean) * 255).view(3, 1, 1).expand(3, resize, resize).contiguous()
    state["preprocess"] = Preprocess(
        mean, torch.tensor(published.std) * 255, torch.zeros(3), torch.eye(3), crop
    ).state_dict()
    state["config"]["data"].update(image_size=resize, crop_size=crop)
    categories = list(member.meta["categories"])
    if len(categories) == len(state["classes"]):
        state["class_names"] = categories
    state["source"] = f"{PREFIX}{member.name} ({os.path.basename(path)})"
    state["meta"] = {
        "weights": PREFIX + member.name,
        "url": member.url,
        **{k: v for k, v in member.meta.items() if k not in ("categories", "_docs") and _plain(v)},
    }
    return state


def _plain(value: Any) -> bool:
    """JSON-safe values only: the metadata also travels in a .safetensors header."""
    return isinstance(value, (str, int, float, bool, type(None), list, tuple, dict))


def load_named(spec: object, url: str | None = None, progress: bool = True) -> torch.nn.Module:
    """The torchvision network with the named weights, in eval mode, with ``.transforms()`` and ``.meta``."""
    from alexnet.checkpoint import model_from_checkpoint
    from alexnet.data.augment import Preprocess
    from alexnet.models.interface import attach_inference

    state = named_checkpoint_state(spec, url, progress)
    model = model_from_checkpoint(state, state["source"]).eval()
    pre = Preprocess.from_state_dict(state["preprocess"])
    attach_inference(model, pre, state["classes"], state.get("class_names"), state["source"], state["meta"])
    return model
