"""The numbers of an epoch beyond training's: ELBOs on the test and validation sets, the
validation log p(x) by importance sampling, the user's metrics (:class:`Validation`).

Each is a Pyro ELBO's loss run over the data in batches (:func:`shared_elbo`), all with beta = 1 in
nats per point. A run that compiles (``compile``) scores them compiled too (:class:`BatchLosses`):
each kind of batch is recorded once from the same ELBO and programs, and compiled with the model's
parameters read at every call, so that one compilation serves every epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pyro
import torch
from pyro import poutine

from pyvae import distributed
from pyvae.compiled import (
    Compiled,
    NotCompiled,
    Recordings,
    Watched,
    compile_function,
    describe,
)
from pyvae.data.batching import Batches
from pyvae.infer.importance import compiles
from pyvae.parts.likelihoods import bits_per_dim, coding
from pyvae.program import (
    LocalParams,
    Unscaled,
    evaluates,
    evaluating,
    invalid_named,
    recordable,
    structure,
)
from pyvae.train.callbacks import BPD_KEYS
from pyvae.train.objectives import IWAE, make_elbo

#: the validation log p(x) by importance sampling (``valid_samples``) uses at most this many points
VALID_IS_POINTS = 1000
#: numbers (points x samples x pixels) per chunk of that estimate, which bounds its memory
VALID_IS_CHUNK = 2**23


class Validation:
    """The numbers of an epoch beyond training's, all with beta = 1 in nats per point:
    ``test_elbo`` (``test_iwae`` for ``iwae``) on ``test``; ``valid_elbo`` (``valid_iwae``) on
    ``valid``, with ``valid_samples`` = K also ``valid_log_px`` = mean_n log (1/K) sum_k w_nk on
    :data:`VALID_IS_POINTS` points evenly spread, the K-sample bound's estimate; each of
    ``metrics`` (a function of the model); for 8-bit images the ELBOs in bits per dimension.
    With ``compile`` ``on``, or ``auto`` and at least :data:`pyvae.infer.importance.AUTO_DRAWS`
    draws over the run's epochs, the ELBOs are computed compiled (:class:`BatchLosses`)."""

    def __init__(self, model, test, valid, world, shape, settings: dict) -> None:
        self.model, self.test, self.valid, self.world, self.shape = model, test, valid, world, shape
        self.elbo, self.num_particles = settings["elbo"], settings["num_particles"]
        self.valid_samples, self.metrics = settings["valid_samples"], settings["metrics"] or {}
        wanted = compiles(settings["compile"], settings["epochs"] * self._draws())
        self.losses = BatchLosses(model, wanted, settings["compile"], speaker(settings["progress"]))

    def _draws(self) -> int:
        """The guide's draws (points x particles) of one epoch's scores."""
        particles = 1 + (self.num_particles if self.elbo == "iwae" else 0)
        draws = sum(len(data) * particles for data in (self.test, self.valid) if data is not None)
        if self.valid is not None and self.valid_samples:
            draws += min(len(self.valid), VALID_IS_POINTS) * self.valid_samples
        return draws

    def _bounds(self, data: Batches, split: str) -> dict:
        elbo = "trace" if self.elbo == "iwae" else self.elbo
        scores = {f"{split}_elbo": self._elbo(data, elbo)}
        if self.elbo == "iwae":
            scores[f"{split}_iwae"] = self._elbo(data, "iwae", self.num_particles)
        return scores

    def _elbo(self, data: Batches, elbo, num_particles: int = 1, **kwargs) -> float:
        return shared_elbo(
            self.model,
            data,
            self.world,
            elbo,
            num_particles,
            shape=self.shape,
            losses=self.losses,
            **kwargs,
        )

    def scores(self, record: dict) -> None:
        """Add the scores to the epoch's ``record`` (the bits per dimension of its
        ``train_elbo`` too)."""
        self.losses.watched.refresh()  # a tensor of the model replaced since the last epoch
        if self.test is not None:
            record.update(self._bounds(self.test, "test"))
        if self.valid is not None:
            record.update(self._bounds(self.valid, "valid"))
            if self.valid_samples:
                record["valid_log_px"] = self._log_px()
        for name, metric in self.metrics.items():
            with torch.no_grad(), evaluating(self.model):
                record[name] = float(metric(self.model))
        if (coded := coding(self.model)) is not None:
            bpd = {f"{k}_bpd": bits_per_dim(record[k], coded[0]) for k in BPD_KEYS if k in record}
            record.update(bpd)

    def _log_px(self) -> float:
        valid, k = self.valid, self.valid_samples
        n = min(len(valid), VALID_IS_POINTS)
        points = torch.linspace(0, len(valid) - 1, n, device=valid.images.device).long()
        chunk = max(1, VALID_IS_CHUNK // (k * valid.images[0].numel()))
        return self._elbo(valid, "iwae", k, batch_size=chunk, points=points)


def speaker(progress: bool) -> Callable[[str], None]:
    """What prints a run's notices: ``print``, or nothing without ``progress``."""
    return print if progress else _silent


def _silent(message: str) -> None:
    pass


class BatchLosses:
    """``losses(objective, program, guide, batch)``: the loss of one batch under a Pyro ELBO,
    -(its estimate of sum_n L(x_n)) over the batch's points (:func:`batch_loss`); run as written,
    or, when ``wanted``, compiled (:func:`pyvae.compiled.compile_function`) from the second batch of
    a kind on. A kind is the ELBO (class and particles), the batch's shapes and the model's
    settings (:class:`pyvae.compiled.Watched`). The parameters are inputs, read at each call, so
    one compilation serves the run's epochs; the guide's draws are inputs drawn as the program
    draws them, so a seeded score is the same compiled or not, up to floating-point
    reassociation. ``say`` tells what was compiled, in how long; a program that cannot be recorded
    is scored as written, ``failed`` saying why once (by default ``say``, naming the setting
    ``mode`` as the training step's recording does)."""

    def __init__(
        self,
        model,
        wanted: bool,
        mode: str,
        say: Callable[[str], None],
        failed: Callable[[NotCompiled], None] | None = None,
    ) -> None:
        self.model, self.mode, self.say = model, mode, say
        self.watched = Watched(model)
        self.recordings = Recordings(wanted, failed or self._uncompiled)

    def __call__(self, objective, program, guide, batch: tuple):
        key = (
            type(objective),
            objective.num_particles,
            objective.vectorize_particles,
            tuple(describe(a) for a in batch),
            self.watched.key(),
        )
        compiled = self.recordings.get(key, lambda: self._record(objective, program, guide, batch))
        if compiled is None:
            return batch_loss(objective, program, guide, batch)
        # a Python float as Pyro's loss is, so that the batches add up in double precision
        return float(compiled(*[a for a in batch if torch.is_tensor(a)])[0])

    def _record(self, objective, program, guide, batch: tuple) -> Compiled:
        def loss(*given: torch.Tensor) -> tuple[torch.Tensor]:
            served = iter(given)
            full = tuple(next(served) if torch.is_tensor(a) else a for a in batch)
            return (recordable_loss(objective, program, guide, full),)

        started = time.perf_counter()
        tensors = [a for a in batch if torch.is_tensor(a)]
        with recordable():
            compiled = compile_function(loss, *tensors, module=self.model, autotune=False)
        self.say(
            f"compile {self.mode}: a validation score ({type(objective).__name__}, K = "
            f"{objective.num_particles}, {batch[0].shape[0]} points a batch) compiled in "
            f"{time.perf_counter() - started:.1f} s"
        )
        return compiled

    def _uncompiled(self, why: NotCompiled) -> None:
        self.say(f"compile {self.mode}: validation scores the program as written: {why}")


def batch_loss(objective: pyro.infer.ELBO, program, guide, batch: tuple) -> float:
    """``objective``'s loss of ``program`` and ``guide`` on ``batch``."""
    return objective.loss(program, guide, *batch)


def recordable_loss(objective: pyro.infer.ELBO, program, guide, batch: tuple) -> torch.Tensor:
    """:func:`batch_loss`'s number in a form a recording can follow. Pyro's ``loss`` of
    ``TraceEnum_ELBO`` and ``RenyiELBO`` reads it by ``.item()``: pyvae's IWAE records its
    ``differentiable_loss`` instead; ``TraceEnum_ELBO``'s refuses a loss without a gradient graph,
    so gradients are on while it runs (nothing takes them; code that asks
    ``torch.is_grad_enabled()`` takes its training branch there). The others' ``loss`` records as
    it is (:func:`pyvae.program.recordable`)."""
    if isinstance(objective, IWAE):
        return objective.differentiable_loss(program, guide, *batch)
    if isinstance(objective, pyro.infer.TraceEnum_ELBO):
        with torch.enable_grad():
            return objective.differentiable_loss(program, guide, *batch).detach()
    return torch.as_tensor(objective.loss(program, guide, *batch))


@torch.no_grad()
@evaluates
def shared_elbo(
    model: torch.nn.Module,
    data: Batches,
    world: distributed.World,
    elbo,
    num_particles: int = 1,
    batch_size: int = 1000,
    shape=None,
    points: torch.Tensor | None = None,
    losses: BatchLosses | None = None,
) -> float:
    """The ELBO of ``model`` on ``data`` (nats per point) with the points dealt out over the
    processes of ``world``; ``shape`` is the program's :class:`~pyvae.program.Structure` when the
    caller has traced it already; ``points`` the indices to score (default all); ``losses`` what
    computes each batch's (default :func:`batch_loss`, as written)."""
    shape = shape or structure(model, data.first())
    objective = make_elbo(elbo, num_particles, shape.max_plate_nesting, vectorize=shape.vectorized)
    points = torch.arange(len(data), device=data.images.device) if points is None else points
    mine = points[world.rank :: world.size]
    # the ELBO of the model alone: pyro.factor sites (training-only terms such as m2's classifier)
    # are left out, and the weights of the program's poutine.scale, as log p(x) leaves them out
    program = Unscaled()(
        poutine.block(model.model, hide_fn=lambda msg: msg["infer"].get("is_auxiliary", False))
    )
    guide = Unscaled()(model.guide)
    score = losses or batch_loss
    with LocalParams(), invalid_named():
        batches = data.select(mine, batch_size)
        total = sum(score(objective, program, guide, batch) for batch in batches)
    total = world.sum(torch.tensor(float(total), dtype=torch.float64, device=data.device))
    return -float(total) / len(points)
