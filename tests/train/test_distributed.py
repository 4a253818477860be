"""Data parallelism under torchrun (gloo on the CPU): N ranks compute what one rank computes.

The multi-process tests start real ``torchrun`` jobs (``--standalone``: a free port on
localhost) of two CPU processes on the tiny network of test_cli.py. Dropout is 0 in the
equivalence tests: each rank draws its own dropout masks, so with dropout the two runs
differ by design; everything else (samples per global batch, crops, flips, lighting,
the averaged gradient) must agree to float tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alexnet.checkpoint import load_checkpoint
from alexnet.cli import main
from alexnet.data.augment import make_preprocess, train_batch
from alexnet.data.loader import EpochBatchSampler
from alexnet.data.synthetic import make_shapes_dataset
from alexnet.errors import AlexNetError
from alexnet.train import distributed
from conftest import TINY as CLI_TINY

TINY = [
    "--preset", "paper",
    *CLI_TINY,
    "--set", "model.dropout=0.0",  # masks differ per rank; the equivalence tests compare parameters
    "--set", "run.tensorboard=false",
    "--set", "speed.amp=off",  # float32: bf16 sums in another order differ by far more than 1e-5
]  # fmt: skip

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    # 10 classes x 8 = 80 training images: 5 whole global batches of 16, none dropped.
    return make_shapes_dataset(
        tmp_path_factory.mktemp("shapes"), image_size=32, train_per_class=8, val_per_class=2, seed=5
    )


FAULT_WORKER = str(Path(__file__).with_name("fault_worker.py"))


def torchrun(
    *args: str, nproc: int = 2, kill_at_step: int | None = None, restarts: int = 0
) -> subprocess.CompletedProcess:
    """A real torchrun job of `alexnet` on this machine's CPU.

    ``kill_at_step``: rank 1 dies (exit code 17) after that step on torchrun's first
    attempt; the job then runs fault_worker.py, `alexnet` with that fault injected.
    """
    worker = ["-m", "alexnet"] if kill_at_step is None else [FAULT_WORKER]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        f"--max-restarts={restarts}", *worker, *map(str, args),
    ]  # fmt: skip
    env = {} if kill_at_step is None else {"ALEXNET_FAULT_KILL_AT_STEP": str(kill_at_step)}
    full_env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    for var in distributed.RENDEZVOUS_VARS:  # the test process itself is no rank
        full_env.pop(var, None)
    full_env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=180)


def params(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_params(a: Path, b: Path, atol: float = 1e-5) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for key in pa:
        torch.testing.assert_close(pa[key], pb[key], atol=atol, rtol=1e-4, msg=key)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_rank(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    assert main(["train", "--data", str(dataset), "--out", str(out), "--epochs", "1", *TINY]) == 0
    return out


@pytest.fixture(scope="module")
def two_ranks(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two") / "run"
    done = torchrun("train", "--data", dataset, "--out", out, "--epochs", "1", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# -- pieces, in one process ----------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sampler_cuts_each_global_batch_into_equal_shares(world):
    n, batch = 70, 16
    single = list(EpochBatchSampler(n, batch, shuffle=True, seed=3))
    shards = [
        EpochBatchSampler(n, batch, shuffle=True, seed=3, rank=r, world_size=world, drop_last=True)
        for r in range(world)
    ]
    per_rank = [list(s) for s in shards]
    assert all(len(p) == len(s) == 70 // 16 for p, s in zip(per_rank, shards))  # equal counts: no DDP hang
    for k in range(70 // 16):  # global batch k is the same samples, in rank order
        assert sum((p[k] for p in per_rank), []) == single[k]
    seen = [i for p in per_rank for b in p for i in b]
    assert len(seen) == len(set(seen)) == 64  # no sample twice; the partial last batch (6) dropped
    later = EpochBatchSampler(n, batch, shuffle=True, seed=3, rank=world - 1, world_size=world, drop_last=True)
    later.set_epoch(0, start_batch=2)  # a position in global batches
    assert list(later) == per_rank[-1][2:] and len(later) == len(per_rank[-1]) - 2


def test_evaluation_sampler_covers_everything_once_without_empty_batches():
    shards = [list(EpochBatchSampler(21, 8, shuffle=False, rank=r, world_size=4)) for r in range(4)]
    seen = sorted(i for s in shards for b in s for i in b)
    assert seen == list(range(21))
    assert all(len(b) > 0 for s in shards for b in s)
    assert [len(EpochBatchSampler(21, 8, shuffle=False, rank=r, world_size=4)) for r in range(4)] == [
        len(s) for s in shards
    ]


def test_augmentation_of_a_share_is_the_slice_of_the_global_batch():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8)
    eigvecs = torch.linalg.qr(torch.randn(3, 3))[0]
    pre = make_preprocess(
        "mean-image",
        12,
        10,
        torch.rand(3, 12, 12) * 255,
        torch.ones(3),
        torch.rand(3),
        eigvecs,
    )
    whole = train_batch(images, pre, generator=torch.Generator().manual_seed(7))
    for rank in range(4):
        part = train_batch(
            images[2 * rank : 2 * rank + 2], pre, generator=torch.Generator().manual_seed(7), draws=8, offset=2 * rank
        )
        torch.testing.assert_close(part, whole[2 * rank : 2 * rank + 2], rtol=0, atol=0)


def test_rendezvous_variables_must_come_together():
    assert distributed.from_env({}) == distributed.Dist()
    full = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "1234", "LOCAL_RANK": "1"}
    assert distributed.from_env(full) == distributed.Dist(1, 2, 1)
    with pytest.raises(AlexNetError, match="MASTER_ADDR missing"):
        distributed.from_env({k: v for k, v in full.items() if k != "MASTER_ADDR"})
    with pytest.raises(AlexNetError, match="RANK must be in"):
        distributed.from_env({**full, "RANK": "2"})


def test_missing_master_addr_is_a_one_line_error(dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "r"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("alexnet: error: distributed launch incomplete") and "MASTER_ADDR" in err[-1]


def test_a_global_batch_the_world_does_not_divide_is_refused_before_any_work(dataset, tmp_path, monkeypatch, capsys):
    for var, value in {"RANK": "0", "WORLD_SIZE": "3", "MASTER_ADDR": "localhost", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(var, value)
    assert main(["train", "--data", str(dataset), "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "batch_size 16 (the global batch) must be divisible by world size 3" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing was started


def test_accumulation_gives_the_update_of_the_whole_batch(dataset, one_rank, tmp_path):
    out = tmp_path / "acc"
    assert (
        main(
            ["train", "--data", str(dataset), "--out", str(out), "--epochs", "1", *TINY, "--set", "optim.accumulate=4"]
        )
        == 0
    )
    assert_same_params(out / "last.pt", one_rank / "last.pt")


def test_linear_lr_scaling_is_opt_in():
    from alexnet.config import OptimConfig

    assert OptimConfig(batch_size=512).scaled_lr == 0.01
    assert OptimConfig(batch_size=512, lr_scaling="linear").scaled_lr == pytest.approx(0.04)
    with pytest.raises(AlexNetError, match="lr_scaling"):
        OptimConfig(lr_scaling="sqrt")


# -- real torchrun jobs ---------------------------------------------------------------------


@pytest.mark.distributed
def test_two_ranks_compute_the_parameters_of_one(one_rank, two_ranks):
    assert_same_params(two_ranks / "last.pt", one_rank / "last.pt")
    (a,), (b,) = rows(one_rank), rows(two_ranks)
    assert a["step"] == b["step"] == 5 and a["train_images"] == b["train_images"] == 80
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
    # Rank 0 alone wrote the run directory: one metrics row, one log.
    assert (two_ranks / "config.yaml").exists() and len((two_ranks / "log.txt").read_text().splitlines()) > 0


@pytest.mark.distributed
def test_validation_reduced_over_ranks_equals_one_process(dataset, two_ranks, tmp_path):
    # The 2-rank run's own metrics (each rank evaluated half, counts summed) against
    # `alexnet evaluate` of the same checkpoint in one process.
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(two_ranks / "last.pt"), "--data", str(dataset), "--centre-only", "--workers", "0",
                 "--json", str(report)]) == 0  # fmt: skip
    single = json.loads(report.read_text())
    (row,) = rows(two_ranks)
    centre = single["centre"]
    assert row["val_images"] == centre["images"] == 20
    assert row["val_top1_error"] == centre["top1_error"] and row["val_top5_error"] == centre["top5_error"]


@pytest.mark.distributed
def test_resume_with_another_world_size(dataset, one_rank, two_ranks, tmp_path):
    # Epoch 1 by two ranks, epoch 2 by one: the same parameters as one rank throughout.
    shutil.copytree(two_ranks, tmp_path / "two")
    shutil.copytree(one_rank, tmp_path / "one")
    assert main(["train", "--resume", str(tmp_path / "two"), "--epochs", "2", "--no-progress"]) == 0
    assert main(["train", "--resume", str(tmp_path / "one"), "--epochs", "2", "--no-progress"]) == 0
    assert_same_params(tmp_path / "two" / "last.pt", tmp_path / "one" / "last.pt")
    assert [r["epoch"] for r in rows(tmp_path / "two")] == [1, 2]


@pytest.mark.distributed
def test_a_killed_rank_ends_the_job_with_the_checkpoint_intact_and_it_resumes(dataset, one_rank, tmp_path):
    # Rank 1 dies abruptly (os._exit) after step 3 of 5, one step after the checkpoint of
    # step 2: the job ends with an error, last.pt is the whole step-2 checkpoint, and the
    # job started again continues from it to the parameters of an uninterrupted run.
    out = tmp_path / "run"
    args = ["train", "--data", dataset, "--out", out, "--epochs", "1", *TINY, "--set", "run.checkpoint_every=2"]
    done = torchrun(*args, kill_at_step=3)
    assert done.returncode != 0 and "exitcode  : 17" in done.stderr
    state = load_checkpoint(out / "last.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (0, 2, 2)
    again = torchrun("train", "--resume", out, "--no-progress")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "in epoch 1 after batch 2" in (out / "log.txt").read_text()
    assert load_checkpoint(out / "last.pt")["step"] == 5
    assert_same_params(out / "last.pt", one_rank / "last.pt")


@pytest.mark.distributed
def test_torchrun_restarts_a_job_whose_rank_died_and_it_finishes_from_the_checkpoint(dataset, one_rank, tmp_path):
    # torchrun --max-restarts=1: rank 1 dies after step 3 on the first attempt; torchrun
    # restarts both ranks, which find the step-2 checkpoint, resume and finish the epoch.
    out = tmp_path / "run"
    done = torchrun(
        "train", "--data", dataset, "--out", out, "--epochs", "1", *TINY, "--set", "run.checkpoint_every=2",
        kill_at_step=3, restarts=1,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exitcode: 17" in done.stderr and "restart 1 by torchrun: resuming" in done.stderr
    assert "in epoch 1 after batch 2" in (out / "log.txt").read_text()
    state = load_checkpoint(out / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 5)
    assert_same_params(out / "last.pt", one_rank / "last.pt")


def test_a_restarted_worker_resumes_the_run_it_finds(dataset, tmp_path, monkeypatch):
    # What torchrun --max-restarts does after a failure: it starts the same command again
    # with TORCHELASTIC_RESTART_COUNT > 0. The run directory's checkpoint is then resumed
    # instead of refused as "already holds a run".
    out = tmp_path / "run"
    args = ["train", "--data", str(dataset), "--out", str(out), *TINY]
    assert main([*args, "--epochs", "1"]) == 0
    assert main([*args, "--epochs", "2"]) == 2  # a first attempt refuses an existing run
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert main([*args, "--epochs", "2"]) == 0
    assert [r["epoch"] for r in rows(out)] == [1, 2]


def test_nproc_launches_torchrun_with_the_same_command(monkeypatch, tmp_path):
    import alexnet.cli.train as cli_train

    seen = []
    monkeypatch.setattr(
        cli_train.subprocess, "run", lambda command: seen.append(command) or subprocess.CompletedProcess(command, 0)
    )
    assert (
        main(["train", "--nproc", "2", "--max-restarts=1", "--data", "D", "--out", str(tmp_path), "--epochs", "3"]) == 0
    )
    (command,) = seen
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert command[3:8] == ["--standalone", "--nproc-per-node=2", "--max-restarts=1", "-m", "alexnet"]
    assert command[8:] == ["train", "--data", "D", "--out", str(tmp_path), "--epochs", "3"]
    seen.clear()  # without --out every rank must get the same directory name: fixed here
    assert main(["train", "--nproc", "2", "--data", "D"]) == 0
    assert seen[0][-2] == "--out" and seen[0][-1].startswith("runs")


def test_under_torchrun_the_run_directory_must_be_given(monkeypatch, capsys):
    for var, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29999"}.items():
        monkeypatch.setenv(var, value)
    assert main(["train", "--data", "D", *TINY]) == 2
    assert "give the run directory explicitly" in capsys.readouterr().err
