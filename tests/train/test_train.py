"""The paper's update rule against hand-computed steps, the plateau schedule, and stop signals."""

import os
import signal
import threading
import time

import pytest
import torch

from alexnet.config import OptimConfig
from alexnet.train.optim import PaperSGD, param_groups, plateau_schedule
from alexnet.train.state import StopSignals


def test_paper_update_rule_hand_computed():
    # v <- 0.9 v - 0.0005 lr w - lr g ;  w <- w + v   (paper, section 5)
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = PaperSGD([w], lr=0.1, momentum=0.9, weight_decay=0.0005)
    w.grad = torch.tensor([0.5, 1.0])
    opt.step()
    v1 = [-0.0005 * 0.1 * 1.0 - 0.1 * 0.5, -0.0005 * 0.1 * -2.0 - 0.1 * 1.0]  # [-0.05005, -0.0999]
    w1 = [1.0 + v1[0], -2.0 + v1[1]]
    torch.testing.assert_close(w.detach(), torch.tensor(w1), rtol=0, atol=1e-7)
    w.grad = torch.tensor([-1.0, 0.25])
    opt.step()
    v2 = [0.9 * v1[0] - 0.0005 * 0.1 * w1[0] + 0.1, 0.9 * v1[1] - 0.0005 * 0.1 * w1[1] - 0.1 * 0.25]
    torch.testing.assert_close(w.detach(), torch.tensor([w1[0] + v2[0], w1[1] + v2[1]]), rtol=0, atol=1e-7)


def _two_runs(lr_schedule):
    torch.manual_seed(0)
    w0 = torch.randn(5)
    grads = [torch.randn(5) for _ in lr_schedule]
    a = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(w0.clone())
    ours = PaperSGD([a], lr=lr_schedule[0], momentum=0.9, weight_decay=5e-4)
    theirs = torch.optim.SGD([b], lr=lr_schedule[0], momentum=0.9, weight_decay=5e-4)
    for lr, g in zip(lr_schedule, grads):
        for opt, p in ((ours, a), (theirs, b)):
            opt.param_groups[0]["lr"] = lr
            p.grad = g.clone()
            opt.step()
    return a.detach(), b.detach()


def test_equals_torch_sgd_while_lr_is_constant():
    a, b = _two_runs([0.01] * 6)
    torch.testing.assert_close(a, b)


def test_differs_from_torch_sgd_when_lr_drops():
    # torch's SGD rescales the whole velocity when lr changes; the paper's rule does not.
    a, b = _two_runs([0.01] * 3 + [0.001] * 3)
    assert not torch.allclose(a, b, atol=1e-6)


def test_velocity_keeps_old_steps_after_lr_drop():
    w = torch.nn.Parameter(torch.zeros(1))
    opt = PaperSGD([w], lr=1.0, momentum=0.5, weight_decay=0.0)
    w.grad = torch.ones(1)
    opt.step()  # v = -1, w = -1
    opt.param_groups[0]["lr"] = 0.1
    w.grad = torch.zeros(1)
    opt.step()  # v = 0.5 * -1 = -0.5 (not rescaled by the new lr), w = -1.5
    assert w.item() == pytest.approx(-1.5)


def test_biases_exempt_from_decay_when_configured():
    model = torch.nn.Linear(3, 2)
    groups = param_groups(model, 5e-4, decay_biases=False)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert groups[1]["params"][0] is model.bias
    assert len(param_groups(model, 5e-4, decay_biases=True)) == 1


def test_plateau_schedule_divides_by_ten_at_most_three_times():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = PaperSGD([p], lr=0.01)
    schedule = plateau_schedule(opt, OptimConfig(plateau_patience=1, lr_drops=3))
    lrs = []
    for err in [0.5, 0.4] + [0.4] * 20:  # improves twice, then a long plateau
        schedule.step(err)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:3] == [0.01, 0.01, 0.01]
    distinct = sorted(set(round(lr, 12) for lr in lrs), reverse=True)
    assert distinct == [0.01, 0.001, 0.0001, 0.00001]


def test_plateau_schedule_waits_while_error_improves():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = PaperSGD([p], lr=0.01)
    schedule = plateau_schedule(opt, OptimConfig(plateau_patience=2))
    for err in [0.9, 0.8, 0.7, 0.6, 0.5]:
        schedule.step(err)
    assert opt.param_groups[0]["lr"] == 0.01


# --------------------------------------------------------------------------------------
# StopSignals: what SIGTERM and SIGINT do during training


def _deliver(signum: int) -> None:
    """Send a signal to this process and let Python run its handler (between bytecodes)."""
    os.kill(os.getpid(), signum)
    for _ in range(100):  # the handler runs at the next bytecode boundary; give it a few
        time.sleep(0.001)


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name == "nt", reason="POSIX signals")
def test_first_signal_sets_flag_second_sigint_aborts() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals() as stop:
        assert stop.signum is None
        _deliver(signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and stop.name == "SIGTERM"
        _deliver(signal.SIGTERM)  # a repeated SIGTERM changes nothing
        assert stop.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGINT)  # Ctrl-C while stopping: abort at once
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_sigint_first_is_a_request_not_an_interrupt() -> None:
    with StopSignals() as stop:
        _deliver(signal.SIGINT)
        assert stop.signum == signal.SIGINT and stop.name == "SIGINT"


def test_outside_the_main_thread_installs_nothing() -> None:
    result: list[object] = []

    def run() -> None:
        with StopSignals() as stop:
            result.append(stop._previous)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert result == [{}]
