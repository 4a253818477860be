"""Paired, interleaved timing of the ablation net's seeds: one at a time, batched, and in worker processes.

Each round times, in turn (the order rotates every round so drift in the machine's load
falls on every mode alike):
  alone    K runs of ``fit`` one after the other (what ``alexnet experiment`` does by default);
  batched  the same K runs in one ``fit_batched`` (``--batch-seeds``);
  jobs     the same K runs in K spawned processes at once (``--jobs K``; with ``--modes``).
Each run trains ``--epochs`` epochs (at least 2) of ``--images`` images; the rate is taken over
the epochs after the first (rows' ``seconds``), so cuDNN's tuning, CUDA-graph capture and
compiling fall outside it. Images/s are of all K runs together. The JSON is rewritten after
every part, so a call that ends early keeps what it measured.

    PYTHONPATH=src python experiments/bench_batched.py --device cpu --runs 3 --rounds 3 --out ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from alexnet.data.cifar import ArraySplit
from alexnet.experiments.ablations import VARIANTS, AblationJob, AblationSettings, ablation_model, ablation_recipe
from alexnet.experiments.batched import fit_batched
from alexnet.experiments.common import make_pre, split_stats
from alexnet.runtime import keep_freed_memory
from alexnet.train.memory import FitResult, fit


def _data(n: int) -> ArraySplit:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ArraySplit(images, torch.randint(0, 10, (n,), generator=g), [str(c) for c in range(10)])


def _setup(args: argparse.Namespace) -> tuple:
    settings = AblationSettings(width=args.width, fc_width=args.fc_width, epochs=args.epochs)
    recipe = ablation_recipe(settings, VARIANTS[args.variant])
    recipe.windows_per_epoch = 1
    train = _data(args.images)
    return settings, args.variant, recipe, train, make_pre(split_stats(train), recipe)


def _model(settings: AblationSettings, variant: str, seed: int, device: torch.device) -> torch.nn.Module:
    return ablation_model(AblationJob(variant, seed), 10, settings, device)


def _steady(r: FitResult, n: int) -> tuple[float, float]:
    """(images, seconds) of the epochs after the first."""
    return n * (len(r.rows) - 1), r.rows[-1]["seconds"] - r.rows[0]["seconds"]


def _alone(args: argparse.Namespace, device: torch.device) -> float:
    settings, variant, recipe, train, pre = _setup(args)
    images = seconds = 0.0
    for seed in range(args.runs):
        r = fit(_model(settings, variant, seed, device), train, pre.to(device), recipe, seed=seed, device=device)
        i, s = _steady(r, len(train))
        images, seconds = images + i, seconds + s
    return images / seconds


def _batched(args: argparse.Namespace, device: torch.device) -> float:
    settings, variant, recipe, train, pre = _setup(args)
    models = [_model(settings, variant, s, device) for s in range(args.runs)]
    fits = fit_batched(models, train, pre.to(device), recipe, seeds=list(range(args.runs)), device=device)
    i, s = _steady(fits[0], len(train))
    return args.runs * i / s


def _one_job(args: argparse.Namespace, device: str, seed: int) -> tuple[float, float, float]:
    """(start, end, images) of the steady epochs of one run in its own process, wall-clock times."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.runs) if device == "cpu" else 1)
    settings, variant, recipe, train, pre = _setup(args)
    dev = torch.device(device)
    if not args.default_malloc:
        keep_freed_memory(dev)  # as alexnet experiment's workers do
    t0 = time.time()
    r = fit(_model(settings, variant, seed, dev), train, pre.to(dev), recipe, seed=seed, device=dev)
    return t0 + r.rows[0]["seconds"], t0 + r.rows[-1]["seconds"], _steady(r, len(train))[0]


def _jobs(args: argparse.Namespace, device: torch.device) -> float:
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.runs, mp_context=ctx) as pool:
        spans = list(pool.map(_one_job, [args] * args.runs, [str(device)] * args.runs, range(args.runs)))
    # Overlapping steady phases only would be stricter; the union is what a user waits for.
    return sum(s[2] for s in spans) / (max(s[1] for s in spans) - min(s[0] for s in spans))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs", type=int, default=3, help="seeds per variant (K)")
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--fc-width", type=int, default=1024)
    p.add_argument("--variant", default="baseline")
    p.add_argument("--modes", default="alone,batched", help="comma-separated: alone, batched, jobs")
    p.add_argument("--out", default="bench-batched.json")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator untuned")
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first is left out of the rate)")
    device = torch.device(args.device)
    # As alexnet experiment does (both modes alike); --default-malloc leaves glibc as it is.
    malloc_kept = False if args.default_malloc else keep_freed_memory(device)
    modes = args.modes.split(",")
    fns = {"alone": _alone, "batched": _batched, "jobs": _jobs}
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    out: dict[str, Any] = {
        "args": vars(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "keep_freed_memory": malloc_kept,
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rounds": [],
    }
    for r in range(args.rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        row: dict[str, float] = {}
        for mode in order:
            row[mode] = fns[mode](args, device)
            out["rounds"].append({"round": r, "mode": mode, "images_per_s": row[mode]})
            print(json.dumps(out["rounds"][-1]), flush=True)
            Path(args.out).write_text(json.dumps(out, indent=1))
        for mode in modes:
            if mode != "alone" and "alone" in row:
                out.setdefault(f"ratio_{mode}_over_alone", []).append(row[mode] / row["alone"])
    for key in [k for k in out if k.startswith("ratio_")]:
        out[key + "_median"] = statistics.median(out[key])
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k.startswith("ratio_")}))


if __name__ == "__main__":
    main()
