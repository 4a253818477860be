"""Argument helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from alexnet.errors import AlexNetError


def add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, help="decoding processes (default: one per core)")
    p.add_argument("--batch-size", type=int)


def config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        help="a packaged preset (paper, small, shapes) or a YAML file; default: paper with --data, shapes without",
    )
    p.add_argument(
        "--data", help="ImageFolder root holding train/<class>/ and val/<class>/, or a store (alexnet prepare)"
    )
    p.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[], help="override any config key")


def resolve_config(args: argparse.Namespace):
    from alexnet import config as config_lib

    return config_lib.resolve(default_preset(args), config_overrides(args))


def default_preset(args: argparse.Namespace) -> str:
    return args.preset or ("paper" if args.data else "shapes")


def config_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The ``section.key`` values the command line sets: its flags, then every --set."""
    from alexnet import config as config_lib

    overrides: dict[str, object] = {}
    if args.data:
        overrides["data.root"] = args.data
    for flag, key in [
        ("model", "model.name"),
        ("epochs", "optim.epochs"),
        ("lr", "optim.lr"),
        ("batch_size", "optim.batch_size"),
        ("seed", "run.seed"),
        ("device", "run.device"),
        ("workers", "data.workers"),
        ("out", "run.out"),
        ("freeze", "optim.freeze"),
        ("init_from", "run.init_from"),
    ]:
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "no_progress", False):
        overrides["run.progress"] = False
    overrides.update(config_lib.parse_assignments(args.set))
    return overrides


def print_per_image(
    results: list[Any], as_json: bool, title: Callable[[Any], str], lines: Callable[[Any], list[str]]
) -> None:
    """predict and retrieve: all results as JSON, or per image its name, its read error and its lines."""
    if as_json:
        print(json.dumps([r.__dict__ for r in results], indent=2))
        return
    for r in results:
        print(title(r))
        if r.error:
            print(f"  cannot read: {r.error}")
        for line in lines(r):
            print(f"  {line}")


def comma_list(text: str | None, convert: type, flag: str) -> tuple | None:
    if text is None:
        return None
    try:
        return tuple(convert(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise AlexNetError(f"{flag} expects a comma-separated list, e.g. {flag} 0.01,0.03; got {text!r}") from None
