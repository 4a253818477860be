"""Configuration: four dataclasses with the paper's defaults, presets, files and overrides.

A run is described by one :class:`Config`, resolved from (in order) the defaults below,
a preset or YAML file, then ``section.key=value`` overrides from the command line. The
resolved config is saved as ``config.yaml`` in every run directory and inside every
checkpoint, so a run can always be reproduced and resumed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from alexnet.config_yaml import _ConfigLoader, _parse, load_yaml  # noqa: F401 (load_yaml re-exported)
from alexnet.errors import AlexNetError
from alexnet.models.alexnet import LAYER_NAMES, ModelConfig

# 16 times the paper's 256: one decoded image is then 50 MB (3 x 4096 x 4096 bytes) and a
# batch of 128 over 6 GB. Beyond that a size is a typo, refused before anything is allocated.
MAX_IMAGE_SIDE = 4096


def short_repr(value: Any) -> str:
    """repr(value) cut to a few hundred characters, without ever building the full repr.

    A YAML file or checkpoint can hold a small graph of shared references that repr
    expands to gigabytes ("billion laughs"); reprlib stops at a depth and a count.
    """
    try:
        return _REPR.repr(value)
    except Exception:  # an int past Python's digit limit, a broken __repr__
        return f"<{type(value).__name__}>"


_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 4
_REPR.maxstring = _REPR.maxother = 120
_REPR.maxlong = 40


@dataclass
class DataConfig:
    root: str | None = None  # ImageFolder root with train/<class>/ and val/<class>/; None: built-in shapes
    image_size: int = 256  # shorter side rescaled to this, then the central square (section 2)
    crop_size: int = 224  # random training patches and the test patches (section 4.1)
    normalize: str = "mean-image"  # "mean-image" (paper) | "mean-image-std" | "imagenet" (torchvision's)
    lighting_std: float = 0.1  # std of the PCA colour alphas (section 4.1); 0 turns it off
    flip: bool = True  # random horizontal reflections
    workers: int = -1  # decoding processes; -1: one per core
    stats_max_images: int = 0  # images used for the mean image and PCA; 0: the whole training set
    # Images per class (a whole number) or a fraction of each class in (0, 1) held out of
    # train/ as the split that drives the lr plateaus and best.pt, so val/ stays unseen
    # until `alexnet evaluate`; 0: val/ drives them, as in the paper (data/holdout.py).
    holdout: float = 0.0

    def __post_init__(self) -> None:
        for key in ("image_size", "crop_size"):
            value = getattr(self, key)
            if not 1 <= value <= MAX_IMAGE_SIDE:
                raise AlexNetError(f"data.{key} must be in 1..{MAX_IMAGE_SIDE}; got {value}")
        if self.workers < -1:
            raise AlexNetError(f"data.workers must be -1 (one per core) or more; got {self.workers}")
        if self.stats_max_images < 0:
            raise AlexNetError(f"data.stats_max_images must be 0 or more; got {self.stats_max_images}")
        if not (math.isfinite(self.lighting_std) and self.lighting_std >= 0):
            raise AlexNetError(f"data.lighting_std must be 0 or more; got {self.lighting_std}")
        from alexnet.data.holdout import check_setting

        check_setting(self.holdout)


@dataclass
class OptimConfig:
    # The GLOBAL batch: summed over all ranks and accumulation steps (train/distributed.py).
    batch_size: int = 128
    epochs: int = 90  # "roughly 90 cycles through the training set" (section 5)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_biases: bool = True  # the paper's rule decays every weight; Caffe exempts biases
    lr_drops: int = 3  # lr divided by 10 on validation plateaus, "three times prior to termination"
    plateau_patience: int = 3  # epochs without improvement before a drop (the paper does not say)
    plateau_threshold: float = 0.001  # improvement in val top-1 error (fraction) that counts
    # A non-finite loss or gradient stops the run (naming the step; the last checkpoint is
    # good); true skips that batch instead (no update) and counts it in metrics.jsonl.
    # Skipping needs to know before the update, so it costs one host sync per step on a GPU.
    skip_nonfinite: bool = False
    # Gradient accumulation: each rank's share of a global batch in this many micro-batches
    # (one update per global batch), for when a share does not fit in memory.
    accumulate: int = 1
    # "none": optim.lr as given (the paper's recipe). "linear": lr * batch_size / 128, the
    # linear scaling rule of Goyal et al. 2017 ("Accurate, large minibatch SGD") for global
    # batches larger than the paper's.
    lr_scaling: str = "none"
    # Fine-tuning (train/finetune.py). freeze: this layer and every one before it are fixed
    # (conv1 ... fc7, the paper's names for both variants; "" trains all): not in the optimizer,
    # so no gradient, weight decay or velocity. backbone_lr_scale: lr multiplier for every layer
    # but fc8, the head; Caffe's fine-tuning recipes train copied layers at 1/10 of the new one.
    freeze: str = ""
    backbone_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        # "not x > 0" rather than "x <= 0": NaN fails every comparison and must be refused too.
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise AlexNetError(f"optim.lr must be positive; got {self.lr}")
        if self.batch_size < 1:
            raise AlexNetError(f"optim.batch_size must be 1 or more; got {self.batch_size}")
        if self.epochs < 0:
            raise AlexNetError(f"optim.epochs must be 0 or more; got {self.epochs}")
        if not 0.0 <= self.momentum <= 1.0:
            raise AlexNetError(f"optim.momentum must be in [0, 1]; got {self.momentum}")
        for key in ("weight_decay", "plateau_threshold"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise AlexNetError(f"optim.{key} must be 0 or more; got {value}")
        for key in ("lr_drops", "plateau_patience"):
            if getattr(self, key) < 0:
                raise AlexNetError(f"optim.{key} must be 0 or more; got {getattr(self, key)}")
        if self.accumulate < 1:
            raise AlexNetError(f"optim.accumulate must be 1 or more; got {self.accumulate}")
        if self.lr_scaling not in ("none", "linear"):
            raise AlexNetError(f"optim.lr_scaling must be none or linear; got {self.lr_scaling!r}")
        if not (math.isfinite(self.backbone_lr_scale) and self.backbone_lr_scale > 0):
            raise AlexNetError(
                f"optim.backbone_lr_scale must be positive; got {self.backbone_lr_scale} "
                "(to keep the copied layers fixed, freeze them: --freeze fc7)"
            )
        _check_freeze(self.freeze)

    @property
    def scaled_lr(self) -> float:
        """The starting learning rate after optim.lr_scaling (the paper's batch is 128)."""
        return self.lr * self.batch_size / 128 if self.lr_scaling == "linear" else self.lr


def _check_freeze(layer: str) -> None:
    frozen = LAYER_NAMES[:-1]  # fc8 is the head being trained
    if layer in ("", "none", *frozen):
        return
    if layer == LAYER_NAMES[-1]:
        raise AlexNetError("optim.freeze cannot be fc8, the layer being trained; the last it accepts is fc7")
    raise AlexNetError(
        f"unknown layer '{layer}' for optim.freeze (--freeze){_suggest(layer, list(frozen))}; "
        f"layers: {', '.join(frozen)}"
    )


@dataclass
class RunConfig:
    out: str = "runs/alexnet"  # run directory: config, metrics, checkpoints, TensorBoard events
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available, else cpu
    tensorboard: bool = True
    progress: bool = True  # a progress bar per epoch (stderr)
    checkpoint_every: int = 0  # also checkpoint every this many steps inside an epoch; 0: at epoch ends only
    keep_checkpoints: int = 2  # history in checkpoints/step-N.pt besides last.pt and best.pt; 0: none
    # TensorBoard step/train_loss, step/lr, step/images_per_s every this many steps (0: per epoch only);
    # the loss is read back from the device only then.
    log_every_steps: int = 50
    # A checkpoint whose weights start the run (fine-tuning, train/finetune.py); its sha256
    # is filled in when the run starts, and a run given one refuses a file that differs.
    init_from: str | None = None
    init_sha256: str = ""

    def __post_init__(self) -> None:
        for key in ("checkpoint_every", "keep_checkpoints", "log_every_steps"):
            if getattr(self, key) < 0:
                raise AlexNetError(f"run.{key} must be 0 or more; got {getattr(self, key)}")


SWITCH = ("auto", "on", "off")
_SWITCH_WORDS = {True: "on", False: "off", "true": "on", "false": "off", "yes": "on", "no": "off"}


@dataclass
class SpeedConfig:
    """How the training step is computed; none of these changes what it computes beyond rounding.

    "auto" picks what is fastest and safe on the device (see train/step.py for the decisions, benchmarks/RESULTS.md for the measurements).
    """

    amp: str | bool = "auto"  # auto | bf16 | fp16 | off: autocast dtype (fp16 uses loss scaling)
    channels_last: str | bool = "auto"  # auto | on | off: NHWC memory layout for model and input
    compile: str | bool = "auto"  # auto | on | off: torch.compile the model and the optimizer step
    compile_mode: str = "default"  # torch.compile's mode: default | reduce-overhead | max-autotune | ...
    tower_convs: str = "auto"  # auto | grouped | split: the paper net's two-tower convolutions
    flush_denormal: str | bool = "auto"  # auto | on | off: denormal floats as zero on the CPU
    conv1: str = "auto"  # auto | direct | space-to-depth: the paper net's conv1 (auto: direct, until a GPU says)

    def __post_init__(self) -> None:
        for key, allowed in (
            ("amp", ("auto", "bf16", "fp16", "off")),
            ("channels_last", SWITCH),
            ("compile", SWITCH),
            ("tower_convs", ("auto", "grouped", "split")),
            ("flush_denormal", SWITCH),
            ("compile_mode", ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")),
            ("conv1", ("auto", "direct", "space-to-depth")),
        ):
            value = getattr(self, key)
            value = _SWITCH_WORDS.get(value.lower() if isinstance(value, str) else value, value)
            if value not in allowed:
                raise AlexNetError(f"speed.{key} must be one of {', '.join(allowed)}; got {getattr(self, key)!r}")
            setattr(self, key, value)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "run": RunConfig, "speed": SpeedConfig}


def preset_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("alexnet").joinpath("configs").iterdir() if p.name.endswith(".yaml")
    )


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


_NULLS = ("", "~", "null", "Null", "NULL", "None", "none")  # e.g. data.root=null: back to None


def _coerce(section: str, key: str, value: Any, current: Any, annotation: str) -> Any:
    """Convert a YAML or command-line value to the field's type, with a clear error."""
    if isinstance(value, bool) and "bool" in annotation:
        return value  # a YAML true/false for a field that also takes words (speed.compile: false)
    if isinstance(value, str) and "str" in annotation:
        # Strings (data.root paths) stay verbatim: "0x10", "on" or "@x" are names, not YAML.
        return None if "None" in annotation and value in _NULLS else value
    if isinstance(value, str) and not isinstance(current, str):
        try:
            value = yaml.load(value, Loader=_ConfigLoader)  # "0.02" -> 0.02, "true" -> True, "null" -> None
        except yaml.YAMLError:
            pass  # not YAML ("[0.1"): the type error below says what was expected
    if value is None and "None" in annotation:
        return None
    if isinstance(current, bool) or annotation == "bool":
        if isinstance(value, bool):
            return value
    elif isinstance(current, int) and annotation == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, float) or annotation == "float":
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif "str" in annotation:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise AlexNetError(f"config {section}.{key} expects {annotation}; got {short_repr(value)}")


def apply_overrides(cfg: Config, values: dict[str, Any], origin: str) -> Config:
    """Apply ``{"section": {"key": value}}`` or ``{"section.key": value}`` onto cfg."""
    if not isinstance(values, dict):
        raise AlexNetError(f"config in {origin} must be a mapping of sections; got {short_repr(values)}")
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if value is None and key in SECTIONS:
            continue  # an empty section in a YAML file ("data:" with every key commented out)
        subs = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in subs:
            # A key is a short name: anything else (a checkpoint can hold any key) is shown
            # truncated, never expanded into the message in full.
            if not isinstance(key, str) or not isinstance(sub, (str, type(None))) or len(f"{key}.{sub}") > 100:
                shown = short_repr(key) if sub is None else f"{short_repr(key)}.{short_repr(sub)}"
                raise AlexNetError(f"unknown config key {shown} in {origin}")
            flat[key if sub is None else f"{key}.{sub}"] = v
    sections = {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}
    if (
        "model.dropout_style" not in flat
        and flat.get("model.name", sections["model"]["name"]) != sections["model"]["name"]
    ):
        # The dropout style defaults by variant ("auto"): another model.name brings its own.
        sections["model"]["dropout_style"] = "auto"
    for dotted, value in flat.items():
        section, _, key = dotted.partition(".")
        if section not in SECTIONS or not key:
            all_keys = [f"{s}.{k}" for s, d in sections.items() for k in d]
            raise AlexNetError(f"unknown config key '{dotted}' in {origin}{_suggest(dotted, all_keys)}")
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
        if key not in fields:
            raise AlexNetError(f"unknown config key '{section}.{key}' in {origin}{_suggest(key, list(fields))}")
        annotation = str(fields[key].type)
        sections[section][key] = _coerce(section, key, value, sections[section][key], annotation)
    return Config(**{name: SECTIONS[name](**d) for name, d in sections.items()})


def load_preset(name_or_path: str) -> dict[str, Any]:
    """A packaged preset by name (``paper``, ``shapes``, ...) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return load_yaml(path)
    names = preset_names()
    if name_or_path not in names:
        raise AlexNetError(
            f"unknown preset '{name_or_path}'{_suggest(name_or_path, names)}; presets: {', '.join(names)}"
        )
    text = resources.files("alexnet").joinpath("configs", f"{name_or_path}.yaml").read_text()
    return _parse(text, f"preset {name_or_path}") or {}


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AlexNetError(f"override '{pair}' must look like section.key=value, e.g. optim.lr=0.02")
        out[key.strip()] = value.strip()
    return out


# 2**31 parameters: 8.6 GB of float32 weights, about 26 GB with their gradients and SGD
# momentum before any activation, the most that trains on one 80 GB accelerator; 35 times
# the paper's 61M. A larger network is a typo (model.width=1e9, num_classes=10**6).
MAX_PARAMETERS = 2**31


def check_model_size(cfg: Config) -> None:
    """Refuse a network over MAX_PARAMETERS, counted on the meta device (nothing is allocated)."""
    import torch

    from alexnet.models.alexnet import build_model, count_parameters

    with torch.device("meta"):
        parameters = count_parameters(build_model(cfg.model))
    if parameters > MAX_PARAMETERS:
        m = cfg.model
        raise AlexNetError(
            f"the model would have {parameters:,} parameters, over the {MAX_PARAMETERS:,} limit "
            f"(model.width {m.width}, fc_width {m.fc_width}, num_classes {m.num_classes}, input_size {m.input_size}); "
            "the paper's has 60,965,224"
        )


def resolve(preset: str | None, overrides: dict[str, Any], origin: str = "command line") -> Config:
    """A config for a new run; a checkpoint's is read with from_dict and checked against its weights."""
    cfg = Config()
    if preset:
        cfg = apply_overrides(cfg, load_preset(preset), f"preset {preset}")
    cfg = apply_overrides(cfg, overrides, origin)
    check_model_size(cfg)
    return cfg


def from_dict(values: dict[str, Any], origin: str) -> Config:
    model = values.get("model") if isinstance(values, dict) else None
    if isinstance(model, dict) and "dropout_style" not in model:
        # Checkpoints from before model.dropout_style were all trained with nn.Dropout.
        values = {**values, "model": {**model, "dropout_style": "inverted"}}
    return apply_overrides(Config(), values, origin)


def save(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
