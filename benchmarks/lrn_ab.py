"""Paired A/B of the paper network's training step with three LRN implementations, the same
step, weights and batch, timed in rotating order round by round:

* new: models/lrn.py (the window as one banded 1x1 convolution; Triton on CUDA),
* loop: the hand-written backward of 2026-11-24 whose window was a pad, a copy and n-1 adds
  (kept here as the reference it was; float32 out),
* old: autograd through F.local_response_norm.

    python benchmarks/lrn_ab.py --batch-size 32 --rounds 8 --amp off [--device cuda]

Prints one JSON line: median images/s of each and the medians of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from alexnet.bench.measure import Arm, BenchConfig, interleaved
from alexnet.bench.run import our_step
from alexnet.data.augment import make_preprocess
from alexnet.models import alexnet as model_lib
from alexnet.runtime import resolve_device
from alexnet.train.step import StepOptions

NEW_FORWARD = model_lib.LocalResponseNorm.forward


def _loop_window(t: torch.Tensor, before: int, after: int) -> torch.Tensor:
    c = t.shape[2]
    padded = F.pad(t, (0, 0, 0, 0, before, after))
    out = padded[:, :, 0:c].clone()
    for i in range(1, before + after + 1):
        out += padded[:, :, i : i + c]
    return out


class _LoopLRN(torch.autograd.Function):
    """models/alexnet.py's _LRNFunction as of 2026-11-24, on (B, G, C, H, W)."""

    @staticmethod
    def forward(ctx, a, size, alpha, beta, k):  # type: ignore[no-untyped-def]
        a32 = a.to(torch.promote_types(a.dtype, torch.float32))
        s = _loop_window(a32 * a32, size // 2, (size - 1) // 2).mul_(alpha).add_(k)
        ctx.save_for_backward(a, s)
        ctx.size, ctx.alpha, ctx.beta = size, alpha, beta
        return s.pow(-beta).mul_(a32)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        a, s = ctx.saved_tensors
        a32, g32 = a.to(s.dtype), g.to(s.dtype)
        p = s.pow(-ctx.beta)
        t = (g32 * a32).mul_(p).div_(s)
        w = _loop_window(t, (ctx.size - 1) // 2, ctx.size // 2)
        grad = torch.addcmul(p.mul_(g32), a32, w, value=-2 * ctx.alpha * ctx.beta)
        return grad.to(a.dtype), None, None, None, None


def loop_forward(self: model_lib.LocalResponseNorm, x: torch.Tensor) -> torch.Tensor:
    towers = x.unflatten(1, (self.groups, x.shape[1] // self.groups))
    return _LoopLRN.apply(towers, self.size, self.alpha / self.size, self.beta, self.k).flatten(1, 2)


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

    forwards = {"new": NEW_FORWARD, "loop": loop_forward, "old": old_forward}

    def arm(forward: object) -> Arm:
        def run() -> None:
            model_lib.LocalResponseNorm.forward = forward  # type: ignore[method-assign]
            step.model_step(x, y)

        return Arm(run, b)

    # One step per window, one warm-up step each; round r starts with arm r mod 3.
    windows = interleaved({name: arm(f) for name, f in forwards.items()}, 1, 1, args.rounds, device)
    runs = {name: w.images_per_s for name, w in windows.items()}
    ratios = [n / o for n, o in zip(runs["new"], runs["old"])]
    ratios_loop = [n / o for n, o in zip(runs["new"], runs["loop"])]
    print(json.dumps({
        "device": str(device), "torch": torch.__version__, "batch_size": b, "amp": args.amp, "rounds": args.rounds,
        "new_images_per_s_median": statistics.median(runs["new"]),
        "loop_images_per_s_median": statistics.median(runs["loop"]),
        "old_images_per_s_median": statistics.median(runs["old"]),
        "median_ratio_new_over_loop": statistics.median(ratios_loop), "ratios_loop": [round(q, 3) for q in ratios_loop],
        "median_ratio_new_over_old": statistics.median(ratios), "ratios": [round(q, 3) for q in ratios],
    }))  # fmt: skip


if __name__ == "__main__":
    main()
