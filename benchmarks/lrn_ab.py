"""Paired A/B of the paper network's training step: LRN through model._LRNFunction (new)
against autograd through F.local_response_norm (old), the same step, weights and batch,
timed in alternating order round by round.

    python benchmarks/lrn_ab.py --batch-size 32 --rounds 8 --amp off [--device cuda]

Prints one JSON line: median images/s of each and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from alexnet.bench.measure import BenchConfig, sync
from alexnet.bench.run import our_step
from alexnet.data.augment import make_preprocess
from alexnet.models import alexnet as model_lib
from alexnet.runtime import resolve_device
from alexnet.train.step import StepOptions

NEW_FORWARD = model_lib.LocalResponseNorm.forward


def old_forward(self: model_lib.LocalResponseNorm, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    y = F.local_response_norm(
        x.reshape(b * self.groups, c // self.groups, h, w), self.size, self.alpha, self.beta, self.k
    )
    return y.reshape(b, c, h, w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--amp", default="off", choices=("off", "bf16"))
    args = parser.parse_args()
    device = resolve_device(args.device)
    b = args.batch_size
    pre = make_preprocess("mean-image", 256, 224, torch.zeros(3, 256, 256), torch.ones(3), torch.ones(3), torch.eye(3))
    options = StepOptions(args.amp, False, False, "grouped", flush_denormal=device.type == "cpu")
    step = our_step("paper", 1000, BenchConfig(crop_size=224), options, pre.to(device), device)
    x = torch.randn(b, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (b,), device=device)

    def timed(new: bool) -> float:
        model_lib.LocalResponseNorm.forward = NEW_FORWARD if new else old_forward
        sync(device)
        start = time.perf_counter()
        step.model_step(x, y)
        sync(device)
        return b / (time.perf_counter() - start)

    timed(True), timed(False)  # warm-up
    runs: dict[str, list[float]] = {"new": [], "old": []}
    for r in range(args.rounds):
        for name in ("new", "old") if r % 2 == 0 else ("old", "new"):
            runs[name].append(timed(name == "new"))
    ratios = [n / o for n, o in zip(runs["new"], runs["old"])]
    print(json.dumps({
        "device": str(device), "torch": torch.__version__, "batch_size": b, "amp": args.amp, "rounds": args.rounds,
        "new_images_per_s_median": statistics.median(runs["new"]),
        "old_images_per_s_median": statistics.median(runs["old"]),
        "median_ratio_new_over_old": statistics.median(ratios), "ratios": [round(q, 3) for q in ratios],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
