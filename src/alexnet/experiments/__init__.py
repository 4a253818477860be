"""The paper's claims that CIFAR-10 can test: Figure 1 (ReLU against tanh) and the ablations.

Each experiment is one module that registers an :class:`~alexnet.experiments.common.Experiment`
here: :mod:`~alexnet.experiments.figure1` (``alexnet experiment relu-vs-tanh``) and
:mod:`~alexnet.experiments.ablations` (``alexnet experiment ablations``), and
:mod:`~alexnet.experiments.section33` (``alexnet experiment cifar-norm``: section 3.3's
13% -> 11% with response normalisation). All train in
memory with :func:`alexnet.train.memory.fit` and write a run directory
(:class:`~alexnet.experiments.common.RunDir`); running the same command with the same
``--out`` again continues it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch

from alexnet.errors import AlexNetError
from alexnet.experiments import ablations, figure1, section33
from alexnet.experiments.common import Experiment, RunDir
from alexnet.runtime import environment, keep_freed_memory

log = logging.getLogger("alexnet")

REGISTRY: dict[str, Experiment] = {e.name: e for e in (figure1.EXPERIMENT, section33.EXPERIMENT, ablations.EXPERIMENT)}


def _options(keys: list[str]) -> str:
    return ", ".join("--" + k.replace("_", "-") for k in keys)


def resolve_settings(name: str, reduced: bool, overrides: dict[str, Any]) -> Any:
    """The full or reduced settings of experiment ``name`` with command-line overrides
    (``None`` values are ignored), checked by the settings class."""
    experiment = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(experiment.settings_cls)}
    given = {k: v for k, v in overrides.items() if v is not None}
    foreign = sorted(k for k in given if k not in fields)
    if foreign:
        takers = [
            n
            for n, e in REGISTRY.items()
            if n != name and any(k in {f.name for f in dataclasses.fields(e.settings_cls)} for k in foreign)
        ]
        where = f"apply to {' or '.join(takers)}, not {name}" if takers else f"do not apply to {name}"
        raise AlexNetError(f"option(s) {_options(foreign)} {where}")
    return dataclasses.replace(experiment.reduced if reduced else experiment.full, **given)


def run_experiment(
    name: str,
    data: str | Path | None,
    out: str | Path,
    settings: Any,
    device: torch.device,
    command: str = "",
    workers: int = 1,
    batch: bool = False,
) -> Path:
    """Load CIFAR-10, run experiment ``name`` into ``out`` and return the run directory.
    ``data`` None: ``$ALEXNET_CIFAR10``. ``command`` is the command line, recorded with the results.
    ``batch``: the seeds of each variant train together in one process (experiments/batched.py)."""
    from alexnet.data.cifar import default_data_path, load_cifar10

    experiment = REGISTRY[name]
    keep_freed_memory(device)
    if data is None:
        data = default_data_path()
        if data is None:
            raise AlexNetError("no --data given and ALEXNET_CIFAR10 is not set; pass --data PATH")
    log.info("loading CIFAR-10 from %s", data)
    train, test = load_cifar10(data)
    log.info("%d training and %d test images of %d classes in memory", len(train), len(test), len(train.classes))
    settings_dict = json.loads(json.dumps(dataclasses.asdict(settings)))  # tuples as lists, as YAML reads them back
    run = RunDir(
        Path(out),
        name,
        {"data": str(data), **settings_dict},
        environment(device, command or f"run_experiment({name!r})"),
    )
    try:
        experiment.run(train, test, settings, device, run, workers, batch)
    finally:
        run.close()
    return Path(out)
