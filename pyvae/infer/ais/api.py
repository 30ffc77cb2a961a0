"""Annealed importance sampling (AIS) of log p(x) for any program with continuous latents.

Neal (2001); for deep generative models Wu, Burda, Salakhutdinov & Grosse (2017). Per data
point x, a path of unnormalized densities over all latent sites z jointly,

    f_b(z) = f_0(z)^(1 - b) p(x, z)^b,      0 = b_0 < b_1 < ... < b_T = 1,

starts at f_0 = q(z|x), the guide (default), or f_0 = p(z), the prior (then f_b = p(z) p(x|z)^b);
f_0 is normalized, so Z_0 = 1 and Z_T = p(x). Each of C chains starts at z ~ f_0 and, for t = 1..T,

    log w += (b_t - b_{t-1}) (log p(x, z) - log f_0(z)),     then z ~ HMC leaving f_{b_t} invariant

(the last transition is skipped: nothing reads it). E[w] = p(x), so log p^ = log (1/C) sum_c w_c
is a stochastic lower bound, E[log p^] <= log p(x), whose gap shrinks as T grows. Run from an
exact posterior draw with b going 1 -> 0 (:func:`reverse_ais`), the same recursion has
E[w] = 1/p(x), and -log (1/C) sum_c w_c is a stochastic upper bound: bidirectional Monte Carlo.

The densities come from the programs themselves (:mod:`~pyvae.infer.ais.potential`, compiled
with ``compile=True``); the transitions are HMC with an adapted step size per chain
(:mod:`~pyvae.infer.ais.hmc`) on unconstrained coordinates (:mod:`~pyvae.infer.ais.schedule`),
whose Jacobian enters the potential and cancels in the weights. The adaptation makes a kernel
depend on the chain's past, which the exactness argument of AIS does not cover; the bias is
below the Monte Carlo error in the tests against closed forms, and BDMC bounds whatever is left.
With a flow guide, log q(z|x) at a point the guide did not draw inverts the flow (one pass per
dimension for an autoregressive one): start at the prior for speed there.

Random numbers come from one generator per data point, seeded by (seed, point index): a
point's result does not depend on which other points share its chunk or its process (up to
floating-point rounding of batched arithmetic; bit for bit under a fixed chunk grid).
Everything is in nats per data point; the NLL is the negative of ``log_px``.
"""

from __future__ import annotations

import inspect
import math
import sys
import time
from dataclasses import dataclass, field
from typing import ClassVar

import arviz
import numpy as np
import pyro
import torch
import xarray
from pyro import poutine
from tqdm.auto import tqdm

from pyvae import program
from pyvae.data.batching import Batches, as_points, check_data, resolve_device
from pyvae.errors import PyvaeError, positive_int, positive_number
from pyvae.infer.ais.hmc import Streams, adapt_step_size, transition
from pyvae.infer.ais.potential import Potential, compile_session
from pyvae.infer.ais.schedule import SCHEDULES, Layout, schedule
from pyvae.infer.importance import CHUNK_ELEMENTS, check_support, point_dim, seeded
from pyvae.infer.report import Report, data_stderr, inference_data, mc_stderr

STARTS = ("guide", "prior")


@dataclass
class AISResult(Report):
    """Per-data-point results of :func:`ais_log_likelihood` (or, for :func:`reverse_ais`, of the
    upper bound).

    ``log_px`` (N,): log (1/C) sum_c w_c over the chains whose weight is finite; ``stderr`` (N,):
    its delta-method Monte Carlo error over chains; ``log_weights`` (N, C); ``acceptance`` (N,):
    the mean HMC acceptance probability; ``divergences`` (N,): rejected proposals with a
    non-finite or huge energy error; ``failed_chains`` (N,): chains whose weight is not finite
    (left out of ``log_px``, never silently); ``compiled`` (N,): whether the point's chains ran
    the compiled densities (``compile=True``) or the program as written; ``acceptance_by_step``/
    ``step_size_by_step`` (T,): averages over points and chains, for the plot.
    """

    log_px: torch.Tensor
    stderr: torch.Tensor
    log_weights: torch.Tensor
    acceptance: torch.Tensor
    divergences: torch.Tensor
    failed_chains: torch.Tensor
    compiled: torch.Tensor
    acceptance_by_step: torch.Tensor
    step_size_by_step: torch.Tensor
    num_steps: int
    num_chains: int
    leapfrog_steps: int
    start: str
    schedule: str
    seconds: float = math.nan
    settings: dict = field(default_factory=dict)
    name: ClassVar[str] = "ais"
    netcdf: ClassVar[str] = "ais.nc"

    def __len__(self) -> int:
        return self.log_px.shape[0]

    def diagnostics(self) -> dict:
        """The settings and how the chains fared: acceptance, divergences, failures, compilation."""
        return {
            **self.settings,
            "acceptance_mean": float(self.acceptance.mean()),
            "divergences": int(self.divergences.sum()),
            "failed_chains": int(self.failed_chains.sum()),
            "compiled_points": int(self.compiled.sum()),
            "seconds": self.seconds,
        }

    def summary(self) -> dict:
        """Means over points of log p^ (nats per point) with their errors, and
        :meth:`diagnostics`."""
        return {
            "num_points": len(self),
            "log_px": float(self.log_px.double().mean()),
            "log_px_mc_stderr": mc_stderr(self.stderr),
            "log_px_data_stderr": data_stderr(self.log_px),
            **self.diagnostics(),
        }

    def table(self) -> str:
        s = self.summary()
        return "\n".join(
            [
                f"AIS on {s['num_points']} points: T = {self.num_steps}, {self.num_chains} chains, "
                f"{self.leapfrog_steps} leapfrog steps, from the {self.start} "
                f"({s['seconds']:.1f} s)",
                f"  log p(x)   {s['log_px']:10.3f} ± {s['log_px_mc_stderr']:.3f} (Monte Carlo) "
                f"± {s['log_px_data_stderr']:.3f} (over points)   nats per point",
                f"  chains     acceptance {s['acceptance_mean']:.2f}, {s['divergences']} divergent "
                f"proposals, {s['failed_chains']} failed chains left out",
            ]
        )

    def inference_data(self) -> arviz.InferenceData:
        """Per point: log p^, its error, acceptance, divergences, failed chains; the log-weights."""
        coords = {"point": np.arange(len(self))}
        data = {
            name: xarray.DataArray(getattr(self, name).numpy(), dims=["point"], coords=coords)
            for name in ("log_px", "stderr", "acceptance", "divergences", "failed_chains")
        }
        data["log_weights"] = xarray.DataArray(
            self.log_weights.numpy(),
            dims=["point", "chain"],
            coords={**coords, "chain": np.arange(self.num_chains)},
        )
        return inference_data("ais", data, {"units": "nats", "num_steps": self.num_steps})

    @staticmethod
    def concat(parts: list[AISResult]) -> AISResult:
        """The results of consecutive chunks of points as one (the by-step curves weighted by
        points)."""
        first, n = parts[0], torch.tensor([len(p) for p in parts], dtype=torch.float64)
        per_point = {k: torch.cat([getattr(p, k) for p in parts]) for k in _PER_POINT}
        by_step = {
            k: (torch.stack([getattr(p, k).double() for p in parts]) * n[:, None]).sum(0) / n.sum()
            for k in _BY_STEP
        }
        rest = {
            k: getattr(first, k)
            for k in ("num_steps", "num_chains", "leapfrog_steps", "start", "schedule", "settings")
        }
        return AISResult(
            **per_point,
            **{k: v.float() for k, v in by_step.items()},
            **rest,
            seconds=sum(p.seconds for p in parts),
        )


_PER_POINT = (
    "log_px",
    "stderr",
    "log_weights",
    "acceptance",
    "divergences",
    "failed_chains",
    "compiled",
)
_BY_STEP = ("acceptance_by_step", "step_size_by_step")


@program.evaluates
def ais_log_likelihood(
    model: torch.nn.Module,
    data,
    *,
    num_steps: int = 1000,
    num_chains: int = 16,
    leapfrog_steps: int = 10,
    schedule: str = "sigmoid",
    start: str = "guide",
    step_size: float = 0.05,
    target_acceptance: float = 0.65,
    adapt: float = 1.02,
    seed: int = 0,
    point_ids: torch.Tensor | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    compile: bool = False,
) -> AISResult:
    """log p(x) of every data point by AIS with ``num_chains`` chains and ``num_steps`` intermediate
    distributions, each transition ``leapfrog_steps`` HMC leapfrog steps.

    ``data`` as for :func:`pyvae.log_likelihood`. ``point_ids`` (default 0..N-1) seed the
    per-point random streams: pass the points' indices in a larger set to get the numbers
    they would get there. Vectorized over points and chains, ``batch_size`` points at a time
    (chosen to bound memory when None). ``compile`` records one evaluation of the densities and
    their gradients as a graph (and the gradients alone as a second) and compiles them
    (:mod:`pyvae.compiled`): about 2.5-3x faster per evaluation on a CPU, for a one-off
    compilation of about 30-45 s per chunk size; ``compiled`` in the result says which points ran
    compiled.
    """
    sampler = _Sampler.build(model, data, num_chains, device, batch_size, point_ids)
    settings = _settings(
        num_steps,
        num_chains,
        leapfrog_steps,
        schedule,
        start,
        step_size,
        target_acceptance,
        adapt,
        compile,
    )
    return sampler.run(seed, settings, progress, exact=None)


@program.evaluates
def reverse_ais(model, data, latents: dict, **kwargs) -> AISResult:
    """Reverse AIS (b from 1 to 0) from exact posterior draws ``latents`` {site: value, as the
    guide would hold it for ``data``'s points}: ``log_px`` is -log (1/C) sum_c w_c, a stochastic
    *upper* bound on log p(x). ``latents`` must be draws of p(z | x), e.g. the z that generated x
    (:func:`pyvae.infer.bdmc.simulate`). Other arguments as :func:`ais_log_likelihood`."""
    options = dict(kwargs)
    sampler = _Sampler.build(
        model,
        data,
        options.pop("num_chains", 16),
        options.pop("device", None),
        options.pop("batch_size", None),
        options.pop("point_ids", None),
    )
    seed, progress = options.pop("seed", 0), options.pop("progress", False)
    return sampler.run(seed, _settings(**options), progress, exact=latents)


def _settings(
    num_steps=1000,
    num_chains=16,
    leapfrog_steps=10,
    schedule="sigmoid",
    start="guide",
    step_size=0.05,
    target_acceptance=0.65,
    adapt=1.02,
    compile=False,
    **unknown,
) -> dict:
    if unknown:
        known = ", ".join(list(inspect.signature(_settings).parameters)[:-1])
        raise PyvaeError(f"unknown AIS setting {next(iter(unknown))!r}; choose from {known}")
    positive_int("num_steps", num_steps)
    positive_int("num_chains", num_chains)
    positive_int("leapfrog_steps", leapfrog_steps)
    positive_number("step_size", step_size)
    if schedule not in SCHEDULES:
        raise PyvaeError(f"unknown AIS schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if start not in STARTS:
        raise PyvaeError(f"unknown AIS start {start!r}; choose from {', '.join(STARTS)}")
    if not 0 < target_acceptance < 1:
        raise PyvaeError(f"target_acceptance must lie in (0, 1); got {target_acceptance!r}")
    if not adapt >= 1:
        raise PyvaeError(f"adapt must be >= 1 (1 = a fixed step size); got {adapt!r}")
    if not isinstance(compile, bool):
        raise PyvaeError(f"compile must be True or False; got {compile!r}")
    return {
        "num_steps": num_steps,
        "num_chains": num_chains,
        "leapfrog_steps": leapfrog_steps,
        "schedule": schedule,
        "start": start,
        "step_size": step_size,
        "target_acceptance": target_acceptance,
        "adapt": adapt,
        "compile": compile,
    }


def check(model: torch.nn.Module, batch: tuple, **settings) -> program.Structure:
    """The program's structure, if AIS can run it (continuous latent sites only) with
    ``settings``; else a PyvaeError."""
    if settings:
        _settings(**settings)
    shape = program.structure(model, batch)
    discrete = [s for s in shape.latent_sites if s not in shape.continuous_sites]
    if discrete:
        raise PyvaeError(
            f"AIS anneals continuous latents; {type(model).__name__}'s site {discrete[0]!r} is "
            "discrete: "
            "score this model by importance sampling (--method is), which sums or samples it"
        )
    return shape


class _Sampler:
    """The data, the program's layout and the chunking shared by forward and reverse AIS."""

    @classmethod
    def build(cls, model, data, num_chains, device, batch_size, point_ids) -> _Sampler:
        self = cls()
        positive_int("num_chains", num_chains)
        self.model, self.chains = model, num_chains
        self.device = resolve_device(device or next(model.parameters()).device)
        model.to(self.device)
        self.batches = Batches(as_points(data), self.device, model)
        check_data(model, self.batches, "data")
        self.shape = check(model, self.batches.first(1))
        n = len(self.batches)
        self.point_ids = (
            torch.arange(n) if point_ids is None else torch.as_tensor(point_ids).reshape(-1).cpu()
        )
        if self.point_ids.shape[0] != n:
            raise PyvaeError(
                f"point_ids must hold one index per data point ({n}); got {self.point_ids.shape[0]}"
            )
        check_support(model, self.batches, self.point_ids)
        if batch_size is None:
            rows = max(
                64,
                min(
                    4096,
                    CHUNK_ELEMENTS.get(self.device.type, 2**21)
                    // (8 * self.batches.images[0].numel()),
                ),
            )
            batch_size = max(1, rows // num_chains)
        self.batch_size = positive_int("batch_size", batch_size)
        return self

    def run(self, seed: int, settings: dict, progress: bool, exact: dict | None) -> AISResult:
        n, start_time = len(self.batches), time.perf_counter()
        bar = tqdm(
            total=n,
            desc=f"AIS T={settings['num_steps']}",
            unit="pt",
            leave=False,
            disable=not progress or not sys.stderr.isatty(),
        )
        # AIS needs gradients in z only: frozen parameters record no graph for themselves
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            with pyro.validation_enabled(False), compile_session():
                parts = self._chunks(seed, settings, exact, bar)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        bar.close()
        result = AISResult.concat(parts)
        result.seconds = time.perf_counter() - start_time
        result.settings = settings
        return result

    def _chunks(self, seed: int, settings: dict, exact: dict | None, bar) -> list[AISResult]:
        parts, n = [], len(self.batches)
        starts, batches = range(0, n, self.batch_size), self.batches.in_order(self.batch_size)
        for first, batch in zip(starts, batches, strict=True):
            ids = self.point_ids[first : first + batch[0].shape[0]]
            chains = _Chains(self.model, batch, self.shape, ids, seed, settings, self.chains)
            parts.append(chains.anneal(None if exact is None else chains.points(exact, first)))
            bar.update(batch[0].shape[0])
        return parts


class _Chains:
    """C chains for each of M points, as R = M * C rows (point-major) of one vectorized program
    run."""

    def __init__(
        self, model, batch: tuple, shape, ids: torch.Tensor, seed: int, settings: dict, chains: int
    ) -> None:
        self.model, self.shape, self.settings, self.chains = model, shape, settings, chains
        self.m = batch[0].shape[0]
        self.batch = tuple(t.repeat_interleave(chains, dim=0) for t in batch)
        self.rows, self.device = self.m * chains, batch[0].device
        self.streams = Streams(seed, ids, chains, self.device)
        # the guide's trace: every latent site, its shape
        self.trace = program.trace_once(model, self.batch)[1]
        layout = Layout(self.trace, shape.continuous_sites, self.rows, shape.data_plate)
        self.potential = Potential(model, self.batch, shape, layout, settings["start"])

    def _dim(self, name: str) -> int:
        return point_dim(self.trace.nodes[name], self.shape.data_plate)

    def points(self, values: dict, first: int) -> dict:
        """This chunk's points of site values held for the whole data set."""
        missing = set(self.shape.continuous_sites) - set(values)
        if missing:
            raise PyvaeError(f"exact latents lack site {sorted(missing)[0]!r}")
        return {
            k: v.narrow(self._dim(k), first, self.m).to(self.device)
            for k, v in values.items()
            if k in self.shape.continuous_sites
        }

    def _initial(self, known: dict | None) -> dict:
        """Site values to start from: exact draws repeated over the chains, else draws from f_0
        per point."""
        if known is not None:
            return {k: v.repeat_interleave(self.chains, dim=self._dim(k)) for k, v in known.items()}
        start_program = self.model.guide if self.settings["start"] == "guide" else self.model.model
        values, plate = {}, self.shape.data_plate
        for p, g in enumerate(self.streams.generators):
            rows = slice(p * self.chains, (p + 1) * self.chains)
            draw = int(torch.randint(2**62, (1,), generator=g))
            with seeded(self.device, draw), torch.no_grad(), program.LocalParams():
                trace = poutine.trace(start_program).get_trace(*(t[rows] for t in self.batch))
            for name in self.shape.continuous_sites:
                site = trace.nodes[name]
                values.setdefault(name, []).append((site["value"], point_dim(site, plate)))
        return {k: torch.cat([v for v, _ in parts], dim=parts[0][1]) for k, parts in values.items()}

    def anneal(self, known: dict | None) -> AISResult:
        """log w per row along the path (reversed from exact draws ``known``), then the result."""
        s, potential = self.settings, self.potential
        betas = schedule(s["num_steps"], s["schedule"]).tolist()
        if known is not None:
            betas = betas[::-1]
        u = potential.layout.unconstrain(self._initial(known))
        potential.prepare(u, s["compile"])
        state = potential.evaluate(u)
        eps = torch.full((self.rows,), s["step_size"], device=self.device)
        log_w = torch.zeros(self.rows, dtype=torch.float64, device=self.device)
        accept_sum, divergences = torch.zeros(self.rows), torch.zeros(self.rows)
        accept_sum, divergences = accept_sum.to(self.device), divergences.to(self.device)
        transitions = max(len(betas) - 2, 1)
        acc_by_step, eps_by_step = torch.zeros(transitions), torch.zeros(transitions)
        for t in range(1, len(betas)):
            log_w += (betas[t] - betas[t - 1]) * (state["joint"] - state["f0"]).double()
            if t == len(betas) - 1:
                break  # the last transition is skipped: nothing reads it
            state, accept, diverged = transition(
                potential, self.streams, state, betas[t], eps, s["leapfrog_steps"]
            )
            eps = adapt_step_size(eps, accept, s["target_acceptance"], s["adapt"])
            accept_sum += accept
            divergences += diverged
            acc_by_step[t - 1], eps_by_step[t - 1] = accept.mean(), eps.mean()
        by_step = (accept_sum / transitions, divergences, acc_by_step, eps_by_step)
        return self.result(log_w, *by_step, reverse=known is not None)

    def result(
        self, log_w, acceptance, divergences, acc_by_step, eps_by_step, reverse: bool
    ) -> AISResult:
        """log (1/C) sum_c w_c over the finite chains (negated for reverse AIS: the estimate is of
        1/p(x)) and its delta-method error, per point."""
        c = self.chains
        log_w = log_w.reshape(self.m, c)
        finite = torch.isfinite(log_w)
        masked = torch.where(finite, log_w, torch.full_like(log_w, -math.inf))
        used = finite.sum(1).clamp(min=1).double()
        log_mean = torch.logsumexp(masked, dim=1) - used.log()
        scaled = torch.where(finite, torch.exp(masked - log_mean[:, None]), torch.zeros_like(log_w))
        variance = ((scaled - 1) ** 2 * finite).sum(1) / (used - 1).clamp(min=1)
        return AISResult(
            log_px=(-log_mean if reverse else log_mean).float().cpu(),
            stderr=(variance / used).sqrt().float().cpu(),
            log_weights=log_w.float().cpu(),
            acceptance=acceptance.reshape(self.m, c).mean(1).cpu(),
            divergences=divergences.reshape(self.m, c).sum(1).cpu(),
            failed_chains=(~finite).sum(1).cpu(),
            compiled=torch.full((self.m,), self.potential.compiled),
            acceptance_by_step=acc_by_step,
            step_size_by_step=eps_by_step,
            **{k: self.settings[k] for k in ("num_steps", "leapfrog_steps", "start", "schedule")},
            num_chains=c,
        )
