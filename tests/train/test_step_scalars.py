"""Per-step TensorBoard scalars (loop.Loop._log_step, rundir.RunLog.step), read back from the event file."""

from __future__ import annotations

import json

import pytest

from alexnet.cli import main


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_step_scalars_every_n_steps_beside_the_epoch_ones(tmp_path):
    from conftest import TINY, write_tree

    data = write_tree(tmp_path / "data", train=5, val=2)  # 15 training images: 3 batches of 5
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--epochs", "2", *TINY, "--batch-size", "5"]
    assert main([*args, "--set", "run.log_every_steps=1"]) == 0
    tags = scalars(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in tags["step/train_loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in tags["step/lr"]] == [1, 2, 3, 4, 5, 6]
    assert all(v > 0 for _, v in tags["step/images_per_s"])
    for epoch, row in enumerate(rows):
        # Equal batches: the epoch's mean loss is the mean of its steps' losses.
        losses = [v for _, v in tags["step/train_loss"][3 * epoch : 3 * epoch + 3]]
        assert sum(losses) / 3 == pytest.approx(row["train_loss"], rel=1e-5)
        assert tags["step/lr"][3 * epoch][1] == pytest.approx(row["lr"], rel=1e-6)
    # The per-epoch scalars are still there, against the epoch number.
    assert [s for s, _ in tags["train_loss"]] == [1, 2]


def test_step_scalars_every_two_steps_average_their_window(tmp_path):
    from conftest import TINY, write_tree

    data = write_tree(tmp_path / "data", train=5, val=2)
    runs = {}
    for every in (1, 2):
        run = tmp_path / f"every{every}"
        args = ["train", "--data", str(data), "--out", str(run), "--epochs", "1", *TINY, "--batch-size", "5"]
        assert main([*args, "--set", f"run.log_every_steps={every}"]) == 0
        runs[every] = dict(scalars(run)["step/train_loss"])
    # The same run (same seed): the value at step 2 is the mean of steps 1 and 2.
    assert list(runs[2]) == [2]
    assert runs[2][2] == pytest.approx((runs[1][1] + runs[1][2]) / 2, rel=1e-5)


def test_no_step_scalars_without_tensorboard(tmp_path, monkeypatch):
    """With run.tensorboard=false nothing takes the step scalars: the loss is not read back for them."""
    from alexnet.train.loop import Loop
    from conftest import TINY, write_tree

    def refuse(self, totals):
        raise AssertionError("step scalars computed without TensorBoard")

    monkeypatch.setattr(Loop, "_log_step", refuse)
    data = write_tree(tmp_path / "data", train=5, val=2)
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY, "--batch-size", "5"]
    assert main([*args, "--set", "run.log_every_steps=1", "--set", "run.tensorboard=false"]) == 0
