"""What the CIFAR-10 experiments share: the run directory, the worker pool, data and summary helpers.

A run directory holds ``config.yaml`` (the settings and the environment), ``metrics.jsonl``
(one line per measurement window of every training run), ``runs/<name>.json`` (each
finished training run), the experiment's figure, ``summary.json`` and ``summary.md``.
Running the same command with the same ``--out`` again skips the training runs already
finished there, so a long experiment can be done in pieces (also with other ``--seeds`` or
``--variants``; the summary covers the runs asked for).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from alexnet.data.augment import Preprocess, make_preprocess
from alexnet.data.cifar import ArraySplit
from alexnet.data.loader import Batch
from alexnet.data.stats import DataStats, StatsAccumulator
from alexnet.errors import AlexNetError
from alexnet.evaluate import EvalResult, evaluate
from alexnet.files import atomic_write_text, write_json
from alexnet.runtime import cpu_cores, keep_freed_memory
from alexnet.train.memory import FitResult, Recipe

log = logging.getLogger("alexnet")


@dataclass(frozen=True)
class Experiment:
    """One experiment of ``alexnet experiment``: its settings and how to run it.

    ``run(train, test, settings, device, run_dir, workers, batch)`` trains and writes the
    summary into ``run_dir`` (``batch``: seeds trained together, experiments/batched.py);
    the settings class checks its own values when constructed.
    """

    name: str
    settings_cls: type
    full: Any  # the full-size settings
    reduced: Any  # the --reduced settings: seconds on a CPU
    run: Callable[..., dict[str, Any]]


# --------------------------------------------------------------------------------------
# Settings checks (messages name the command-line options)


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


def check_at_least_one(settings: Any, keys: Iterable[str]) -> None:
    for key in keys:
        if getattr(settings, key) < 1:
            raise AlexNetError(f"{_option(key)} must be at least 1; got {getattr(settings, key)}")


def check_counts(settings: Any, keys: Iterable[str]) -> None:
    """Image counts: 0 means all."""
    for key in keys:
        if getattr(settings, key) < 0:
            raise AlexNetError(f"{_option(key)} must be 0 (all) or a positive count; got {getattr(settings, key)}")


# --------------------------------------------------------------------------------------
# Data


def split_stats(split: ArraySplit, chunk: int = 5000) -> DataStats:
    """Mean image and RGB PCA of an in-memory split (data/stats.py's accumulator, in chunks)."""
    acc = StatsAccumulator(split.images.shape[-1])
    for i in range(0, len(split), chunk):
        acc.add(split.images[i : i + chunk])
    return acc.result()


def make_pre(stats: DataStats, recipe: Recipe) -> Preprocess:
    s = stats.mean_image.shape[-1]
    return make_preprocess(
        recipe.normalize, s, recipe.crop_size, stats.mean_image, stats.pixel_std, stats.eigvals, stats.eigvecs
    )


def _batches(split: ArraySplit, batch_size: int) -> Iterator[Batch]:
    for i in range(0, len(split), batch_size):
        yield Batch(split.images[i : i + batch_size], split.labels[i : i + batch_size], [])


def evaluate_split(
    model: nn.Module, pre: Preprocess, test: ArraySplit, device: torch.device, ten: bool
) -> dict[str, EvalResult]:
    """Top-1/top-5 test error of the centre patch and, with ``ten``, of the ten patches."""
    results, _ = evaluate([model], [pre], _batches(test, 500), device, ten=ten)
    return results


def fit_group(
    jobs: dict[str, Any],
    models: Callable[[Any], nn.Module],
    train: ArraySplit,
    pre: Preprocess,
    recipe: Recipe,
    result: Callable[[Any, nn.Module, FitResult], dict[str, Any]],
    *,
    device: torch.device,
    on_rows: dict[str, Callable[[dict[str, float]], None]],
) -> dict[str, dict[str, Any]]:
    """The runs of ``jobs`` (name -> job; the jobs differ in their ``seed`` only) trained
    together by experiments/batched.py, each model made by ``models(job)``: each run's
    ``result(job, model, fit)`` with ``batched_runs``, the number trained together."""
    from alexnet.experiments.batched import fit_batched

    kinds = {dataclasses.replace(j, seed=0) for j in jobs.values()}
    if len(kinds) != 1:
        raise AlexNetError(f"runs trained together must differ in seed only; got {sorted(map(str, kinds))}")
    names = list(jobs)
    nets = [models(jobs[n]) for n in names]
    seeds = [jobs[n].seed for n in names]
    fits = fit_batched(nets, train, pre, recipe, seeds=seeds, device=device, on_rows=[on_rows[n] for n in names])
    return {n: {**result(jobs[n], m, r), "batched_runs": len(names)} for n, m, r in zip(names, nets, fits)}


def epochs_to(rows: Sequence[dict[str, float]], target: float) -> float | None:
    """The first (fractional) epoch at whose window the training error is at most target."""
    return next((r["epoch"] for r in rows if r["train_error"] <= target), None)


# --------------------------------------------------------------------------------------
# Run directories


class RunDir:
    """The files of one experiment run; finished training runs are kept and reused."""

    def __init__(self, out: Path, experiment: str, settings: dict[str, Any], env: dict[str, Any]) -> None:
        self.out = out
        self.runs = out / "runs"
        config_path = out / "config.yaml"
        if config_path.exists():
            try:
                previous = yaml.safe_load(config_path.read_text()) or {}
            except yaml.YAMLError:
                previous = {}

            # seeds and variants only choose which runs to do; each run's result does not depend
            # on them, so a directory can be filled in pieces (--variants a,b then --variants c).
            def same(a: dict[str, Any]) -> dict[str, Any]:
                return {k: v for k, v in (a or {}).items() if k not in ("seeds", "variants")}

            if previous.get("experiment") != experiment or same(previous.get("settings")) != same(settings):
                raise AlexNetError(
                    f"{out} holds a {previous.get('experiment', 'different')} run with other settings; "
                    "use another --out (or the same settings to continue it)"
                )
        self.runs.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            config_path,
            yaml.safe_dump({"experiment": experiment, "settings": settings, "environment": env}, sort_keys=False),
        )
        # Metric lines of runs that did not finish are dropped: those runs start again.
        self.metrics_path = out / "metrics.jsonl"
        done = {p.stem for p in self.runs.glob("*.json")}
        if self.metrics_path.exists():
            lines = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip()]
            self.metrics_path.write_text("".join(ln + "\n" for ln in lines if json.loads(ln).get("run") in done))
        self.handler = logging.FileHandler(out / "log.txt")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(self.handler)

    def close(self) -> None:
        log.removeHandler(self.handler)
        self.handler.close()

    def run_all(
        self,
        fn: Callable[..., dict[str, Any]],
        shared: tuple,
        jobs: dict[str, Any],
        device: torch.device,
        workers: int = 1,
    ) -> dict[str, dict[str, Any]]:
        """The result of each training run in ``jobs`` (name -> job), in that order: read back
        if it finished before, else ``fn(job, *shared, device=..., on_row=...)``.

        ``workers`` > 1 trains that many runs at once, each in its own process (and CUDA
        context). The CIFAR-sized nets here cannot fill a GPU at the paper's batch of 128,
        and a bigger batch would change the experiment; several processes keep the GPU busy
        instead (time-sliced, not overlapped, without MPS). Measured on an H100: 12 workers
        trained at about 37,000 images/s in all, 95-98% busy at 320 W of 700
        (experiments/RESULTS.md); one run alone was not timed. ``fn`` and ``shared`` are
        pickled to the workers; tensors travel through shared memory.
        """
        results: dict[str, dict[str, Any]] = {}
        todo: dict[str, Any] = {}
        for name, job in jobs.items():
            path = self.runs / f"{name}.json"
            if path.exists():
                log.info("%s: finished before, reusing %s", name, path)
                results[name] = json.loads(path.read_text())
            else:
                todo[name] = job
        if workers <= 1 or len(todo) <= 1:
            for name, job in todo.items():
                log.info("%s", name)
                on_row = functools.partial(_append_metric, self.metrics_path, name)
                results[name] = self._save(name, fn(job, *shared, device=device, on_row=on_row))
        else:
            for name, result in self._in_workers(_worker_run, fn, shared, todo, device, workers):
                results[name] = self._save(name, {**result, "concurrent_runs": min(workers, len(todo))})
                log.info("%s: finished (%d of %d)", name, sum(n in results for n in todo), len(todo))
        return {name: results[name] for name in jobs}

    def run_groups(
        self,
        fn: Callable[..., dict[str, dict[str, Any]]],
        shared: tuple,
        groups: dict[str, dict[str, Any]],
        device: torch.device,
        workers: int = 1,
    ) -> dict[str, dict[str, Any]]:
        """Like :meth:`run_all`, for runs trained together: ``groups`` maps a group name to its
        runs (name -> job), and ``fn(jobs, *shared, device=..., on_rows={name: on_row})``
        trains a group's unfinished runs at once (experiments/batched.py) and returns each
        one's result. Every run's file is written as soon as its group finishes, so a call
        that ends early keeps every group that finished; ``workers`` > 1 trains that many
        groups at once, each in its own process."""
        results: dict[str, dict[str, Any]] = {}
        todo: dict[str, dict[str, Any]] = {}
        for group, jobs in groups.items():
            for name, job in jobs.items():
                path = self.runs / f"{name}.json"
                if path.exists():
                    results[name] = json.loads(path.read_text())
                else:
                    todo.setdefault(group, {})[name] = job
        if workers <= 1 or len(todo) <= 1:
            for group, jobs in todo.items():
                log.info("%s: %d runs together (%s)", group, len(jobs), ", ".join(jobs))
                on_rows = {n: functools.partial(_append_metric, self.metrics_path, n) for n in jobs}
                for name, result in fn(jobs, *shared, device=device, on_rows=on_rows).items():
                    results[name] = self._save(name, result)
        else:
            finished = 0
            for group, out in self._in_workers(_worker_run_group, fn, shared, todo, device, workers):
                for name, result in out.items():
                    results[name] = self._save(name, {**result, "concurrent_runs": min(workers, len(todo))})
                finished += 1
                log.info("%s: finished (%d of %d groups)", group, finished, len(todo))
        return {name: results[name] for jobs in groups.values() for name in jobs}

    def _in_workers(
        self,
        worker: Callable[[str, Any], Any],
        fn: Callable[..., Any],
        shared: tuple,
        todo: dict[str, Any],
        device: torch.device,
        workers: int,
    ) -> Iterator[tuple[str, Any]]:
        """(name, ``worker(name, job)``) for each job of ``todo`` as it finishes, in ``workers`` processes."""
        workers = min(workers, len(todo))
        # CPU runs share the cores; a GPU run's process needs one thread to launch kernels.
        threads = max(1, cpu_cores() // workers) if device.type == "cpu" else 1
        log.info("%d jobs in %d worker processes: %s", len(todo), workers, ", ".join(todo))
        pool = ProcessPoolExecutor(
            workers,
            mp_context=torch.multiprocessing.get_context("spawn"),  # CUDA cannot be forked
            initializer=_worker_init,
            initargs=(fn, shared, str(device), str(self.metrics_path), str(self.out / "log.txt"), threads),
        )
        try:
            futures = {pool.submit(worker, name, job): name for name, job in todo.items()}
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BaseException:
            # A failed run or Ctrl-C: drop the runs not started and stop the running ones now
            # (unfinished runs are not kept, so there is nothing to wait for).
            processes = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()
            raise
        pool.shutdown()

    def _save(self, name: str, result: dict[str, Any]) -> dict[str, Any]:
        write_json(self.runs / f"{name}.json", result, indent=1)
        return result

    def write_summary(self, summary: dict[str, Any], markdown: str) -> None:
        write_json(self.out / "summary.json", summary, indent=2)
        atomic_write_text(self.out / "summary.md", markdown)

    def environment(self) -> dict[str, Any]:
        """The environment recorded in config.yaml (:func:`alexnet.runtime.environment`)."""
        return yaml.safe_load((self.out / "config.yaml").read_text())["environment"]


def _append_metric(path: Path, run: str, row: dict[str, float]) -> None:
    # One short line per append: concurrent workers' lines do not interleave (O_APPEND).
    with open(path, "a") as f:
        f.write(json.dumps({"run": run, **row}) + "\n")


_WORKER: dict[str, Any] = {}  # what _worker_init gives each worker process


class _RunName(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.run = _WORKER.get("name", "-")
        return True


def _worker_init(
    fn: Callable[..., dict[str, Any]], shared: tuple, device: str, metrics: str, log_file: str, threads: int
) -> None:
    torch.set_num_threads(threads)
    keep_freed_memory(torch.device(device))
    formatter = logging.Formatter("%(asctime)s [%(run)s] %(message)s")
    for handler in (logging.StreamHandler(), logging.FileHandler(log_file)):
        handler.setFormatter(formatter)
        handler.addFilter(_RunName())
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    _WORKER.update(fn=fn, shared=shared, device=torch.device(device), metrics=Path(metrics))


def _worker_run(name: str, job: Any) -> dict[str, Any]:
    w = _WORKER
    w["name"] = name
    log.info("started in process %d", os.getpid())
    on_row = functools.partial(_append_metric, w["metrics"], name)
    return w["fn"](job, *w["shared"], device=w["device"], on_row=on_row)


def _worker_run_group(group: str, jobs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    w = _WORKER
    w["name"] = group
    log.info("started in process %d: %s", os.getpid(), ", ".join(jobs))
    on_rows = {n: functools.partial(_append_metric, w["metrics"], n) for n in jobs}
    return w["fn"](jobs, *w["shared"], device=w["device"], on_rows=on_rows)


def pyplot() -> Any:
    from alexnet.extras import require

    require("matplotlib", "the experiments' figures").use("Agg")  # files only; no display on training machines
    return require("matplotlib.pyplot", "the experiments' figures")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def verdict(effect: float, se: float, n: int, claimed: bool) -> str:
    """Whether removing a component raised the error: compared with twice its standard error."""
    if not math.isfinite(effect):
        return "undetermined"
    if not math.isfinite(se) or n < 2:
        return "undetermined (one seed: no spread)"
    if effect > 2 * se:
        return "yes" if claimed else "helps"
    if effect < -2 * se:
        return "no (the opposite)" if claimed else "hurts"
    return "not resolved (within noise)"


def pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}f}"


def device_line(env: dict[str, Any]) -> str:
    """The summary.md line of the environment (:func:`alexnet.runtime.environment`): device, torch, day."""
    return f"Device: {env['device_description']}; torch {env['torch']}; {env['date'][:10]}.  "
