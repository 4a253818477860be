"""Every combination of the step's speed switches, timed interleaved: the evidence behind "auto".

    python benchmarks/step_options.py --device cpu --batch-size 64 --rounds 5 --json out.json

Each configuration is built once; then every round times one step of each configuration
in turn, so that a change in machine load (a shared machine) falls on all of them alike.
Reports the median and the best images/s per configuration. The model step is
step.TrainStep.model_step on a resident random batch, the same as `alexnet bench`'s
"model step"; the reference row is torchvision's alexnet with torch.optim.SGD, float32.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch
import torch.nn.functional as F

from alexnet.bench.measure import BenchConfig, sync
from alexnet.bench.run import our_step
from alexnet.data.augment import make_preprocess
from alexnet.runtime import resolve_device
from alexnet.train.step import StepOptions

REFERENCE = "reference: torchvision.models.alexnet, float32 eager, torch.optim.SGD"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", default="paper,torchvision")
    parser.add_argument("--amp", default="off,bf16")
    parser.add_argument("--compile", action="store_true", help="also the compiled variants (slow to build on a CPU)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode for the compiled variants")
    parser.add_argument("--json")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    b, classes, crop = args.batch_size, 1000, 224
    pre = make_preprocess(
        "mean-image", 256, crop, torch.zeros(3, 256, 256), torch.ones(3), torch.ones(3), torch.eye(3)
    ).to(device)
    bc = BenchConfig(crop_size=crop)
    runs = {}
    for name in args.models.split(","):
        towers = ("grouped", "split") if name == "paper" else ("grouped",)
        for amp, cl, tw, comp in itertools.product(
            args.amp.split(","), (False, True), towers, (False, True) if args.compile else (False,)
        ):
            options = StepOptions(
                amp, cl, comp, tw, flush_denormal=device.type == "cpu", compile_mode=args.compile_mode
            )
            step = our_step(name, classes, bc, options, pre, device)
            x = torch.randn(b, 3, crop, crop, device=device).contiguous(memory_format=step.memory_format)
            y = torch.randint(0, classes, (b,), device=device)
            step.model_step(x, y)  # warm-up (and compilation)
            key = f"{name} amp={amp} channels_last={cl} towers={tw} compile={comp}"
            step.optimizer.zero_grad(set_to_none=True)  # 4 bytes per parameter less while the others run
            runs[key] = lambda s=step, x=x, y=y: (s.model_step(x, y), s.optimizer.zero_grad(set_to_none=True))
    import torchvision

    ref = torchvision.models.alexnet(num_classes=classes).to(device)
    opt = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    xr, yr = torch.randn(b, 3, crop, crop, device=device), torch.randint(0, classes, (b,), device=device)

    def reference() -> None:
        loss = F.cross_entropy(ref(xr), yr)
        loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        opt.zero_grad()

    reference()
    runs[REFERENCE] = reference
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for key, run in runs.items():
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            times[key].append(b / (time.perf_counter() - start))
    result = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "batch_size": b,
        "rounds": args.rounds,
        "images_per_s": {k: {"median": statistics.median(v), "best": max(v), "all": v} for k, v in times.items()},
        # Per round, each configuration over the reference timed in the same round: a
        # paired ratio, robust to load that changes between rounds.
        "median_ratio_to_reference": {
            k: statistics.median(a / r for a, r in zip(v, times[REFERENCE])) for k, v in times.items() if k != REFERENCE
        },
    }
    width = max(map(len, times))
    for key, v in result["images_per_s"].items():
        ratio = result["median_ratio_to_reference"].get(key)
        paired = f"  x reference {ratio:5.2f}" if ratio is not None else ""
        print(f"{key:{width}s}  median {v['median']:8.1f}  best {v['best']:8.1f} images/s{paired}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
