"""How healthy is the posterior? KL per latent dimension, active units, the bound's gap, I(x; z).

:func:`evaluate` gathers them with the importance-sampled log-likelihood into an
:class:`Evaluation` that prints a table, writes ``eval.json``, an ``arviz.InferenceData``
netCDF file and the plots.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import ClassVar

import arviz
import numpy as np
import pyro
import torch
import xarray
from pyro import poutine

from pyvae import distributed, program
from pyvae.compiled import check_compile
from pyvae.data.batching import Batches, as_points, resolve_device, take
from pyvae.data.datasets import spread
from pyvae.errors import PyvaeError
from pyvae.infer.ais import AISResult, ais_ladder, ais_log_likelihood, check, compile_session
from pyvae.infer.importance import (
    GRID,
    MIN_KHAT_SAMPLES,
    LogLikelihood,
    compiles,
    khat_threshold,
    log_likelihood,
    point_dim,
    point_seed,
    scoring_session,
    seeded,
)
from pyvae.infer.report import Report, data_stderr, inference_data, mc_stderr
from pyvae.parts.likelihoods import bits_per_dim, coding

ACTIVE_UNIT_THRESHOLD = 0.01
#: the share of points with k^ above the threshold beyond which importance sampling's headline
#: is flagged
UNTRUSTED_SHARE = 0.1


def active_units(
    z_mean: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD
) -> tuple[int, torch.Tensor]:
    """(number of d with Cov_x(E_q[z_d|x]) > threshold, those variances): Burda et al.'s active
    units."""
    variance = z_mean.reshape(z_mean.shape[0], -1).var(0)
    return int((variance > threshold).sum()), variance


@torch.no_grad()
@program.evaluates
def mutual_information(
    model: torch.nn.Module, data, max_points: int = 1000, chunk: int = 100
) -> float | None:
    """I(x; latents) under q(latents, x) = q(latents|x) p_data(x), in nats, from N <=
    ``max_points`` points.

    I = E[log q(v|x)] - E[log q(v)], with the aggregate posterior q(v_i) ~ (1/N) sum_j q(v_i|x_j)
    at one draw v_i ~ q(.|x_i) per point, every latent site of the guide taken jointly (the
    guide replayed on x_j with v_i's values). The estimate is biased: the aggregate term
    averages over only N points, so it cannot exceed log N, and with a guide whose posteriors
    overlap it can come out slightly below 0; it is reported clamped at 0. None for guides
    with enumerated sites and for programs that cannot run with particles as a batch dimension.
    """
    device = next(model.parameters()).device
    batches = Batches(as_points(data), device, model)
    index = spread(torch.arange(len(batches)), max_points).to(batches.images.device)
    batch = next(batches.select(index, len(index)))
    shape = program.structure(model, batch)
    if shape.enumerated_sites or not shape.vectorized:
        return None
    n, nesting = batch[0].shape[0], shape.max_plate_nesting
    with program.LocalParams():
        own = poutine.trace(model.guide).get_trace(*batch)
    log_q_own = _guide_log_prob(own, nesting, n, shape.data_plate)[0]
    log_q_agg = []
    # q(v_i|x_j) far from x_j's posterior may overflow a flow's inverse: that density is ~0, not NaN
    with pyro.validation_enabled(False):
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(start + chunk, n), device=batch[0].device)
            values = {
                name: _others(site, idx, n, nesting, shape.data_plate)
                for name, site in own.nodes.items()
                if name in shape.latent_sites
            }
            with program.LocalParams(), pyro.plate(program.PARTICLES, len(idx), dim=-(nesting + 1)):
                trace = poutine.trace(poutine.condition(model.guide, data=values)).get_trace(*batch)
            log_q = torch.nan_to_num(
                _guide_log_prob(trace, nesting, n, shape.data_plate), nan=-math.inf
            )  # (c, N): v_i against q(.|x_j)
            log_q_agg.append(torch.logsumexp(log_q, dim=1) - math.log(n))
    return max(0.0, float((log_q_own - torch.cat(log_q_agg)).mean()))


def _guide_log_prob(trace, nesting: int, n: int, plate: str) -> torch.Tensor:
    total = 0.0
    for site in program.sample_sites(trace):
        total = total + program.site_log_prob(site, nesting, 0, n, plate)
    return total


def _others(site, idx: torch.Tensor, n: int, nesting: int, plate: str) -> torch.Tensor:
    """The site's values of points ``idx`` moved to the particle dimension, each repeated over all
    n points."""
    value, event, data_dim = site["value"], site["fn"].event_dim, point_dim(site, plate)
    value = value.index_select(data_dim, idx).movedim(data_dim, 0).unsqueeze(data_dim)
    value = value.reshape(len(idx), *(1,) * (nesting + 1 + event - value.dim()), *value.shape[1:])
    shape = list(value.shape)
    shape[data_dim] = n
    return value.expand(shape)


@dataclass
class Evaluation(Report):
    """The importance-sampled log-likelihood and the posterior diagnostics of one data set;
    ``write`` gives ``eval.json`` and ``eval.nc`` (the pictures:
    :func:`pyvae.viz.plots.evaluation`)."""

    name: ClassVar[str] = "eval"

    ll: LogLikelihood
    site: str | None  # the latent site the plots and the headline latent numbers are about
    mutual_information: float | None
    dataset: str = ""
    split: str = ""
    seconds: float = math.nan
    #: {T: AIS result}, the largest T the headline; empty when scored by importance sampling alone
    ais: dict = field(default_factory=dict)
    #: (pixels per point, values per pixel) when the likelihood is a mass over discrete pixel values
    coding: tuple[int, int] | None = None

    @property
    def method(self) -> str:
        return "ais" if self.ais else "is"

    def summary(self) -> dict:
        """The numbers of ``eval.json``: means over data points, nats per data point."""
        ll, n = self.ll, len(self.ll)
        log_px, elbo = ll.log_px.double(), ll.elbo.double()
        summary = {
            "dataset": self.dataset,
            "split": self.split,
            "num_points": n,
            "num_samples": ll.num_samples,
            "log_px": float(log_px.mean()),
            # Monte Carlo error of that mean, for this fixed set of points
            "log_px_mc_stderr": mc_stderr(ll.stderr),
            # spread over points: the error of the mean as an estimate over the data distribution
            "log_px_data_stderr": data_stderr(log_px),
            "nll": float(-log_px.mean()),
            "elbo": float(elbo.mean()),
            "gap": float((log_px - elbo).mean()),
            "iwae": {str(k): float(v.double().mean()) for k, v in ll.iwae.items()},
            # null where K is too small for k^ to be estimated (MIN_KHAT_SAMPLES)
            **(
                {
                    "khat_threshold": khat_threshold(ll.num_samples),
                    "khat_bands": ll.khat_bands(),
                    "khat_above_threshold": self.khat_above_threshold,
                    "khat_max": float(ll.khat.max()),
                }
                if self.khat_estimated
                else dict.fromkeys(
                    ("khat_threshold", "khat_bands", "khat_above_threshold", "khat_max")
                )
            ),
            "warning": self.warning(),
            "ess_mean": float(ll.ess.mean()),
            "ess_min": float(ll.ess.min()),
            "latent_site": self.site,
            "latent_sites": {name: self.site_summary(name) for name in ll.latent_means},
            "mutual_information": self.mutual_information,
            "seconds": self.seconds,
            "method": self.method,
            **(self.ais_summary(log_px, elbo) if self.ais else {}),
        }
        if self.coding:  # from the headline log p(x), IS's or AIS's
            summary["bits_per_dim"] = bits_per_dim(summary["log_px"], self.coding[0])
            summary["elbo_bits_per_dim"] = bits_per_dim(summary["elbo"], self.coding[0])
            summary["bits_per_dim_levels"] = self.coding[1]
        return summary

    def ais_summary(self, log_px_is: torch.Tensor, elbo: torch.Tensor) -> dict:
        """The AIS headline replacing IS's: log p(x), its errors, the gap, and IS's figures kept as
        ``log_px_is``."""
        top = self.ais[max(self.ais)]
        log_px = top.log_px.double()
        return {
            "log_px": float(log_px.mean()),
            "log_px_mc_stderr": mc_stderr(top.stderr),
            "log_px_data_stderr": data_stderr(log_px),
            "nll": float(-log_px.mean()),
            "gap": float((log_px - elbo).mean()),
            "log_px_is": float(log_px_is.mean()),
            "ais_minus_is": float((log_px - log_px_is).mean()),
            "ais": {
                **top.diagnostics(),
                "log_px_by_num_steps": {
                    str(t): float(r.log_px.double().mean()) for t, r in sorted(self.ais.items())
                },
            },
        }

    def _khat_line(self, s: dict) -> str:
        if not self.khat_estimated:
            return f"not estimated (K = {s['num_samples']} < {MIN_KHAT_SAMPLES})"
        bands = ", ".join(f"{name} {100 * frac:.1f}%" for name, frac in s["khat_bands"].items())
        return (
            f"{bands}; above the threshold {s['khat_threshold']:.2f}: "
            f"{100 * s['khat_above_threshold']:.1f}% of points (max {s['khat_max']:.2f})"
        )

    @property
    def khat_estimated(self) -> bool:
        """Whether K is large enough for a Pareto fit to the weights' tail
        (:data:`MIN_KHAT_SAMPLES`)."""
        return self.ll.num_samples >= MIN_KHAT_SAMPLES

    @property
    def khat_above_threshold(self) -> float:
        """The share of points whose Pareto k^ is above the reliability threshold for K draws."""
        return float((self.ll.khat > khat_threshold(self.ll.num_samples)).float().mean())

    def warning(self) -> str | None:
        """Why IS's headline is not to be trusted, or None: more than :data:`UNTRUSTED_SHARE` of
        the points have Pareto k^ above the threshold, where the weights' variance may be infinite,
        the delta-method ± understates the error and log p^ is likely well below log p(x). None
        under AIS, whose headline does not rest on these weights."""
        if self.ais:
            return None
        if not self.khat_estimated:
            return (
                f"Pareto k^ cannot be estimated from {self.ll.num_samples} draws per point (it "
                f"needs {MIN_KHAT_SAMPLES}): the ± (Monte Carlo) is unchecked and may understate "
                "the error; evaluate with more --num-samples"
            )
        above = self.khat_above_threshold
        if above <= UNTRUSTED_SHARE:
            return None
        return (
            f"Pareto k^ > {khat_threshold(self.ll.num_samples):.2f} on {100 * above:.1f}% of "
            "points: the ± (Monte Carlo) is not to be trusted and log p(x) is likely too low; AIS "
            "does not need the guide to cover the posterior: python -m pyvae evaluate RUN --method "
            "ais"
        )

    @property
    def kl_per_dim(self) -> torch.Tensor | None:
        """E_x KL(q(z_d|x) || p(z_d)) per dimension d of the chosen site (None if it does not
        factorize)."""
        per_dim = self.ll.kl_per_dim.get(self.site)
        return per_dim.mean(0) if per_dim is not None else None

    def site_summary(self, name: str) -> dict:
        """KL (mean over points of E_q[log q - log p] of the site), active units and size of one
        latent site."""
        count, variance = active_units(self.ll.latent_means[name])
        per_dim = self.ll.kl_per_dim.get(name)
        return {
            "kl": float(self.ll.kl[name].double().mean()),
            "active_units": count,
            "dims": int(variance.shape[0]),
            "kl_per_dim": per_dim.mean(0).tolist() if per_dim is not None else None,
        }

    @staticmethod
    def _compiled_words(s: dict) -> str:
        if not s["ais"]["compile"]:
            return ""
        done, n = s["ais"]["compiled_points"], s["num_points"]
        return " (compiled)" if done == n else f" (compiled for {done} of {n} points)"

    def table(self) -> str:
        s = self.summary()
        how = (
            f"AIS with T = {s['ais']['num_steps']}, {s['ais']['num_chains']} chains"
            f"{self._compiled_words(s)}; "
            if self.ais
            else ""
        )
        lines = [
            f"{self.title()}: {s['num_points']} points, {how}K = {s['num_samples']} importance "
            f"samples ({s['seconds']:.1f} s)",
            f"  log p(x)   {s['log_px']:10.3f} ± {s['log_px_mc_stderr']:.3f} (Monte Carlo) "
            f"± {s['log_px_data_stderr']:.3f} (over points)   nats per point; NLL {s['nll']:.3f}",
        ]
        if s["warning"]:
            lines.append(f"  WARNING    {s['warning']}")
        if "bits_per_dim" in s:
            lines.append(
                f"  bits/dim   {s['bits_per_dim']:.4f} (ELBO {s['elbo_bits_per_dim']:.4f}): "
                f"-log2 p(x) / {self.coding[0]} pixels, p(x) a mass over "
                f"{s['bits_per_dim_levels']} values per pixel"
            )
        if self.ais:
            a = s["ais"]
            ladder = "  ".join(f"T={t}: {v:.3f}" for t, v in a["log_px_by_num_steps"].items())
            lines += [
                f"  AIS by T   {ladder}; acceptance {a['acceptance_mean']:.2f}, "
                f"{a['divergences']} divergent proposals"
                + (f", {a['failed_chains']} failed chains left out" if a["failed_chains"] else ""),
                f"  IS         {s['log_px_is']:10.3f} (K = {s['num_samples']}): "
                f"AIS - IS = {s['ais_minus_is']:.3f}",
            ]
        lines += [
            f"  ELBO       {s['elbo']:10.3f}    gap log p - ELBO {s['gap']:.3f} "
            "(~ KL(q(z|x) || p(z|x)))",
            "  IWAE-K     " + "  ".join(f"K={k}: {v:.3f}" for k, v in s["iwae"].items()),
            f"  Pareto k^  {self._khat_line(s)}",
            f"  ESS        mean {s['ess_mean']:.1f}, min {s['ess_min']:.1f} of {s['num_samples']}",
        ]
        for name, site in s["latent_sites"].items():
            lines.append(
                f"  site {name!r}: {site['active_units']} of {site['dims']} latent units active; "
                f"KL(q || p) {site['kl']:.3f} nats"
            )
        if s["mutual_information"] is not None:
            lines.append(
                f"  I(x; latents) {s['mutual_information']:.3f} nats (biased: at most log of the "
                "points used)"
            )
        return "\n".join(lines)

    def title(self) -> str:
        """What was evaluated: the data set and split, when known."""
        named = " ".join(part for part in (self.dataset, self.split) if part)
        return named or "evaluation"

    def inference_data(self) -> arviz.InferenceData:
        """Per-point log p^, its standard error, the ELBO, k^ and ESS as an arviz InferenceData."""
        ll = self.ll
        coords = {"point": np.arange(len(ll))}
        data = {
            name: xarray.DataArray(getattr(ll, name).numpy(), dims=["point"], coords=coords)
            for name in ("log_px", "stderr", "elbo", "khat", "ess")
        }
        for name, mean in ll.latent_means.items():
            flat = mean.reshape(len(ll), -1).numpy()
            data[f"{name}_mean"] = xarray.DataArray(
                flat,
                dims=["point", f"{name}_dim"],
                coords={**coords, f"{name}_dim": np.arange(flat.shape[1])},
            )
            data[f"{name}_kl"] = xarray.DataArray(
                ll.kl[name].numpy(), dims=["point"], coords=coords
            )
        if self.ais:
            top = self.ais[max(self.ais)]
            data["log_px_is"], data["stderr_is"] = data["log_px"], data["stderr"]
            for name in ("log_px", "stderr", "acceptance", "divergences", "failed_chains"):
                data[name if name in ("log_px", "stderr") else f"ais_{name}"] = xarray.DataArray(
                    getattr(top, name).numpy(), dims=["point"], coords=coords
                )
            data["ais_log_weights"] = xarray.DataArray(
                top.log_weights.numpy(),
                dims=["point", "chain"],
                coords={**coords, "chain": np.arange(top.num_chains)},
            )
        attrs = {
            "method": self.method,
            "num_samples": ll.num_samples,
            "dataset": self.dataset,
            "split": self.split,
            "units": "nats",
        }
        return inference_data("importance_sampling", data, attrs)


@program.evaluates
def evaluate(
    model: torch.nn.Module,
    data,
    num_samples: int = 5000,
    batch_size: int | None = None,
    *,
    site: str | None = None,
    device: str | torch.device | None = None,
    dataset: str = "",
    split: str = "",
    progress: bool = False,
    seed: int = 0,
    ais: dict | None = None,
    world: distributed.World | None = None,
    compile: str = "auto",
) -> Evaluation | None:
    """Importance-sampled log p(x) with K = ``num_samples`` plus the posterior diagnostics of every
    latent site; ``site`` picks the one the plots show (default: the model's ``latent_site``, else
    the first continuous latent site the model samples, the top of a hierarchy).

    With ``ais`` (the keyword arguments of :func:`pyvae.ais.ais_log_likelihood`: ``num_steps`` T,
    ``num_chains``, ...) the headline log p(x) is annealed importance sampling's, also run at
    T/100 and T/10 (those >= 10) to show whether it still moves with T; IS stays beside it.

    Random draws are seeded from ``seed`` per chunk of :data:`GRID` points (IS) and per point
    (AIS), so the numbers do not depend on the global random state or on ``world``: under
    torchrun the chunks are shared out among the processes and the result is gathered on
    rank 0 (the others get None). ``compile`` is :func:`~pyvae.infer.importance.log_likelihood`'s,
    for all the points together (``auto``: N x K of at least
    :data:`~pyvae.infer.importance.AUTO_DRAWS`); AIS's is in ``ais``.
    """

    start = time.perf_counter()
    world = world or distributed.World()
    device = resolve_device(device or next(model.parameters()).device)
    data = as_points(data)
    n, grid = data[0].shape[0], GRID.get(device.type, 64)
    if ais:  # before any work: a model AIS cannot run fails now, not after the importance sampling
        first = Batches(take(data, 0, 1), torch.device("cpu"), model).first(1)
        check(model.to(device), tuple(t.to(device) for t in first), **ais)

    def importance(first, stop):
        with seeded(device, point_seed(seed, first, "importance")):
            return log_likelihood(
                model,
                take(data, first, stop),
                num_samples,
                batch_size,
                device=device,
                progress=progress,
                compile="on" if compiled else "off",
                point_ids=torch.arange(first, stop),
            )

    compiled = compiles(check_compile(compile), n * num_samples)
    with scoring_session():
        parts = distributed.sharded(importance, n, grid, world)
    runs = _ais_ladder(model, data, ais, seed, device, progress, world) if ais else {}
    if not world.main:
        return None
    ll = LogLikelihood.concat(parts)
    site = site or getattr(model, "latent_site", None) or next(iter(ll.latent_means), None)
    if site is not None and site not in ll.latent_means:
        raise PyvaeError(
            f"site {site!r} is not a per-point continuous latent site; choose from "
            f"{', '.join(ll.latent_means) or 'none'}"
        )
    with seeded(device, seed):
        information = mutual_information(model, data)
    result = Evaluation(
        ll=ll,
        site=site,
        mutual_information=information,
        dataset=dataset,
        split=split,
        ais=runs,
        coding=coding(model),
    )
    result.seconds = time.perf_counter() - start
    return result


def _ais_ladder(model, data: tuple, ais: dict, seed, device, progress, world) -> dict:
    """{T: AIS result} at T/100, T/10 and T (:func:`~pyvae.infer.ais.ais_ladder`) on the grid of
    :data:`GRID` points, seeded per point; {} off the main process."""
    runs, grid, n = {}, GRID.get(device.type, 64), data[0].shape[0]
    # a program that cannot be compiled is warned about once, not per chunk and T
    with compile_session():
        for steps in ais_ladder(ais["num_steps"]):

            def chunk(first, stop, steps=steps):
                return ais_log_likelihood(
                    model,
                    take(data, first, stop),
                    **{**ais, "num_steps": steps},
                    seed=seed,
                    point_ids=torch.arange(first, stop),
                    device=device,
                    progress=progress,
                )

            runs[steps] = distributed.sharded(chunk, n, grid, world)
    return {t: AISResult.concat(p) for t, p in runs.items() if p is not None}
