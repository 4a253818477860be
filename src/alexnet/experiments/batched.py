"""Several training runs of one small network in one process: stacked parameters and vmap.

The CIFAR-sized nets of the experiments are launch-bound at the paper's batch of 128 (an
H100 ran 12 of them at once at 305-335 W of 700, experiments/RESULTS.md). Here the seeds of
one variant train together: ``torch.func.stack_module_state`` stacks their parameters
along a new leading dimension, ``vmap`` over ``functional_call`` runs all forward passes
as one set of kernels, and one backward of the summed per-run losses gives every run its
own gradient (the runs share no parameter, so d(sum_k L_k)/d(theta_k) = dL_k/d(theta_k)).
:class:`~alexnet.train.optim.PaperSGD` then updates the stacked tensors; its update is
elementwise, so it is each run's own update.

Each run keeps what :func:`alexnet.train.memory.fit` would have given it alone: its data
order and augmentation come from its own generator (seeded as ``fit`` seeds it), and its
dropout masks are drawn outside vmap from a second generator seeded as ``fit`` seeds the
global one, with the CPU kernel's own recipe (``bernoulli_(1 - p)`` then ``/ (1 - p)``,
aten's ``_dropout_impl``), and passed in. Inside the vmapped function nothing random runs
(``randomness="error"`` enforces it): vmap's ``randomness="different"`` would draw other
numbers than the runs alone.

What is not bit-identical, and why: vmap turns a convolution whose weights are batched
into one grouped convolution (K groups, K x 2 for the two-tower layers) and a linear layer
into a batched matrix product, and oneDNN sums those in another order than the
ungrouped kernels of a run alone. The random streams are bit-identical; the losses agree
to float32 rounding that grows with the steps (tests/experiments/test_batched.py states
the tolerances).

On the CPU the runs are laid out channels_last, (B, H, W, K, C) in memory
(:func:`_channels_last`), and the per-channel ops fold the K runs into the channels,
(B, K x C, H, W), which in that layout is a view: the LRN by its Function's vmap rule
(alexnet.models.lrn, K x 2 towers, so no window crosses a run), the max-poolings by
:class:`_RunsMaxPool`. vmap's own rules fold runs into the batch, a copy in and out of
every such op. With that and glibc keeping freed memory
(:func:`alexnet.runtime.keep_freed_memory`) 3 runs batched train at 0.83-0.95 of the rate
of the 3 one at a time on a 2-core AMD EPYC (from 0.46-0.51): the K-fold larger tensors
fall out of the L3 cache between ops, which the launch-bound GPU does not care about
(experiments/RESULTS.md).

On CUDA the vmapped step is compiled with ``mode="reduce-overhead"`` (CUDA graphs: one
replay per step instead of hundreds of launches) and the update with Inductor; if
compiling fails the step stays eager, with a warning. On the CPU it is eager (compiling
needs a C++ toolchain and tens of seconds per shape, train/step.py).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from alexnet.config import OptimConfig
from alexnet.data.augment import Preprocess, train_batch
from alexnet.data.cifar import ArraySplit
from alexnet.errors import AlexNetError
from alexnet.evaluate import topk_errors
from alexnet.models.alexnet import Dropout
from alexnet.train.memory import FitResult, Recipe, lr_at
from alexnet.train.optim import PaperSGD

log = logging.getLogger("alexnet")


class _GivenMask(nn.Module):
    """Dropout whose mask (already scaled: by 1 / (1 - p) inverted, by 1 paper-style) comes
    from a queue shared by the net's dropouts."""

    def __init__(self, p: float, queue: list[Tensor], style: str = "inverted") -> None:
        super().__init__()
        self.p, self.queue, self.style = p, queue, style

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:  # the paper's test-time factor; inverted dropout is the identity
            return x * (1.0 - self.p) if self.style == "paper" else x
        if self.p == 0:  # aten's dropout (and the paper-style module) draws nothing then
            return x
        return x * self.queue.pop(0)


class _RunsMaxPool(torch.autograd.Function):
    """Max pooling whose vmap rule folds the K runs into the channels, (B, K x C, H, W).

    vmap's own rule folds them into the batch, (K x B, C, H, W): with the runs'
    channels_last layout (B, H, W, K, C) that is a copy in and a copy out of every pooling
    (and its backward), 4x the pooling's own time on the 2-core AMD EPYC. Pooling is per
    channel, so folding into the channels is a view and gives the same numbers."""

    @staticmethod
    def forward(x: Tensor, pool: tuple) -> tuple[Tensor, Tensor]:
        return torch.ops.aten.max_pool2d_with_indices(x, *pool)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple[Tensor, Tensor]) -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0], output[1])
        ctx.pool = inputs[1]

    @staticmethod
    def backward(ctx: Any, g: Tensor, _: Tensor | None) -> tuple[Tensor, None]:
        x, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(g, x, *ctx.pool, indices), None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, x: Tensor, pool: tuple) -> Any:
        runs = x.movedim(in_dims[0], 1)  # (B, K, C, H, W)
        out, indices = _RunsMaxPool.apply(runs.flatten(1, 2), pool)
        return (out.unflatten(1, runs.shape[1:3]), indices.unflatten(1, runs.shape[1:3])), (1, 1)


class _FoldedMaxPool(nn.Module):
    """nn.MaxPool2d through :class:`_RunsMaxPool` (the template's pooling on the CPU)."""

    def __init__(self, m: nn.MaxPool2d) -> None:
        super().__init__()
        pair = torch.nn.modules.utils._pair
        self.pool = (
            pair(m.kernel_size),
            pair(m.stride or m.kernel_size),
            pair(m.padding),
            pair(m.dilation),
            m.ceil_mode,
        )

    def forward(self, x: Tensor) -> Tensor:
        return _RunsMaxPool.apply(x, self.pool)[0]


def _dropout_style(module: nn.Module) -> str | None:
    """ "inverted" for nn.Dropout, the module's style for the paper net's Dropout, else None."""
    if isinstance(module, nn.Dropout):
        return "inverted"
    if isinstance(module, Dropout):
        return module.style
    return None


def _dropout_specs(model: nn.Module, sample: Tensor) -> list[tuple[tuple[int, ...], float, bool]]:
    """(feature shape, p, scaled?) of every dropout call of one forward, in call order (a module used
    twice, as the paper net's ``dropout`` is, appears twice). Measured with hooks on a copy
    in eval mode, so no random number is drawn."""
    probe = copy.deepcopy(model).eval()
    calls: list[tuple[tuple[int, ...], float, bool]] = []

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if module.p > 0:  # type: ignore[operator]
            scaled = _dropout_style(module) == "inverted"
            calls.append((tuple(args[0].shape[1:]), float(module.p), scaled))  # type: ignore[arg-type]

    for m in probe.modules():
        if _dropout_style(m) is not None:
            m.register_forward_pre_hook(hook)
        elif isinstance(m, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
            raise AlexNetError(f"batched runs support nn.Dropout only, not {type(m).__name__}")
    with torch.no_grad():
        probe(sample)
    return calls


def _template(model: nn.Module, queue: list[Tensor], fold_pools: bool) -> nn.Module:
    """A parameterless copy of ``model`` (meta device) whose dropouts read the queue and, with
    ``fold_pools`` (the runs laid out channels_last), whose max-poolings fold runs into channels."""
    t = copy.deepcopy(model).to("meta").train()
    for parent in list(t.modules()):
        for name, child in list(parent.named_children()):
            style = _dropout_style(child)
            if style is not None:
                setattr(parent, name, _GivenMask(child.p, queue, style))  # type: ignore[arg-type]
            elif fold_pools and type(child) is nn.MaxPool2d and not child.return_indices:
                setattr(parent, name, _FoldedMaxPool(child))
    return t


def _groups(params: dict[str, Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """optim.param_groups' rule on the stacked parameters."""
    if OptimConfig.decay_biases:
        return [{"params": list(params.values()), "weight_decay": weight_decay}]
    return [
        {"params": [p for n, p in params.items() if not n.endswith("bias")], "weight_decay": weight_decay},
        {"params": [p for n, p in params.items() if n.endswith("bias")], "weight_decay": 0.0},
    ]


class BatchedStep:
    """``step(x (K, B, ...), labels (K, B), masks) -> (losses (K,), wrong (K,))``: one SGD step of K runs."""

    def __init__(self, models: Sequence[nn.Module], recipe: Recipe, device: torch.device, compile_: bool) -> None:
        self.queue: list[Tensor] = []
        self.channels_last = device.type == "cpu"
        template = _template(models[0], self.queue, fold_pools=self.channels_last)
        params, buffers = stack_module_state(list(models))
        placed = {n: p.detach().to(device) for n, p in params.items()}
        self.params = {
            n: (_channels_last(p, weights=True) if self.channels_last else p).requires_grad_(True)
            for n, p in placed.items()
        }
        self.buffers = {n: b.to(device) for n, b in buffers.items()}
        self.optimizer = PaperSGD(_groups(self.params, recipe.weight_decay), lr=recipe.lr, momentum=recipe.momentum)
        queue = self.queue

        def one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor, y: Tensor, masks: tuple) -> tuple:
            queue[:] = list(masks)
            logits = functional_call(template, (p, b), (x,))
            return F.cross_entropy(logits.float(), y), topk_errors(logits.detach(), y, (1,))[1]

        self.eager_losses = vmap(one, randomness="error")
        self.losses = self.eager_losses
        self.update: Callable[[], Any] = self.optimizer.step
        self.compiled = False
        if compile_:
            # reduce-overhead: CUDA graphs of the forward and backward (static shapes; the
            # epoch's last, smaller batch is a second graph).
            self.losses = torch.compile(self.losses, mode="reduce-overhead", dynamic=False)
            self.update = torch.compile(self.optimizer.step, dynamic=False)
            self.compiled = True

    def __call__(self, x: Tensor, y: Tensor, masks: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        if self.channels_last:
            x = _channels_last(x, weights=False)
        losses, wrong = self.losses(self.params, self.buffers, x, y, masks)
        losses.sum().backward()
        self.update()
        # Copies: a CUDA graph's outputs are overwritten by its next replay.
        return losses.detach().clone(), wrong.clone()

    def eager(self) -> None:
        """Give up compiling (the first compiled step failed)."""
        self.losses = self.eager_losses
        self.update, self.compiled = self.optimizer.step, False

    def copy_into(self, k: int, model: nn.Module) -> None:
        """Run k's current parameters into ``model`` (its own module, for testing and saving)."""
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(self.params[name][k])
            for name, b in model.named_buffers():
                if name in self.buffers:
                    b.copy_(self.buffers[name][k])


def _channels_last(t: Tensor, weights: bool) -> Tensor:
    """Stacked conv weights (K, O, I, kh, kw) or a batch of inputs (K, B, C, H, W), the same
    values in the memory order that makes vmap's grouped convolution channels_last.

    vmap folds the K runs into the channels of one grouped convolution; oneDNN's grouped
    kernels in NCHW are 3.7x slower than in channels_last on the 2-core AMX Xeon (forward and
    backward, batch 128, 3 runs, 3 -> 12 channels, 32x32: 38.3 against 10.5 ms;
    experiments/RESULTS.md). In memory, weights become (K, O, kh, kw, I) and inputs
    (B, H, W, K, C); the ops after a convolution follow its output's layout.
    """
    if t.ndim != 5:
        return t
    if weights:
        return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return t.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)


def _masks(
    specs: list[tuple[tuple[int, ...], float, bool]], n: int, gens: list[torch.Generator], device: torch.device
) -> tuple:
    """Every dropout call's masks for K runs, (K, n, *shape) each, drawn as aten's CPU dropout
    (and the paper-style Dropout, which draws the same Bernoulli mask and does not scale it) draws them."""
    out = []
    for shape, p, scaled in specs:
        per_run = [torch.empty((n, *shape), device=device).bernoulli_(1 - p, generator=g) for g in gens]
        if scaled:
            per_run = [m.div_(1 - p) for m in per_run]
        out.append(torch.stack(per_run))
    return tuple(out)


def _window(
    stepper: BatchedStep,
    batches: list[list[Tensor]],
    images: Tensor,
    labels: Tensor,
    pre: Preprocess,
    recipe: Recipe,
    specs: list[tuple[tuple[int, ...], float, bool]],
    data_gens: list[torch.Generator],
    drop_gens: list[torch.Generator],
) -> tuple[Tensor, Tensor, int]:
    """One logging window of K runs: each batch's K index sets augmented with each run's own
    generator, the masks drawn, one batched step. (loss sums (K,), wrong counts (K,), images
    per run), all still on the device."""
    k_runs = len(data_gens)
    loss_sum = torch.zeros(k_runs, device=images.device)
    wrong = torch.zeros(k_runs, device=images.device, dtype=torch.long)
    seen = 0
    for idx in batches:
        x = torch.stack([
            train_batch(images[i], pre, flip=recipe.flip, lighting_std=recipe.lighting_std, generator=g)
            for i, g in zip(idx, data_gens)
        ])  # fmt: skip
        y = torch.stack([labels[i] for i in idx])
        masks = _masks(specs, len(idx[0]), drop_gens, images.device)
        try:
            losses, batch_wrong = stepper(x, y, masks)
        except Exception as e:  # noqa: BLE001 -- any compiler failure falls back to eager
            if not stepper.compiled:
                raise
            log.warning("compiled batched step failed (%s); continuing eager", str(e).splitlines()[0][:200])
            stepper.eager()
            losses, batch_wrong = stepper(x, y, masks)
        loss_sum += losses * len(idx[0])
        wrong += batch_wrong
        seen += len(idx[0])
    return loss_sum, wrong, seen


def _record(
    row: dict[str, float],
    rows: list[dict[str, float]],
    on_row: Callable[[dict[str, float]], None] | None,
    recipe: Recipe,
    seen: int,
) -> FitResult | None:
    """Append one run's window row (and report it); its FitResult when the run stops here,
    as fit's rule stops it: a non-finite loss, or ``recipe.stop_at_error`` reached."""
    rows.append(row)
    if on_row is not None:
        on_row(row)
    diverged = not math.isfinite(row["train_loss"])
    if diverged or (recipe.stop_at_error and row["train_error"] <= recipe.stop_at_error):
        return FitResult(rows, diverged, row["seconds"], seen)
    return None


def fit_batched(
    models: Sequence[nn.Module],
    train: ArraySplit,
    pre: Preprocess,
    recipe: Recipe,
    *,
    seeds: Sequence[int],
    device: torch.device,
    on_rows: Sequence[Callable[[dict[str, float]], None] | None] | None = None,
    compile_step: bool | None = None,
) -> list[FitResult]:
    """Train ``models`` (same architecture, each initialised with its seed) together, run k as
    ``fit(models[k], train, pre, recipe, seed=seeds[k])`` would; the trained weights are
    copied back into ``models``. A run that diverges or reaches ``recipe.stop_at_error``
    keeps its weights and rows from that window on (the others go on); ``images_per_s`` of
    a run is then its images over the shared time. ``compile_step`` None: on CUDA only."""
    if len(models) != len(seeds) or not models:
        raise AlexNetError(f"fit_batched needs one seed per model; got {len(models)} models, {len(seeds)} seeds")
    k_runs = len(models)
    on_rows = list(on_rows) if on_rows is not None else [None] * k_runs
    images, labels = train.images.to(device), train.labels.to(device)
    n = len(train)
    steps = math.ceil(n / recipe.batch_size)
    windows = max(1, min(recipe.windows_per_epoch, steps // 8))  # fit's windows
    bounds = [round(steps * (w + 1) / windows) for w in range(windows)]
    sample = train_batch(images[:2], pre, flip=False, lighting_std=0.0).to(device)
    specs = _dropout_specs(models[0].to(device), sample)
    if compile_step is None:
        from alexnet.train.step import compile_available

        compile_step = device.type == "cuda" and compile_available()
    stepper = BatchedStep(models, recipe, device, compile_step)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data_gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    drop_gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]  # fit: torch.manual_seed(seed)
    rows: list[list[dict[str, float]]] = [[] for _ in models]
    done: list[FitResult | None] = [None] * k_runs
    start, seen_total = time.perf_counter(), 0
    for epoch in range(recipe.epochs):
        lr = lr_at(recipe, epoch)
        for group in stepper.optimizer.param_groups:
            group["lr"] = lr
        orders = [torch.randperm(n, generator=g, device=device) for g in data_gens]
        for w, end in enumerate(bounds):
            batches = [
                [o[s * recipe.batch_size : (s + 1) * recipe.batch_size] for o in orders]
                for s in range(bounds[w - 1] if w else 0, end)
            ]
            loss_sum, wrong, seen = _window(stepper, batches, images, labels, pre, recipe, specs, data_gens, drop_gens)
            seen_total += seen
            elapsed = time.perf_counter() - start
            losses_host, wrong_host = loss_sum.tolist(), wrong.tolist()
            for k in range(k_runs):
                if done[k] is None:
                    row = {"epoch": epoch + (w + 1) / windows, "train_loss": losses_host[k] / seen}
                    row.update(train_error=wrong_host[k] / seen, lr=lr, seconds=elapsed)
                    done[k] = _record(row, rows[k], on_rows[k], recipe, seen_total)
                    if done[k] is not None:  # diverged or at its target: its weights from this window on
                        stepper.copy_into(k, models[k])
            if all(d is not None for d in done):
                return [d for d in done if d is not None]
        log.info(
            "  epoch %d/%d  %d runs batched  train err %s  lr %.2g  %.0f img/s per run",
            epoch + 1,
            recipe.epochs,
            k_runs,
            " ".join(f"{100 * r[-1]['train_error']:.2f}%" for r in rows),
            lr,
            seen_total / (time.perf_counter() - start),
        )
    elapsed = time.perf_counter() - start
    results = []
    for k in range(k_runs):
        if done[k] is None:
            stepper.copy_into(k, models[k])
            done[k] = FitResult(rows[k], False, elapsed, seen_total)
        results.append(done[k])
    return results  # type: ignore[return-value]
