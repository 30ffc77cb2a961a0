"""Bidirectional Monte Carlo (Grosse et al. 2015; Wu et al. 2017): how far AIS can be from log p(x).

On data simulated from the model itself, (z, x) ~ p(z) p(x|z), the z that made x is an exact
draw from p(z | x). Forward AIS from f_0 on x gives a stochastic lower bound on log p(x);
reverse AIS started at that z gives a stochastic upper bound (:func:`pyvae.ais.reverse_ais`).
The truth lies between them in expectation, so their gap certifies the accuracy of AIS (and
of anything scoring below it, like importance sampling) at that T, on data like the model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from pyro import poutine

from pyvae import distributed, program
from pyvae.data.batching import take
from pyvae.errors import PyvaeError
from pyvae.infer.ais import (
    AISResult,
    ais_ladder,
    ais_log_likelihood,
    check,
    compile_session,
    reverse_ais,
)
from pyvae.infer.importance import GRID, point_dim, point_seed, seeded
from pyvae.infer.report import Report
from pyvae.parts.likelihoods import bits_per_dim, coding


@torch.no_grad()
def simulate(model: torch.nn.Module, batch: tuple, seed: int = 0) -> tuple[tuple, dict]:
    """(the batch with x replaced by draws x ~ p(x | z), {latent site: the z ~ p(z) that made
    them}).

    ``batch`` gives the number of points and their shapes (and the labels of a conditional
    model, which are kept); its x is not used. The model must observe one site.
    """
    shape = program.structure(model, batch)
    if len(shape.observed_sites) != 1:
        raise PyvaeError(
            "simulating data needs a model with one observed site; "
            f"{type(model).__name__} has {shape.observed_sites}"
        )
    device = batch[0].device
    with seeded(device, point_seed(seed, 0, "simulate")), program.LocalParams():
        trace = poutine.trace(poutine.uncondition(model.model)).get_trace(*batch)
    x = trace.nodes[shape.observed_sites[0]]["value"].reshape(batch[0].shape)
    return (x, *batch[1:]), {name: trace.nodes[name]["value"] for name in shape.continuous_sites}


@dataclass
class BDMCResult(Report):
    """{T: (forward AIS, reverse AIS)} on the same simulated points; ``lower``/``upper`` per point
    are their ``log_px``. The gap upper - lower >= 0 in expectation. ``write`` gives ``bdmc.json``
    (the picture: :func:`pyvae.viz.plots.bdmc`)."""

    name: ClassVar[str] = "bdmc"
    runs: dict
    #: (pixels per point, values per pixel) when the likelihood is a mass over 8-bit-like values
    coding: tuple[int, int] | None = None

    def summary(self) -> dict:
        by_t = {}
        for steps, (lower, upper) in sorted(self.runs.items()):
            low, up = float(lower.log_px.double().mean()), float(upper.log_px.double().mean())
            by_t[str(steps)] = {
                "lower": low,
                "upper": up,
                "gap": up - low,
                "seconds": lower.seconds + upper.seconds,
            }
            # the sandwich in bits per dimension: the upper bound on log p(x) is the lower in bits
            if self.coding:
                by_t[str(steps)]["bits_per_dim"] = {
                    k: bits_per_dim(v, self.coding[0]) for k, v in (("lower", low), ("upper", up))
                }
        top_t = max(self.runs)
        lower, upper = self.runs[top_t]
        return {
            "num_points": len(lower),
            **{
                k: lower.settings[k]
                for k in (
                    "num_steps",
                    "num_chains",
                    "leapfrog_steps",
                    "schedule",
                    "start",
                    "compile",
                )
            },
            **by_t[str(top_t)],
            "units": "nats per point; lower: forward AIS, a stochastic lower bound on log p(x); "
            "upper: reverse AIS from the simulating z, a stochastic upper bound",
            "by_num_steps": by_t,
            "acceptance_mean": {
                "forward": float(lower.acceptance.mean()),
                "reverse": float(upper.acceptance.mean()),
            },
            "failed_chains": int(lower.failed_chains.sum() + upper.failed_chains.sum()),
            "compiled_points": {
                "forward": int(lower.compiled.sum()),
                "reverse": int(upper.compiled.sum()),
            },
            "per_point": {"lower": lower.log_px.tolist(), "upper": upper.log_px.tolist()},
        }

    def table(self) -> str:
        s = self.summary()
        lines = [
            f"BDMC on {s['num_points']} points simulated from the model; {s['num_chains']} chains, "
            f"{s['leapfrog_steps']} leapfrog steps, {s['schedule']} schedule (nats per point)"
        ]
        for steps, row in s["by_num_steps"].items():
            bits = row.get("bits_per_dim")
            lines.append(
                f"  T={steps:<7} lower {row['lower']:10.3f}   upper {row['upper']:10.3f}   "
                f"gap {row['gap']:.3f}   ({row['seconds']:.0f} s)"
                + (
                    f"   bits/dim ({self.coding[1]} levels) "
                    f"{bits['upper']:.4f} to {bits['lower']:.4f}"
                    if bits
                    else ""
                )
            )
        return "\n".join(lines)


@program.evaluates
def bdmc(
    model: torch.nn.Module,
    template: tuple,
    *,
    num_steps: int = 1000,
    seed: int = 0,
    world: distributed.World | None = None,
    ladder: bool = True,
    **settings,
) -> BDMCResult | None:
    """Forward and reverse AIS on data simulated from ``model`` with ``template``'s shapes (its
    labels kept), at T = ``num_steps`` (and T/100, T/10 with ``ladder``); ``settings`` as
    :func:`pyvae.ais.ais_log_likelihood`.
    Under torchrun the points are shared out; rank 0 gets the result, the others None."""
    world = world or distributed.World()
    device = template[0].device
    shape = check(model, take(template, 0, 1), num_steps=num_steps, **settings)
    data, latents = simulate(model, template, seed)
    n = data[0].shape[0]
    _, guide_trace = program.trace_once(model, take(template, 0, 1))
    dims = {name: point_dim(guide_trace.nodes[name], shape.data_plate) for name in latents}
    runs = {}
    with (
        compile_session()
    ):  # a program that cannot be compiled is warned about once, not per chunk and T
        for steps in ais_ladder(num_steps) if ladder else [num_steps]:

            def both(first, stop, steps=steps):
                common = dict(
                    num_steps=steps,
                    seed=seed,
                    point_ids=torch.arange(first, stop),
                    device=device,
                    **settings,
                )
                part = {k: v.narrow(dims[k], first, stop - first) for k, v in latents.items()}
                return (
                    ais_log_likelihood(model, take(data, first, stop), **common),
                    reverse_ais(model, take(data, first, stop), part, **common),
                )

            parts = distributed.sharded(both, n, GRID.get(device.type, 64), world)
            if parts is not None:
                runs[steps] = tuple(AISResult.concat([p[i] for p in parts]) for i in (0, 1))
    return BDMCResult(runs, coding(model)) if world.main else None
