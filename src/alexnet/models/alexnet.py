"""AlexNet: the network of Krizhevsky, Sutskever & Hinton (NeurIPS 2012), and torchvision's.

Two networks live here, each written out layer by layer:

* ``"paper"`` -- the network of the paper's Figure 2. The two GPU "towers" are expressed
  as grouped convolutions (conv2, conv4 and conv5 have ``groups=2``; conv3 and the fully
  connected layers see both towers), so one device computes exactly what the two GPUs
  computed (or, with ``set_tower_convs(model, "split")``, as two convolutions per layer:
  the same function and parameters, whichever a device runs faster). 60,965,224 parameters for 1000 classes. Local response normalisation uses
  the paper's formula (section 3.3), which differs from Caffe's and from
  ``torch.nn.LocalResponseNorm``; see :class:`LocalResponseNorm`.
* ``"torchvision"`` -- the single-tower "one weird trick" network (Krizhevsky 2014) that
  ``torchvision.models.alexnet`` implements, with torchvision's module names so that its
  state_dicts load unchanged and give the same logits. 61,100,840 parameters.

Where the paper variant departs from the paper, it is on purpose and switchable:
``init="kaiming"`` (the paper's N(0, 0.01) with biases of 1 is known to stall -- Caffe
reported a flat loss -- and needs the full 90-epoch recipe), and the size options
(``width``, ``fc_width``, ``conv1_*``) that shrink the same layer pattern for small
images and CPU runs. Defaults are the paper's, dropout included: ``dropout_style="paper"``
multiplies fc6 and fc7's outputs by 0.5 at test time instead of doubling the kept units
in training (see :class:`Dropout`); torchvision's variant uses ``"inverted"``, as its
weights were trained.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from alexnet.errors import AlexNetError
from alexnet.models.conv1 import Conv1
from alexnet.models.interface import InferenceInterface
from alexnet.models.layers import DROPOUT_STYLES, Dropout, TowerConv2d, set_tower_convs  # noqa: F401 (re-exported)
from alexnet.models.lrn import LRN_CONVENTIONS, LocalResponseNorm, _LRNFunction  # noqa: F401 (re-exported)

MODEL_NAMES = ("paper", "torchvision")

# The eight learned layers by their paper names, input to output, for both variants
# (``named_layers``): what ``optim.freeze`` and fine-tuning refer to.
LAYER_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


@dataclass
class ModelConfig:
    name: str = "paper"  # "paper" | "torchvision"
    num_classes: int = 1000
    activation: str = "relu"  # "relu" (section 3.1) | "tanh" (the Figure 1 comparison)
    lrn: str = "paper"  # "paper" | "cuda-convnet" | "caffe" | "none"
    pooling: str = "overlap"  # "overlap": 3x3 stride 2 (section 3.4) | "non-overlap": 2x2 stride 2
    towers: int = 2  # 2: conv2/4/5 see one tower's maps, as on two GPUs | 1: a single tower
    dropout: float = 0.5  # in fc6 and fc7 (section 4.2)
    # "paper": training keeps units unscaled and test multiplies fc6/fc7 outputs by 1 - p
    # (section 4.2: "multiply their outputs by 0.5"); "inverted": nn.Dropout, kept units
    # scaled by 1/(1-p) in training, identity at test (torchvision's and Caffe's weights).
    # "auto" (given, never kept): the variant's own, paper for "paper" and inverted for
    # "torchvision", so a saved config and a checkpoint name the style in force.
    dropout_style: str = "auto"
    init: str = "paper"  # "paper": N(0, 0.01), bias 1 in conv2/4/5, fc6, fc7 | "kaiming"
    remove_conv: int = 0  # 2, 3, 4 or 5 drops that layer (section 1's ablation); 0 keeps all
    width: float = 1.0  # scales the conv widths 96-256-384-384-256; 1.0 is the paper
    fc_width: int = 4096  # fc6 and fc7 units
    conv1_kernel: int = 11
    conv1_stride: int = 4
    conv1_padding: int = 2  # 224 + 2*2 gives the paper's 55x55 conv1 maps (227 needs none)
    input_size: int = 224  # side of the square crop the network sees; sets fc6's fan-in

    def __post_init__(self) -> None:
        if self.dropout_style == "auto":
            self.dropout_style = "paper" if self.name == "paper" else "inverted"
        choices = {
            "name": MODEL_NAMES,
            "activation": ("relu", "tanh"),
            "lrn": (*LRN_CONVENTIONS, "none"),
            "pooling": ("overlap", "non-overlap"),
            "init": ("paper", "kaiming"),
            "towers": (1, 2),
            "remove_conv": (0, 2, 3, 4, 5),
            "dropout_style": DROPOUT_STYLES,
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise AlexNetError(
                    f"model.{key} must be one of {', '.join(map(str, allowed))}; got {getattr(self, key)!r}"
                )
        if self.num_classes < 1:
            raise AlexNetError(f"model.num_classes must be at least 1; got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise AlexNetError(f"model.dropout must be in [0, 1); got {self.dropout}")
        # Sizes are checked before any layer exists: a typo (width=1e9) must not allocate.
        if not 0.0 < self.width <= 16.0:
            raise AlexNetError(f"model.width must be in (0, 16]; got {self.width}")
        for key, low in (("fc_width", 1), ("conv1_kernel", 1), ("conv1_stride", 1), ("conv1_padding", 0)):
            if getattr(self, key) < low:
                raise AlexNetError(f"model.{key} must be {low} or more; got {getattr(self, key)}")
        # Per-size bounds keep the layer shapes sane; the whole network's size is bounded
        # where a config is resolved for training (config.check_model_size), while a
        # checkpoint's config is checked against the weights in its file instead.
        if self.fc_width > 2**20:
            raise AlexNetError(f"model.fc_width must be at most {2**20}; got {self.fc_width}")
        if self.num_classes > 2**20:
            raise AlexNetError(f"model.num_classes must be at most {2**20}; got {self.num_classes}")
        if not 1 <= self.input_size <= 4096:
            raise AlexNetError(f"model.input_size must be in 1..4096; got {self.input_size}")
        if self.name == "torchvision":
            # torchvision's network has fixed sizes: refuse paper-only options rather than
            # silently ignoring them.
            defaults = ModelConfig()
            changed = [
                f.name
                for f in dataclasses.fields(self)
                if f.name not in ("name", "num_classes", "dropout", "input_size", "dropout_style")
                and getattr(self, f.name) != getattr(defaults, f.name)
            ]
            if changed:
                raise AlexNetError(f"option(s) {', '.join(changed)} apply only to the paper variant, not 'torchvision'")
            # torchvision's network is the one its published weights were trained as
            # (nn.Dropout); paper-style dropout would halve fc6/fc7's outputs under them.
            if self.dropout_style == "paper":
                raise AlexNetError(
                    "model.dropout_style 'paper' applies only to the paper variant; torchvision's is 'inverted'"
                )


def model_config(name: str = "paper", num_classes: int = 1000, **options: Any) -> ModelConfig:
    """Build a ModelConfig, naming the closest valid option when one is misspelt."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise AlexNetError(f"unknown model option '{key}'{hint}")
    return ModelConfig(name=name, num_classes=num_classes, **options)


def _conv_out(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _even(channels: float) -> int:
    # Two towers split every grouped layer's channels in half.
    return max(2, 2 * round(channels / 2))


class PaperAlexNet(InferenceInterface, nn.Module):
    """The paper's network (Figure 2). Shapes in comments are for the defaults at 224x224."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        c1, c2, c3, c4, c5 = (_even(c * cfg.width) for c in (96, 256, 384, 384, 256))
        g = cfg.towers
        pool_k = 3 if cfg.pooling == "overlap" else 2
        self.act = nn.ReLU(inplace=True) if cfg.activation == "relu" else nn.Tanh()
        self.pool = nn.MaxPool2d(pool_k, stride=2)
        self.lrn1 = LocalResponseNorm(cfg.lrn, g) if cfg.lrn != "none" else nn.Identity()
        # LRN2 normalises conv2's responses, so it goes with conv2 (remove_conv=2).
        has_lrn2 = cfg.lrn != "none" and cfg.remove_conv != 2
        self.lrn2 = LocalResponseNorm(cfg.lrn, g) if has_lrn2 else nn.Identity()

        self.conv1 = Conv1(3, c1, cfg.conv1_kernel, cfg.conv1_stride, cfg.conv1_padding)  # direct or space-to-depth
        # A removed layer passes its input channels on to the next layer.
        self.conv2 = TowerConv2d(c1, c2, 5, padding=2, groups=g) if cfg.remove_conv != 2 else None
        c2_out = c2 if self.conv2 is not None else c1
        self.conv3 = nn.Conv2d(c2_out, c3, 3, padding=1) if cfg.remove_conv != 3 else None
        c3_out = c3 if self.conv3 is not None else c2_out
        self.conv4 = TowerConv2d(c3_out, c4, 3, padding=1, groups=g) if cfg.remove_conv != 4 else None
        c4_out = c4 if self.conv4 is not None else c3_out
        self.conv5 = TowerConv2d(c4_out, c5, 3, padding=1, groups=g) if cfg.remove_conv != 5 else None
        c5_out = c5 if self.conv5 is not None else c4_out

        side = _conv_out(cfg.input_size, cfg.conv1_kernel, cfg.conv1_stride, cfg.conv1_padding)
        for _ in range(3):  # pool1, pool2, pool5; conv2-5 keep the size
            side = _conv_out(side, pool_k, 2)
        if side < 1:
            raise AlexNetError(
                f"input_size {cfg.input_size} is too small for conv1 {cfg.conv1_kernel}/{cfg.conv1_stride} "
                "and three poolings; use a larger crop or a smaller conv1 stride"
            )
        self.feature_shape = (c5_out, side, side)  # (256, 6, 6) for the paper

        self.fc6 = nn.Linear(c5_out * side * side, cfg.fc_width)
        self.fc7 = nn.Linear(cfg.fc_width, cfg.fc_width)
        self.fc8 = nn.Linear(cfg.fc_width, cfg.num_classes)
        self.dropout = Dropout(cfg.dropout, cfg.dropout_style)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in self.named_layers().values():
            if self.config.init == "paper":
                # Section 5: weights N(0, 0.01); biases 1 in conv2, conv4, conv5 and the
                # hidden fully connected layers "to accelerate the early stages of learning
                # by providing the ReLUs with positive inputs"; 0 elsewhere.
                nn.init.normal_(layer.weight, 0.0, 0.01)
                one = layer in (self.conv2, self.conv4, self.conv5, self.fc6, self.fc7)
                nn.init.constant_(layer.bias, 1.0 if one else 0.0)
            else:
                nn.init.kaiming_normal_(layer.weight, nonlinearity=self.config.activation)
                nn.init.zeros_(layer.bias)

    def forward_conv(self, x: Tensor) -> Tensor:
        """The five convolutional layers: (B, 3, 224, 224) -> pool5 (B, 256, 6, 6).

        A removed layer (remove_conv) is skipped; its pooling and LRN are discussed at conv2."""
        x = self.pool(self.lrn1(self.act(self.conv1(x))))  # conv1 (B, 96, 55, 55) -> (B, 96, 27, 27)
        if self.conv2 is not None:
            x = self.lrn2(self.act(self.conv2(x)))  # conv2 (B, 256, 27, 27)
        # pool2 stays when conv2 is removed: conv3-5 then see 13x13 maps and fc6 its
        # 6x6 input, as in the full net, so the ablation changes depth and nothing else.
        x = self.pool(x)  # (B, 256, 13, 13)
        if self.conv3 is not None:
            x = self.act(self.conv3(x))  # (B, 384, 13, 13), sees both towers
        if self.conv4 is not None:
            x = self.act(self.conv4(x))  # (B, 384, 13, 13)
        if self.conv5 is not None:
            x = self.act(self.conv5(x))  # (B, 256, 13, 13)
        return self.pool(x)  # pool5 (B, 256, 6, 6)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last convolutional map, as timm names it: pool5 (B, 256, 6, 6)."""
        return self.forward_conv(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """pool5 map -> logits (B, num_classes), or with ``pre_logits`` the fc7 vector (B, 4096).

        The fc7 vector is fc7's own output, before the dropout that follows fc7: with paper-style
        dropout in eval mode the test-time factor 1 - p is applied to it only on the way to fc8.
        fc6's factor does reach it, as it reaches fc7's input."""
        x = torch.flatten(x, 1)  # (B, 9216)
        x = self.dropout(self.act(self.fc6(x)))  # (B, 4096)
        x = self.act(self.fc7(x))  # (B, 4096)
        return x if pre_logits else self.fc8(self.dropout(x))  # logits (B, num_classes)

    def fc7_features(self, x: Tensor) -> Tensor:
        """fc7 activations (B, 4096): the feature space of the paper's Figure 4 retrievals."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def named_layers(self) -> dict[str, nn.Module]:
        """The learned layers by paper name, conv1 ... fc8 (a removed conv layer is absent)."""
        layers = [self.conv1, self.conv2, self.conv3, self.conv4, self.conv5, self.fc6, self.fc7, self.fc8]
        return {name: layer for name, layer in zip(LAYER_NAMES, layers) if layer is not None}

    def get_classifier(self) -> nn.Linear:
        """fc8, the layer fine-tuning replaces (timm's name)."""
        return self.fc8

    def reset_classifier(self, num_classes: int) -> None:
        """A new fc8 with ``num_classes`` outputs, initialised by the model's rule (timm's name).

        ``init="paper"``: N(0, 0.01) and bias 0, as section 5 gives fc8; ``"kaiming"``: He
        normal and bias 0, as :meth:`reset_parameters`. Same device and dtype as the old fc8.
        """
        old = self.fc8
        _check_num_classes(num_classes)
        fc8 = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
        if self.config.init == "paper":
            nn.init.normal_(fc8.weight, 0.0, 0.01)
        else:
            nn.init.kaiming_normal_(fc8.weight, nonlinearity=self.config.activation)
        nn.init.zeros_(fc8.bias)
        self.fc8 = fc8
        self.config = dataclasses.replace(self.config, num_classes=num_classes)


class TorchvisionAlexNet(InferenceInterface, nn.Module):
    """torchvision's AlexNet: one tower, 64-192-384-256-256 kernels, no LRN, dropout before fc6/fc7.

    Module indices match ``torchvision.models.alexnet`` so its state_dict keys
    (``features.0.weight`` ... ``classifier.6.bias``) load as they are.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # 0: (B, 64, 55, 55)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # (B, 64, 27, 27)
            nn.Conv2d(64, 192, kernel_size=5, padding=2),  # 3: (B, 192, 27, 27)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # (B, 192, 13, 13)
            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 6
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 8
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 10
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # (B, 256, 6, 6)
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))  # lets any input size >= 63 reach fc6
        self.classifier = nn.Sequential(
            nn.Dropout(cfg.dropout),
            nn.Linear(256 * 6 * 6, 4096),  # 1: fc6
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Linear(4096, 4096),  # 4: fc7
            nn.ReLU(inplace=True),
            nn.Linear(4096, cfg.num_classes),  # 6: fc8
        )
        self.feature_shape = (256, 6, 6)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last convolutional map after avgpool: (B, 256, 6, 6)."""
        return self.avgpool(self.features(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, 256, 6, 6) -> logits, or with ``pre_logits`` the fc7 vector (B, 4096)."""
        x = self.classifier[:6](torch.flatten(x, 1))
        return x if pre_logits else self.classifier[6](x)

    def fc7_features(self, x: Tensor) -> Tensor:
        """fc7 activations (B, 4096)."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def named_layers(self) -> dict[str, nn.Module]:
        """The learned layers by paper name: conv1-5 are features.0/3/6/8/10, fc6-8 classifier.1/4/6."""
        layers = [*(self.features[i] for i in (0, 3, 6, 8, 10)), *(self.classifier[i] for i in (1, 4, 6))]
        return dict(zip(LAYER_NAMES, layers))

    def get_classifier(self) -> nn.Linear:
        """fc8 (classifier.6), the layer fine-tuning replaces (timm's name)."""
        return self.classifier[6]

    def reset_classifier(self, num_classes: int) -> None:
        """A new fc8 (classifier.6) with ``num_classes`` outputs (timm's name).

        Initialised as torchvision initialises it (``nn.Linear``'s default: uniform in
        +-1/sqrt(4096), weights by kaiming_uniform with a=sqrt(5)); same device and dtype.
        """
        old = self.classifier[6]
        _check_num_classes(num_classes)
        self.classifier[6] = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
        self.config = dataclasses.replace(self.config, num_classes=num_classes)


AlexNet = PaperAlexNet | TorchvisionAlexNet


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= 2**20:
        raise AlexNetError(f"reset_classifier: num_classes must be an integer in 1..{2**20}; got {num_classes!r}")


def build_model(cfg: ModelConfig) -> AlexNet:
    return PaperAlexNet(cfg) if cfg.name == "paper" else TorchvisionAlexNet(cfg)


def create_model(name: str = "paper", num_classes: int = 1000, weights: Any = None, **options: Any) -> AlexNet:
    """``create_model("paper")``, ``create_model("torchvision")``, or with ablation options,
    e.g. ``create_model("paper", 10, lrn="none", towers=1, pooling="non-overlap")``.

    ``weights="torchvision:IMAGENET1K_V1"`` (or ``AlexNet_Weights.IMAGENET1K_V1``) gives
    torchvision's network with its published weights, downloaded once into torch.hub's cache,
    in eval mode, with their ``.transforms()`` and ``.meta`` (tools/named_weights.py)."""
    if weights is None:
        return build_model(model_config(name, num_classes, **options))
    if name != "torchvision" or num_classes != 1000 or options:
        raise AlexNetError(
            f"published weights {weights!s} are torchvision's 1000-class network: "
            "use create_model('torchvision', weights=...) without other options"
        )
    from alexnet.tools.named_weights import load_named  # the download and conversion sit downstream of the model

    return load_named(weights)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
