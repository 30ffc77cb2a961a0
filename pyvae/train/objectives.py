"""Training objectives: Pyro ELBOs over a model's programs, with the KL weight applied by a handler.

Each step minimizes a negative ELBO estimate for the whole data set (the data plate
scales the minibatch terms by N/M)::

    loss = -(N/M) * sum_{n in batch} E_q[ log p(x_n, latents) - log q(latents | x_n) ]

``trace`` (``Trace_ELBO``) estimates every term by Monte Carlo with reparameterized
samples; ``meanfield`` (``TraceMeanField_ELBO``) uses the analytic KL of each latent site
where torch has one (elsewhere Pyro estimates it by Monte Carlo, so it equals ``trace``);
``enum`` (``TraceEnum_ELBO``) sums guide sites marked for enumeration exactly (M2's y);
``iwae`` is the bound of Burda et al. with K vectorized particles::

    L_K(x) = E[ log (1/K) sum_k p(x, z_k) / q(z_k|x) ],   z_k ~ q(z|x)

Any ``pyro.infer.ELBO`` instance works too. The KL weight beta (beta-VAE, KL warm-up)
multiplies the log-densities of the latent sites in model and guide
(:class:`pyvae.program.LatentScale`), so E_q[log p(x|z)] - beta * KL is what is optimized:
no model needs a ``beta`` argument.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO, config_enumerate
from pyro.infer.util import get_dependent_plate_dims, torch_sum
from torch.distributions import kl_divergence

from pyvae.data.batching import Call
from pyvae.errors import PyvaeError, positive_int
from pyvae.program import (
    DataScale,
    LatentScale,
    LocalParams,
    accepts_num_data,
    bound,
    fork_rng,
    kept_buffers,
    plate_full_size,
    sample_sites,
    structure,
    trace_once,
)


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
                        raise NotImplementedError(
                            f"IWAE needs a reparameterized guide; site {site['name']!r} is not"
                        )
                    log_w = log_w + sign * torch_sum(site["log_prob"], sum_dims)
            log_weights.append(log_w)
        # vectorized particles arrive as one trace with a leading particle dimension
        log_w = (
            log_weights[0]
            if self.vectorize_particles and self.num_particles > 1
            else torch.stack(log_weights)
        )
        return -(torch.logsumexp(log_w, dim=0) - math.log(self.num_particles)).sum()


ELBOS = {
    "trace": Trace_ELBO,
    "meanfield": TraceMeanField_ELBO,
    "iwae": IWAE,
    "enum": TraceEnum_ELBO,
}
#: what :func:`pyvae.fit` and the CLI accept: the ELBOs, and ``auto``, one of them chosen for the
#: program
ELBO_CHOICES = ("auto", *ELBOS)


def make_elbo(
    elbo: str | pyro.infer.ELBO,
    num_particles: int = 1,
    max_plate_nesting: float = math.inf,
    vectorize: bool = True,
) -> pyro.infer.ELBO:
    """The Pyro ELBO named ``elbo`` with ``num_particles`` particles, vectorized unless the program
    cannot be (:attr:`pyvae.program.Structure.vectorized`: then Pyro draws them in a loop), or
    ``elbo`` itself.

    ``max_plate_nesting`` comes from :func:`pyvae.program.structure` (read off a trace of the
    program), so models with nested plates need no setting.
    """
    if isinstance(elbo, pyro.infer.ELBO):
        return elbo
    if elbo not in ELBOS:
        raise PyvaeError(
            f"unknown elbo {elbo!r}; choose from {', '.join(ELBOS)} or pass a pyro.infer.ELBO"
        )
    positive_int("num_particles", num_particles)
    return ELBOS[elbo](
        num_particles=num_particles,
        vectorize_particles=vectorize and num_particles > 1,
        max_plate_nesting=max_plate_nesting,
    )


class Objective(torch.nn.Module):
    """A training objective as a module: ``objective(calls, beta)`` is the loss of one step's calls
    (:class:`pyvae.data.batching.Call`) on the full-data scale, -(estimate of sum_n L(x_n)),
    differentiable in the model's parameters; :meth:`loss` is that of a single batch.

    Each call's terms are scaled by N_c / M_c (its group's points over the call's), whether the
    program's data plate is sized by ``num_data`` with the minibatch as subsample (Pyro scales then;
    ``num_data`` is passed only to programs that take it) or by the minibatch, or implicitly
    (pyvae scales then): every form optimizes the same unbiased full-data objective. Programs in
    ``auxiliary`` ((model, guide) pairs, e.g. Pyro's auxiliary classifier loss) add their ELBO
    losses on the same calls, scaled alike. ``kl_sites`` names the latent sites beta weights
    (None: all of them); ``enumerate`` marks the guide's discrete sites for parallel enumeration
    (``config_enumerate``), as ``elbo="auto"`` does for a guide that samples a finite discrete site.

    Being a module holding the model, it can be wrapped in ``DistributedDataParallel``
    (Pyro's ``ELBOModule`` idea, for a model and guide that are methods of one module).

    ``iwae`` is special: Pyro's ``RenyiELBO`` multiplies each site's log-density by its scale
    *before* the log-mean-exp over particles, which with a subsampled plate would give
    log mean_k exp((N/M) log w_k) instead of (N/M) log mean_k w_k. So the IWAE bound is
    computed on the minibatch alone (plate of size M, scale 1) and multiplied by N/M here.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        elbo: str | pyro.infer.ELBO,
        num_particles: int = 1,
        kl_sites=None,
        auxiliary=(),
    ) -> None:
        super().__init__()
        self.module = module
        self.elbo = make_elbo(elbo, num_particles)
        self.kl_sites = None if kl_sites is None else tuple(kl_sites)
        self.auxiliary = [(model, guide) for model, guide in auxiliary]
        self.enumerate = False
        #: whether the program's data plate scales by N/M itself when given num_data (None: not yet
        #: read)
        self.self_scaled: bool | None = None

    def fill_plate_nesting(self, nesting: int) -> None:
        """Give an ELBO without a ``max_plate_nesting`` the program's
        (:attr:`pyvae.program.Structure.max_plate_nesting`), plus one for vectorized particles as
        Pyro's constructor adds; one that has it keeps it. Unfilled, the first call reads it off a
        trace."""
        if self.elbo.max_plate_nesting == math.inf:
            vectorized = self.elbo.vectorize_particles and self.elbo.num_particles > 1
            self.elbo.max_plate_nesting = nesting + vectorized

    def read_scaling(self, call: Call, plate: str) -> None:
        """Whether the program scales by N/M itself: its data plate's declared size when called with
        ``num_data`` is N (a subsampled plate) or the batch's M (pyvae scales); anything else is an
        error."""
        # read on a batch smaller than N: at M = N both answers fit, and a later call may be
        # smaller; of two points where N allows (batch normalization needs two)
        n = call.num_data
        args = tuple(t[: 2 if n > 2 else 1] for t in call.args)
        m = args[0].shape[0]
        if not accepts_num_data(self.module.model) or m == n:
            self.self_scaled = False  # N = 1: nothing to scale
            return
        size = plate_full_size(self.module, args, n, plate)
        if size not in (m, n):
            raise PyvaeError(
                f"{type(self.module).__name__}: plate {plate!r} has size {size} when called with a "
                f"minibatch of {m} of {n} points and num_data={n}; size it num_data (with the "
                "minibatch as subsample) or the minibatch"
            )
        self.self_scaled = size == n

    def forward(self, calls: list, beta: float = 1.0) -> torch.Tensor:
        """(2, C): the model's loss and the auxiliary programs' loss of each of the C calls."""
        return torch.stack([torch.stack(self._call_losses(call, beta)) for call in calls], dim=1)

    def loss(self, batch: tuple, num_data: int, beta: float = 1.0) -> torch.Tensor:
        """The loss of one batch standing for ``num_data`` points (the model's and the auxiliary
        ones)."""
        return self([Call(batch, num_data, num_data)], beta).sum()

    def _call_losses(self, call: Call, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        batch, m = call.args, call.args[0].shape[0]
        if self.elbo.max_plate_nesting == math.inf or self.self_scaled is None:
            shape = structure(self.module, batch)  # one trace for whatever is still unread
            if self.elbo.max_plate_nesting == math.inf:
                self.fill_plate_nesting(shape.max_plate_nesting)
            if self.self_scaled is None:
                self.read_scaling(call, shape.data_plate)
        iwae = isinstance(self.elbo, IWAE)
        # the IWAE bound is on the minibatch alone
        given = call.num_data if self.self_scaled and not iwae else None
        scale = 1.0 if given is not None else call.group / m
        model, guide = bound(self.module.model, given), bound(self.module.guide, given)
        if given is not None and call.group != call.num_data:
            # the program scales by N/M; its densities stand for the call's group, its pyro.factor
            # terms for what the program says (m2's alpha N E_labelled[log q(y|x)])
            model, guide = (DataScale(call.group / call.num_data)(p) for p in (model, guide))
        if self.enumerate:
            guide = config_enumerate(guide, "parallel")
        if isinstance(beta, torch.Tensor) or beta != 1.0:  # a tensor: KL warm-up, recorded
            model, guide = (LatentScale(beta, self.kl_sites)(program) for program in (model, guide))
        with LocalParams():
            main = self._elbo_loss(self.elbo, model, guide, batch) * scale
            aux = sum(
                (
                    torch.as_tensor(Trace_ELBO().differentiable_loss(a_model, a_guide, *batch))
                    for a_model, a_guide in self.auxiliary
                ),
                torch.zeros(()),
            ) * (call.group / m)
        return main, aux.to(main)

    @staticmethod
    def _elbo_loss(elbo, model, guide, batch: tuple) -> torch.Tensor:
        if hasattr(elbo, "differentiable_loss"):
            return elbo.differentiable_loss(model, guide, *batch)
        if not hasattr(elbo, "_loss_and_surrogate_loss"):
            raise PyvaeError(
                f"{type(elbo).__name__} has no differentiable loss to train with; use elbo "
                "'trace', 'meanfield', 'iwae' (pyvae's IWAE for RenyiELBO at alpha 0), 'enum', or "
                "an ELBO with differentiable_loss"
            )
        # TraceGraph_ELBO: its surrogate has the ELBO's gradient (score-function terms included) but
        # another value; the loss's value with the surrogate's gradient
        value, surrogate = elbo._loss_and_surrogate_loss(model, guide, (*batch,), {})
        return surrogate + (-value - surrogate.detach())


# -- which ELBO a program allows ------------------------------------------------------
def choose_elbo(module: torch.nn.Module, batch: tuple, shape) -> tuple[str, str]:
    """``auto``: (the ELBO for this program, why). ``enum`` for a guide with enumerated sites (M2's
    y); ``meanfield``, the analytic KL, where it is exact and available: a mean-field guide of
    reparameterized sites, each with a KL torch knows against its prior; else ``trace``. The
    analytic KL has the same expectation as the Monte Carlo one and less variance (for the default
    VAE on MNIST 0.1 to 0.4 nats better in 20 epochs, benchmarks/RESULTS.md)."""
    if shape.enumerated_sites:
        return "enum", f"the guide enumerates {', '.join(shape.enumerated_sites)}"
    discrete = enumerable_sites(module, batch)
    if discrete:
        return (
            "enum",
            f"the guide's discrete site {', '.join(discrete)} is summed exactly (config_enumerate)",
        )
    violation = mean_field_violation(module, batch)
    if violation:
        return "trace", f"Monte Carlo KL: an analytic KL needs {violation}"
    missing = sites_without_analytic_kl(module, batch)
    if missing:
        return (
            "trace",
            f"Monte Carlo KL: torch has no analytic KL for latent site {', '.join(missing)}",
        )
    return "meanfield", "the analytic KL of every latent site (TraceMeanField_ELBO)"


def enumerable_sites(module: torch.nn.Module, batch: tuple) -> list[str]:
    """The guide's discrete sites with a finite support not marked for enumeration: ``elbo="auto"``
    sums them exactly (what Pyro's examples do with ``config_enumerate`` outside the class)."""
    _, guide_trace = trace_once(module, batch)
    return [
        s["name"]
        for s in sample_sites(guide_trace)
        if s["fn"].has_enumerate_support and "enumerate" not in s["infer"]
    ]


def mean_field_violation(module: torch.nn.Module, batch: tuple) -> str | None:
    """Why ``TraceMeanField_ELBO`` would not be the ELBO of this guide, or None.

    It replaces E_q[log q(z_s) - log p(z_s|...)] by KL(q(z_s|x) || p(z_s|...)) at the other sites'
    draws, which assumes reparameterized sites and a q(z_s) that depends on no other draw (Pyro only
    warns when model and guide order their sites differently). The dependence is found by autograd:
    the guide is run with its latent values held fixed, and a site whose log-density at its own
    value has a gradient with respect to another site's value depends on it (hvae's q(z2|z1))."""
    _, guide_trace = trace_once(module, batch)
    latent = [s for s in sample_sites(guide_trace) if not s["is_observed"]]
    for site in latent:
        if not site["fn"].has_rsample:
            family = type(site["fn"]).__name__
            return f"reparameterized latent sites; guide site {site['name']} is a {family}"
    names = [s["name"] for s in latent]
    with (
        fork_rng(batch[0].device),
        kept_buffers(module),
        torch.enable_grad(),
        poutine.block(),
        LocalParams(),
    ):
        values = {
            name: guide_trace.nodes[name]["value"].detach().requires_grad_() for name in names
        }
        trace = poutine.trace(poutine.condition(module.guide, data=values)).get_trace(*batch)
        # a site drawn only on some runs may be absent
        for name in (name for name in names if name in trace.nodes):
            others = [k for k in names if k != name]
            log_q = trace.nodes[name]["fn"].log_prob(values[name].detach()).sum()
            used = (
                torch.autograd.grad(log_q, [values[k] for k in others], allow_unused=True)
                if others and log_q.requires_grad
                else []
            )
            parents = [k for k, g in zip(others, used, strict=False) if g is not None]
            if parents:
                return (
                    "a mean-field guide, whose latent sites are independent given x; this guide "
                    f"draws {name} given {', '.join(parents)}, so its analytic KL would not be the "
                    "ELBO"
                )
    return None


def sites_without_analytic_kl(module: torch.nn.Module, batch: tuple) -> list[str]:
    """The latent sites, in words, for which torch has no KL(q || p) (Pyro then estimates it by
    Monte Carlo)."""
    model_trace, guide_trace = trace_once(module, batch)
    missing = []
    for site in sample_sites(model_trace):
        name = site["name"]
        if site["is_observed"] or name not in guide_trace.nodes:
            continue
        q, p = guide_trace.nodes[name]["fn"], site["fn"]
        try:
            kl_divergence(q, p.expand(q.batch_shape) if p.batch_shape != q.batch_shape else p)
        except NotImplementedError:
            missing.append(f"{name} (the guide's {_family(q)} against the prior's {_family(p)})")
    return missing


def _family(d) -> str:
    """A distribution's name without the wrappers that shape it (Independent, an expansion)."""
    while isinstance(d, (dist.Independent, dist.ExpandedDistribution)):
        d = d.base_dist
    return type(d).__name__
