"""The paper's model parallelism: the two towers of Figure 2 on two devices (ranks).

Section 3.2: "we spread the net across two GPUs ... the GPUs communicate only in certain
layers. This means that, for example, the kernels of layer 3 take input from all kernel
maps in layer 2. However, kernels in layer 4 take input only from those kernel maps in
layer 3 which reside on the same GPU." Here rank t of a 2-process group holds tower t:

* conv1: its 48 of the 96 kernels, over the whole image (each GPU saw the full input);
  LRN and pooling inside the tower (the paper convention's LRN window stays per tower);
* conv2, conv4, conv5: its group of the two-group convolution, reading only its tower;
* conv3, fc6, fc7, fc8: its half of the output units, reading BOTH towers, whose
  activations are all-gathered first (the only communication);
* the logits are all-gathered too, so every rank holds the whole (B, classes).

The all-gathers are ``torch.distributed.nn.functional.all_gather``, which carries
gradients back (a reduce-scatter, or an all-to-all on gloo). Every rank computes the same
loss from the same logits; each backpropagates ``loss / 2`` so the gradients, summed over
the ranks by the all-gathers' backward, are those of the loss once. The module is built
from a grouped ``PaperAlexNet`` and :meth:`TowerParallelAlexNet.tower_state` maps the
gradients back; tests/models/test_towers.py checks outputs and all gradients against the single
process model with two gloo processes.

Communication per step, as a model (counted from the layer shapes, not measured), for
the paper's 224x224 net and float32 activations, per image and per rank:

=============  ==========================  ============================
all-gather     tensor per tower            floats sent forward
=============  ==========================  ============================
conv3 input    128 x 13 x 13               21,632
fc6 input      128 x 6 x 6                 4,608
fc7 input      2,048                       2,048
fc8 input      2,048                       2,048
logits         500                         500
=============  ==========================  ============================

about 30,800 floats = 123 kB per image forward and the same again for the gradients in
backward: ~246 kB per image, ~31.5 MB per step of 128 images, growing with the batch.
Data parallelism instead all-reduces the gradients of all 60,965,224 parameters once
per step: a ring all-reduce moves 2 (N-1)/N x 244 MB = 244 MB per GPU for N = 2, fixed
whatever the batch. At batch 128 model parallelism sends ~8x fewer bytes; the break-even
is near 990 images per step. The price is that each GPU holds half the weights but computes every image, and
the two halves wait for each other five times per forward and backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from alexnet.errors import AlexNetError
from alexnet.models.alexnet import LocalResponseNorm, PaperAlexNet


def _gather(x: Tensor, dim: int) -> Tensor:
    """Both towers' x concatenated along dim in rank order, with gradients flowing back."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim)


def _rows(t: Tensor, rank: int) -> Tensor:
    """Rank's half of the first dimension (output units, or groups of a grouped conv)."""
    return t.chunk(2)[rank].detach().clone()


class TowerParallelAlexNet(nn.Module):
    """One tower of a two-tower ``PaperAlexNet`` on this rank; ``forward`` gives the whole logits."""

    def __init__(self, full: PaperAlexNet, rank: int | None = None) -> None:
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != 2:
            raise AlexNetError("the two-tower model parallel layout needs a process group of exactly 2 ranks")
        cfg = full.config
        if cfg.towers != 2:
            raise AlexNetError(f"model parallelism splits the paper's two towers; the model has towers={cfg.towers}")
        if any(getattr(full, f"conv{i}") is None for i in (2, 3, 4, 5)):
            raise AlexNetError("model parallelism needs all five convolutional layers (model.remove_conv is set)")
        for lrn in (full.lrn1, full.lrn2):
            if isinstance(lrn, LocalResponseNorm) and lrn.groups != 2:
                raise AlexNetError(
                    f"LRN convention {cfg.lrn!r} normalises across towers; use lrn=paper (per tower) or none"
                )
        if cfg.num_classes % 2:
            raise AlexNetError(f"fc8 is split in two halves: num_classes must be even; got {cfg.num_classes}")
        self.rank = dist.get_rank() if rank is None else rank
        self.config = cfg
        self.act, self.pool, self.dropout = full.act, full.pool, full.dropout
        # LRN inside one tower: a single group over this rank's channels.
        self.lrn1 = LocalResponseNorm(cfg.lrn, 1) if cfg.lrn != "none" else nn.Identity()
        self.lrn2 = LocalResponseNorm(cfg.lrn, 1) if cfg.lrn != "none" else nn.Identity()
        self.names = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
        for name in self.names:
            layer = getattr(full, name)
            setattr(self, name + "_weight", nn.Parameter(_rows(layer.weight, self.rank)))
            setattr(self, name + "_bias", nn.Parameter(_rows(layer.bias, self.rank)))
        self.conv1_args = (full.conv1.stride, full.conv1.padding)

    def forward(self, x: Tensor) -> Tensor:
        p = self.pool
        x = F.conv2d(x, self.conv1_weight, self.conv1_bias, *self.conv1_args)  # whole image, 48 kernels
        x = p(self.lrn1(self.act(x)))
        x = p(self.lrn2(self.act(F.conv2d(x, self.conv2_weight, self.conv2_bias, padding=2))))
        x = _gather(x, 1)  # conv3 sees both towers
        x = self.act(F.conv2d(x, self.conv3_weight, self.conv3_bias, padding=1))
        x = self.act(F.conv2d(x, self.conv4_weight, self.conv4_bias, padding=1))
        x = p(self.act(F.conv2d(x, self.conv5_weight, self.conv5_bias, padding=1)))
        # fc6 reads both towers' pool5 in the single model's (channel, y, x) order.
        x = torch.flatten(_gather(x, 1), 1)
        x = self.dropout(self.act(F.linear(x, self.fc6_weight, self.fc6_bias)))
        x = self.dropout(self.act(F.linear(_gather(x, 1), self.fc7_weight, self.fc7_bias)))
        x = F.linear(_gather(x, 1), self.fc8_weight, self.fc8_bias)
        return _gather(x, 1)  # (B, classes) on both ranks

    def tower_state(self, which: str = "param") -> dict[str, Tensor]:
        """This rank's half of every layer, named as in ``PaperAlexNet.state_dict()``
        (``which="grad"``: the gradients). Concatenating the two ranks' halves along
        dimension 0 gives the single model's tensors."""
        out = {}
        for name in self.names:
            for kind in ("weight", "bias"):
                t = getattr(self, f"{name}_{kind}")
                out[f"{name}.{kind}"] = t.grad if which == "grad" else t.detach()
        return out
