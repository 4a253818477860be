"""``alexnet experiment``: the paper's claims on CIFAR-10."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from alexnet.cli.common import comma_list
from alexnet.errors import AlexNetError


def register(sub: Any) -> None:
    from alexnet.experiments import REGISTRY

    x = sub.add_parser(
        "experiment",
        help="the paper's claims on CIFAR-10: relu-vs-tanh (Figure 1), cifar-norm (section 3.3) or ablations",
        description="Reproduce Figure 1 (relu-vs-tanh), section 3.3's normalisation claim (cifar-norm) or the "
        "architecture ablations (ablations) on CIFAR-10. "
        "Unset options take the full-size defaults, or the --reduced ones.",
    )
    x.add_argument("name", choices=tuple(REGISTRY))
    x.add_argument(
        "--data",
        help="CIFAR-10: an ImageFolder tree (train/, test/), its .tar.gz, or cifar-10-python.tar.gz "
        "(default: the path in the environment variable ALEXNET_CIFAR10)",
    )
    x.add_argument(
        "--out", help="run directory (default: runs/<name>-<time>); an existing one with the same settings is continued"
    )
    x.add_argument("--reduced", action="store_true", help="a quick check: 500 training images, 1-3 epochs, small nets")
    x.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    x.add_argument("--epochs", type=int, help="epochs per run (relu-vs-tanh: the most a final run may take)")
    x.add_argument("--subset", type=int, help="training images, balanced over classes (0: all)")
    x.add_argument("--seeds", type=int, help="runs per activation or variant")
    x.add_argument("--batch-size", type=int)
    x.add_argument("--lrs", help="relu-vs-tanh: comma-separated learning rates to sweep")
    x.add_argument("--sweep-epochs", type=int, help="relu-vs-tanh: epochs per learning-rate trial")
    x.add_argument("--test-subset", type=int, help="ablations, cifar-norm: test images (0: all 10,000)")
    x.add_argument("--variants", help="ablations: comma-separated variants (default: all)")
    x.add_argument("--width", type=float, help="ablations: conv width relative to the paper's 96-256-384-384-256")
    x.add_argument("--fc-width", type=int, help="ablations: fc6 and fc7 units")
    x.add_argument(
        "--init",
        choices=("he", "paper"),
        help="relu-vs-tanh: He-normal weights on unit-scale input (default), or the paper's N(0, 0.01) on raw pixels",
    )
    x.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="training runs at once, each in its own process (default 1); small nets leave a GPU idle, "
        "so several runs at once finish sooner",
    )
    x.add_argument(
        "--batch-seeds",
        action="store_true",
        help="train the seeds of each variant (relu-vs-tanh: each activation's final runs) together in one "
        "process, stacked and vmapped: several small nets per kernel launch (CUDA graphs on a GPU)",
    )
    x.add_argument("--lr", type=float, help="ablations, cifar-norm: learning rate")
    x.set_defaults(handler=cmd_experiment)


def cmd_experiment(args: argparse.Namespace) -> int:
    from alexnet.experiments import resolve_settings, run_experiment
    from alexnet.runtime import resolve_device

    overrides = {
        "epochs": args.epochs,
        "subset": args.subset,
        "seeds": args.seeds,
        "batch_size": args.batch_size,
        "lrs": comma_list(args.lrs, float, "--lrs"),
        "sweep_epochs": args.sweep_epochs,
        "test_subset": args.test_subset,
        "variants": comma_list(args.variants, str, "--variants"),
        "width": args.width,
        "fc_width": args.fc_width,
        "lr": args.lr,
        "init": args.init,
    }
    if args.jobs < 1:
        raise AlexNetError(f"--jobs must be at least 1; got {args.jobs}")
    settings = resolve_settings(args.name, args.reduced, overrides)
    out = args.out or str(Path("runs") / f"{args.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = run_experiment(
        args.name,
        args.data,
        out,
        settings,
        resolve_device(args.device),
        args.command_line,
        workers=args.jobs,
        batch=args.batch_seeds,
    )
    print((run_dir / "summary.md").read_text(), end="")
    print(f"run directory: {run_dir}")
    return 0
