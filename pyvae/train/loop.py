"""Training by stochastic variational inference: the loop.

Each step draws a minibatch of M of the N training points and takes an Adam step on
the objective of :mod:`pyvae.objectives` (a negative ELBO for the whole data set, the
data plate scaling the minibatch terms by N/M). The model is any module with Pyro
``model``/``guide`` methods (:mod:`pyvae.program`); its parameters go straight to a torch
optimizer, and :class:`pyvae.program.LocalParams` keeps them out of Pyro's global param
store. Under ``torchrun`` the objective module is wrapped in ``DistributedDataParallel``
(see :mod:`pyvae.distributed`). Checkpoints hold the training state of :mod:`pyvae.state`.

All ELBO numbers that leave this module are in nats per data point: the ELBO bounds
log p(x) from below (negative for probability masses such as the Bernoulli, possibly
positive for densities); the NLL is its negative.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pyro
import torch
from pyro import poutine
from tqdm.auto import tqdm

from pyvae import distributed
from pyvae.data.batching import (
    KINDS,
    Batches,
    check_data,
    fitting_batch_size,
    resolve_device,
    serving,
)
from pyvae.errors import PyvaeError, PyvaeWarning, positive_int, positive_number
from pyvae.parts.likelihoods import bits_per_dim, coding
from pyvae.program import LocalParams, structure
from pyvae.runs import atomic_write, save
from pyvae.train import protocol
from pyvae.train import resume as state
from pyvae.train.objectives import (
    Objective,
    choose_elbo,
    enumerable_sites,
    make_elbo,
    mean_field_violation,
    sites_without_analytic_kl,
)


def make_adam(params, lr: float) -> torch.optim.Adam:
    """Adam with torch's fused kernel where the device supports it (one kernel for all parameters
    instead of a Python loop over them); the plain implementation elsewhere. Same update rule."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def fit(
    model: torch.nn.Module,
    train,
    *,
    test=None,
    valid=None,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    lr_schedule: str = "none",
    patience: int | None = None,
    valid_samples: int = 0,
    elbo: str | pyro.infer.ELBO = "auto",
    num_particles: int = 1,
    beta: float = 1.0,
    kl_warmup_epochs: int = 0,
    kl_sites: list[str] | None = None,
    metrics: dict[str, Callable[[torch.nn.Module], float]] | None = None,
    clip_norm: float | None = None,
    device: str | torch.device = "auto",
    seed: int | None = None,
    out: str | Path | None = None,
    out_files: dict[str, str] | None = None,
    resume: bool = False,
    progress: bool = True,
    tensorboard=None,
    auxiliary=(),
    labelled_share: float | None = None,
) -> list[dict]:
    """Train ``model`` in place by SVI with Adam; return one dict per epoch.

    ``model`` is any module with Pyro ``model(*batch, num_data=None)`` and ``guide`` methods
    (:mod:`pyvae.program`); ``train``/``test`` are a tensor x, a tuple (x, y), an ImageSet or
    a Dataset, served as ``(x,)`` or ``(x, y)`` as the model's signature asks.
    ``elbo`` is ``trace``, ``meanfield``, ``iwae`` (with ``num_particles`` = K), ``enum``
    (``TraceEnum_ELBO``, for enumerated discrete guide sites), a ``pyro.infer.ELBO``, or ``auto``
    (:func:`pyvae.objectives.choose_elbo`: meanfield where the analytic KL is exact and available,
    enum for enumerated sites, else trace; said on stdout with ``progress``).
    ``beta`` weights the KL terms (beta-VAE) of all latent sites, or of ``kl_sites``; with
    ``kl_warmup_epochs`` > 0 the weight rises linearly, step by step, from 0 to ``beta``
    over that many epochs. ``metrics`` maps names to functions of the model computed after
    every epoch (e.g. a test accuracy) and recorded with the ELBOs.

    ``valid`` is held-out data (served like ``test``) scored after every epoch: ``valid_elbo`` (and
    ``valid_iwae`` for ``iwae``), and with ``valid_samples`` = K > 0 ``valid_log_px``, the
    importance-sampled log p(x) with K samples on at most :data:`VALID_IS_POINTS` points evenly
    spread over ``valid``. The validation objective (:mod:`pyvae.protocol`) is ``valid_log_px`` when
    computed, else ``valid_iwae`` when computed, else ``valid_elbo``: with ``out``, ``best.pt``
    holds the weights of the epoch where it was highest (the earliest on ties), written atomically
    before that epoch's ``checkpoint.pt``; with ``patience`` = P training stops once the best is P
    epochs old. ``lr_schedule`` is ``none``, ``iwae`` (Burda et al.'s 3^i-epoch stages at
    lr·10^(-i/7)), ``plateau`` (halved when the validation objective stalls) or ``cosine`` (over
    ``epochs``), stepped after every epoch; ``lr`` in each record is the rate the epoch trained
    with.

    Each dict has ``epoch``, ``train_elbo`` (the average of the minibatch values of
    the training objective during the epoch: the beta-weighted ELBO when beta is not 1,
    the IWAE bound for ``iwae``), ``beta`` (the KL weight at the end of the epoch),
    ``test_elbo`` (the plain ELBO, beta = 1, on ``test`` after the epoch, when given;
    for ``iwae`` also ``test_iwae``, the K-sample bound) and ``seconds``. All are in
    nats per data point. With ``out``, ``metrics.jsonl`` gets one line per epoch and
    ``checkpoint.pt`` is rewritten atomically after each, the one before kept as
    ``checkpoint.prev.pt``. The folder is made only once the input has been checked, together
    with ``out_files`` ({name: text}, e.g. the CLI's ``config.yaml``): a refused run writes nothing.

    ``clip_norm`` rescales the gradient to at most that total norm. A non-finite loss or
    gradient stops training with a :class:`PyvaeError` naming the epoch and step; the
    parameters are then not saved, so no checkpoint ever holds NaNs.

    With ``resume`` (and ``out``), training continues after the last completed epoch of
    ``out/checkpoint.pt``: weights, optimizer and learning-rate schedule state, step counter
    (the warm-up schedule), history and the random number generators of python, numpy and
    torch are restored, so an interrupted and resumed run reaches the same parameters as an
    uninterrupted one (and stops early where it does). Resuming with another ``lr_schedule``
    is an error.
    """
    positive_int("epochs", epochs)
    positive_int("batch_size", batch_size)
    positive_number("lr", lr)
    if clip_norm is not None:
        positive_number("clip_norm", clip_norm)
    # a log-density scale must be > 0
    positive_number("beta", beta)
    if (
        isinstance(kl_warmup_epochs, bool)
        or not isinstance(kl_warmup_epochs, int)
        or kl_warmup_epochs < 0
    ):
        raise PyvaeError(f"kl_warmup_epochs must be an integer >= 0; got {kl_warmup_epochs!r}")
    if isinstance(valid_samples, bool) or not isinstance(valid_samples, int) or valid_samples < 0:
        raise PyvaeError(f"valid_samples must be an integer >= 0; got {valid_samples!r}")
    protocol.check(patience, lr_schedule, valid is not None)
    # auto: chosen below
    objective = Objective(
        model, "trace" if elbo == "auto" else elbo, num_particles, kl_sites, auxiliary
    )
    if isinstance(objective.elbo, pyro.infer.RenyiELBO) and (beta != 1 or kl_warmup_epochs):
        raise PyvaeError(
            "beta and kl_warmup_epochs do not apply to elbo 'iwae' (a scaled latent site inside "
            "the log-mean-exp is not a beta-weighted bound); use trace or meanfield"
        )
    world, device = distributed.init(resolve_device(device))
    progress = progress and world.main

    train_batches = Batches(train, device, model, "training data", semi_supervised=True)
    test_batches = Batches(test, device, model, "test data") if test is not None else None
    valid_batches = Batches(valid, device, model, "validation data") if valid is not None else None
    for batches, split in (
        (train_batches, "training data"),
        (test_batches, "test data"),
        (valid_batches, "validation data"),
    ):
        if batches is not None:
            check_data(model, batches, split)
    batch_size = fitting_batch_size(batch_size, len(train_batches))
    shapes = world.gather(tuple(train_batches.images.shape))
    if len(set(shapes)) > 1:
        raise PyvaeError(
            f"the training processes hold different data sets, of shapes {shapes}; each must load "
            "the same one"
        )
    model.to(device)
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise PyvaeError(
            f"parameter {bad[0]} holds NaN or infinite values before training; rebuild or reload "
            "the model"
        )
    plan = serving(model, train_batches, batch_size, world, labelled_share)
    # the contract, checked before any step on each kind of call (the one with most latents leads)
    probes = plan.probes()
    shapes = [structure(model, probe) for probe in probes]
    probe, shape = max(zip(probes, shapes), key=lambda pair: len(pair[1].latent_sites))
    shape.max_plate_nesting = max(s.max_plate_nesting for s in shapes)
    if kl_sites is not None and set(kl_sites) - set(shape.latent_sites):
        unknown = sorted(set(kl_sites) - set(shape.latent_sites))[0]
        raise PyvaeError(
            f"kl_sites names {unknown!r}, which is not a latent site of the model; its latent "
            f"sites: {', '.join(shape.latent_sites)}"
        )
    # choose_elbo takes meanfield only where the checks below pass: not run twice
    chosen = elbo == "auto"
    if chosen:
        elbo, why = choose_elbo(model, probe, shape)
        objective.elbo = make_elbo(elbo, num_particles, vectorize=shape.vectorized)
        objective.enumerate = bool(enumerable_sites(model, probe))
        if world.main and progress:
            print(f"elbo auto: {elbo}, {why}")
    elif not shape.vectorized and num_particles > 1 and isinstance(elbo, str):
        objective.elbo = make_elbo(elbo, num_particles, vectorize=False)
    if not shape.vectorized and num_particles > 1 and progress:
        print(
            f"{type(model).__name__} cannot run with particles as a batch dimension: its "
            f"{num_particles} particles are drawn one at a time"
        )
    if shape.enumerated_sites and not isinstance(objective.elbo, pyro.infer.TraceEnum_ELBO):
        raise PyvaeError(
            f"the guide enumerates {', '.join(shape.enumerated_sites)}; train it with elbo 'enum' "
            "(TraceEnum_ELBO)"
        )
    objective.fill_plate_nesting(shape.max_plate_nesting)
    if isinstance(objective.elbo, pyro.infer.TraceMeanField_ELBO) and not chosen:
        violation = mean_field_violation(model, probe)
        if violation:
            raise PyvaeError(f"elbo 'meanfield' needs {violation}: use elbo 'trace'")
        missing = sites_without_analytic_kl(model, probe)
        if missing and world.main:
            warnings.warn_explicit(
                f"elbo 'meanfield': torch has no analytic KL for latent site {', '.join(missing)}; "
                "that term is estimated by Monte Carlo, exactly as elbo 'trace' does",
                PyvaeWarning,
                "pyvae",
                0,
            )
    # made only now that the input is known to be good: a refused run leaves nothing
    if out is not None:
        out = Path(out)
        if world.main:
            out.mkdir(parents=True, exist_ok=True)
            for name, text in (out_files or {}).items():
                atomic_write(out / name, lambda f, text=text: f.write(text.encode()))
    optimizer = make_adam(model.parameters(), lr)
    # before a resumed optimizer state: it sets the rate
    schedule = protocol.Schedule(lr_schedule, optimizer, epochs)
    objective_key = protocol.objective_key(elbo, valid_samples)
    num_data = len(train_batches)
    # one permutation of the data per epoch, drawn from (order_seed, epoch) alike in every process
    order_seed = world.broadcast(seed if seed is not None else int(torch.randint(2**31, ())))
    if seed is not None or world.size > 1:
        pyro.set_rng_seed(order_seed + world.rank)  # the processes draw different noise
    steps_per_epoch = plan.steps(order_seed)
    step = 0
    history, resumed = [], {}
    if resume:
        if out is None:
            raise PyvaeError(
                "resume needs out, the run folder whose checkpoint.pt to continue from"
            )
        history, resumed = state.restore(model, optimizer, out / "checkpoint.pt", world, schedule)
        step, order_seed = resumed["step"], resumed["order_seed"]
        if world.main:
            with open(
                out / "metrics.jsonl", "wb"
            ) as f:  # exactly the completed epochs: no torn or repeated lines
                f.write("".join(json.dumps(h) + "\n" for h in history).encode())
    # the loss as a module, so that DistributedDataParallel can average the gradients of the
    # processes (it also sends rank 0's buffers each step: a user's network may keep running
    # statistics)
    loss_of = objective if world.size == 1 else torch.nn.parallel.DistributedDataParallel(objective)

    def kl_weight_at(step: int) -> float:
        return (
            beta * min(1.0, step / (kl_warmup_epochs * steps_per_epoch))
            if kl_warmup_epochs
            else beta
        )

    def save_state(epoch: int, **partial) -> None:
        """Rank 0 writes the weights and what resuming needs; every process's generators
        included."""
        rngs = world.gather(state.rng_state())
        if world.main:
            training = {
                "version": state.VERSION,
                "step": step,
                "order_seed": order_seed,
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "rng": rngs,
                **partial,
            }
            save(
                model,
                out / "checkpoint.pt",
                keep_previous=True,
                epoch=epoch,
                history=history,
                training=training,
            )
        world.barrier()  # no process exits before the checkpoint is complete

    validated = False
    stop = StopOnSignal(enabled=out is not None)
    first_epoch = len(history) + 1
    try:
        for epoch in range(first_epoch, epochs + 1):
            if protocol.stalled(history, objective_key, patience):
                if progress:
                    _say_stopped_early(history, objective_key, patience)
                break
            model.train()
            epoch_lr = schedule.lr
            # a run stopped by a signal mid-epoch resumes inside it: the epoch's order is drawn
            # again, the batches already used are skipped, the generators go on from the stop
            done = resumed.get("step_in_epoch", 0) if epoch == first_epoch else 0
            start = time.perf_counter() - (resumed["partial_seconds"] if done else 0.0)
            sums = torch.zeros(len(KINDS), 3, device=device)
            if done:
                sums = resumed_sums(resumed["partial_total"], done * batch_size, device)
            bar = tqdm(
                plan.epoch(epoch, order_seed, done),
                total=steps_per_epoch,
                initial=done,
                desc=f"epoch {epoch}/{epochs}",
                leave=False,
                disable=not progress
                or not sys.stderr.isatty(),  # no carriage-return frames in log files
                file=sys.stderr,
            )
            for in_epoch, calls in enumerate(bar, start=done + 1):
                step += 1
                optimizer.zero_grad(set_to_none=True)
                # the first step runs with Pyro's and torch's validation (shapes, supports,
                # parameter constraints), which catches a broken model or part; the data were
                # checked above, so the remaining steps skip those checks (they cost about 5% of a
                # step on a CPU)
                with pyro.validation_enabled(
                    not validated and pyro.infer.util.is_validation_enabled()
                ):
                    losses = loss_of(calls, kl_weight_at(step))  # (model's, auxiliary) x calls
                loss = losses.sum()
                loss.backward()
                loss, losses = loss.detach(), losses.detach()
                validated = True
                grad_norm = (
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
                    if clip_norm
                    else None
                )
                bad_loss = not bool(torch.isfinite(loss))
                bad_gradient = grad_norm is not None and not bool(torch.isfinite(grad_norm))
                signum = stop.signum or 0
                # the processes stop together: on a fault or a signal in any of them
                if world.size > 1:
                    flags = torch.tensor([bad_loss, bad_gradient, signum], device=device)
                    bad_loss, bad_gradient, signum = world.max(flags).tolist()
                if bad_loss or bad_gradient:
                    raise PyvaeError(
                        _numerical_fault(epoch, in_epoch, "loss" if bad_loss else "gradient", out)
                    )
                optimizer.step()
                if tensorboard is not None and world.main:
                    tensorboard.step(step, loss, num_data)
                tally(sums, calls, losses)
                if signum:
                    partial_totals = world.gather(sums.tolist())
                    save_state(
                        epoch - 1,
                        step_in_epoch=in_epoch,
                        partial_total=partial_totals,
                        partial_seconds=time.perf_counter() - start,
                    )
                    raise TrainingStopped(
                        signum,
                        f"stopped by {signal.Signals(signum).name} at epoch {epoch}, step "
                        f"{in_epoch}; checkpoint written to {out / 'checkpoint.pt'}; continue with "
                        f"--resume {out}",
                    )
            # each process summed its shard; together they cover the (padded) data set once
            record = {
                "epoch": epoch,
                **train_elbos(world.sum(sums), plan.sizes),
                "beta": kl_weight_at(step),
            }
            if test_batches is not None:
                record["test_elbo"] = _shared_elbo(
                    model, test_batches, world, "trace" if elbo == "iwae" else elbo, shape=shape
                )
                if elbo == "iwae":
                    record["test_iwae"] = _shared_elbo(
                        model, test_batches, world, "iwae", num_particles, shape=shape
                    )
            if valid_batches is not None:
                record.update(
                    _validation(
                        model, valid_batches, world, elbo, num_particles, valid_samples, shape
                    )
                )
            for name, metric in (metrics or {}).items():
                model.eval()
                with torch.no_grad():
                    record[name] = float(metric(model))
            if (
                coded := coding(model)
            ) is not None:  # 8-bit images: the ELBOs also in bits per dimension
                record.update(
                    {f"{k}_bpd": bits_per_dim(record[k], coded[0]) for k in BPD_KEYS if k in record}
                )
            record["lr"] = epoch_lr
            schedule.step(record.get(objective_key))
            record["seconds"] = time.perf_counter() - start
            history.append(record)
            if tensorboard is not None and world.main:
                tensorboard.epoch(record, model)
            if progress:
                tqdm.write(
                    _epoch_line(record, epochs, num_particles, metrics, coded), file=sys.stdout
                )
            if out is not None:
                if world.main:
                    if protocol.best_epoch(history, objective_key) == (
                        epoch,
                        record.get(objective_key),
                    ):
                        # before checkpoint.pt: a run killed between the two redoes this epoch and
                        # writes it again
                        save(
                            model,
                            out / "best.pt",
                            epoch=epoch,
                            objective={objective_key: record[objective_key]},
                        )
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                save_state(epoch)
    finally:
        stop.restore()  # also when training fails: the caller's Ctrl-C must work again
    return history


def tally(sums: torch.Tensor, calls: list, losses: torch.Tensor) -> None:
    """Add one step to ``sums`` (kinds x [objective, model's loss, points],
    :data:`~pyvae.batching.KINDS`): each call's losses, which estimate the sum over its group's N_c
    points, weighted by M_c / N_c, so that over an epoch they sum the per-point losses of the points
    served."""
    for i, call in enumerate(calls):
        weight = call.args[0].shape[0] / call.group
        row = sums[KINDS.index(call.kind)]
        row[0] += losses[:, i].sum() * weight
        row[1] += losses[0, i] * weight
        row[2] += call.args[0].shape[0]


def resumed_sums(partial, points: int, device) -> torch.Tensor:
    """The accumulators :func:`tally` saved at a stop mid-epoch; a checkpoint of an older pyvae kept
    one number, the objective's sum over ``points`` points of single calls: their first row."""
    if isinstance(partial, (int, float)):
        sums = torch.zeros(len(KINDS), 3, device=device)
        sums[0] = torch.tensor([partial, partial, points], device=device)
        return sums
    return torch.tensor(partial, device=device)


def train_elbos(sums: torch.Tensor, sizes: dict) -> dict:
    """The epoch's ``train_elbo`` per point of the data set, sum_c N_c (objective per point of c) /
    N, and for semi-supervised steps ``train_elbo_labelled``/``_unlabelled``: the model's ELBO per
    point of each group (auxiliary losses left out)."""
    total = sum(sizes.values())
    means = {kind: sums[KINDS.index(kind)] for kind in sizes}
    record = {
        "train_elbo": -sum(n * float(means[k][0] / means[k][2]) for k, n in sizes.items()) / total
    }
    if len(sizes) > 1:
        record.update({f"train_elbo_{k}": -float(means[k][1] / means[k][2]) for k in sizes})
    return record


#: the validation log p(x) by importance sampling (``valid_samples``) uses at most this many points
VALID_IS_POINTS = 1000
#: numbers (points x samples x pixels) per chunk of that estimate, which bounds its memory
VALID_IS_CHUNK = 2**23


def _validation(
    model, valid: Batches, world, elbo, num_particles: int, valid_samples: int, shape
) -> dict:
    """The validation numbers of one epoch (nats per point, beta = 1): ``valid_elbo``, for ``iwae``
    ``valid_iwae``, and with ``valid_samples`` = K ``valid_log_px`` = mean_n log (1/K) sum_k w_nk on
    :data:`VALID_IS_POINTS` points evenly spread, which is the K-sample bound's estimate."""
    scores = {
        "valid_elbo": _shared_elbo(
            model, valid, world, "trace" if elbo == "iwae" else elbo, shape=shape
        )
    }
    if elbo == "iwae":
        scores["valid_iwae"] = _shared_elbo(model, valid, world, "iwae", num_particles, shape=shape)
    if valid_samples:
        points = torch.linspace(
            0, len(valid) - 1, min(len(valid), VALID_IS_POINTS), device=valid.images.device
        ).long()
        chunk = max(1, VALID_IS_CHUNK // (valid_samples * valid.images[0].numel()))
        scores["valid_log_px"] = _shared_elbo(
            model, valid, world, "iwae", valid_samples, chunk, shape, points
        )
    return scores


#: the per-epoch numbers also given in bits per dimension for an 8-bit likelihood
#: the numbers an epoch also reports in bits per dimension, and their labels in the epoch line
BPD_KEYS = {
    "train_elbo": "train",
    "test_elbo": "test",
    "test_iwae": "test IWAE",
    "valid_elbo": "valid",
    "valid_iwae": "valid IWAE",
    "valid_log_px": "valid log p(x)",
}


def _epoch_line(
    record: dict,
    epochs: int,
    num_particles: int,
    metrics: dict | None,
    coded: tuple[int, int] | None = None,
) -> str:
    """``epoch   5/10  train ELBO ...  test ELBO ...  valid ELBO ...  nats/point  lr ...  (4.4 s)``;
    for a likelihood that is a mass over ``coded`` = (pixels, levels), the same numbers in bits/dim
    after them."""
    parts = [f"epoch {record['epoch']:3d}/{epochs}  train ELBO {record['train_elbo']:9.3f}"]
    if "train_elbo_labelled" in record:
        parts.append(
            f"(labelled {record['train_elbo_labelled']:.3f}, unlabelled "
            f"{record['train_elbo_unlabelled']:.3f})"
        )
    for split in ("test", "valid"):
        if f"{split}_elbo" in record:
            parts.append(f"{split} ELBO {record[f'{split}_elbo']:9.3f}")
        if f"{split}_iwae" in record:
            parts.append(f"{split} IWAE-{num_particles} {record[f'{split}_iwae']:9.3f}")
    if "valid_log_px" in record:
        parts.append(f"valid log p(x) {record['valid_log_px']:9.3f}")
    parts.append("nats/point")
    if coded is not None:
        parts.append(
            f"bits/dim ({coded[1]} levels) "
            + "  ".join(
                f"{label} {record[f'{k}_bpd']:.4f}" for k, label in BPD_KEYS.items() if k in record
            )
        )
    parts += [f"{name} {record[name]:.3f}" for name in metrics or {}]
    parts.append(f"lr {record['lr']:.3g}  ({record['seconds']:.1f} s)")
    return "  ".join(parts)


def _say_stopped_early(history: list[dict], key: str, patience: int) -> None:
    epoch, value = protocol.best_epoch(history, key)
    tqdm.write(
        f"early stop after epoch {history[-1]['epoch']}: the validation {protocol.LABELS[key]} has "
        f"not improved for {history[-1]['epoch'] - epoch} epochs (patience {patience}); the best, "
        f"{value:.3f} nats/point, was epoch {epoch}",
        file=sys.stdout,
    )


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


@torch.no_grad()
def evaluate_elbo(
    model: torch.nn.Module,
    data,
    *,
    elbo: str | pyro.infer.ELBO = "trace",
    num_particles: int = 1,
    batch_size: int = 1000,
    device: str | torch.device | None = None,
) -> float:
    """The ELBO of ``model`` on ``data`` in nats per data point (a single-sample estimate per point
    by default), computed by running the model's own programs under ``elbo``.

    With ``elbo="iwae"`` and ``num_particles=K``, the K-sample importance-weighted bound instead.
    """
    if not isinstance(data, Batches):
        device = resolve_device(device or next(model.parameters()).device)
        data = Batches(data, device, model)
        check_data(model, data, "data")
    return _shared_elbo(model, data, distributed.World(), elbo, num_particles, batch_size)


@torch.no_grad()
def _shared_elbo(
    model: torch.nn.Module,
    data: Batches,
    world: distributed.World,
    elbo,
    num_particles: int = 1,
    batch_size: int = 1000,
    shape=None,
    points: torch.Tensor | None = None,
) -> float:
    """:func:`evaluate_elbo` with the points dealt out over the processes of ``world``; ``shape`` is
    the program's :class:`~pyvae.program.Structure` when the caller has traced it already;
    ``points`` the indices to score (default all)."""
    model.eval()
    shape = shape or structure(model, data.first())
    objective = make_elbo(elbo, num_particles, shape.max_plate_nesting, vectorize=shape.vectorized)
    points = torch.arange(len(data), device=data.images.device) if points is None else points
    mine = points[world.rank :: world.size]
    # the ELBO of the model alone: pyro.factor sites (training-only terms such as m2's classifier)
    # are left out
    program = poutine.block(
        model.model, hide_fn=lambda msg: msg["infer"].get("is_auxiliary", False)
    )
    with LocalParams():
        batches = data.select(mine, batch_size)
        total = sum(objective.loss(program, model.guide, *batch) for batch in batches)  # plain sums
    total = world.sum(torch.tensor(float(total), dtype=torch.float64, device=data.device))
    return -float(total) / len(points)


def _numerical_fault(epoch: int, step: int, what: str, out: Path | None) -> str:
    last = out / "checkpoint.pt" if out is not None and (out / "checkpoint.pt").is_file() else None
    return (
        f"non-finite {what} at epoch {epoch}, step {step}; likely causes: a learning rate too "
        "high, a likelihood scale too small for the data, or exploding decoder outputs (try a "
        f"lower --lr or --clip-norm); last good checkpoint: {last or 'none written yet'}"
    )
