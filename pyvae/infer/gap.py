"""The inference gap and its two parts (Cremer, Li & Duvenaud 2018).

For a data point x and an amortized guide q(z|x) of some family Q,

    log p(x) - ELBO(q)  =  [log p(x) - ELBO(q*)]  +  [ELBO(q*) - ELBO(q)]
    inference gap          approximation gap         amortization gap

where q* is the best member of Q for x alone. Here q* is found by local optimization: a copy
of the guide (its networks included, so any member of the family its outputs can express,
flow parameters too) is fitted to the one point by Adam on its ELBO, starting from the amortized
guide, while the model stays fixed (a VampPrior that runs the encoder keeps the original).
log p(x) is AIS's (:mod:`pyvae.ais`); both ELBOs are estimated with the same K draws scheme
(:func:`pyvae.log_likelihood`'s ``elbo``). All in nats per point.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import arviz
import numpy as np
import torch
import xarray

from pyvae import distributed, program
from pyvae.data.batching import as_points, take
from pyvae.errors import positive_int, positive_number
from pyvae.infer.ais import AISResult, ais_log_likelihood, check, compile_session
from pyvae.infer.importance import LogLikelihood, log_likelihood, point_seed, seeded
from pyvae.infer.report import (
    Report,
    inference_data,
    mc_stderr,
    stderr_of_mean,
    within_noise,
)
from pyvae.parts.likelihoods import bits_per_dim, coding


class LocalGuide(torch.nn.Module):
    """The model of ``model`` with the guide of ``guide_copy``: a program whose guide can move
    alone."""

    def __init__(self, model: torch.nn.Module, guide_copy: torch.nn.Module) -> None:
        super().__init__()
        self.generative, self.local = model, guide_copy
        self.model, self.guide = model.model, guide_copy.guide


def local_optimum(
    model: torch.nn.Module,
    batch: tuple,
    *,
    steps: int = 2000,
    num_particles: int = 16,
    lr: float = 1e-3,
    check_every: int = 200,
    tolerance: float = 0.01,
) -> tuple[LocalGuide, int]:
    """(model with the guide fitted to ``batch`` alone, Adam steps taken): from the amortized
    guide, maximize the ``num_particles``-sample ELBO; when its mean over ``check_every`` steps
    improves by less than ``tolerance`` nats per point, the learning rate drops tenfold (Adam's
    noise floor hides the last nats), and the third time the fit stops; or after ``steps`` steps.
    A fit stopped early underestimates ELBO(q*): the approximation gap is then overstated and the
    amortization gap understated, never the other way."""
    local = LocalGuide(model, copy.deepcopy(model).requires_grad_(True))
    shape = program.structure(local, batch)
    optimizer = torch.optim.Adam(local.local.parameters(), lr=lr)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # the model stays as trained; no gradients for it
        p.requires_grad_(False)
    try:
        best, window, stalls = -float("inf"), [], 0
        for step in range(1, steps + 1):
            elbo = program.log_weights(local, batch, num_particles, shape).elbo().mean()
            optimizer.zero_grad()
            (-elbo).backward()
            optimizer.step()
            window.append(float(elbo.detach()))
            if step % check_every == 0:
                mean, window = sum(window) / len(window), []
                if mean < best + tolerance:
                    stalls += 1
                    if stalls == 3:
                        return local, step
                    for group in optimizer.param_groups:
                        group["lr"] /= 10
                best = max(best, mean)
        return local, steps
    finally:
        for p in frozen:
            p.requires_grad_(True)


#: the numbers also reported in bits per dimension for an 8-bit likelihood, and their labels
BITS = {"log_px": "log p(x)", "elbo_local": "ELBO local", "elbo_amortized": "ELBO amortized"}


@dataclass
class GapResult(Report):
    """Per point (N,): ``log_px`` (AIS), ``elbo_amortized``, ``elbo_local`` (the best guide for
    that point), the IS estimates from both guides, and the Adam steps each local fit took.
    ``write`` gives ``gap.json`` and ``eval.nc`` (the per-point values)."""

    name: ClassVar[str] = "gap"

    log_px: torch.Tensor
    elbo_amortized: torch.Tensor
    elbo_local: torch.Tensor
    log_px_is: torch.Tensor
    log_px_is_local: torch.Tensor
    local_steps: torch.Tensor
    ais: AISResult
    num_samples: int
    #: (pixels per point, values per pixel) when the likelihood is a mass over 8-bit-like values
    coding: tuple[int, int] | None = None

    def gaps(self) -> dict[str, tuple[float, float]]:
        """{gap: (mean over points, its standard error)} of the approximation and amortization
        gaps (paired differences per point: their spread over points, or AIS's Monte Carlo error
        for one point)."""
        per_point = {
            "approximation": self.log_px - self.elbo_local,
            "amortization": self.elbo_local - self.elbo_amortized,
        }
        return {
            k: (float(v.double().mean()), stderr_of_mean(v, self.ais.stderr))
            for k, v in per_point.items()
        }

    def notes(self) -> list[str]:
        """Words for each gap that cannot be told from zero
        (:func:`~pyvae.infer.report.within_noise`)."""
        hints = {
            "approximation": f"AIS with T = {self.ais.num_steps} may be too short to tell "
            "(a larger --num-steps raises log p(x) towards its value)",
            "amortization": "the local fits may have stopped early (a larger --local-steps)",
        }
        words = (
            within_noise(mean, se, f"the {k} gap", hints[k])
            for k, (mean, se) in self.gaps().items()
        )
        return [w for w in words if w]

    def summary(self) -> dict:
        mean = lambda t: float(t.double().mean())  # noqa: E731
        gaps = self.gaps()
        return {
            "num_points": len(self.log_px),
            "units": "nats per point; gaps are differences of log p(x) (AIS) and ELBOs, >= 0 up "
            "to Monte Carlo error",
            "log_px": mean(self.log_px),
            "elbo_amortized": mean(self.elbo_amortized),
            "elbo_local": mean(self.elbo_local),
            "inference_gap": mean(self.log_px - self.elbo_amortized),
            "approximation_gap": gaps["approximation"][0],
            "approximation_gap_stderr": gaps["approximation"][1],
            "amortization_gap": gaps["amortization"][0],
            "amortization_gap_stderr": gaps["amortization"][1],
            "notes": self.notes(),
            "log_px_is_amortized": mean(self.log_px_is),
            "log_px_is_local": mean(self.log_px_is_local),
            "num_samples": self.num_samples,
            "ais": {
                **self.ais.settings,
                "log_px_stderr": mc_stderr(self.ais.stderr),
            },
            "local_steps_mean": mean(self.local_steps),
            "per_point": {
                "log_px": self.log_px.tolist(),
                "elbo_amortized": self.elbo_amortized.tolist(),
                "elbo_local": self.elbo_local.tolist(),
            },
            **(
                {
                    "bits_per_dim": {
                        k: bits_per_dim(mean(getattr(self, k)), self.coding[0]) for k in BITS
                    },
                    "bits_per_dim_levels": self.coding[1],
                }
                if self.coding
                else {}
            ),
        }

    def inference_data(self) -> arviz.InferenceData:
        """The per-point values as an arviz InferenceData group ``inference_gap``."""
        names = (
            "log_px",
            "elbo_amortized",
            "elbo_local",
            "log_px_is",
            "log_px_is_local",
            "local_steps",
        )
        coords = {"point": np.arange(len(self.log_px))}
        data = {
            name: xarray.DataArray(getattr(self, name).numpy(), dims=["point"], coords=coords)
            for name in names
        }
        return inference_data("inference_gap", data, {"units": "nats"})

    def table(self) -> str:
        s = self.summary()
        return "\n".join(
            [
                f"inference gap on {s['num_points']} points (nats per point; log p(x) by AIS "
                f"T = {s['ais']['num_steps']})",
                f"  log p(x)            {s['log_px']:10.3f}",
                f"  ELBO, local q*      {s['elbo_local']:10.3f}   approximation gap "
                f"{s['approximation_gap']:.3f} ± {s['approximation_gap_stderr']:.3f}",
                f"  ELBO, amortized q   {s['elbo_amortized']:10.3f}   amortization gap  "
                f"{s['amortization_gap']:.3f} ± {s['amortization_gap_stderr']:.3f}",
                f"  inference gap       {s['inference_gap']:10.3f}   "
                "(= approximation + amortization)",
                f"  IS (K = {s['num_samples']})      amortized {s['log_px_is_amortized']:.3f}, "
                f"local {s['log_px_is_local']:.3f}; local fits took "
                f"{s['local_steps_mean']:.0f} Adam steps on average",
                *(
                    [
                        f"  bits/dim ({s['bits_per_dim_levels']} levels)  "
                        + "  ".join(f"{BITS[k]} {v:.4f}" for k, v in s["bits_per_dim"].items())
                    ]
                    if "bits_per_dim" in s
                    else []
                ),
                *(f"  NOTE  {note}" for note in s["notes"]),
            ]
        )


@program.evaluates
def inference_gap(
    model: torch.nn.Module,
    data,
    *,
    ais: dict,
    num_samples: int = 1000,
    local_steps: int = 2000,
    lr: float = 1e-3,
    seed: int = 0,
    world: distributed.World | None = None,
) -> GapResult | None:
    """The gap decomposition for every point of ``data`` (a tensor x, a tuple (x, y), ...: as
    :func:`pyvae.log_likelihood` takes it); ``ais`` holds the settings of
    :func:`pyvae.ais.ais_log_likelihood`. The ELBOs use ``num_samples`` draws. Under torchrun the
    points are shared out; rank 0 gets the result, the others None."""
    world = world or distributed.World()
    positive_int("num_samples", num_samples)
    positive_int("local_steps", local_steps)
    positive_number("lr", lr)
    device = next(model.parameters()).device
    data = as_points(data)
    check(model, tuple(t.to(device) for t in take(data, 0, 1)), **ais)
    n = data[0].shape[0]

    def per_point(first, stop):
        rows = []
        for i in range(first, stop):
            batch = tuple(t.to(device) for t in take(data, i, i + 1))
            with seeded(device, point_seed(seed, i, "local")):
                amortized = log_likelihood(model, batch, num_samples, point_ids=[i])
                local, steps = local_optimum(model, batch, steps=local_steps, lr=lr)
                fitted = log_likelihood(local, batch, num_samples, point_ids=[i])
            rows.append((amortized, fitted, steps))
        x = take(data, first, stop)
        annealed = ais_log_likelihood(
            model, x, **ais, seed=seed, point_ids=torch.arange(first, stop), device=device
        )
        return rows, annealed

    with compile_session():  # a program that cannot be compiled is warned about once, not per chunk
        parts = distributed.sharded(per_point, n, 8, world)
    if parts is None:
        return None
    rows = [row for part, _ in parts for row in part]
    amortized, fitted = (
        LogLikelihood.concat([r[0] for r in rows]),
        LogLikelihood.concat([r[1] for r in rows]),
    )
    annealed = AISResult.concat([a for _, a in parts])
    return GapResult(
        log_px=annealed.log_px,
        elbo_amortized=amortized.elbo,
        elbo_local=fitted.elbo,
        log_px_is=amortized.log_px,
        log_px_is_local=fitted.log_px,
        local_steps=torch.tensor([float(r[2]) for r in rows]),
        ais=annealed,
        num_samples=num_samples,
        coding=coding(model),
    )
