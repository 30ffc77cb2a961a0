"""Importance-sampled log-likelihoods and diagnostics of the guide.

The estimator, per data point x, with the guide as proposal::

    z_1..z_K ~ q(z|x),   w_k = p(z_k) p(x|z_k) / q(z_k|x)
    log p^(x) = log (1/K) sum_k w_k

E[log p^(x)] <= log p(x) (Jensen): the IWAE-K bound (Burda et al. 2016). It rises
with K and reaches log p(x) as K -> infinity; K = 1 is the ELBO. Its Monte Carlo
standard error comes from the delta method on the mean of the weights,
se = sqrt(Var(w) / K) / mean(w), which is itself unreliable when the weights are
heavy-tailed: the Pareto k^ of the weights (PSIS, Vehtari et al. 2024) says when.
With k^ above min(1 - 1/log10 K, 0.7) the estimate should not be trusted.

The log-weights come from the model's own Pyro programs (:func:`pyvae.program.log_weights`:
the guide traced with K vectorized particles, the model replayed against it), so any
model (any latent sites, labels, nested plates, enumerated discrete guide sites, which
are summed exactly) is scored as written, with no second implementation of a density.
Everything is in nats per data point; the NLL is the negative of ``log_px``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import arviz
import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from pyvae import program
from pyvae.compiled import (
    NotCompiled,
    Recordings,
    check_compile,
    compile_function,
    describe,
    fingerprint,
)
from pyvae.data.batching import Batches, as_points, check_data, resolve_device, take
from pyvae.errors import PyvaeError, PyvaeWarning, positive_int, warn

#: how many floats one chunk's rows may hold: 32 MB in float32 on a CPU, 128 MB on a GPU. Each
#: chunk is one trace of guide and model, whose Pyro bookkeeping costs ~1-2 ms; on a CPU an
#: 8 MB chunk (cache-sized) made that overhead ~25% of the time, 32 MB makes it small
#: (benchmarks/RESULTS.md)
CHUNK_ELEMENTS = {"cpu": 2**23, "cuda": 2**25}

#: points traced at a time by :func:`check_support`
SUPPORT_CHUNK = 1024
#: points per chunk of a fixed grid on which draws are seeded and processes share work
GRID = {"cpu": 64, "cuda": 512}
#: what a seed is for: independent streams for every (seed, point index, purpose)
STREAMS = {"ais": 0, "simulate": 1, "importance": 2, "local": 3}

KHAT_BANDS = (
    ("good", -math.inf, 0.5),
    ("ok", 0.5, 0.7),
    ("bad", 0.7, 1.0),
    ("very bad", 1.0, math.inf),
)


#: the fewest draws whose weights have a tail of 5 for arviz's Pareto fit:
#: ceil(min(0.2 K, 3 sqrt K)) >= 5
MIN_KHAT_SAMPLES = 21


def point_seed(seed: int, index: int, purpose: str = "ais") -> int:
    """The seed of data point ``index``'s random stream for ``purpose`` (a key of
    :data:`STREAMS`)."""
    state = np.random.SeedSequence([seed, index, STREAMS[purpose]]).generate_state(1, np.uint64)
    return int(state[0] >> 1)


@contextlib.contextmanager
def seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Torch's generators seeded with ``seed`` inside, restored after
    (:func:`pyvae.program.fork_rng`): the caller's random streams do not move."""
    with program.fork_rng(device):
        torch.manual_seed(seed)
        yield


def point_dim(site, plate: str) -> int:
    """The (negative) dimension of ``site``'s value that indexes the data points: the data
    plate's batch dimension (:func:`pyvae.program.data_dim`) left of the event dimensions."""
    return program.data_dim(site, plate) - site["fn"].event_dim


def khat_threshold(num_samples: int) -> float:
    """The sample-size dependent reliability threshold min(1 - 1/log10 K, 0.7) of Vehtari et al."""
    return min(1 - 1 / math.log10(num_samples), 0.7) if num_samples > 10 else 0.0


@dataclass
class LogLikelihood:
    """Per-data-point results of :func:`log_likelihood`, each a tensor of shape (N,).

    ``log_px``: log (1/K) sum_k w_k, the IWAE-K estimate of log p(x);
    ``stderr``: its Monte Carlo standard error; ``elbo``: mean_k log w_k, the ELBO
    estimated from the same K draws; ``khat``: the Pareto shape of the weights;
    ``ess``: 1 / sum_k w~_k^2 with w~ the normalized weights (K when the weights are equal; with
    enumerated values, the average of each value's ESS weighted by its share of p^, never above K);
    ``iwae``: {K': the IWAE-K' bound} for K' dividing the draws into K/K' groups;
    ``latent_means``: {site: (N, *event) E_q[site|x]} and ``kl``: {site: (N,) E_q[log q - log p]
    of that site} for every continuous latent site in the data plate alone, ``kl_per_dim``:
    {site: (N, D)} where guide and model factorize over the site's dimensions; all estimated
    from the same draws. With enumerated discrete guide sites (C values), ``log_weights`` is
    (N, C, K) instead of (N, K).
    """

    log_px: torch.Tensor
    stderr: torch.Tensor
    elbo: torch.Tensor
    khat: torch.Tensor
    ess: torch.Tensor
    iwae: dict[int, torch.Tensor]
    latent_means: dict[str, torch.Tensor]
    kl: dict[str, torch.Tensor]
    kl_per_dim: dict[str, torch.Tensor]
    num_samples: int
    log_weights: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.log_px.shape[0]

    @staticmethod
    def concat(parts: list[LogLikelihood]) -> LogLikelihood:
        """The results of consecutive chunks of points as one."""
        first = parts[0]
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        per_site = lambda name: {  # noqa: E731
            k: torch.cat([getattr(p, name)[k] for p in parts]) for k in getattr(first, name)
        }
        return LogLikelihood(
            **{name: cat(name) for name in ("log_px", "stderr", "elbo", "khat", "ess")},
            iwae={k: torch.cat([p.iwae[k] for p in parts]) for k in first.iwae},
            **{name: per_site(name) for name in ("latent_means", "kl", "kl_per_dim")},
            num_samples=first.num_samples,
            log_weights=None if first.log_weights is None else cat("log_weights"),
        )

    def khat_bands(self) -> dict[str, float]:
        """Fraction of points whose k^ is good (< 0.5), ok (< 0.7), bad (< 1) and very bad
        (>= 1)."""
        k = self.khat
        return {name: float(((k >= lo) & (k < hi)).float().mean()) for name, lo, hi in KHAT_BANDS}


def iwae_sizes(num_samples: int) -> list[int]:
    """1, 5, 10, 50, 100, ... up to and always including ``num_samples``."""
    sizes, base = [], 1
    while base <= num_samples:
        sizes += [k for k in (base, 5 * base) if k < num_samples]
        base *= 10
    return sorted(set(sizes)) + [num_samples]


@torch.no_grad()
@program.evaluates
def log_likelihood(
    model: torch.nn.Module,
    data,
    num_samples: int = 5000,
    batch_size: int | None = None,
    *,
    device: str | torch.device | None = None,
    keep_log_weights: bool = False,
    progress: bool = False,
    compile: str = "auto",
    point_ids: torch.Tensor | None = None,
) -> LogLikelihood:
    """Importance-sampled log p(x) of every data point, K = ``num_samples``, from the model's
    programs.

    ``data`` is a tensor x, a tuple (x, y), an ImageSet (one draw if it binarizes
    dynamically) or a Dataset, served as the model's signature asks. Vectorized over
    samples and data points and chunked so that memory is bounded by the chunk, not by
    K x N: ``batch_size`` points at a time (chosen from :data:`CHUNK_ELEMENTS` when None),
    their K samples in as few passes as fit. The log-weights are kept only with
    ``keep_log_weights``.

    ``compile`` (``auto``, ``on``, ``off``): whether each chunk's numbers come from one graph
    recorded from the programs and compiled with the weights frozen (:class:`Scorer`; the same
    numbers from the same draws, up to floating-point reassociation). ``auto`` compiles an
    estimate of at least :data:`AUTO_DRAWS` draws in all. ``point_ids`` (default 0..N-1) are the
    points' indices in a larger set, which an error about a point names.
    """
    positive_int("num_samples", num_samples)
    check_compile(compile)
    device = resolve_device(device or next(model.parameters()).device)
    model.to(device)
    batches = Batches(as_points(data), device, model)
    check_data(model, batches, "data")
    ids = torch.arange(len(batches)) if point_ids is None else torch.as_tensor(point_ids).cpu()
    check_support(model, batches, ids)
    with program.invalid_named():
        shape = program.structure(model, batches.first(1))
    strata, batch_size, sample_chunk = _chunks(model, batches, shape, num_samples, batch_size)
    n, sizes = len(batches), iwae_sizes(num_samples)

    # results go into tensors allocated once: thousands of small per-chunk tensors kept
    # alive between the large chunk buffers fragment the heap until memory grows with N
    out = {name: torch.empty(n) for name in ("log_px", "stderr", "elbo", "khat", "ess")}
    iwae = torch.empty(len(sizes), n)
    stats = _SiteStats(shape, n)
    scorer = Scorer.of(model, shape, stats, compile, n * num_samples)
    elbo = torch.zeros(n)
    log_weights = torch.empty(n, strata, num_samples) if keep_log_weights else None
    # a bar only on a terminal: no carriage-return frames in log files
    bar = tqdm(
        total=n,
        desc=f"log p(x), K={num_samples}",
        unit="pt",
        disable=not progress or not sys.stderr.isatty(),
        leave=False,
    )
    # the data were checked above; re-validating every chunk would only repeat that work
    with pyro.validation_enabled(False):
        starts, served = range(0, n, batch_size), batches.in_order(batch_size)
        for start, batch in zip(starts, served, strict=True):
            span = slice(start, start + batch[0].shape[0])
            chunks = []
            for s0 in range(0, num_samples, sample_chunk):
                k = min(sample_chunk, num_samples - s0)
                per_point, chunk_elbo, values = scorer(batch, k, s0 == 0)
                chunks.append(per_point)
                stats.add(values, k, span, per_dim=s0 == 0)
                elbo[span] += k * chunk_elbo.cpu()
            log_w = torch.cat(chunks, dim=2)  # (M, C, K)
            _refuse_nan(log_w, batch, ids[start:])
            for name, values in _summarize(log_w, sizes).items():
                if name == "iwae":
                    iwae[:, span] = values
                else:
                    out[name][span] = values.cpu()
            if keep_log_weights:
                log_weights[span] = log_w.cpu()
            bar.update(batch[0].shape[0])
    bar.close()
    out["elbo"] = elbo / num_samples
    if log_weights is not None and strata == 1:
        log_weights = log_weights[:, 0]
    return LogLikelihood(
        **out,
        iwae={size: iwae[i] for i, size in enumerate(sizes)},
        **stats.result(),
        num_samples=num_samples,
        log_weights=log_weights,
    )


def check_support(model: torch.nn.Module, batches: Batches, point_ids: torch.Tensor) -> None:
    """Every point of a program that has no ``check_batch`` of its own traced once with Pyro's
    validation (unless the user turned it off: the scores that follow run without it): an
    observation outside its likelihood's support (grey pixels under a Bernoulli) is a one-line
    error naming the site and the first such point (its index in ``point_ids``), not a number."""
    if hasattr(model, "check_batch") or not pyro.infer.util.is_validation_enabled():
        return
    first = 0
    for batch in batches.in_order(SUPPORT_CHUNK):
        try:
            _validated(model, batch)
        except PyvaeError:  # which point: each of the chunk's alone, on this rare path only
            for i in range(len(batch[0])):
                where = f"data point {int(point_ids[first + i])}: "
                _validated(model, take(batch, i, i + 1), where)
            raise
        first += len(batch[0])


def _validated(model: torch.nn.Module, batch: tuple, where: str = "") -> None:
    """The program traced on ``batch`` with Pyro's validation; what it finds is a
    :class:`PyvaeError` after ``where``."""
    with program.invalid_named(where), pyro.validation_enabled(True):
        program.trace_once(model, batch)[0].compute_log_prob()


def _refuse_nan(log_w: torch.Tensor, batch: tuple, point_ids: torch.Tensor) -> None:
    """A NaN log-weight makes log p(x) NaN: an error naming the point, never a number."""
    nan = log_w.isnan().flatten(1).any(1)
    if bool(nan.any()):
        i = int(torch.nonzero(nan)[0])
        x = batch[0][i]
        why = (
            "its data hold NaN"
            if x.is_floating_point() and bool(x.isnan().any())
            else "the model's densities are NaN there"
        )
        raise PyvaeError(f"log p(x) of data point {int(point_ids[i])} is NaN: {why}")


#: ``compile="auto"`` compiles an estimate with at least this many draws (points x K) in all: on a
#: CPU about a minute of the default model as written, which a compilation (10-40 s the first
#: time, a few seconds from inductor's cache) repays
AUTO_DRAWS = 2_000_000
#: the compiled chunk scorers of the current :func:`scoring_session`, by model and weights
_session: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "pyvae_scoring_session", default=None
)


def compiles(compile: str, draws: int) -> bool:
    """Whether an estimate of ``draws`` draws (points x K) in all is compiled: ``on``, or ``auto``
    with at least :data:`AUTO_DRAWS`."""
    return compile == "on" or (compile == "auto" and draws >= AUTO_DRAWS)


@contextlib.contextmanager
def scoring_session() -> Iterator[None]:
    """The :func:`log_likelihood` calls inside share their compiled chunks (evaluate makes one call
    per grid chunk of points): each kind of chunk is recorded once, not once per call."""
    if _session.get() is not None:
        yield
        return
    token = _session.set({})
    try:
        yield
    finally:
        _session.reset(token)


class Scorer:
    """One chunk's numbers, ``scorer(batch, k, per_dim)`` = (log-weights (M, C, K), the ELBO of the
    draws (M,), the site statistics :meth:`_SiteStats.values`): the programs run as written
    (:func:`pyvae.program.log_weights`), or recorded and compiled with the model's weights frozen
    (:func:`pyvae.compiled.compile_function`, as AIS compiles its densities). The guide's draws
    are inputs drawn as the program draws them, so a seeded chunk gives the same numbers either
    way. A kind of chunk (its shapes, K, ``per_dim``) is compiled the second time it comes; the
    first runs as written and settles which sites have statistics. A program that cannot be
    recorded runs as written, with a warning saying why."""

    def __init__(self, model, shape, stats: _SiteStats, compile: bool) -> None:
        self.model, self.shape, self.stats = model, shape, stats
        self.recordings = Recordings(compile, _uncompiled)
        self.names: dict[tuple, list] = {}  # each compiled kind's statistics, in output order

    @staticmethod
    def of(model, shape, stats: _SiteStats, compile: str, draws: int) -> Scorer:
        """The scorer of this call: the session's (with the weights as they are now) if any."""
        wanted = compiles(compile, draws)
        session = _session.get()
        if session is None or not wanted:
            return Scorer(model, shape, stats, wanted)
        key = (id(model), fingerprint([*model.parameters(), *model.buffers()]))
        if key not in session:
            session.clear()  # other weights: those scorers are done
            session[key] = Scorer(model, shape, stats, wanted)
        scorer = session[key]
        scorer.stats = stats
        return scorer

    def __call__(self, batch: tuple, k: int, per_dim: bool):
        key = (tuple(describe(a) for a in batch), k, per_dim)
        compiled = self.recordings.get(key, lambda: self._compiled(key, batch, k, per_dim))
        if compiled is None:
            return self._as_written(batch, k, per_dim)
        per_point, elbo, *values = compiled(*[a for a in batch if torch.is_tensor(a)])
        return per_point, elbo, dict(zip(self.names[key], values, strict=True))

    def _as_written(self, batch: tuple, k: int, per_dim: bool):
        w = program.log_weights(self.model, batch, k, self.shape)
        return w.per_point(), w.elbo(), self.stats.values(w, per_dim)

    def _compiled(self, key: tuple, batch: tuple, k: int, per_dim: bool) -> Callable:
        names: list = []
        tensors = [a for a in batch if torch.is_tensor(a)]

        def chunk(*given: torch.Tensor) -> tuple:
            served = iter(given)
            full = tuple(next(served) if torch.is_tensor(a) else a for a in batch)
            per_point, elbo, values = self._as_written(full, k, per_dim)
            names[:] = list(values)
            return (per_point, elbo, *values.values())

        frozen = [*self.model.parameters(), *self.model.buffers()]
        with program.recordable():
            compiled = compile_function(chunk, *tensors, module=self.model, frozen=frozen)
        self.names[key] = names
        return compiled


def _uncompiled(why: NotCompiled) -> None:
    """What :class:`Scorer`'s recordings say once, when a recording fails."""
    warn(f"importance sampling runs the program uncompiled: {why}")


def _chunks(model, batches, shape, num_samples: int, batch_size: int | None):
    """(strata, points per chunk, samples per pass): as many rows per pass as
    :data:`CHUNK_ELEMENTS` allows on the device; one sample at a time for a program that cannot
    vectorize particles (said once)."""
    device = batches.device
    strata, per_row = _chunk_shape(model, batches.first(1), shape)
    rows = max(1, CHUNK_ELEMENTS.get(device.type, 2**21) // per_row)
    if batch_size is None:
        batch_size = max(1, min(len(batches), rows // (num_samples if shape.vectorized else 1)))
    positive_int("batch_size", batch_size)
    sample_chunk = max(1, min(num_samples, rows // batch_size)) if shape.vectorized else 1
    if not shape.vectorized and num_samples > 1:
        _say_one_at_a_time(model)
    return strata, batch_size, sample_chunk


def _say_one_at_a_time(model) -> None:
    warnings.warn_explicit(
        f"{type(model).__name__} cannot run with particles as a batch dimension (e.g. boolean-mask "
        "indexing): its samples are drawn one at a time, the same estimate, slower",
        PyvaeWarning,
        "pyvae",
        0,
    )


def _chunk_shape(model, batch: tuple, shape: program.Structure) -> tuple[int, int]:
    """(C, floats held per (sample, point) row): every site's value and parameters, mixtures'
    components."""
    with pyro.validation_enabled(False):
        w = program.log_weights(model, batch, 1, shape)
    per_row = 0
    for trace in (w.model_trace, w.guide_trace):
        for site in program.sample_sites(trace):
            components = getattr(site["fn"], "_num_component", 1)
            per_row += 2 * site["value"].numel() * components
    strata = w.log_w.shape[0]
    return strata, per_row * strata


class _SiteStats:
    """Per-site sums over the particles of E_q[site] and of log q - log p; the KL per dimension from
    each chunk's first sample chunk only (thousands of draws already; it would cost two more
    density passes per chunk)."""

    def __init__(self, shape: program.Structure, n: int) -> None:
        self.shape, self.n = shape, n
        self.sites = list(shape.continuous_sites)
        self.sums = {"means": {}, "kl": {}, "kl_per_dim": {}}
        self.counts = {"means": torch.zeros(n), "kl": torch.zeros(n), "kl_per_dim": torch.zeros(n)}

    def values(self, w: program.Weights, per_dim: bool) -> dict[tuple[str, str], torch.Tensor]:
        """{(kind, site): per-point value} of one chunk's draws; a site in a nested plate, which
        has no per-point summary, is dropped for good."""
        nesting, values = self.shape.max_plate_nesting, {}
        for name in list(self.sites):
            try:
                values["means", name] = program.site_mean(w.guide_trace.nodes[name], w, nesting)
            except PyvaeError:  # in a nested plate: no per-point summary
                self.sites.remove(name)
                continue
            values["kl", name] = program.site_kl(name, w, nesting)
            if per_dim:
                values["kl_per_dim", name] = program.site_kl(name, w, nesting, per_dim=True)
        return {key: value for key, value in values.items() if value is not None}

    def add(self, values: dict, k: int, span: slice, per_dim: bool) -> None:
        """Add one chunk's :meth:`values` from ``k`` draws per point."""
        for (kind, name), value in values.items():
            store = self.sums[kind]
            if name not in store:
                store[name] = torch.zeros(self.n, *value.shape[1:])
            store[name][span] += k * value.cpu()
        for kind in ("means", "kl") + (("kl_per_dim",) if per_dim else ()):
            self.counts[kind][span] += k

    def result(self) -> dict:
        def average(kind):
            count = self.counts[kind].clamp(min=1)
            return {
                name: v / count.reshape(-1, *(1,) * (v.dim() - 1))
                for name, v in self.sums[kind].items()
                if name in self.sites
            }

        return {
            "latent_means": average("means"),
            "kl": average("kl"),
            "kl_per_dim": average("kl_per_dim"),
        }


def _ess(scaled: torch.Tensor) -> torch.Tensor:
    """The effective sample size of the K draws of each point, from weights (M, C, K): per stratum c
    (an enumerated value summed exactly) ess_c = (sum_k w_ck)^2 / sum_k w_ck^2, averaged over the
    strata with their share of p^ as weights. It lies in [1, K] (K when the weights are equal): the
    C*K weights are not C*K draws."""
    sums, squares = scaled.sum(2), (scaled**2).sum(2)
    per_stratum = torch.where(
        sums > 0,
        sums**2 / squares.clamp(min=torch.finfo(scaled.dtype).tiny),
        torch.zeros_like(sums),
    )
    return (sums * per_stratum).sum(1) / sums.sum(1)


#: log-weights of a point that span less than this (nats) are equal: ratios within 0.1%
CONSTANT_WEIGHTS = 1e-3


def pareto_khat(log_w: torch.Tensor) -> torch.Tensor:
    """Pareto k^ of each row's importance weights, from ``arviz.psislw``.

    Two cases arviz cannot fit are made explicit: weights equal to within
    :data:`CONSTANT_WEIGHTS` have no tail (k^ = 0, where arviz returns inf), and with
    too few samples for a tail of 5 (K <= 20) k^ is not estimated (NaN).
    """
    if log_w.shape[1] < MIN_KHAT_SAMPLES:
        return torch.full((log_w.shape[0],), math.nan)
    with warnings.catch_warnings():
        # arviz warns about large k^; we report every point's k^ and the bands ourselves
        warnings.simplefilter("ignore")
        _, khat = arviz.psislw(log_w.double().cpu().numpy())
    khat = torch.as_tensor(np.asarray(khat), dtype=torch.float32).reshape(-1)
    spread = (log_w.max(1).values - log_w.min(1).values).cpu()
    return torch.where(spread < CONSTANT_WEIGHTS, torch.zeros_like(khat), khat)


def _summarize(log_w: torch.Tensor, sizes: list[int]) -> dict[str, torch.Tensor]:
    """Per-point statistics of log-weights of shape (M, C, K): C strata (enumerated values) of K
    draws.

    p^ = sum_c (1/K) sum_k w_ck; its delta-method standard error sums the strata's variances.
    """
    m, c, k = log_w.shape
    log_px = torch.logsumexp(log_w.reshape(m, -1), dim=1) - math.log(k)
    scaled = torch.exp(log_w - log_px.reshape(m, 1, 1))  # w_ck / p^, finite
    # per stratum, (M, C)
    variance = ((scaled - scaled.mean(2, keepdim=True)) ** 2).sum(2) / max(k - 1, 1)
    iwae = []
    for size in sizes:
        groups = log_w[:, :, : (k // size) * size].reshape(m, c, -1, size)
        iwae.append((torch.logsumexp(groups, dim=(1, 3)) - math.log(size)).mean(1))
    finite = log_w.reshape(m, -1)
    floor = (
        torch.where(torch.isfinite(finite), finite, torch.full_like(finite, math.inf))
        .min(1, keepdim=True)
        .values
    )
    return {
        "log_px": log_px,
        "stderr": (variance.sum(1) / k).clamp(min=0).sqrt(),
        "ess": _ess(scaled),
        # strata of probability 0 hold exact zeros, which lie below any Pareto tail
        "khat": pareto_khat(torch.where(torch.isfinite(finite), finite, floor - 1e3)),
        "iwae": torch.stack(iwae),
    }
