"""The two-tower model parallel layout (towers.py) against the single-process grouped model.

Two gloo processes each hold one tower; outputs and every gradient must equal those of
PaperAlexNet with grouped convolutions on one process (the reference), to float rounding.
"""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from alexnet.models.alexnet import ModelConfig, build_model

CFG = dict(
    width=0.125, fc_width=32, conv1_kernel=5, conv1_stride=1, input_size=28, num_classes=10, init="kaiming", dropout=0.0
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tower_worker(rank: int, port: int) -> None:
    from alexnet.models.towers import TowerParallelAlexNet

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        full = build_model(ModelConfig(**CFG))
        x = torch.randn(6, 3, 28, 28)
        labels = torch.arange(6) % 10
        ref_logits = full(x)
        F.cross_entropy(ref_logits, labels).backward()

        tower = TowerParallelAlexNet(full)
        logits = tower(x)
        # Every rank computes the same loss; the gathers' backward sums the two halves.
        (F.cross_entropy(logits, labels) / 2).backward()
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        params, grads = tower.tower_state("param"), tower.tower_state("grad")
        for name, p in full.named_parameters():
            torch.testing.assert_close(params[name], p.detach().chunk(2)[rank], rtol=0, atol=0, msg=name)
            torch.testing.assert_close(grads[name], p.grad.chunk(2)[rank], atol=1e-5, rtol=1e-4, msg=name)
        assert len(grads) == len(list(full.parameters()))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_towers_on_two_ranks_equal_the_grouped_model():
    mp.spawn(_tower_worker, args=(_free_port(),), nprocs=2, join=True)


def test_the_layout_refuses_a_single_process():
    from alexnet.errors import AlexNetError
    from alexnet.models.towers import TowerParallelAlexNet

    with pytest.raises(AlexNetError, match="exactly 2 ranks"):
        TowerParallelAlexNet(build_model(ModelConfig(**CFG)))
