"""Any Pyro program: the traces that training, scoring, diagnostics and pictures share.

A *model* here is a ``torch.nn.Module`` with two Pyro methods, written as Pyro's tutorials
write them::

    model(*batch)     p(x, latents)        batch = (x,), (x, y), (xs, ys=None), ...
    guide(*batch)     q(latents | x)

``num_data=`` is passed only to programs that take it (:func:`bound`). Per-data-point sites
live in the plate over the batch's points, whatever its name (:func:`find_data_plate`): sized
by the minibatch (``pyro.plate("data", len(x))``), implicitly (``pyro.plate("data")``) or by
``num_data`` with the minibatch as subsample (:func:`data_plate`). Any number of latent sites,
any names, nested plates inside it; ``pyro.deterministic`` records are never data.

Everything after training reads the program through :func:`trace_particles`: the guide
traced with K vectorized particles, the model replayed against it, and per data point n::

    log w_nk = sum_{model sites s} log p(s | ...) - sum_{guide sites s} log q(s | ...)

summed over every dimension of each site except the data dimension (nested plates and
event dimensions included). No density is written twice.

Discrete guide sites marked ``infer={"enumerate": "parallel"}`` (``config_enumerate``)
are *summed exactly*: each of their C values is a separate stratum, and

    log p^(x) = log sum_c (1/K) sum_k p(x, c, z_ck) / q(z_ck | x, c),   z_ck ~ q(z | x, c)

over the values c with q(c | x) > 0 (a guide that fixes a labelled point's class puts
probability 0 on the others, so that point is scored as log p(x, y); the zeros must be
exact, i.e. logits of -inf: ``Categorical(probs=...)`` clamps zero probabilities). Non-enumerated
discrete guide sites are sampled like any other: part of the proposal.

Sites made by ``pyro.factor`` (Pyro marks them ``is_auxiliary``) add to the training
objective only, e.g. M2's classification term; they are not part of log p(x).
Every site is scored unscaled (no N/M, no beta) but masked.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pyro.infer.traceenum_elbo as pyro_traceenum
import pyro.infer.util as pyro_infer_util
import pyro.util
import torch
from opt_einsum import shared_intermediates
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import Dice
from pyro.ops import packed
from pyro.ops.einsum.adjoint import require_backward
from pyro.ops.rings import MarginalRing
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from pyvae.errors import PyvaeError

DATA = "data"
PARTICLES = "_pyvae_particles"
NUM_DATA = "num_data"


def data_plate(x: torch.Tensor, num_data: int | None = None) -> pyro.plate:
    """The plate of data points: size ``num_data`` (the whole data set), subsample = this minibatch.

    Pyro scales every log-density inside it by N/M, so a minibatch loss is an unbiased
    estimate of the full-data loss; with ``num_data=None`` the minibatch is the data set.
    """
    batch = x.shape[0]
    return pyro.plate(DATA, size=num_data or batch, subsample=torch.arange(batch, device=x.device))


def _positional(fn) -> list[inspect.Parameter]:
    """The positional parameters a program takes its batch by (``num_data`` is no batch tensor)."""
    return [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != NUM_DATA
    ]


def batch_arity(module: torch.nn.Module) -> int:
    """How many tensors a batch must hold for ``module.model``: 1 for ``model(x)`` and
    ``model(xs, ys=None)``, 2 for ``model(x, y)``."""
    if not callable(getattr(module, "model", None)) or not callable(getattr(module, "guide", None)):
        raise PyvaeError(
            f"{type(module).__name__} is not a pyvae model: it needs Pyro methods model(*batch) "
            "and guide(*batch)"
        )
    return sum(p.default is p.empty for p in _positional(module.model))


def batch_slots(module: torch.nn.Module) -> int:
    """How many tensors ``module.model`` can take: its positional parameters, optional ones included
    (``model(xs, ys=None)`` takes 2); a data set's further tensors are not served to it."""
    batch_arity(module)
    if any(p.kind == p.VAR_POSITIONAL for p in inspect.signature(module.model).parameters.values()):
        return math.inf
    return len(_positional(module.model))


def accepts_num_data(fn) -> bool:
    """Whether a program takes the keyword ``num_data`` (by name or through ``**kwargs``)."""
    params = inspect.signature(fn).parameters.values()
    return any(p.name == NUM_DATA or p.kind == p.VAR_KEYWORD for p in params)


def bound(fn, num_data: int | None):
    """``fn`` as pyvae calls it: with ``num_data=`` only if it takes that keyword and one is given;
    pyvae never passes an argument a program does not accept."""
    if num_data is None or not accepts_num_data(fn):
        return fn
    return functools.partial(fn, num_data=num_data)


def check_call(module: torch.nn.Module, batch: tuple, num_data: int | None = None) -> None:
    """Refuse, in one line naming the method and the argument, a batch the programs cannot take."""
    for method in ("model", "guide"):
        fn = bound(getattr(module, method), num_data)
        try:
            inspect.signature(fn).bind(*batch)
        except TypeError as e:
            raise PyvaeError(
                f"{type(module).__name__}.{method}() cannot be called with a batch of {len(batch)} "
                f"tensor(s): {e}"
            ) from None


class LatentScale(Messenger):
    """Multiply the log-density of latent sample sites by ``scale``: the KL weight beta.

    In the model, latent sites are the unobserved ones; in the guide every sample site is
    latent. With ``sites`` only those names are scaled. Applied to both programs, the ELBO
    becomes E_q[log p(x | z)] - beta * E_q[log q(z | x) - log p(z)] (Higgins et al. 2017).
    """

    def __init__(self, scale: float, sites: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.scale = scale
        self.sites = None if sites is None else frozenset(sites)

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or msg["is_observed"] or msg["infer"].get("is_auxiliary"):
            return
        if self.sites is None or msg["name"] in self.sites:
            msg["scale"] = self.scale * msg["scale"]


class DataScale(Messenger):
    """Multiply the log-density of every sample site but ``pyro.factor``'s (auxiliary) by ``scale``:
    a call's minibatch terms made to stand for its group of the data (N_c of N points) in a program
    whose data plate scales by N/M itself."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and not msg["infer"].get("is_auxiliary"):
            msg["scale"] = self.scale * msg["scale"]


class Unscaled(Messenger):
    """Score every sample site without the weights a ``poutine.scale`` puts on it for training (a KL
    annealing factor, a loss scaled by 1/N), as :func:`log_weights` scores them; a subsampled
    plate's N/M stays, which makes its terms an estimate of the whole sum. Outermost, it sees each
    site after the program's own handlers."""

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample":
            msg["scale"] = math.prod(
                frame.full_size / frame.size for frame in subsampled(msg["cond_indep_stack"])
            )


def subsampled(frames) -> list:
    """The plates among ``frames`` that hold a subsample of their points (Pyro scales their terms
    by full size / size)."""
    return [f for f in frames if f.full_size not in (None, -1, f.size)]


class LocalParams(Messenger):
    """Keep ``pyro.module``'s parameters in their module: a ``pyro.param(name, parameter)`` message
    is answered with that ``nn.Parameter`` itself, so Pyro's global param store is never filled
    (pyvae's optimizers take ``module.parameters()`` directly) and two models never share weights
    through it. :func:`structure` refuses any other ``pyro.param`` (a plain tensor, a constraint):
    it would never be trained. With ``tensors``, any tensor given is the answer: a recording runs
    the module with tensors standing for its parameters (:func:`recordable`)."""

    def __init__(self, tensors: bool = False) -> None:
        super().__init__()
        self.kind = torch.Tensor if tensors else torch.nn.Parameter

    def _process_message(self, msg) -> None:
        given = msg["args"][1] if len(msg["args"]) > 1 else None
        if msg["type"] == "param" and isinstance(given, self.kind):
            msg["value"] = msg["args"][1]
            msg["done"] = True


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


def _unchecked(value, *args, **kwargs):
    return value


@contextlib.contextmanager
def recordable() -> Iterator[None]:
    """A context in which Pyro's ELBOs can be recorded as a graph (:mod:`pyvae.compiled`): they
    read two values as Python numbers, which a recording cannot (its tensors have no values):
    ``torch_item`` (the loss's value beside its surrogate, as a float) is the detached tensor
    instead, which is the same number, and ``warn_if_nan`` (a warning about a NaN loss) does not
    look (pyvae's training loop refuses a non-finite loss). Pyro's and torch's validation
    is off (its checks read values too); ``pyro.param`` is answered with the tensor given
    (:class:`LocalParams` with ``tensors``). ``TraceEnum_ELBO`` computes its expectation with
    :class:`StaticDice`."""
    instead = {id(pyro_infer_util.torch_item): _detached, id(pyro.util.warn_if_nan): _unchecked}
    patched = [
        (module, name, value)
        for module in [m for n, m in list(sys.modules.items()) if n.startswith("pyro.") and m]
        for name, value in list(vars(module).items())
        if id(value) in instead
    ]
    for module, name, value in patched:
        setattr(module, name, instead[id(value)])
    patched.append((pyro_traceenum, "Dice", pyro_traceenum.Dice))
    pyro_traceenum.Dice = StaticDice
    try:
        with pyro.validation_enabled(False), LocalParams(tensors=True):
            yield
    finally:
        for module, name, value in patched:
            setattr(module, name, value)


class StaticDice(Dice):
    """Pyro's ``Dice`` with the one step a recording cannot follow made static.

    Pyro's ``compute_expectation`` sums prob * cost over the enumerated values; where a value has
    probability 0 (M2's labelled points: q(y|x) is 0 off the label) the cost may be infinite, so it
    first asks whether any probability is 0 (a value a recording does not have) and then drops those
    entries with ``masked_select`` (a shape that depends on values). Here both are one
    ``torch.where``: the sum over the values with probability > 0 of prob * cost, the same number,
    and the gradients (a zero, not a NaN, where the probability is 0). The rest is Pyro's code
    (pyro/infer/util.py, Apache 2.0) as it is."""

    def compute_expectation(self, costs):
        with shared_intermediates() as cache:
            ring = MarginalRing(cache=cache)
            expected_cost = 0.0
            for ordinal, cost_terms in costs.items():
                log_factors = self._get_log_factors(ordinal)
                scale = math.exp(sum(x for x in log_factors if not isinstance(x, torch.Tensor)))
                log_factors = [x for x in log_factors if isinstance(x, torch.Tensor)]
                probs, queries = self._marginals(ring, ordinal, cost_terms, log_factors)
                for cost in cost_terms:
                    key = frozenset(cost._pyro_dims)
                    prob = probs[key]
                    prob._pyro_dims = queries[key]._pyro_dims
                    cost, prob = packed.broadcast_all(cost, prob)
                    mask = prob > 0
                    terms = torch.where(mask, prob * torch.where(mask, cost, 0.0), 0.0)
                    expected_cost = expected_cost + scale * terms.sum()
        return expected_cost

    @staticmethod
    def _marginals(ring, ordinal, cost_terms, log_factors) -> tuple[dict, dict]:
        """Pyro's: the marginal probability of each cost term's dimensions, by a sum-product
        contraction of the log factors and its backward pass."""
        queries = {frozenset(cost._pyro_dims): None for cost in cost_terms}
        for log_factor in log_factors:
            key = frozenset(log_factor._pyro_dims)
            if queries.get(key, False) is None:
                queries[key] = log_factor
        for cost in cost_terms:
            key = frozenset(cost._pyro_dims)
            if queries[key] is None:
                query = torch.zeros_like(cost)
                query._pyro_dims = cost._pyro_dims
                log_factors.append(query)
                queries[key] = query
        # plates never need to be product-contracted (plate-based dependency ordering)
        sum_dims = set().union(*(x._pyro_dims for x in log_factors)) - ordinal
        for query in queries.values():
            require_backward(query)
        root = ring.sumproduct(log_factors, sum_dims)
        root._pyro_backward()
        probs = {key: query._pyro_backward_result.exp() for key, query in queries.items()}
        return probs, queries


# -- traces -------------------------------------------------------------------------
@dataclass
class Structure:
    """What one trace of a program says about its shape: plate nesting, latent and observed sites,
    and the plate over the data points, whatever its name."""

    max_plate_nesting: int
    latent_sites: list[str]  # in the order the model samples them (top of a hierarchy first)
    observed_sites: list[str]
    enumerated_sites: list[str]
    continuous_sites: list[str]
    data_plate: str = DATA
    #: whether the programs run with particles as a leading batch dimension (not so with
    #: boolean-mask indexing or data-dependent shapes): then particles are drawn one at a time
    vectorized: bool = True


def fork_rng(device: torch.device):
    """A context in which torch's generators (and ``device``'s, on a GPU) may be drawn from and
    are restored after: a look at a program must not move the streams a resumed run replays."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def trace_once(module: torch.nn.Module, batch: tuple, num_data: int | None = None):
    """(model trace, guide trace) of one draw from the guide on ``batch``, the model replayed
    against it, hidden from outer handlers and without gradients. The random generators are left as
    they were: a look at the program must not move the streams that resumed runs replay exactly."""
    device = batch[0].device
    model, guide = bound(module.model, num_data), bound(module.guide, num_data)
    with (
        fork_rng(device),
        kept_buffers(module),
        torch.no_grad(),
        poutine.block(),
        LocalParams(),
    ):
        guide_trace = poutine.trace(guide).get_trace(*batch)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*batch)
    return model_trace, guide_trace


#: how Pyro's validation of a site begins its error: a value outside the support, a parameter
#: outside its constraint
INVALID = (
    "Error while computing log_prob at site",
    "Expected value argument",
    "Expected parameter",
)


@contextlib.contextmanager
def invalid_named(where: str = "") -> Iterator[None]:
    """Pyro's validation error of a site (an observation outside its likelihood's support, a NaN
    parameter) as a one-line :class:`~pyvae.errors.PyvaeError`: its first two lines, after
    ``where``."""
    try:
        yield
    except ValueError as error:
        lines = str(error).splitlines()
        if not lines or not lines[0].startswith(INVALID):
            raise
        said = ": ".join(line.strip().rstrip(":") for line in lines[:2] if line.strip())
        raise PyvaeError(f"{where}{said}") from error


@contextlib.contextmanager
def evaluating(module: torch.nn.Module) -> Iterator[None]:
    """``module`` in evaluation mode inside (dropout off, batch normalization by its running
    statistics), and each of its submodules back in its own mode after: a model scored mid-training
    goes on training as it was."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def evaluates(function: Callable) -> Callable:
    """``function(model, ...)`` run with its first argument, the model, in evaluation mode
    (:func:`evaluating`), passed by position or by name."""
    name = next(iter(inspect.signature(function).parameters))

    @functools.wraps(function)
    def in_evaluation_mode(*args, **kwargs):
        with evaluating(args[0] if args else kwargs[name]):
            return function(*args, **kwargs)

    return in_evaluation_mode


def kept_buffers(module: torch.nn.Module):
    """A context after which ``module``'s buffers hold their values from before it: a look at the
    program must not count as a step (BatchNorm's running statistics, a counter)."""
    return kept_values(module.buffers())


@contextlib.contextmanager
def kept_values(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """A context after which the ``tensors`` updated in place inside hold their values from before
    it. Only those with a new version are written back (a write is itself a new version, which
    :func:`pyvae.compiled.fingerprint` reads as a change), as :func:`pyvae.compiled.untouched`
    puts values back (a floor's modules do not import each other: the two keep a copy each)."""
    values = [(t, t._version, t.detach().clone()) for t in tensors if not t.is_inference()]
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, version, value in values:
                if tensor._version != version:
                    tensor.copy_(value)


def structure(module: torch.nn.Module, batch: tuple) -> Structure:
    """Trace guide and model once on ``batch`` (:func:`trace_once`), as pyvae calls them, and check
    the contract; a violation is a :class:`PyvaeError`."""
    name = type(module).__name__
    check_call(module, batch)
    model_trace, guide_trace = trace_once(module, batch)
    nesting = 0
    for trace in (model_trace, guide_trace):
        for site in sample_sites(trace):
            for frame in site["cond_indep_stack"]:
                if frame.vectorized:
                    nesting = max(nesting, -frame.dim)
    model_sites = [s for s in sample_sites(model_trace) if not s["infer"].get("is_auxiliary")]
    observed = [s["name"] for s in model_sites if s["is_observed"]]
    if not observed:
        raise PyvaeError(
            f"{name}: the model observes nothing (no sample site with obs=... other than "
            f"pyro.deterministic) on this batch of {len(batch)} tensor(s); log p(x) needs data"
        )
    plate = find_data_plate(module, model_sites + sample_sites(guide_trace), batch[0].shape[0])
    latent = [s["name"] for s in model_sites if not s["is_observed"]]
    for site_name in latent:
        if site_name not in guide_trace.nodes:
            raise PyvaeError(
                f"{name}: latent site {site_name!r} of the model has no site of that name in the "
                "guide"
            )
    for site in sample_sites(guide_trace):
        if site["name"] not in latent:
            raise PyvaeError(
                f"{name}: guide site {site['name']!r} has no latent site of that name in the model"
            )
    enumerated = [
        s["name"] for s in sample_sites(guide_trace) if s["infer"].get("enumerate") == "parallel"
    ]
    for site_name in enumerated:
        site = guide_trace.nodes[site_name]
        if any(f.vectorized and f.name != plate for f in site["cond_indep_stack"]):
            # summing c per stratum would make every element of the nested plate take the same value
            raise PyvaeError(
                f"{name}: enumerated guide site {site_name!r} sits in a plate nested in {plate!r}; "
                "the importance sampler sums enumerated values per data point only"
            )
    _check_params(module, list(model_trace.nodes.values()) + list(guide_trace.nodes.values()))
    continuous = [s for s in latent if not _is_discrete(guide_trace.nodes[s]["fn"])]
    return Structure(
        nesting,
        latent,
        observed,
        enumerated,
        continuous,
        plate,
        _vectorizes(module, batch, nesting),
    )


def _vectorizes(module: torch.nn.Module, batch: tuple, nesting: int) -> bool:
    """Whether the programs run with two particles in a leading plate, as they ran without it."""
    device = batch[0].device
    try:
        with (
            fork_rng(device),
            kept_buffers(module),
            torch.no_grad(),
            poutine.block(),
        ):
            trace_particles(module, batch, 2, nesting)
    except (IndexError, RuntimeError, ValueError):
        return False
    return True


def find_data_plate(module: torch.nn.Module, sites: list, m: int) -> str:
    """The name of the plate over the data points: the outermost vectorized plate of size ``m`` (the
    batch's points) around every latent and observed site, whatever it is called; a module's
    ``data_plate`` attribute names it where that is ambiguous. Sized by the minibatch
    (``pyro.plate("data", len(x))``), implicitly (``pyro.plate("data")``) or by ``num_data`` with
    the minibatch as subsample, all the same here."""
    name, wanted = type(module).__name__, getattr(module, "data_plate", None)
    candidates = (
        [wanted] if wanted else [f.name for f in sites[0]["cond_indep_stack"] if f.vectorized]
    )
    sized = [p for p in candidates if wanted or _sized(sites, p, m)]
    for plate in sized:
        if all(_in_plate(site, plate) for site in sites):
            return plate
    outside = next((s for s in sites if not sized or not _in_plate(s, sized[0])), sites[0])
    raise PyvaeError(_outside_message(name, outside, wanted, m))


def _in_plate(site, plate: str) -> bool:
    return any(f.vectorized and f.name == plate for f in site["cond_indep_stack"])


def _sized(sites: list, plate: str, m: int) -> bool:
    """Whether ``plate`` spans the batch's ``m`` points at every site inside it (1: broadcast)."""
    sizes = {_plate_size(site, plate) for site in sites if _in_plate(site, plate)}
    return m in sizes and sizes <= {m, 1}


def _outside_message(name: str, site, wanted: str | None, m: int) -> str:
    where = (
        f"the plate {wanted!r} (the module's data_plate)"
        if wanted
        else f"a plate of size {m}, the batch's points,"
    )
    what = "latent" if not site["is_observed"] else "observed"
    return (
        f"{name}: {what} site {site['name']!r} is not inside {where} around every latent and "
        "observed site; log p(x) per data point needs per-point latents (a global latent, e.g. a "
        "PyroSample weight, has no per-point density): wrap the sites in pyro.plate('data', "
        "len(x)), or set data_plate = 'NAME' on the module where several plates could be it"
    )


def _plate_size(site, plate: str) -> int:
    """The size of ``plate`` at ``site``: the plate's own, else (an implicitly sized plate) the
    site's batch shape there."""
    frame = next(f for f in site["cond_indep_stack"] if f.name == plate)
    if frame.size != -1:
        return frame.size
    shape = site["fn"].batch_shape
    return shape[frame.dim] if len(shape) >= -frame.dim else 1


def data_dim(site, plate: str) -> int:
    """The (negative) batch dimension of ``site`` that indexes the data points."""
    return next(f.dim for f in site["cond_indep_stack"] if f.name == plate)


def plate_full_size(module: torch.nn.Module, batch: tuple, num_data: int, plate: str) -> int:
    """The size the data plate declares when called with ``num_data``: ``num_data`` when the program
    scales its minibatch terms by N/M itself (a subsampled plate), the batch's M when it does
    not."""
    model_trace, _ = trace_once(module, batch, num_data)
    site = next(s for s in sample_sites(model_trace) if s["is_observed"])
    frame = next(f for f in site["cond_indep_stack"] if f.name == plate)
    return frame.full_size if frame.full_size not in (None, -1) else _plate_size(site, plate)


def label_site(module: torch.nn.Module, unlabelled: tuple) -> tuple[str, int, bool]:
    """(name, C, one-hot) of the label site of a program with an optional label
    (``model(xs, ys=None)``): the one discrete latent site its model samples when called without
    the label, its number of classes, and whether labels go to it one-hot (a ``OneHotCategorical``)
    or as integers (a ``Categorical``)."""
    model_trace, _ = trace_once(module, unlabelled)
    found = [
        s
        for s in sample_sites(model_trace)
        if not s["is_observed"] and not s["infer"].get("is_auxiliary") and _is_discrete(s["fn"])
    ]
    name, names = type(module).__name__, [s["name"] for s in found]
    if len(found) != 1:
        raise PyvaeError(
            f"{name}: called without its optional label, the model samples {len(found)} discrete "
            f"latent sites ({', '.join(names) or 'none'}); unlabelled points (-1) need exactly "
            "one, the label"
        )
    fn = found[0]["fn"]
    while isinstance(fn, (dist.Independent, dist.ExpandedDistribution, dist.MaskedDistribution)):
        fn = fn.base_dist
    if isinstance(fn, dist.OneHotCategorical):
        return found[0]["name"], fn.event_shape[-1], True
    if isinstance(fn, dist.Categorical):
        return found[0]["name"], fn.logits.shape[-1], False
    raise PyvaeError(
        f"{name}: label site {found[0]['name']!r} is a {type(fn).__name__}; a label is a "
        "Categorical (integer labels) or a OneHotCategorical (one-hot labels)"
    )


def _check_params(module: torch.nn.Module, sites) -> None:
    """Every ``pyro.param`` of the programs must be a parameter the module owns: pyvae optimizes
    ``module.parameters()``, so anything else would silently never train."""
    own = {id(p) for p in module.parameters()}
    for site in sites:
        if site["type"] != "param":
            continue
        constraint = site["kwargs"].get("constraint")
        if id(site["value"]) not in own:
            raise PyvaeError(
                f"{type(module).__name__}: pyro.param({site['name']!r}) is not a parameter of the "
                "module; pyvae trains module.parameters(): make it an nn.Parameter of the module "
                "(pyro.module registers those)"
            )
        if constraint is not None and constraint is not torch.distributions.constraints.real:
            raise PyvaeError(
                f"{type(module).__name__}: pyro.param({site['name']!r}) has a constraint; "
                "constrain the parameter in the module instead (e.g. softplus of a free one)"
            )


def trace_particles(module: torch.nn.Module, batch: tuple, num_particles: int | None, nesting: int):
    """(model trace, guide trace) with ``num_particles`` vectorized draws from the guide (None: one
    draw without a particle plate, for programs that are not :attr:`Structure.vectorized`).

    The particle dimension sits left of the plates (dim ``-(nesting + 1)``); enumerated
    guide sites get dimensions further left. The model is replayed against the guide, so
    it sees the guide's values of every latent site.
    """
    particles = (
        pyro.plate(PARTICLES, num_particles, dim=-(nesting + 1))
        if num_particles
        else contextlib.nullcontext()
    )
    with LocalParams(), particles:
        guide = poutine.enum(module.guide, first_available_dim=-(nesting + 2))
        guide_trace = poutine.trace(guide).get_trace(*batch)
        model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(
            *batch
        )
    return model_trace, guide_trace


@dataclass
class Weights:
    """Per-data-point log-weights of one chunk, from :func:`log_weights`.

    ``log_w``: (C, K, M) log p(x, latents) - log q(sampled latents | x, c) for each of the C
    joint values c of the enumerated guide sites (C = 1 without any), K particles, M points;
    ``log_q_enum``: (C, 1, M) log q(c | x) (zeros when C = 1); ``enum_shape``: the shape
    whose product is C. The traces are kept for the diagnostics.
    """

    log_w: torch.Tensor
    log_q_enum: torch.Tensor
    enum_shape: tuple[int, ...]
    model_trace: object
    guide_trace: object
    #: {site: (enum..., K or 1, M) per-point log-density} of every model site and (as "q:<site>")
    #: guide site
    site_log_probs: dict
    #: the name of the plate over the data points
    data_plate: str = DATA

    def masked(self) -> torch.Tensor:
        """``log_w`` with the strata that q gives probability 0 set to -inf: they drop out of every
        sum."""
        if not self.enum_shape:
            return self.log_w
        return self.log_w.masked_fill(self.log_q_enum == -math.inf, -math.inf)

    def per_point(self) -> torch.Tensor:
        """(M, C, K): the K draws of every stratum of each point; log p^ = logsumexp over (C, K) -
        log K."""
        return self.masked().permute(2, 0, 1)

    def elbo(self) -> torch.Tensor:
        """sum_c q(c|x) (mean_k log w_ck - log q(c|x)) per point, shape (M,): the ELBO from the same
        draws."""
        if not self.enum_shape:
            return self.log_w[0].mean(0)
        q_c = self.log_q_enum.exp()
        inner = torch.where(
            q_c > 0, self.log_w.mean(1, keepdim=True) - self.log_q_enum, torch.zeros_like(q_c)
        )
        return (q_c * inner).sum((0, 1))


def log_weights(
    module: torch.nn.Module, batch: tuple, num_particles: int, shape: Structure
) -> Weights:
    """The per-point log importance weights of ``module`` on ``batch`` with K = ``num_particles``; a
    program that is not :attr:`Structure.vectorized` takes one particle at a time."""
    if not shape.vectorized and num_particles > 1:
        raise PyvaeError(
            f"{type(module).__name__} cannot run with particles as a batch dimension; draw them "
            "one at a time (num_particles=1)"
        )
    model_trace, guide_trace = trace_particles(
        module, batch, num_particles if shape.vectorized else None, shape.max_plate_nesting
    )
    m, nesting, enum_dims = batch[0].shape[0], shape.max_plate_nesting, len(shape.enumerated_sites)
    total, parts = 0.0, {}
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for site in sample_sites(trace):
            if site["infer"].get("is_auxiliary") or (
                sign < 0 and site["name"] in shape.enumerated_sites
            ):
                continue
            log_p = site_log_prob(site, nesting, enum_dims, m, shape.data_plate)
            parts[site["name"] if sign > 0 else "q:" + site["name"]] = log_p
            total = total + sign * log_p
    log_q_enum = torch.zeros((1,) * enum_dims + (1, m), device=batch[0].device)
    for name in shape.enumerated_sites:
        log_q_enum = log_q_enum + site_log_prob(
            guide_trace.nodes[name], nesting, enum_dims, m, shape.data_plate
        )
        if log_q_enum.shape[-2] != 1:
            raise PyvaeError(
                f"enumerated guide site {name!r} depends on a sampled site; the importance sampler "
                "needs q(c | x) to be sampled before the continuous latents (e.g. M2's q(y|x) "
                "q(z|x, y))"
            )
    enum_shape = tuple(
        torch.broadcast_shapes(total.shape[:enum_dims], log_q_enum.shape[:enum_dims])
    )
    c = math.prod(enum_shape)
    log_w = total.expand(*enum_shape, num_particles, m).reshape(c, num_particles, m)
    log_q_enum = log_q_enum.expand(*enum_shape, 1, m).reshape(c, 1, m)
    return Weights(log_w, log_q_enum, enum_shape, model_trace, guide_trace, parts, shape.data_plate)


def site_log_prob(site, nesting: int, enum_dims: int, m: int, plate: str) -> torch.Tensor:
    """One site's log-density, unscaled but masked, as (enum..., K or 1, M): every plate but the
    data points' (``plate``) summed out."""
    parts = subsampled(site["cond_indep_stack"])
    if parts:
        raise PyvaeError(
            f"site {site['name']!r} scores {parts[0].size} of the {parts[0].full_size} terms of "
            f"its plate {parts[0].name!r}: the program subsamples it itself, and log p(x) needs "
            f"every term (pyvae subsamples the data: size the plate by what it is given, "
            f"pyro.plate({parts[0].name!r}, {parts[0].full_size}))"
        )
    log_p = scale_and_mask(site["fn"].log_prob(site["value"]), 1.0, site["mask"])
    if not torch.is_tensor(log_p):
        log_p = torch.as_tensor(log_p)
    log_p = log_p.reshape((1,) * (nesting + 1 + enum_dims - log_p.dim()) + log_p.shape)
    others = [
        log_p.dim() + f.dim
        for f in site["cond_indep_stack"]
        if f.vectorized and f.name not in (plate, PARTICLES)
    ]
    if others:
        log_p = log_p.sum(others, keepdim=True)
    log_p = log_p.movedim(log_p.dim() + data_dim(site, plate), -1)
    # enum dims and the particle dim; the plates left are size 1
    lead = log_p.shape[: log_p.dim() - nesting]
    return log_p.reshape(*lead, log_p.shape[-1]).expand(*lead, m)


def site_mean(site, w: Weights, nesting: int) -> torch.Tensor:
    """E_q[value | x] of a guide site that lives in the data plate alone, shape (M, *event), from
    one :class:`Weights`: the average over particles, weighted by q(c | x) over enumerated
    values."""
    return _particle_mean(site["value"], len(site["fn"].event_shape), site, w, nesting)


def site_kl(name: str, w: Weights, nesting: int, per_dim: bool = False) -> torch.Tensor | None:
    """E_q[log q(v | ...) - log p(v | ...)] of latent site ``name`` per point, shape (M,), from the
    particles of one :class:`Weights` (the site's KL, conditional on its parents in a hierarchy).
    With ``per_dim``, shape (M, D) for a site whose guide and model both factorize over its D
    dimensions (``Independent`` of a univariate family), else None."""
    q_site, p_site = w.guide_trace.nodes[name], w.model_trace.nodes[name]
    if not per_dim:  # the per-point log-densities log_weights already summed, data dimension last
        m, k = w.log_w.shape[2], w.log_w.shape[1]
        diff = (w.site_log_probs["q:" + name] - w.site_log_probs[name]).expand(*w.enum_shape, k, m)
        return (w.log_q_enum.exp().reshape(-1, m) * diff.reshape(-1, k, m).mean(1)).sum(0)
    q, p, value = q_site["fn"], p_site["fn"], q_site["value"]
    if not (_factorizes(q) and _factorizes(p)):
        return None
    return _particle_mean(
        q.base_dist.log_prob(value) - p.base_dist.log_prob(value), 1, q_site, w, nesting
    )


def _factorizes(fn) -> bool:
    return (
        isinstance(fn, torch.distributions.Independent)
        and fn.reinterpreted_batch_ndims == 1
        and fn.base_dist.event_shape == ()
    )


def _particle_mean(
    value: torch.Tensor, event_ndims: int, site, w: Weights, nesting: int
) -> torch.Tensor:
    if any(
        f.vectorized and f.name not in (w.data_plate, PARTICLES) for f in site["cond_indep_stack"]
    ):
        raise PyvaeError(
            f"site {site['name']!r} sits in plates besides {w.data_plate!r}; pick a per-point "
            "latent site"
        )
    enum_dims = len(w.enum_shape)
    value = value.reshape(
        (1,) * (enum_dims + 1 + nesting + event_ndims - value.dim()) + value.shape
    )
    batch_dims = value.dim() - event_ndims
    event = value.shape[batch_dims:]
    value = value.movedim(batch_dims + data_dim(site, w.data_plate), batch_dims - 1)
    m, k = w.log_w.shape[2], w.log_w.shape[1]
    value = value.expand(*w.enum_shape, k, *value.shape[enum_dims + 1 : batch_dims - 1], m, *event)
    value = value if value.is_floating_point() else value.to(torch.get_default_dtype())
    mean = value.reshape(-1, k, m, *event).mean(1)  # (C, M, *event)
    q = w.log_q_enum.exp().reshape(-1, m, *(1,) * len(event))
    return (q * mean).sum(0)


def sample_sites(trace) -> list:
    """The sample sites of a trace, without the subsample sites of plates and
    ``pyro.deterministic``'s records (observed in Pyro's bookkeeping, but no data and no
    density)."""
    return [
        s
        for s in trace.nodes.values()
        if s["type"] == "sample"
        and not site_is_subsample(s)
        and not s["infer"].get("_deterministic")
    ]


def _is_discrete(fn) -> bool:
    support = getattr(fn, "support", None)
    return support is not None and bool(getattr(support, "is_discrete", False))


# -- programs run forward: pictures --------------------------------------------------
def observed_mean(fn) -> torch.Tensor:
    """E[x] of an observation site's distribution: its ``mean``, else the average of 64 draws."""
    try:
        return fn.mean
    except NotImplementedError:
        return fn.sample((64,)).mean(0)


@torch.no_grad()
def generate(
    module: torch.nn.Module, batch: tuple, fixed: dict | None = None, site: str | None = None
) -> torch.Tensor:
    """E[x | latents] with the latents drawn from the model (the prior), except those in ``fixed``.

    ``batch`` fixes the shapes (and the labels of a conditional model); its x is not used.
    ``site`` is the observation to return (default: the first observed site).
    """
    name = site or structure(module, batch).observed_sites[0]
    # condition outside uncondition: the fixed latents stay fixed while the observations are drawn
    program = poutine.condition(poutine.uncondition(module.model), data=fixed or {})
    with LocalParams():
        trace = poutine.trace(program).get_trace(*batch)
    if name not in trace.nodes:
        raise PyvaeError(f"the model has no observed site {name!r}")
    return observed_mean(trace.nodes[name]["fn"])


@torch.no_grad()
def reconstruct(
    module: torch.nn.Module, batch: tuple, site: str | None = None, num_samples: int = 1
) -> torch.Tensor:
    """E[x | latents] with the latents drawn from the guide q(latents | x): the average over
    ``num_samples`` draws, enumerated values weighted by q(c | x). Shape (M, *event)."""
    shape = structure(module, batch)
    w = log_weights(module, batch, num_samples, shape)
    observed = w.model_trace.nodes[site or shape.observed_sites[0]]
    return _particle_mean(
        observed_mean(observed["fn"]),
        len(observed["fn"].event_shape),
        observed,
        w,
        shape.max_plate_nesting,
    )


@torch.no_grad()
def latent_means(
    module: torch.nn.Module, batch: tuple, site: str, num_samples: int = 64
) -> torch.Tensor:
    """E_q[site | x] per point, shape (M, *event): averaged over ``num_samples`` guide draws."""
    shape = structure(module, batch)
    w = log_weights(module, batch, num_samples, shape)
    return site_mean(w.guide_trace.nodes[site], w, shape.max_plate_nesting)
