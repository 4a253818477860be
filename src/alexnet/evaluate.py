"""Top-1/top-5 error, the paper's ten test patches, and model ensembles.

Pure functions first: :func:`topk_errors` on scores and targets, :func:`predict_probs`
for a batch. :func:`evaluate` only loops over a loader and sums.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alexnet.data.augment import Preprocess, eval_patches
from alexnet.data.loader import Batch


def topk_errors(scores: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, Tensor]:
    """Number of samples whose target is not among the k highest scores, for each k.

    Counts (not fractions) so that batches can be summed; k larger than the number of
    classes is clipped (top-5 of a 3-class problem is top-3). Ties go to the lower index.
    """
    # A stable sort, not topk: topk's order among equal scores is unspecified (all-zero
    # scores of 10 classes came back as 8, 6, 7, 5, 9 on CPU).
    top = scores.sort(dim=1, descending=True, stable=True).indices[:, : max(ks)]  # (B, kmax)
    hit = top == targets[:, None]
    return {k: (~hit[:, :k].any(1)).sum() for k in ks}


@torch.no_grad()
def patch_probs(models: Sequence[nn.Module], pres: Sequence[Preprocess], images: Tensor, ten: bool) -> Tensor:
    """Softmax per test patch, averaged over models: (B, P, classes), P = 10 or 1 (centre first).

    Averaging probabilities, not logits, is what the paper does for both its ten
    patches and its ensembles of CNNs (sections 4.1 and 6).
    """
    total = None
    for model, pre in zip(models, pres):
        patches = eval_patches(images, pre, ten)  # (B, P, 3, c, c)
        b, p = patches.shape[:2]
        probs = model(patches.flatten(0, 1)).float().softmax(1).view(b, p, -1)
        total = probs if total is None else total + probs
    return total / len(models)


def predict_probs(models: Sequence[nn.Module], pres: Sequence[Preprocess], images: Tensor, ten: bool) -> Tensor:
    """(B, classes): the centre patch's probabilities, or the mean over the ten patches."""
    return patch_probs(models, pres, images, ten).mean(1)


@dataclass
class EvalResult:
    top1_error: float
    top5_error: float
    images: int

    def as_dict(self, prefix: str = "") -> dict[str, float | int]:
        return {
            f"{prefix}top1_error": self.top1_error,
            f"{prefix}top5_error": self.top5_error,
            f"{prefix}images": self.images,
        }


def evaluate(
    models: Sequence[nn.Module],
    pres: Sequence[Preprocess],
    batches: Iterable[Batch],
    device: torch.device,
    ten: bool = False,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[dict[str, EvalResult], list[str]]:
    """Top-1 and top-5 error over batches for the centre patch ("centre") and, with ``ten``,
    the ten patches ("ten_patches"), in one pass; also the files that could not be read.

    ``reduce`` sums the counts over the processes of a distributed job, each of which
    evaluated its share of the images (distributed.Dist.all_reduce_sum).
    """
    for m in models:
        m.eval()
    views = ["centre", "ten_patches"] if ten else ["centre"]
    wrong = {(v, k): torch.zeros((), device=device, dtype=torch.long) for v in views for k in (1, 5)}
    n, skipped = 0, []
    for batch in batches:
        skipped += batch.skipped
        if not len(batch.labels):
            continue
        images = batch.images.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        probs = patch_probs(models, pres, images, ten)
        for view in views:
            counts = topk_errors(probs[:, 0] if view == "centre" else probs.mean(1), labels)
            for k in (1, 5):
                wrong[view, k] += counts[k]
        n += len(labels)
    counts = torch.stack([*(wrong[v, k] for v in views for k in (1, 5)), torch.tensor(n, device=device)])
    if reduce is not None:
        counts = reduce(counts)
    c = counts.tolist()
    n = c[-1]
    nan = float("nan")
    results = {
        v: EvalResult(c[2 * i] / n if n else nan, c[2 * i + 1] / n if n else nan, n) for i, v in enumerate(views)
    }
    return results, skipped
