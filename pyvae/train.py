"""Training by stochastic variational inference.

Each step draws a minibatch of M of the N training points and minimizes Pyro's
loss, the negative ELBO estimate for the whole data set (the data plate scales
the minibatch terms by N/M)::

    loss = -(N/M) * sum_{n in batch} E_q[ log p_theta(x_n|z) + log p(z) - log q_phi(z|x_n) ]

``Trace_ELBO`` estimates every term by Monte Carlo with reparameterized samples;
``TraceMeanField_ELBO`` replaces E_q[log p(z) - log q(z|x)] by the analytic
-KL(q(z|x) || p(z)) where one exists. Gradients go straight to a torch optimizer
over ``vae.parameters()``: no global param store is involved.

All ELBO numbers that leave this module are in nats per data point (negative:
the ELBO bounds log p(x) from below; the NLL is its negative).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from tqdm.auto import tqdm

from .checkpoint import save
from .data import ImageSet
from .errors import PyvaeError, positive_int, positive_number
from .model import VAE

ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}
DEVICES = ("auto", "cpu", "cuda")


def make_elbo(name: str, num_particles: int = 1) -> pyro.infer.ELBO:
    """The Pyro ELBO named ``name`` with ``num_particles`` vectorized particles."""
    if name not in ELBOS:
        raise PyvaeError(f"unknown elbo {name!r}; choose from {', '.join(ELBOS)}")
    positive_int("num_particles", num_particles)
    return ELBOS[name](num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; asking for CUDA without one is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise PyvaeError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise PyvaeError(f"device {device!r} requested but CUDA is not available here; use --device cpu or auto")
    return torch.device(device)


class Batches:
    """A data set held as one tensor, on the training device when it fits, served in minibatches.

    Holding the data on the device avoids a DataLoader round trip per step; a
    ``dynamic`` set is re-binarized on the device once per epoch.
    """

    def __init__(self, data: torch.Tensor | torch.utils.data.Dataset, device: torch.device) -> None:
        images, self.dynamic = _as_tensor(data)
        self.device = device
        self.images = images.to(device) if _fits(images, device) else images.pin_memory() if device.type == "cuda" else images

    def __len__(self) -> int:
        return self.images.shape[0]

    def epoch(self, batch_size: int, shuffle: bool = True):
        """Yield minibatches covering the data once (a fresh binarization when dynamic)."""
        images = torch.bernoulli(self.images) if self.dynamic else self.images
        n = len(self)
        order = torch.randperm(n, device=images.device) if shuffle else None
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size] if shuffle else slice(start, start + batch_size)
            yield images[idx].to(self.device, non_blocking=True)


def fit(
    vae: VAE,
    train: torch.Tensor | torch.utils.data.Dataset,
    *,
    test: torch.Tensor | torch.utils.data.Dataset | None = None,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    elbo: str = "trace",
    num_particles: int = 1,
    device: str | torch.device = "auto",
    seed: int | None = None,
    out: str | Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train ``vae`` in place by SVI with Adam; return one dict per epoch.

    Each dict has ``epoch``, ``train_elbo`` (the average of the minibatch estimates
    during the epoch), ``test_elbo`` (on ``test`` after the epoch, when given) and
    ``seconds``; ELBOs are in nats per data point. With ``out``, ``metrics.jsonl``
    gets one line per epoch and ``checkpoint.pt`` is rewritten atomically after each.
    """
    positive_int("epochs", epochs)
    positive_int("batch_size", batch_size)
    positive_number("lr", lr)
    objective = make_elbo(elbo, num_particles)
    device = resolve_device(device)
    if seed is not None:
        pyro.set_rng_seed(seed)

    train_batches = Batches(train, device)
    test_batches = Batches(test, device) if test is not None else None
    for batches, split in ((train_batches, "training"), (test_batches, "test")):
        if batches is not None:
            _check_data(vae, batches, split)
    if batch_size > len(train_batches):
        raise PyvaeError(f"batch_size {batch_size} is larger than the training set ({len(train_batches)} points)")
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)

    vae.to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    num_data = len(train_batches)
    history = []
    for epoch in range(1, epochs + 1):
        vae.train()
        start = time.perf_counter()
        total = torch.zeros((), device=device)
        bar = tqdm(
            train_batches.epoch(batch_size),
            total=math.ceil(num_data / batch_size),
            desc=f"epoch {epoch}/{epochs}",
            leave=False,
            disable=not progress,
            file=sys.stderr,
        )
        for x in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = objective.differentiable_loss(vae.model, vae.guide, x, num_data)
            loss.backward()
            optimizer.step()
            # loss estimates the sum over all N points; weight by M/N so the epoch total sums them once
            total += loss.detach() * (x.shape[0] / num_data)
        record = {"epoch": epoch, "train_elbo": -total.item() / num_data}
        if test_batches is not None:
            record["test_elbo"] = evaluate_elbo(vae, test_batches, elbo=elbo)
        record["seconds"] = time.perf_counter() - start
        history.append(record)
        if progress:
            test_part = f"  test ELBO {record['test_elbo']:9.3f}" if "test_elbo" in record else ""
            tqdm.write(
                f"epoch {epoch:3d}/{epochs}  train ELBO {record['train_elbo']:9.3f}{test_part}  "
                f"nats/point  ({record['seconds']:.1f} s)",
                file=sys.stdout,
            )
        if out is not None:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            save(vae, out / "checkpoint.pt", epoch=epoch, history=history)
    return history


@torch.no_grad()
def evaluate_elbo(
    vae: VAE,
    data: torch.Tensor | torch.utils.data.Dataset | Batches,
    *,
    elbo: str = "trace",
    num_particles: int = 1,
    batch_size: int = 1000,
    device: str | torch.device | None = None,
) -> float:
    """The ELBO of ``vae`` on ``data`` in nats per data point (a single-sample estimate per point by default)."""
    objective = make_elbo(elbo, num_particles)
    if not isinstance(data, Batches):
        device = resolve_device(device or next(vae.parameters()).device)
        data = Batches(data, device)
    vae.eval()
    total = 0.0
    for x in data.epoch(batch_size, shuffle=False):
        total += objective.loss(vae.model, vae.guide, x)  # num_data = batch: the plain sum over the chunk
    return -total / len(data)


def _as_tensor(data) -> tuple[torch.Tensor, bool]:
    """(images, dynamic) from a tensor, an :class:`ImageSet` or any map-style Dataset of images."""
    if isinstance(data, ImageSet):
        images, dynamic = data.images, data.dynamic
    elif isinstance(data, torch.Tensor):
        images, dynamic = data, False
    elif isinstance(data, torch.utils.data.Dataset):
        items = [data[i] for i in range(len(data))]
        images = torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])
        dynamic = False
    else:
        raise PyvaeError(f"data must be a tensor of shape (N, x_dim) or a Dataset; got {type(data).__name__}")
    if images.ndim != 2 or images.shape[0] == 0:
        raise PyvaeError(f"data must have shape (N, x_dim) with N > 0; got {tuple(images.shape)}")
    if not images.is_floating_point():
        images = images.float()
    return images, dynamic


def _fits(images: torch.Tensor, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return images.numel() * images.element_size() < free // 4


def _check_data(vae: VAE, batches: Batches, split: str) -> None:
    if batches.images.shape[1] != vae.x_dim:
        raise PyvaeError(f"{split} data has {batches.images.shape[1]} features per point; the VAE expects x_dim={vae.x_dim}")
    sample = torch.bernoulli(batches.images) if batches.dynamic else batches.images
    vae.likelihood.check_support(sample)
