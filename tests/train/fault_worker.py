"""`alexnet` with a fault injected, for the restart tests of test_distributed.py: run by torchrun as a script.

ALEXNET_FAULT_KILL_AT_STEP=N: rank ALEXNET_FAULT_RANK (default 1) dies abruptly
(os._exit(17)) after optimizer step N, on torchrun's first attempt only
(TORCHELASTIC_RESTART_COUNT 0), so a restarted job runs clean.
"""

from __future__ import annotations

import os
import sys

from alexnet.cli import main
from alexnet.train import distributed, loop
from alexnet.train.distributed import Dist


def install() -> None:
    kill_at = int(os.environ["ALEXNET_FAULT_KILL_AT_STEP"])
    rank = int(os.environ.get("ALEXNET_FAULT_RANK", "1"))

    def kill(step: int, dist: Dist) -> None:
        if step == kill_at and dist.rank == rank and distributed.restart_count() == 0:
            os._exit(17)

    loop.after_step_hooks.append(kill)


if __name__ == "__main__":
    install()
    sys.exit(main(sys.argv[1:]))
