"""Training by stochastic variational inference.

Each step draws a minibatch of M of the N training points and minimizes Pyro's
loss, the negative ELBO estimate for the whole data set (the data plate scales
the minibatch terms by N/M)::

    loss = -(N/M) * sum_{n in batch} E_q[ log p_theta(x_n|z) + log p(z) - log q_phi(z|x_n) ]

``Trace_ELBO`` estimates every term by Monte Carlo with reparameterized samples;
``TraceMeanField_ELBO`` replaces E_q[log p(z) - log q(z|x)] by the analytic
-KL(q(z|x) || p(z)) where one exists (for pairs without one, such as mixture, Vamp
or flow priors and flow guides, Pyro estimates that term by Monte Carlo: we warn
and go on, so ``meanfield`` then equals ``trace``). :class:`IWAE` (Pyro's
``RenyiELBO`` at alpha = 0) with K vectorized particles is the IWAE bound, a
log-mean-exp over the K importance weights of each data point separately::

    L_K(x) = E[ log (1/K) sum_k p(x, z_k) / q(z_k|x) ],   z_k ~ q(z|x)

The loss is computed by a module, :class:`Objective`, and its gradients go straight to
a torch optimizer over ``vae.parameters()``: no global param store is involved. Under
``torchrun`` that module is wrapped in ``DistributedDataParallel`` (see
:mod:`pyvae.distributed`).

All ELBO numbers that leave this module are in nats per data point: the ELBO bounds
log p(x) from below (negative for probability masses such as the Bernoulli, possibly
positive for densities); the NLL is its negative.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import get_dependent_plate_dims, torch_sum
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import save
from .data import ImageSet
from .errors import PyvaeError, positive_int, positive_number
from .model import VAE

DEVICES = ("auto", "cpu", "cuda")


def make_elbo(name: str, num_particles: int = 1) -> pyro.infer.ELBO:
    """The Pyro ELBO named ``name`` with ``num_particles`` vectorized particles."""
    if name not in ELBOS:
        raise PyvaeError(f"unknown elbo {name!r}; choose from {', '.join(ELBOS)}")
    positive_int("num_particles", num_particles)
    return ELBOS[name](num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1)


def make_adam(params, lr: float) -> torch.optim.Adam:
    """Adam with torch's fused kernel where the device supports it (one kernel for all parameters
    instead of a Python loop over them); the plain implementation elsewhere. Same update rule."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


class IWAE(RenyiELBO):
    """The IWAE bound, Renyi's alpha = 0, with a :meth:`differentiable_loss` (``RenyiELBO`` only has
    ``loss_and_grads``, which runs its own backward pass and so cannot sit inside a module that
    ``DistributedDataParallel`` wraps).

    With K reparameterized particles and log w_k = log p(x, z_k) - log q(z_k|x) per data point,
    the loss is -sum_n log (1/K) sum_k w_nk; its gradient is the IWAE gradient, the
    normalized-weight average of the particles' gradients, which Pyro's surrogate also gives.
    """

    def __init__(self, num_particles: int = 1, **kwargs) -> None:
        super().__init__(alpha=0.0, num_particles=num_particles, **kwargs)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_weights = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
            log_w = 0.0
            for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
                for site in trace.nodes.values():
                    if site["type"] != "sample":
                        continue
                    if sign < 0 and not site["fn"].has_rsample:
                        raise NotImplementedError(f"IWAE needs a reparameterized guide; site {site['name']!r} is not")
                    log_w = log_w + sign * torch_sum(site["log_prob"], sum_dims)
            log_weights.append(log_w)
        # vectorized particles arrive as one trace with a leading particle dimension
        log_w = log_weights[0] if self.vectorize_particles and self.num_particles > 1 else torch.stack(log_weights)
        return -(torch.logsumexp(log_w, dim=0) - math.log(self.num_particles)).sum()


ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO, "iwae": IWAE}


class Objective(torch.nn.Module):
    """A training objective as a module: ``objective(x, num_data, beta)`` is the loss on the
    full-data scale, -(estimate of sum_n L(x_n)), differentiable in ``vae``'s parameters.

    Being a module holding ``vae``, it can be wrapped in ``DistributedDataParallel``
    (Pyro's ``ELBOModule`` idea, for a model and guide that are methods of one module).

    ``trace`` and ``meanfield`` get the plate scale N/M from Pyro. ``iwae`` is different:
    Pyro's ``RenyiELBO`` multiplies each site's log-density by its scale *before* the
    log-mean-exp over particles, which with a subsampled plate would give
    log mean_k exp((N/M) log w_k) instead of (N/M) log mean_k w_k. So the IWAE bound is
    computed on the minibatch alone (plate of size M, scale 1) and multiplied by N/M here.
    """

    def __init__(self, vae: VAE, name: str, num_particles: int = 1) -> None:
        super().__init__()
        self.vae = vae
        self.name = name
        self.elbo = make_elbo(name, num_particles)

    def forward(self, x: torch.Tensor, num_data: int, beta: float = 1.0) -> torch.Tensor:
        if self.name == "iwae":
            return self.elbo.differentiable_loss(self.vae.model, self.vae.guide, x) * (num_data / x.shape[0])
        return self.elbo.differentiable_loss(self.vae.model, self.vae.guide, x, num_data, beta)


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
    ``dynamic`` set is binarized afresh, on the device, each time a minibatch is served.
    """

    def __init__(self, data: torch.Tensor | torch.utils.data.Dataset, device: torch.device) -> None:
        images, self.dynamic = as_images(data)
        self.device = device
        self.images = images.to(device) if _fits(images, device) else images.pin_memory() if device.type == "cuda" else images

    def __len__(self) -> int:
        return self.images.shape[0]

    def in_order(self, batch_size: int):
        """Minibatches covering the data once, in order."""
        for start in range(0, len(self), batch_size):
            yield self._serve(slice(start, start + batch_size))

    def sampler(self, seed: int, world: distributed.World) -> DistributedSampler:
        """This process's ``DistributedSampler``: its share of one permutation per epoch, drawn from
        (``seed``, epoch) alike in every process, so the shards are disjoint and equally long
        (padded by repeating points when the processes do not divide N); ``len`` is that length."""
        return DistributedSampler(range(len(self)), num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed)

    def shard(self, epoch: int, seed: int, world: distributed.World) -> torch.Tensor:
        """The indices this process trains on in ``epoch`` (see :meth:`sampler`)."""
        sampler = self.sampler(seed, world)
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler), device=self.images.device)

    def select(self, indices: torch.Tensor, batch_size: int, skip: int = 0):
        """Minibatches of the points at ``indices`` in that order, after ``skip`` minibatches."""
        for start in range(skip * batch_size, len(indices), batch_size):
            yield self._serve(indices[start : start + batch_size])

    def _serve(self, idx) -> torch.Tensor:
        x = self.images[idx].to(self.device, non_blocking=True)
        return torch.bernoulli(x) if self.dynamic else x


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
    beta: float = 1.0,
    kl_warmup_epochs: int = 0,
    clip_norm: float | None = None,
    device: str | torch.device = "auto",
    seed: int | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Train ``vae`` in place by SVI with Adam; return one dict per epoch.

    ``elbo`` is ``trace``, ``meanfield`` or ``iwae`` (with ``num_particles`` = K).
    ``beta`` weights the KL term (beta-VAE); with ``kl_warmup_epochs`` > 0 the
    weight rises linearly, step by step, from 0 to ``beta`` over that many epochs.

    Each dict has ``epoch``, ``train_elbo`` (the average of the minibatch values of
    the training objective during the epoch: the beta-weighted ELBO when beta is not 1,
    the IWAE bound for ``iwae``), ``beta`` (the KL weight at the end of the epoch),
    ``test_elbo`` (the plain ELBO, beta = 1, on ``test`` after the epoch, when given;
    for ``iwae`` also ``test_iwae``, the K-sample bound) and ``seconds``. All are in
    nats per data point. With ``out``, ``metrics.jsonl`` gets one line per epoch and
    ``checkpoint.pt`` is rewritten atomically after each, the one before kept as
    ``checkpoint.prev.pt``.

    ``clip_norm`` rescales the gradient to at most that total norm. A non-finite loss or
    gradient stops training with a :class:`PyvaeError` naming the epoch and step; the
    parameters are then not saved, so no checkpoint ever holds NaNs.

    With ``resume`` (and ``out``), training continues after the last completed epoch of
    ``out/checkpoint.pt``: weights, optimizer state, step counter (the warm-up schedule),
    history and the random number generators of python, numpy and torch are restored, so
    an interrupted and resumed run reaches the same parameters as an uninterrupted one.
    """
    positive_int("epochs", epochs)
    positive_int("batch_size", batch_size)
    positive_number("lr", lr)
    if clip_norm is not None:
        positive_number("clip_norm", clip_norm)
    # poutine.scale needs a scale > 0
    positive_number("beta", beta)
    if isinstance(kl_warmup_epochs, bool) or not isinstance(kl_warmup_epochs, int) or kl_warmup_epochs < 0:
        raise PyvaeError(f"kl_warmup_epochs must be an integer >= 0; got {kl_warmup_epochs!r}")
    if elbo == "iwae" and (beta != 1 or kl_warmup_epochs):
        raise PyvaeError(
            "beta and kl_warmup_epochs do not apply to elbo 'iwae' (a scaled latent site inside the "
            "log-mean-exp is not a beta-weighted bound); use trace or meanfield"
        )
    objective = Objective(vae, elbo, num_particles)
    world, device = distributed.init(resolve_device(device))
    progress = progress and world.main

    train_batches = Batches(train, device)
    test_batches = Batches(test, device) if test is not None else None
    for batches, split in ((train_batches, "training"), (test_batches, "test")):
        if batches is not None:
            _check_data(vae, batches, split)
    if batch_size > len(train_batches):
        raise PyvaeError(f"batch_size {batch_size} is larger than the training set ({len(train_batches)} points)")
    shapes = world.gather(tuple(train_batches.images.shape))
    if len(set(shapes)) > 1:
        raise PyvaeError(f"the training processes hold different data sets, of shapes {shapes}; each must load the same one")
    if out is not None:
        out = Path(out)
        if world.main:
            out.mkdir(parents=True, exist_ok=True)

    vae.to(device)
    bad = [name for name, p in vae.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise PyvaeError(f"parameter {bad[0]} holds NaN or infinite values before training; rebuild or reload the model")
    if elbo == "meanfield" and world.main:
        _warn_if_no_analytic_kl(vae, train_batches.images[:2].to(device))
    optimizer = make_adam(vae.parameters(), lr)
    num_data = len(train_batches)
    # one permutation of the data per epoch, drawn from (order_seed, epoch) alike in every process
    order_seed = world.broadcast(seed if seed is not None else int(torch.randint(2**31, ())))
    if seed is not None or world.size > 1:
        pyro.set_rng_seed(order_seed + world.rank)  # the processes draw different noise
    shard_size = len(train_batches.sampler(order_seed, world))
    steps_per_epoch = math.ceil(shard_size / batch_size)
    step = 0
    history, resumed = [], {}
    if resume:
        if out is None:
            raise PyvaeError("resume needs out, the run folder whose checkpoint.pt to continue from")
        history, resumed = _restore(vae, optimizer, out / "checkpoint.pt", world)
        step, order_seed = resumed["step"], resumed["order_seed"]
        if world.main:
            with open(out / "metrics.jsonl", "wb") as f:  # exactly the completed epochs: no torn or repeated lines
                f.write("".join(json.dumps(h) + "\n" for h in history).encode())
    # the loss as a module, so that DistributedDataParallel can average the gradients of the processes
    # (it also sends rank 0's buffers each step: a user's network may keep running statistics)
    loss_of = objective if world.size == 1 else torch.nn.parallel.DistributedDataParallel(objective)

    def kl_weight_at(step: int) -> float:
        return beta * min(1.0, step / (kl_warmup_epochs * steps_per_epoch)) if kl_warmup_epochs else beta

    def save_state(epoch: int, **partial) -> None:
        """Rank 0 writes the weights and what resuming needs; every process's generators included."""
        rngs = world.gather(rng_state())
        if world.main:
            training = {"step": step, "order_seed": order_seed, "optimizer": optimizer.state_dict(), "rng": rngs, **partial}
            save(vae, out / "checkpoint.pt", keep_previous=True, epoch=epoch, history=history, training=training)
        world.barrier()  # no process exits before the checkpoint is complete

    validated = False
    stop = StopOnSignal(enabled=out is not None)
    first_epoch = len(history) + 1
    try:
        for epoch in range(first_epoch, epochs + 1):
            vae.train()
            # a run stopped by a signal mid-epoch resumes inside it: the epoch's order is drawn
            # again, the batches already used are skipped, the generators go on from the stop
            done = resumed.get("step_in_epoch", 0) if epoch == first_epoch else 0
            start = time.perf_counter() - (resumed["partial_seconds"] if done else 0.0)
            total = torch.full((), resumed["partial_total"] if done else 0.0, device=device)
            batches = train_batches.select(train_batches.shard(epoch, order_seed, world), batch_size, skip=done)
            bar = tqdm(
                batches,
                total=steps_per_epoch,
                initial=done,
                desc=f"epoch {epoch}/{epochs}",
                leave=False,
                disable=not progress,
                file=sys.stderr,
            )
            for in_epoch, x in enumerate(bar, start=done + 1):
                step += 1
                optimizer.zero_grad(set_to_none=True)
                # the first step runs with Pyro's and torch's validation (shapes, supports, parameter
                # constraints), which catches a broken model or part; the data were checked above, so
                # the remaining steps skip those checks (they cost about 5% of a step on a CPU)
                with pyro.validation_enabled(not validated and pyro.infer.util.is_validation_enabled()):
                    loss = loss_of(x, num_data, kl_weight_at(step))
                loss.backward()
                loss = loss.detach()
                validated = True
                grad_norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), clip_norm) if clip_norm else None
                bad_loss = not bool(torch.isfinite(loss))
                bad_gradient = grad_norm is not None and not bool(torch.isfinite(grad_norm))
                signum = stop.signum or 0
                if world.size > 1:  # the processes stop together: on a fault or a signal in any of them
                    flags = torch.tensor([bad_loss, bad_gradient, signum], device=device)
                    bad_loss, bad_gradient, signum = world.max(flags).tolist()
                if bad_loss or bad_gradient:
                    raise PyvaeError(_numerical_fault(epoch, in_epoch, "loss" if bad_loss else "gradient", out))
                optimizer.step()
                # loss estimates the sum over all N points; weight by M/N so the epoch total sums them once
                total += loss * (x.shape[0] / num_data)
                if signum:
                    partial_totals = world.gather(float(total))
                    save_state(epoch - 1, step_in_epoch=in_epoch, partial_total=partial_totals, partial_seconds=time.perf_counter() - start)
                    raise TrainingStopped(
                        signum,
                        f"stopped by {signal.Signals(signum).name} at epoch {epoch}, step {in_epoch}; "
                        f"checkpoint written to {out / 'checkpoint.pt'}; continue with --resume {out}",
                    )
            # each process summed its shard; together they cover the (padded) data set once
            record = {"epoch": epoch, "train_elbo": -float(world.sum(total)) / (shard_size * world.size), "beta": kl_weight_at(step)}
            if test_batches is not None:
                record["test_elbo"] = _shared_elbo(vae, test_batches, world, "trace" if elbo == "iwae" else elbo)
                if elbo == "iwae":
                    record["test_iwae"] = _shared_elbo(vae, test_batches, world, "iwae", num_particles)
            record["seconds"] = time.perf_counter() - start
            history.append(record)
            if progress:
                test_part = f"  test ELBO {record['test_elbo']:9.3f}" if "test_elbo" in record else ""
                if "test_iwae" in record:
                    test_part += f"  test IWAE-{num_particles} {record['test_iwae']:9.3f}"
                tqdm.write(
                    f"epoch {epoch:3d}/{epochs}  train ELBO {record['train_elbo']:9.3f}{test_part}  "
                    f"nats/point  ({record['seconds']:.1f} s)",
                    file=sys.stdout,
                )
            if out is not None:
                if world.main:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                save_state(epoch)
    finally:
        stop.restore()  # also when training fails: the caller's Ctrl-C must work again
    return history


class TrainingStopped(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM after writing a checkpoint it can resume from."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class StopOnSignal:
    """Turns SIGINT and SIGTERM into a request to stop after the current step (main thread only)."""

    def __init__(self, enabled: bool = True) -> None:
        self.signum: int | None = None
        self.previous = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._request)

    def _request(self, signum, frame) -> None:
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def rng_state() -> dict:
    """The states of python's, numpy's and torch's (CPU and CUDA) generators, as tensors and numbers
    (``torch.load(weights_only=True)`` reads them back)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):  # a machine may have fewer GPUs
            torch.cuda.set_rng_state(cuda_state, index)


def _restore(vae: VAE, optimizer: torch.optim.Optimizer, path: Path, world: distributed.World) -> tuple[list[dict], dict]:
    """Load weights, optimizer state and this process's generators; return (history, training state)."""
    from .checkpoint import read

    payload = read(path)
    training = payload.get("training")
    if training is None or "history" not in payload:
        raise PyvaeError(f"{path} holds no training state to resume from (it was not written by fit)")
    if not isinstance(training.get("rng"), list):
        raise PyvaeError(f"{path} was written by an older pyvae whose training state cannot be resumed; pyvae.load still reads its weights")
    try:
        vae.load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(training["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise PyvaeError(f"{path} does not match this model and optimizer: {str(e).splitlines()[0]}") from e
    written_by = len(training["rng"])
    if written_by == world.size:
        set_rng_state(training["rng"][world.rank])
    elif "step_in_epoch" in training:
        raise PyvaeError(
            f"{path} was written mid-epoch by {written_by} training process(es); resume it with {written_by}, "
            f"not {world.size} (each process's place in its shard of the epoch is part of the state)"
        )
    else:
        warnings.warn(
            f"{path} was written by {written_by} training process(es), resuming in {world.size}: training goes on "
            "after the last completed epoch, but not bit-identically to an uninterrupted run (the shards and "
            "each process's random generators differ, and a KL warm-up still under way moves to the new "
            "number of steps per epoch)",
            stacklevel=3,
        )
        pyro.set_rng_seed(training["order_seed"] + training["step"] + world.rank)
    training = dict(training)
    if "partial_total" in training:
        training["partial_total"] = training["partial_total"][world.rank]
    return list(payload["history"]), training


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
    """The ELBO of ``vae`` on ``data`` in nats per data point (a single-sample estimate per point by default).

    With ``elbo="iwae"`` and ``num_particles=K``, the K-sample importance-weighted bound instead.
    """
    if not isinstance(data, Batches):
        device = resolve_device(device or next(vae.parameters()).device)
        data = Batches(data, device)
    return _shared_elbo(vae, data, distributed.World(), elbo, num_particles, batch_size)


@torch.no_grad()
def _shared_elbo(
    vae: VAE, data: Batches, world: distributed.World, elbo: str, num_particles: int = 1, batch_size: int = 1000
) -> float:
    """:func:`evaluate_elbo` with the points dealt out over the processes of ``world``."""
    objective = make_elbo(elbo, num_particles)
    vae.eval()
    mine = torch.arange(world.rank, len(data), world.size, device=data.images.device)
    total = sum(objective.loss(vae.model, vae.guide, x) for x in data.select(mine, batch_size))  # plain sums per chunk
    total = world.sum(torch.tensor(float(total), dtype=torch.float64, device=data.device))
    return -float(total) / len(data)


def as_images(data) -> tuple[torch.Tensor, bool]:
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


def _numerical_fault(epoch: int, step: int, what: str, out: Path | None) -> str:
    last = out / "checkpoint.pt" if out is not None and (out / "checkpoint.pt").is_file() else None
    return (
        f"non-finite {what} at epoch {epoch}, step {step}; likely causes: a learning rate too high, "
        "a likelihood scale too small for the data, or exploding decoder outputs (try a lower --lr or --clip-norm); "
        f"last good checkpoint: {last or 'none written yet'}"
    )


def _warn_if_no_analytic_kl(vae: VAE, x: torch.Tensor) -> None:
    from torch.distributions import kl_divergence

    with torch.no_grad():
        q = vae.encode(x)
        try:
            kl_divergence(q, vae.prior().expand(q.batch_shape))
        except NotImplementedError:
            warnings.warn(
                f"elbo 'meanfield': no analytic KL between guide {vae.config['guide']['name']!r} "
                f"and prior {vae.config['prior']['name']!r}; that term is estimated by Monte Carlo, "
                "exactly as elbo 'trace' does",
                stacklevel=3,
            )


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
