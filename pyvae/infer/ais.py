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

Both densities come from the programs themselves: the model and the guide conditioned on the
chain's values and traced (:mod:`pyvae.program`), so the potential is the model as written.
With ``compile=True`` one such evaluation, gradients included, is recorded as a graph and compiled
(:mod:`pyvae.compiled`): the same operations without re-running Python and Pyro's handlers, and
with the elementwise kernels fused; a second graph returns the gradients alone, for the leapfrog
steps inside a trajectory, which read nothing else (the compiler drops the values' work). A
program whose Python decides by the latents' values (control flow, ``.tolist()``) runs as
written, and :func:`compile_session` warns once why.
With a flow guide, log q(z|x) at a point the guide did not draw inverts the flow (one pass
per dimension for an autoregressive one): start at the prior for speed there.

HMC (identity mass matrix, ``leapfrog_steps`` steps) moves unconstrained coordinates u with
z = T(u) (``biject_to`` of each site's support); the Jacobian enters the potential and cancels
in the weights. Each chain has its own step size, multiplied after every transition by
``adapt`` when its acceptance probability is above ``target_acceptance`` and divided by it
below (Wu et al.'s rule). That makes a kernel depend on the chain's past, which the exactness
argument of AIS does not cover; the bias is below the Monte Carlo error in the tests against
closed forms, and BDMC bounds whatever is left. A proposal whose energy is not finite or off
by more than :data:`DIVERGENCE` nats is rejected and counted as a divergence.

Random numbers come from one generator per data point, seeded by (seed, point index): a
point's result does not depend on which other points share its chunk or its process (up to
floating-point rounding of batched arithmetic; bit for bit under a fixed chunk grid).
Everything is in nats per data point; the NLL is the negative of ``log_px``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyro
import torch
from pyro import poutine
from torch.distributions import biject_to
from tqdm.auto import tqdm

from pyvae import program
from pyvae.compiled import NotCompiled, compile_function
from pyvae.data.batching import Batches, check_data, resolve_device
from pyvae.errors import PyvaeError, PyvaeWarning, positive_int, positive_number
from pyvae.infer.importance import CHUNK_ELEMENTS, drawn_once

SCHEDULES = ("sigmoid", "linear")
STARTS = ("guide", "prior")
#: an energy error above this many nats counts as a divergent (and rejected) proposal
DIVERGENCE = 1000.0
#: why the AIS runs of the current :func:`compile_session` run uncompiled, once one could not compile
_session: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "pyvae_ais_compile_session", default=None
)


@contextlib.contextmanager
def compile_session() -> Iterator[dict]:
    """The AIS runs inside share one attempt at ``compile=True``: the first that must run the program
    uncompiled warns why, and the rest run it as written without trying (or warning) again. Each
    :func:`ais_log_likelihood` call is a session of its own unless it runs inside one (evaluate, bdmc
    and gap run all their chunks and ladders inside one)."""
    outer = _session.get()
    if outer is not None:
        yield outer
        return
    token = _session.set({})
    try:
        yield _session.get()
    finally:
        _session.reset(token)


def schedule(num_steps: int, kind: str = "sigmoid", sharpness: float = 4.0) -> torch.Tensor:
    """b_0 = 0 < ... < b_T = 1 as a float64 tensor of T + 1 values.

    ``sigmoid`` (Grosse et al. 2013, Wu et al. 2017): b~_t = sigmoid(sharpness (2t/T - 1)),
    rescaled to run from 0 to 1: small steps at both ends, where the densities change most.
    ``linear``: b_t = t / T.
    """
    positive_int("num_steps", num_steps)
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    if kind == "linear":
        return t
    if kind != "sigmoid":
        raise PyvaeError(f"unknown AIS schedule {kind!r}; choose from {', '.join(SCHEDULES)}")
    b = torch.sigmoid(sharpness * (2 * t - 1))
    return (b - b[0]) / (b[-1] - b[0])


@dataclass
class AISResult:
    """Per-data-point results of :func:`ais_log_likelihood` (or, for :func:`reverse_ais`, of the upper bound).

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

    def __len__(self) -> int:
        return self.log_px.shape[0]

    @staticmethod
    def concat(parts: list[AISResult]) -> AISResult:
        """The results of consecutive chunks of points as one (the by-step curves weighted by points)."""
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
    (:mod:`pyvae.compiled`): about 2.5-3x faster per evaluation on a CPU, for a one-off compilation of
    about 30-45 s per chunk size; ``compiled`` in the result says which points ran compiled.
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


def reverse_ais(model, data, latents: dict, **kwargs) -> AISResult:
    """Reverse AIS (b from 1 to 0) from exact posterior draws ``latents`` {site: value, as the guide would
    hold it for ``data``'s points}: ``log_px`` is -log (1/C) sum_c w_c, a stochastic *upper* bound on
    log p(x). ``latents`` must be draws of p(z | x), e.g. the z that generated x (:func:`simulate`).
    Other arguments as :func:`ais_log_likelihood`."""
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
) -> dict:
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
    """The program's structure, if AIS can run it (continuous latent sites only) with ``settings``; else a PyvaeError."""
    if settings:
        _settings(**settings)
    shape = program.structure(model, batch)
    discrete = [s for s in shape.latent_sites if s not in shape.continuous_sites]
    if discrete:
        raise PyvaeError(
            f"AIS anneals continuous latents; {type(model).__name__}'s site {discrete[0]!r} is discrete: "
            "score this model by importance sampling (--method is), which sums or samples it"
        )
    return shape


#: what a seed is for: independent streams for every (seed, point index, purpose)
STREAMS = {"ais": 0, "simulate": 1, "importance": 2, "local": 3}


def point_seed(seed: int, index: int, purpose: str = "ais") -> int:
    """The seed of data point ``index``'s random stream for ``purpose`` (a key of :data:`STREAMS`)."""
    return int(
        np.random.SeedSequence([seed, index, STREAMS[purpose]]).generate_state(1, np.uint64)[0] >> 1
    )


class _Layout:
    """Where each continuous latent site lives in a chain's flat vector of unconstrained coordinates.

    Sites are kept row first (the data dimension moved to the front), so that a site's
    transform sees its event dimensions last and every row's coordinates are contiguous.
    """

    def __init__(self, trace, sites: list[str], rows: int, plate: str) -> None:
        self.sites = []
        for name in sites:
            site = trace.nodes[name]
            dim, transform = data_dim(trace, name, plate), biject_to(site["fn"].support)
            rest = transform.inv(site["value"].movedim(dim, 0)).shape[1:]
            self.sites.append((name, dim, transform, rest, math.prod(rest)))
        self.rows, self.dim = rows, sum(s[-1] for s in self.sites)

    def unconstrain(self, values: dict) -> torch.Tensor:
        """(rows, D) coordinates of site values as the programs hold them."""
        parts = [
            t.inv(values[name].movedim(dd, 0)).reshape(self.rows, size)
            for name, dd, t, _, size in self.sites
        ]
        return torch.cat(parts, dim=1)

    def constrain(self, u: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """({site: value as the programs hold it}, log |det dz/du| per row) of coordinates u (rows, D)."""
        values, log_jac, offset = {}, torch.zeros(u.shape[0], dtype=u.dtype, device=u.device), 0
        for name, data_dim, transform, rest, size in self.sites:
            piece = u[:, offset : offset + size].reshape(u.shape[0], *rest)
            offset += size
            z = transform(piece)
            if not _is_identity(transform):
                log_jac = log_jac + transform.log_abs_det_jacobian(piece, z).reshape(
                    u.shape[0], -1
                ).sum(1)
            values[name] = z.movedim(0, data_dim)
        return values, log_jac


def _is_identity(transform) -> bool:
    """Whether ``biject_to`` gave the identity (real support): no Jacobian to compute."""
    while isinstance(transform, torch.distributions.transforms.IndependentTransform):
        transform = transform.base_transform
    return (
        isinstance(transform, torch.distributions.transforms.ComposeTransform)
        and not transform.parts
    )


def data_dim(trace, name: str, plate: str) -> int:
    """The dimension of site ``name``'s value that indexes the data points (the plate ``plate``)."""
    site = trace.nodes[name]
    return site["value"].dim() - len(site["fn"].event_shape) + program.data_dim(site, plate)


def _same(mine: torch.Tensor, program_s: torch.Tensor) -> bool:
    """Whether a compiled density (or gradient) is the program's to float rounding (1e-4 of the largest
    finite magnitude in the row: fusion reorders sums), NaN and infinities in the same places."""
    if mine.shape != program_s.shape or mine.dtype != program_s.dtype:
        return False
    a, b = mine.reshape(len(mine), -1), program_s.reshape(len(program_s), -1)
    scale = 1 + torch.where(torch.isfinite(b), b.abs(), torch.zeros_like(b)).amax(1, keepdim=True)
    return bool(
        (
            torch.isclose(a, b, rtol=0, atol=0, equal_nan=True) | ((a - b).abs() <= 1e-4 * scale)
        ).all()
    )


class _Sampler:
    """The data, the program's layout and the chunking shared by forward and reverse AIS."""

    @classmethod
    def build(cls, model, data, num_chains, device, batch_size, point_ids) -> _Sampler:
        self = cls()
        positive_int("num_chains", num_chains)
        self.model, self.chains = model, num_chains
        self.device = resolve_device(device or next(model.parameters()).device)
        model.to(self.device).eval()
        self.batches = Batches(drawn_once(data), self.device, model)
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
        for first, batch in zip(
            range(0, n, self.batch_size), self.batches.in_order(self.batch_size)
        ):
            ids = self.point_ids[first : first + batch[0].shape[0]]
            chains = _Chains(self.model, batch, self.shape, ids, seed, settings, self.chains)
            parts.append(chains.anneal(None if exact is None else chains.points(exact, first)))
            bar.update(batch[0].shape[0])
        return parts


class _Chains:
    """C chains for each of M points, as R = M * C rows (point-major) of one vectorized program run."""

    def __init__(
        self, model, batch: tuple, shape, ids: torch.Tensor, seed: int, settings: dict, chains: int
    ) -> None:
        self.model, self.shape, self.settings, self.chains = model, shape, settings, chains
        self.m = batch[0].shape[0]
        self.batch = tuple(t.repeat_interleave(chains, dim=0) for t in batch)
        self.rows = self.m * chains
        self.generators = [torch.Generator().manual_seed(point_seed(seed, int(i))) for i in ids]
        self.device = batch[0].device
        self.nesting = shape.max_plate_nesting
        self.trace = program.trace_once(model, self.batch)[
            1
        ]  # the guide's: every latent site, its shape
        self.layout = _Layout(self.trace, shape.continuous_sites, self.rows, shape.data_plate)
        # set by anneal: constant_guide, compile
        self.guide_sites, self.potential, self.gradients = (
            None,
            self.densities,
            self.densities_gradients,
        )

    def points(self, values: dict, first: int) -> dict:
        """This chunk's points of site values held for the whole data set."""
        missing = set(self.shape.continuous_sites) - set(values)
        if missing:
            raise PyvaeError(f"exact latents lack site {sorted(missing)[0]!r}")
        return {
            k: v.narrow(data_dim(self.trace, k, self.shape.data_plate), first, self.m).to(
                self.device
            )
            for k, v in values.items()
            if k in self.shape.continuous_sites
        }

    # -- densities ------------------------------------------------------------------
    def _guide_trace(self, values: dict):
        return poutine.trace(poutine.condition(self.model.guide, data=values)).get_trace(
            *self.batch
        )

    def constant_guide(self, u: torch.Tensor) -> dict | None:
        """The guide's sites, if none of their distributions depends on the latents (a guide whose
        parameters are functions of x alone): then log q(z|x) is their ``log_prob`` at the chain's z
        without running the guide's networks again. None for a guide like q(z1|x) q(z2|z1)."""
        with torch.enable_grad():
            values, _ = self.layout.constrain(u.detach().requires_grad_(True))
            with program.LocalParams():
                trace = self._guide_trace(values)
        sites = {s["name"]: s for s in program.sample_sites(trace)}
        # the module's parameters are frozen here, so only a path from u makes a tensor need a gradient
        if any(
            site["fn"].log_prob(site["value"].detach()).requires_grad for site in sites.values()
        ):
            return None
        return sites

    def _log_prob(self, trace, names=None) -> torch.Tensor:
        total = torch.zeros(self.rows, device=self.device)
        sites = trace.values() if isinstance(trace, dict) else program.sample_sites(trace)
        for site in sites:
            if site["infer"].get("is_auxiliary") or (
                names is not None and site["name"] not in names
            ):
                continue
            total = (
                total
                + program.site_log_prob(site, self.nesting, 0, self.rows, self.shape.data_plate)[0]
            )
        return total

    def densities(self, u: torch.Tensor) -> tuple:
        """(log f_0, log p(x, z), log |J|, d/du (log f_0 + log |J|), d/du (log p + log |J|)) per row at u,
        from the programs as written.

        The two densities see two leaves holding the same u, so one backward pass gives both gradients.
        """
        with torch.enable_grad():
            u0, u1 = u.detach().requires_grad_(True), u.detach().requires_grad_(True)
            values, log_jac = self.layout.constrain(u1)
            with program.LocalParams():
                model_trace = poutine.trace(
                    poutine.condition(self.model.model, data=values)
                ).get_trace(*self.batch)
                log_joint = self._log_prob(model_trace)
                if self.settings["start"] == "prior":
                    log_f0 = self._log_prob(model_trace, set(self.shape.latent_sites))
                    values0, log_jac0 = values, log_jac
                else:
                    values0, log_jac0 = self.layout.constrain(u0)
                    if self.guide_sites is not None:
                        log_f0 = self._log_prob(
                            {
                                name: {**site, "value": values0[name]}
                                for name, site in self.guide_sites.items()
                            }
                        )
                    else:
                        log_f0 = self._log_prob(self._guide_trace(values0))
            if self.settings["start"] == "prior":  # f_0 is part of the model's trace: a second pass
                g0 = torch.autograd.grad((log_f0 + log_jac).sum(), u1, retain_graph=True)[0]
                g1 = torch.autograd.grad((log_joint + log_jac).sum(), u1)[0]
            else:
                g0, g1 = torch.autograd.grad(
                    (log_f0 + log_jac0).sum() + (log_joint + log_jac).sum(), (u0, u1)
                )
        return log_f0.detach(), log_joint.detach(), log_jac.detach(), g0, g1

    def densities_gradients(self, u: torch.Tensor) -> tuple:
        """The two gradients of :meth:`densities` alone: all that a leapfrog step short of the
        trajectory's end reads. Compiled, the values it does not return are not computed (on the
        default model the likelihood's log-mass over every pixel: 9 of 10 evaluations skip it)."""
        return self.densities(u)[3:]

    def compile(self, u: torch.Tensor) -> None:
        """:meth:`densities` and :meth:`densities_gradients` compiled at u
        (:func:`pyvae.compiled.compile_function`) as ``potential`` and ``gradients``, if they give the
        program's numbers there (to float rounding: fusion reorders sums); else the program as
        written, with a warning saying why the first time in the :func:`compile_session`."""
        session = _session.get()
        if "uncompiled" in session:
            return
        frozen = [*self.model.parameters(), *self.model.buffers()]
        try:
            potential = compile_function(self.densities, u, frozen=frozen)
            gradients = compile_function(self.densities_gradients, u, frozen=frozen)
            program_s = self.densities(u)
            if not all(map(_same, (*potential(u), *gradients(u)), (*program_s, *program_s[3:]))):
                raise NotCompiled("its compiled densities differ from the program's")
        except NotCompiled as why:
            session["uncompiled"] = str(why)
            warnings.warn(f"AIS runs the program uncompiled: {why}", PyvaeWarning, stacklevel=2)
            return
        self.potential, self.gradients = potential, gradients

    def evaluate(self, u: torch.Tensor) -> dict:
        """The chain's state at u: its coordinates, the densities and their gradients (:meth:`densities`)."""
        f0, joint, jac, g0, g1 = self.potential(u)
        return {"u": u.detach(), "f0": f0, "joint": joint, "jac": jac, "g0": g0, "g1": g1}

    @staticmethod
    def log_density(state: dict, b: float) -> torch.Tensor:
        return (1 - b) * state["f0"] + b * state["joint"] + state["jac"]

    @staticmethod
    def grad(state: dict, b: float) -> torch.Tensor:
        return (1 - b) * state["g0"] + b * state["g1"]

    # -- randomness: one stream per point ----------------------------------------------
    def _normal(self, dim: int) -> torch.Tensor:
        draws = [torch.randn(self.chains, dim, generator=g) for g in self.generators]
        return torch.cat(draws).to(self.device)

    def _uniform(self) -> torch.Tensor:
        return torch.cat([torch.rand(self.chains, generator=g) for g in self.generators]).to(
            self.device
        )

    def _initial(self, known: dict | None) -> dict:
        """Site values to start from: exact draws repeated over the chains, else draws from f_0 per point."""
        if known is not None:
            return {
                k: v.repeat_interleave(
                    self.chains, dim=data_dim(self.trace, k, self.shape.data_plate)
                )
                for k, v in known.items()
            }
        start_program = self.model.guide if self.settings["start"] == "guide" else self.model.model
        values = {}
        for p, g in enumerate(self.generators):
            rows = slice(p * self.chains, (p + 1) * self.chains)
            with program.fork_rng(self.device), torch.no_grad(), program.LocalParams():
                torch.manual_seed(int(torch.randint(2**62, (1,), generator=g)))
                trace = poutine.trace(start_program).get_trace(*(t[rows] for t in self.batch))
            for name in self.shape.continuous_sites:
                values.setdefault(name, []).append(
                    (trace.nodes[name]["value"], data_dim(trace, name, self.shape.data_plate))
                )
        return {k: torch.cat([v for v, _ in parts], dim=parts[0][1]) for k, parts in values.items()}

    # -- the annealing loop -----------------------------------------------------------
    def anneal(self, known: dict | None) -> AISResult:
        s = self.settings
        betas = schedule(s["num_steps"], s["schedule"]).tolist()
        if known is not None:
            betas = betas[::-1]
        u = self.layout.unconstrain(self._initial(known))
        self.guide_sites = self.constant_guide(u) if s["start"] == "guide" else None
        if s["compile"]:
            self.compile(u)
        state = self.evaluate(u)
        eps = torch.full((self.rows,), s["step_size"], device=self.device)
        log_w = torch.zeros(self.rows, dtype=torch.float64, device=self.device)
        accept_sum = torch.zeros(self.rows, device=self.device)
        divergences = torch.zeros(self.rows, device=self.device)
        acc_by_step, eps_by_step = (
            torch.zeros(max(len(betas) - 2, 1)),
            torch.zeros(max(len(betas) - 2, 1)),
        )
        for t in range(1, len(betas)):
            log_w += (betas[t] - betas[t - 1]) * (state["joint"] - state["f0"]).double()
            if t == len(betas) - 1:
                break
            state, accept, diverged = self.transition(state, betas[t], eps)
            eps = self.adapt(eps, accept)
            accept_sum += accept
            divergences += diverged
            acc_by_step[t - 1], eps_by_step[t - 1] = accept.mean(), eps.mean()
        transitions = max(len(betas) - 2, 1)
        return self.result(
            log_w,
            accept_sum / transitions,
            divergences,
            acc_by_step,
            eps_by_step,
            reverse=known is not None,
        )

    def transition(self, state: dict, b: float, eps: torch.Tensor):
        """One HMC transition leaving f_b invariant: (new state, acceptance probability, divergent) per row."""
        momentum = self._normal(self.layout.dim)
        step = eps[:, None]
        h0 = -self.log_density(state, b) + 0.5 * (momentum**2).sum(1)
        p = momentum + 0.5 * step * self.grad(state, b)
        u = state["u"]
        for _ in range(self.settings["leapfrog_steps"] - 1):
            u = u + step * p
            g0, g1 = self.gradients(u)
            p = p + step * self.grad({"g0": g0, "g1": g1}, b)
        proposal = self.evaluate(u + step * p)  # the trajectory's end: its densities too
        p = p + 0.5 * step * self.grad(proposal, b)
        h1 = -self.log_density(proposal, b) + 0.5 * (p**2).sum(1)
        error = h1 - h0
        diverged = ~torch.isfinite(error) | (error > DIVERGENCE)
        accept = torch.where(diverged, torch.zeros_like(error), torch.exp(-error.clamp(min=0)))
        take = self._uniform() < accept
        new = {
            k: torch.where(take.reshape(-1, *(1,) * (v.dim() - 1)), proposal[k], v)
            for k, v in state.items()
        }
        return new, accept, diverged.float()

    def adapt(self, eps: torch.Tensor, accept: torch.Tensor) -> torch.Tensor:
        s = self.settings
        factor = torch.where(accept > s["target_acceptance"], s["adapt"], 1 / s["adapt"])
        return (eps * factor).clamp(1e-5, 10.0)

    def result(
        self, log_w, acceptance, divergences, acc_by_step, eps_by_step, reverse: bool
    ) -> AISResult:
        c = self.chains
        log_w = log_w.reshape(self.m, c)
        finite = torch.isfinite(log_w)
        # the estimate of p(x) (forward) or of 1/p(x) (reverse) over the chains that finished
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
            compiled=torch.full((self.m,), self.potential != self.densities),
            acceptance_by_step=acc_by_step,
            step_size_by_step=eps_by_step,
            num_steps=self.settings["num_steps"],
            num_chains=c,
            leapfrog_steps=self.settings["leapfrog_steps"],
            start=self.settings["start"],
            schedule=self.settings["schedule"],
        )
