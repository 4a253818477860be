"""The paper network's model step eager / compiled / reduce-overhead (CUDA graphs) at each batch
size, conv1 direct against space-to-depth, and the 15 most expensive kernels of the compiled step.

    python benchmarks/gpu_steps.py --json OUT/gpu-steps.json              # on a GPU (bf16)
    python benchmarks/gpu_steps.py --smoke --json /tmp/smoke.json         # CPU dry run, tiny sizes

At each batch size the modes are timed window by window in turn (bench.measure.interleaved:
>= 2 s windows on a GPU, median and spread of ``--repeats``). The JSON file is rewritten
after each batch size and after the profile, so a time limit keeps what finished.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from alexnet.bench.flops import device_peak, fp32_kind, step_flops
from alexnet.bench.measure import Arm, BenchConfig, interleaved
from alexnet.bench.run import our_step
from alexnet.config import SpeedConfig
from alexnet.data.augment import make_preprocess
from alexnet.files import write_json
from alexnet.runtime import environment, resolve_device
from alexnet.train.step import TrainStep, resolve_options


def _steps(modes: dict[str, dict[str, str]], bc: BenchConfig, device: torch.device, pre: Any) -> dict[str, TrainStep]:
    steps = {}
    for label, speed in modes.items():
        options = resolve_options(SpeedConfig(**speed), device, "paper")
        steps[label] = our_step("paper", 1000, bc, options, pre, device)
    return steps


def _arm(step: TrainStep, batch: int, crop: int, device: torch.device) -> Arm:
    x = torch.randn(batch, 3, crop, crop, device=device).contiguous(memory_format=step.memory_format)
    y = torch.randint(0, 1000, (batch,), device=device)
    return Arm(lambda: step.model_step(x, y), batch)


def _profile(step: TrainStep, batch: int, crop: int, device: torch.device, top: int = 15) -> list[dict[str, Any]]:
    """The ``top`` kernels (or CPU ops) by total device time over 5 profiled steps, after 3 warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    arm = _arm(step, batch, crop, device)
    for _ in range(3):
        arm.run()
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            arm.run()
        if cuda:
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    total = sum(getattr(e, key) for e in prof.key_averages()) or 1.0
    return [
        {"name": e.key, "calls": e.count, "us_per_step": getattr(e, key) / 5, "share": getattr(e, key) / total}
        for e in events
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="128,256,512")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="least steps per window")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="CPU, 64 px crops, batches 2 and 4, eager only")
    args = parser.parse_args()
    smoke = args.smoke
    device = torch.device("cpu") if smoke else resolve_device("cuda")
    crop = 64 if smoke else 224
    batches = [2, 4] if smoke else [int(b) for b in args.batch_sizes.split(",")]
    bc = BenchConfig(crop_size=crop, image_size=max(crop, 72) + 32, steps=1 if smoke else args.steps, warmup=2)
    pre = make_preprocess(
        "mean-image", bc.image_size, crop, torch.zeros(3, bc.image_size, bc.image_size), torch.ones(3), torch.ones(3),
        torch.eye(3),
    ).to(device)  # fmt: skip
    on = {"compile": "on"}
    modes = {"eager": {"compile": "off"}}
    if not smoke:
        modes |= {"compiled": on, "reduce-overhead": on | {"compile_mode": "reduce-overhead"}}
    steps = _steps(modes, bc, device, pre)
    s2d = _steps({"compiled, conv1 space-to-depth" if not smoke else "eager, conv1 space-to-depth":
                  (on if not smoke else {"compile": "off"}) | {"conv1": "space-to-depth"}}, bc, device, pre)  # fmt: skip
    first = next(iter(steps.values()))
    amp = first.options.amp
    peak, source = device_peak(device, amp if amp != "off" else fp32_kind(device), None)
    out: dict[str, Any] = {"environment": environment(device), "peak_flops": peak, "peak_source": source, "steps": []}
    for batch in batches:
        x = torch.randn(batch, 3, crop, crop, device=device)
        flops = step_flops(first.model, x, torch.randint(0, 1000, (batch,), device=device)) / batch
        arms = {label: _arm(step, batch, crop, device) for label, step in steps.items()}
        if batch == batches[len(batches) // 2]:  # conv1 compared at the middle batch size
            arms |= {label: _arm(step, batch, crop, device) for label, step in s2d.items()}
        windows = interleaved(arms, bc.steps, bc.warmup, args.repeats, device, 0.0 if smoke else 2.0)
        for label, w in windows.items():
            mfu = flops * w.median / peak if peak else None
            row = {"mode": label, "batch_size": batch, "images_per_s": w.median, "mfu": mfu, "flops_per_image": flops}
            out["steps"].append(row | w.as_dict())
            print(f"batch {batch:4d} {label:34s} {w.median:10.1f} images/s  MFU {mfu or 0:.1%}  spread {w.spread:.2f}")
        write_json(args.json, out, indent=2)
    profiled = steps.get("compiled", first)
    out["profile"] = {"mode": "compiled" if "compiled" in steps else "eager", "batch_size": batches[len(batches) // 2]}
    out["profile"]["top"] = _profile(profiled, out["profile"]["batch_size"], crop, device)
    write_json(args.json, out, indent=2)
    for e in out["profile"]["top"]:
        print(f"{e['us_per_step']:10.1f} us/step {e['share']:6.1%}  {e['name'][:90]}")
    out["options"] = {label: dataclasses.asdict(step.options) for label, step in (steps | s2d).items()}
    write_json(args.json, out, indent=2)


if __name__ == "__main__":
    main()
