"""The timing of alexnet.bench (bench/measure.py): windows, rotation, drains, with a fake clock."""

from __future__ import annotations

import pytest
import torch

from alexnet.bench.measure import Arm, interleaved, window_steps

CPU = torch.device("cpu")


class FakeClock:
    """Time moves only when an arm's step runs: each step advances it by that arm's cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _arm(clock: FakeClock, log: list[str], name: str, seconds: float, images: int = 8, drain: bool = False) -> Arm:
    def run() -> None:
        log.append(name)
        clock.now += seconds

    return Arm(run, images, (lambda: log.append(f"drain {name}")) if drain else None)


def test_window_steps_last_at_least_the_minimum_time_and_steps():
    assert window_steps(0.01, 20, 2.0) == 200  # 2 s at 10 ms a step
    assert window_steps(0.5, 20, 2.0) == 20  # slow steps: the step minimum wins
    assert window_steps(1e-6, 20, 2.0, max_steps=1000) == 1000
    assert window_steps(0.01, 5, 0.0) == 5  # no time minimum (the CPU)


def test_interleaved_rotates_the_arms_and_reports_median_and_spread():
    clock, log = FakeClock(), []
    ours = _arm(clock, log, "ours", 0.01)
    # The reference's step costs 0.1 s, except in its last window (0.2 s): a drain sets each window's cost.
    window_costs = iter([0.1, 0.1, 0.2])
    cost = [0.1]

    def ref_step() -> None:
        log.append("ref")
        clock.now += cost[0]

    def ref_drain() -> None:
        log.append("drain ref")
        cost[0] = next(window_costs)

    ref = Arm(ref_step, 8, ref_drain)
    out = interleaved(
        {"ours": ours, "ref": ref}, steps=2, warmup=2, repeats=3, device=CPU, min_seconds=0.1, clock=clock
    )
    # Warm-up: 2 calls each, the second timed; at 10 ms ours needs 10 steps for 0.1 s, ref its 2.
    assert out["ours"].steps == 10 and out["ref"].steps == 2
    windows = log[4:]
    runs = [w for i, w in enumerate(windows) if i == 0 or w != windows[i - 1]]
    # Rounds: (ours, ref), (ref, ours), (ours, ref); the reference drains before each window.
    assert runs == ["ours", "drain ref", "ref", "drain ref", "ref", "ours", "drain ref", "ref"]
    assert windows.count("ours") == 30 and windows.count("ref") == 6
    assert out["ours"].images_per_s == pytest.approx([800.0] * 3)
    assert out["ref"].images_per_s == pytest.approx([80.0, 80.0, 40.0])
    assert out["ref"].median == pytest.approx(80.0) and out["ref"].spread == pytest.approx(0.5)
    assert out["ours"].images == 3 * 10 * 8 and out["ours"].seconds == pytest.approx(0.3)
