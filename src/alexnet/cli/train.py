"""``alexnet train`` (one process, or torchrun with ``--nproc``) and ``alexnet config``."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from alexnet.cli.common import add_runtime, config_args, config_overrides, default_preset, resolve_config
from alexnet.errors import AlexNetError


def register(sub: Any) -> None:
    t = sub.add_parser(
        "train",
        help="train a network (the paper's recipe by default)",
        epilog="exit status: 0 finished; 2 error (one line, also in RUN/log.txt); 130 or 143 stopped by SIGINT or "
        "SIGTERM after writing a checkpoint: continue with --resume RUN",
    )
    config_args(t)
    add_runtime(t)
    t.add_argument("--out", help="run directory (default: runs/<time>)")
    t.add_argument("--model", choices=("paper", "torchvision"))
    t.add_argument("--epochs", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")
    t.add_argument(
        "--init-from", metavar="CKPT",
        help="fine-tune: start from this checkpoint's weights and preprocessing (fc8 new for other classes)",
    )  # fmt: skip
    t.add_argument(
        "--freeze", metavar="LAYER", help="keep LAYER and every layer before it fixed (conv1 ... fc7; optim.freeze)"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.add_argument(
        "--nproc", type=int, metavar="N",
        help="data-parallel training in N processes on this machine (runs torchrun --standalone --nproc-per-node N)",
    )  # fmt: skip
    t.add_argument(
        "--max-restarts", type=int, default=0, metavar="K", help="with --nproc: torchrun restarts after a failure"
    )
    t.set_defaults(handler=cmd_train)


def register_config(sub: Any) -> None:
    c = sub.add_parser("config", help="print the resolved configuration as YAML")
    config_args(c)
    c.set_defaults(handler=cmd_config)


def _launch_torchrun(args: argparse.Namespace) -> int:
    """``alexnet train --nproc N ...`` is ``torchrun --standalone --nproc-per-node N -m alexnet train ...``."""
    if args.nproc < 1 or args.max_restarts < 0:
        raise AlexNetError(
            f"--nproc must be 1 or more and --max-restarts 0 or more; got {args.nproc} and {args.max_restarts}"
        )
    rest, skip = [], False
    for word in args.argv:  # the same command without the launcher's own options
        if skip:
            skip = False
        elif word in ("--nproc", "--max-restarts"):
            skip = True
        elif not word.startswith(("--nproc=", "--max-restarts=")):
            rest.append(word)
    if not args.resume and not args.out and not any(s.startswith("run.out=") for s in args.set):
        rest += ["--out", str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))]  # one name for all ranks
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
        f"--max-restarts={args.max_restarts}", "-m", "alexnet", *rest,
    ]  # fmt: skip
    print("alexnet: running " + shlex.join(command), file=sys.stderr)
    return subprocess.run(command).returncode


def _recipe_options_given(args: argparse.Namespace) -> list[str]:
    """The options given that set a run's recipe, which a resumed run keeps (--data, --model, ...)."""
    names = ("data", "preset", "model", "lr", "batch_size", "seed", "out", "freeze")
    fixed = [f"--{name.replace('_', '-')}" for name in names]
    return [flag for flag in fixed if getattr(args, flag[2:].replace("-", "_")) is not None] + (
        ["--set"] if args.set else []
    )


def cmd_train(args: argparse.Namespace) -> int:
    from alexnet.train import check_resume_changes, resume, train
    from alexnet.train.distributed import from_env
    from alexnet.train.finetune import finetune_config

    if args.nproc is not None:
        if from_env().active:
            raise AlexNetError("--nproc starts torchrun itself; under torchrun leave it out")
        return _launch_torchrun(args)
    if args.resume and args.init_from:
        raise AlexNetError(
            f"--init-from starts a new run from a checkpoint's weights, --resume continues {args.resume}: give one"
        )
    if args.resume:
        check_resume_changes(args.resume, _recipe_options_given(args), args.model)
        run_dir = resume(
            args.resume,
            epochs=args.epochs,
            device=args.device,
            workers=args.workers,
            progress=False if args.no_progress else None,
        )
    else:
        cfg = resolve_config(args)
        if cfg.run.init_from:  # --init-from, or run.init_from from --set or a preset file
            overrides = {**config_overrides(args), "run.init_from": cfg.run.init_from}
            cfg = finetune_config(cfg.run.init_from, args.preset, overrides, default_preset=default_preset(args))
        if not args.out and not any(s.startswith("run.out=") for s in args.set):
            if from_env().active:  # the default name is a time stamp: ranks would disagree
                raise AlexNetError("with several processes give the run directory explicitly: --out RUN_DIR")
            cfg = dataclasses.replace(
                cfg, run=dataclasses.replace(cfg.run, out=str(Path("runs") / time.strftime("%Y%m%d-%H%M%S")))
            )
        run_dir = train(cfg)
    print(f"run directory: {run_dir}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    print(yaml.safe_dump(resolve_config(args).to_dict(), sort_keys=False), end="")
    return 0
