"""Training state: what a checkpoint holds besides the weights so that a stopped run resumes
exactly.

The state is versioned (``VERSION``): the step counter, the data-order seed, Adam's state,
every process's python/numpy/torch generators, and, for a stop inside an epoch, the place
in it. A checkpoint whose state has another version cannot be resumed (its weights still load).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyro
import torch

from pyvae import distributed
from pyvae.errors import PyvaeError, warn
from pyvae.runs import read

VERSION = 2


def rng_state() -> dict:
    """The states of python's, numpy's and torch's (CPU and CUDA) generators, as tensors and numbers
    (``torch.load(weights_only=True)`` reads them back)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [
            name,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def torch_rng(device: torch.device) -> tuple:
    """torch's generator states a training step draws from (the CPU's, and ``device``'s on a
    GPU): cheap to take before every step, so that a step a signal aborts can be undone."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_torch_rng(saved: tuple, device: torch.device) -> None:
    """Put back the states :func:`torch_rng` took."""
    cpu, cuda = saved
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(
            state["cuda"][: torch.cuda.device_count()]
        ):  # a machine may have fewer GPUs
            torch.cuda.set_rng_state(cuda_state, index)


def restore(
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    path: Path,
    world: distributed.World,
    schedule=None,
) -> tuple[list[dict], dict]:
    """Load weights, optimizer state, the learning-rate ``schedule``'s state (a
    :class:`pyvae.train.protocol.Schedule`; a different schedule is an error, raised before
    anything is loaded) and this process's generators; return (history, training state)."""

    payload = read(path)
    training = payload.get("training")
    if training is None or "history" not in payload:
        raise PyvaeError(
            f"{path} holds no training state to resume from (it was not written by fit)"
        )
    if training.get("version") != VERSION:
        raise PyvaeError(
            f"{path} was written by an older pyvae whose training state cannot be resumed; "
            "pyvae.load still reads its weights"
        )
    if schedule is not None:
        schedule.load_state_dict(training.get("schedule"), path)
    try:
        module.load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(training["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise PyvaeError(
            f"{path} does not match this model and optimizer: {str(e).splitlines()[0]}"
        ) from e
    written_by = len(training["rng"])
    if written_by == world.size:
        set_rng_state(training["rng"][world.rank])
    elif "step_in_epoch" in training:
        raise PyvaeError(
            f"{path} was written mid-epoch by {written_by} training process(es); resume it with "
            f"{written_by}, not {world.size} (each process's place in its shard of the epoch is "
            "part of the state)"
        )
    else:
        warn(
            f"{path} was written by {written_by} training process(es), resuming in {world.size}: "
            "training goes on after the last completed epoch, but not bit-identically to an "
            "uninterrupted run (the shards and each process's random generators differ, and a KL "
            "warm-up still under way moves to the new number of steps per epoch)"
        )
        pyro.set_rng_seed(training["order_seed"] + training["step"] + world.rank)
    training = dict(training)
    if "partial_total" in training:
        training["partial_total"] = training["partial_total"][world.rank]
    return list(payload["history"]), training
