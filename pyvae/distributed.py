"""Data-parallel training in the processes ``torchrun`` starts.

    torchrun --nproc_per_node=4 examples/mnist_svi.py                 # 4 GPUs (or 4 CPU processes)
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 examples/mnist_svi.py  # each of 2 machines

Every process holds the whole model. In each step each process draws its own minibatch
from its shard of the data (a ``DistributedSampler``: one permutation per epoch, the same
in every process, dealt out so the shards are disjoint) and computes the loss of its
minibatch on the full-data scale, -(N/M) sum_{n in batch} L(x_n). The ELBO runs inside a
``torch.nn.Module`` wrapped in ``DistributedDataParallel``, which averages the gradients
of the processes during the backward pass (a compiled step averages them itself,
:meth:`World.average`): the average of W unbiased estimates of the gradient of the
full-data ELBO is one with W times the minibatch. Every process then takes
the same optimizer step, so the parameters stay identical. ``--batch-size`` is per
process; an epoch takes 1/W of the steps.

The processes talk over NCCL when training on GPUs (process r uses ``cuda:LOCAL_RANK``)
and gloo on CPUs. Only rank 0 writes checkpoints, metrics and pictures.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pyvae.errors import PyvaeError


@dataclass(frozen=True)
class World:
    """This process's place among the processes training together (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this process writes files and prints progress."""
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes (in place; itself when alone)."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` maximized elementwise over the processes (in place; itself when alone)."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def average(self, tensors: list[torch.Tensor]) -> None:
        """``tensors`` made their means over the processes, in place: one all-reduce of those of
        each dtype laid end to end (as ``DistributedDataParallel`` averages gradients, in
        buckets)."""
        if self.size > 1:
            for same in by_dtype(tensors):
                # divided first, as DDP does: a sum of half-precision gradients might overflow
                flat = _end_to_end(same) / self.size
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                _put_back(flat, same)

    def share(self, tensors: Iterable[torch.Tensor]) -> None:
        """``tensors`` set to rank 0's, in place: one broadcast of those of each dtype laid end
        to end (as ``DistributedDataParallel`` sends rank 0's buffers before each step)."""
        if self.size > 1:
            for same in by_dtype(tensors):
                flat = _end_to_end(same)
                dist.broadcast(flat, src=0)
                _put_back(flat, same)

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] in every process."""
        if self.size == 1:
            return [obj]
        objects = [None] * self.size
        dist.all_gather_object(objects, obj)
        return objects

    def broadcast(self, obj):
        """Rank 0's ``obj`` in every process."""
        if self.size == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    @contextmanager
    def local_main_first(self):
        """Run the block in the first process of each machine, then in the others (so that one
        process per machine downloads a data set and the others find it there)."""
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()


def by_dtype(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` in lists of one dtype each (what one collective or foreach kernel takes)."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


def _end_to_end(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One contiguous copy of ``tensors`` (a collective needs contiguous memory)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _put_back(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy :func:`_end_to_end`'s ``flat`` back into ``tensors``, each with its own strides."""
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(part.view(t.shape))


def sharded(fn, n: int, chunk: int, world: World) -> list | None:
    """``fn(start, stop)`` for the chunks [0, chunk), [chunk, 2 chunk), ... of n points, dealt out
    to the processes in turn; the results of all chunks in order on rank 0, None on the others.

    The chunk grid does not depend on the number of processes, so results seeded per chunk
    or per point are the same, bit for bit, with one process or many.
    """
    starts = range(0, n, chunk)
    mine = [
        (s, fn(s, min(s + chunk, n))) for i, s in enumerate(starts) if i % world.size == world.rank
    ]
    gathered = world.gather(mine)
    if not world.main:
        return None
    return [
        result
        for _, result in sorted(
            (pair for part in gathered for pair in part), key=lambda pair: pair[0]
        )
    ]


def launched() -> bool:
    """Whether this process is one of several started by torchrun (which sets WORLD_SIZE, RANK,
    LOCAL_RANK)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    """The world of the initialized process group, else a world of one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    )


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join torchrun's process group (once; a no-op outside torchrun and any initialized group)
    and return (world, this process's device).

    ``device`` is the device asked for: with CUDA each process takes ``cuda:LOCAL_RANK``
    and the group talks NCCL; on CPUs it talks gloo.
    """
    joined = dist.is_available() and dist.is_initialized()  # e.g. a group the caller set up itself
    if not (launched() or joined):
        return World(), device
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() if joined else 0))
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if visible == 1:  # a scheduler that shows each process its own GPU
            local_rank = 0
        elif local_rank >= visible:
            raise PyvaeError(
                f"LOCAL_RANK {local_rank} but only {visible} GPUs here; start at most one process "
                "per GPU (--nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # addresses from torchrun's environment
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave)
    return world(), device


def shutdown() -> None:
    """Leave the process group once every process has arrived here (a no-op outside one)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _leave() -> None:
    # at exit, perhaps after an error in this process alone: waiting for the others could hang
    if dist.is_initialized():
        dist.destroy_process_group()
