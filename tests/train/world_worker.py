"""One process of the 2-process test of ``World.average`` and ``World.share``: ``torchrun
--nproc_per_node=2 tests/train/world_worker.py OUT``. Each process makes tensors of its rank
(float32, one transposed, a float64 and a 0-d integer), averages one set and shares the other,
and leaves them in OUT/<rank>.pt."""

import sys
from pathlib import Path

import torch

from pyvae import distributed

world, _ = distributed.init(torch.device("cpu"))
r = float(world.rank)


def made() -> list[torch.Tensor]:
    return [
        torch.full((2, 3), r),
        torch.arange(6.0).reshape(3, 2).t() + r,  # strides (1, 2)
        torch.full((4,), r + 0.5, dtype=torch.float64),
        torch.tensor(7 + world.rank),
    ]


averaged, shared = made()[:3], made()
world.average(averaged)
world.share(shared)
torch.save({"averaged": averaged, "shared": shared}, Path(sys.argv[1]) / f"{world.rank}.pt")
