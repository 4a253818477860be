"""The paper's optimiser (section 5) and its learning-rate schedule.

Batches of 128, momentum 0.9, weight decay 0.0005 with the update

    v <- 0.9 v - 0.0005 lr w - lr grad(L)        w <- w + v

and a learning rate of 0.01 divided by 10 whenever the validation error stopped
improving, three times in all, over about 90 epochs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from alexnet import config as config_lib


class PaperSGD(torch.optim.Optimizer):
    """SGD with the paper's momentum form: the learning rate is inside the velocity.

    ``torch.optim.SGD`` computes v <- mu v + g, w <- w - lr v: when lr is divided by 10
    the whole accumulated velocity is scaled down at once. Here the velocity keeps the
    steps taken at the old rate and only new gradients are scaled, as in the paper.
    The two agree while lr is constant. Weight decay is per parameter group, so biases
    can be exempted as Caffe does.
    """

    def __init__(self, params: Any, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be non-negative")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            velocities = []
            for p in params:
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                velocities.append(state["velocity"])
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            # v <- mu v - wd lr w - lr g ; w <- w + v, over all tensors of the group at once.
            torch._foreach_mul_(velocities, mu)
            if wd:
                torch._foreach_add_(velocities, params, alpha=-wd * lr)
            torch._foreach_add_(velocities, grads, alpha=-lr)
            torch._foreach_add_(params, velocities)
        return loss


def param_groups(
    model: nn.Module, weight_decay: float, decay_biases: bool, backbone_lr: float | None = None
) -> list[dict[str, Any]]:
    """The optimizer's groups: weight decay per group (biases exempt unless ``decay_biases``).

    Parameters with ``requires_grad`` False (frozen by finetune.freeze) are left out, so
    they get no weight decay and no velocity. With ``backbone_lr``, every layer but the
    head (``model.get_classifier()``, fc8) gets that learning rate; the head's groups come
    first and keep the optimizer's, which metrics.jsonl reports as ``lr``.
    """
    head = {id(p) for p in model.get_classifier().parameters()} if backbone_lr is not None else None
    # (in the backbone, an exempt bias) -> parameters; a group that freezing emptied never appears
    members: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (head is not None and id(p) not in head, not decay_biases and name.endswith("bias"))
            members.setdefault(key, []).append(p)
    return [
        {"params": params, "weight_decay": 0.0 if bias else weight_decay, **({"lr": backbone_lr} if backbone else {})}
        for (backbone, bias), params in sorted(members.items(), key=lambda item: item[0])  # head first, weights first
    ]


def plateau_schedule(optimizer: torch.optim.Optimizer, cfg: config_lib.OptimConfig) -> ReduceLROnPlateau:
    """lr / 10 when val top-1 error has not improved for `plateau_patience` epochs, `lr_drops` times at most.

    Every group is divided together (a backbone at optim.backbone_lr_scale stays at that
    ratio to the head), each with its own floor at its starting lr / 10**lr_drops.
    """
    floors = [group["lr"] * 0.1**cfg.lr_drops for group in optimizer.param_groups]
    return ReduceLROnPlateau(
        optimizer,
        mode="min",
        factor=0.1,
        patience=cfg.plateau_patience,
        threshold=cfg.plateau_threshold,
        threshold_mode="abs",
        # The floors stop the schedule after lr_drops divisions; the margins absorb rounding.
        min_lr=[floor * (1 - 1e-6) for floor in floors],
        eps=min(floors) * 1e-3,
    )
