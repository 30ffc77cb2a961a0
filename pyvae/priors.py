"""Priors p(z).

A prior is a :class:`Prior`: the model calls it with no arguments and gets a Pyro
distribution over z with ``event_shape == (z_dim,)`` and empty batch shape; the
data plate broadcasts it over the minibatch. A user-defined prior is a few lines::

    class LaplacePrior(pyvae.priors.Prior):
        def bind(self, vae):
            self.register_buffer("loc", torch.zeros(vae.z_dim))

        def forward(self):
            return dist.Laplace(self.loc, 1.0).to_event(1)

Fixed tensors are buffers (they follow ``.to(device)``), learnable ones parameters.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch.distributions import constraints
from pyro.distributions import transforms as T
from pyro.distributions.transforms import Permute

from .components import Component, Registry
from .errors import PyvaeError, positive_int, positive_number

PRIORS = Registry("prior")


class Prior(Component):
    """Base class: ``forward()`` returns p(z) with event shape ``(z_dim,)``."""

    def bind(self, vae: torch.nn.Module) -> None:
        self.z_dim = vae.z_dim

    def forward(self) -> dist.TorchDistribution:
        raise NotImplementedError


@PRIORS.register
class StandardNormal(Prior):
    """p(z) = N(0, I)."""

    name = "normal"

    def bind(self, vae: torch.nn.Module) -> None:
        super().bind(vae)
        self.register_buffer("loc", torch.zeros(vae.z_dim))
        self.register_buffer("scale", torch.ones(vae.z_dim))

    def forward(self) -> dist.TorchDistribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


@PRIORS.register
class LearnedNormal(Prior):
    """p(z) = N(m, diag(s^2)) with learnable m and s (s = softplus of a free parameter)."""

    name = "learned_normal"

    def bind(self, vae: torch.nn.Module) -> None:
        super().bind(vae)
        self.loc = torch.nn.Parameter(torch.zeros(vae.z_dim))
        # softplus(0.5413) = 1: starts at N(0, I)
        self.raw_scale = torch.nn.Parameter(torch.full((vae.z_dim,), 0.5413))

    def forward(self) -> dist.TorchDistribution:
        return dist.Normal(self.loc, torch.nn.functional.softplus(self.raw_scale)).to_event(1)


@PRIORS.register
class Laplace(Prior):
    """p(z) = prod_d Laplace(z_d; 0, scale): heavier tails than the Normal."""

    name = "laplace"

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(scale=scale)
        self.scale = positive_number("laplace scale", scale)

    def bind(self, vae: torch.nn.Module) -> None:
        super().bind(vae)
        self.register_buffer("loc", torch.zeros(vae.z_dim))

    def forward(self) -> dist.TorchDistribution:
        return dist.Laplace(self.loc, self.scale).to_event(1)


@PRIORS.register
class StudentT(Prior):
    """p(z) = prod_d StudentT(z_d; df, 0, scale): polynomial tails, N(0, scale^2) as df -> infinity."""

    name = "student_t"

    def __init__(self, df: float = 3.0, scale: float = 1.0) -> None:
        super().__init__(df=df, scale=scale)
        self.df = positive_number("student_t df", df)
        self.scale = positive_number("student_t scale", scale)

    def bind(self, vae: torch.nn.Module) -> None:
        super().bind(vae)
        self.register_buffer("loc", torch.zeros(vae.z_dim))

    def forward(self) -> dist.TorchDistribution:
        return dist.StudentT(self.df, self.loc, self.scale).to_event(1)


@PRIORS.register
class MixtureOfGaussians(Prior):
    """p(z) = sum_k pi_k N(z; m_k, diag(s_k^2)) with learnable weights, locations and scales."""

    name = "mog"

    def __init__(self, num_components: int = 10) -> None:
        super().__init__(num_components=num_components)
        self.num_components = positive_int("mog num_components", num_components)

    def bind(self, vae: torch.nn.Module) -> None:
        super().bind(vae)
        k, d = self.num_components, vae.z_dim
        self.logits = torch.nn.Parameter(torch.zeros(k))
        # spread the components so they do not collapse onto one another at the start
        self.locs = torch.nn.Parameter(torch.randn(k, d))
        self.raw_scales = torch.nn.Parameter(torch.full((k, d), 0.5413))  # softplus -> 1

    def forward(self) -> dist.TorchDistribution:
        components = dist.Normal(self.locs, torch.nn.functional.softplus(self.raw_scales)).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)


@PRIORS.register
class VampPrior(Prior):
    """The VampPrior (Tomczak & Welling 2018): p(z) = (1/K) sum_k q_phi(z | u_k).

    The K pseudo-inputs u_k are learnable points of data space (kept in [0, 1] like
    the data), pushed through the VAE's own encoder and guide family, so the prior is
    the aggregate posterior of K learned "images". Its density is computed a chunk of
    components at a time (:class:`VampMixture`), so memory does not grow with K.
    """

    name = "vamp"

    def __init__(self, num_components: int = 500) -> None:
        super().__init__(num_components=num_components)
        self.num_components = positive_int("vamp num_components", num_components)

    def bind(self, vae: torch.nn.Module) -> None:
        super().bind(vae)
        self.pseudo_inputs = torch.nn.Parameter(0.5 + 0.1 * torch.randn(self.num_components, vae.x_dim))
        # bound methods, not submodules: the encoder and the guide family stay owned by the VAE alone
        self._encoder, self._family, self._family_parameters = vae.encoder.__call__, vae.posterior.__call__, vae.posterior.parameters

    def forward(self) -> dist.TorchDistribution:
        return VampMixture(self._encoder(self.pseudo_inputs.clamp(0, 1)), self._family, list(self._family_parameters()))


class VampMixture(dist.TorchDistribution):
    """(1/K) sum_k q(z | h_k): the guide family ``family`` at K encoder outputs ``h`` (K, P).

    ``log_prob`` takes the components a chunk of :data:`VAMP_CHUNK` (data points x components) at a
    time, without keeping any chunk's intermediate values: the backward pass recomputes each chunk
    (:class:`_Recomputed`). That is for flow families (a ``TransformedDistribution``); a diagonal or
    low-rank Normal's pairs cost a few z_dim-sized tensors, in chunks of :data:`VAMP_CHUNK_NORMAL` with
    nothing recomputed. A flow guide's log q(z|h_k) at a z it did not draw inverts the flow one
    dimension at a time, whose intermediate values for every (point, component) pair would
    otherwise all be held (about 100 KB per pair for a 2-step IAF on z_dim = 50: 32 GB for a
    minibatch of 128, K = 500 and 5 particles). The result is the same sum; the price is one more
    forward pass of the components. A component whose flow overflows far from its own posterior
    counts as density 0. ``parameters``: the family's own (a flow's), which the gradient must reach.
    """

    arg_constraints = {}
    support = constraints.real_vector

    def __init__(self, h: torch.Tensor, family, parameters=()) -> None:
        self.h, self.family, self.parameters = h, family, [p for p in parameters if p.requires_grad]
        one = family(h[:1])
        self.flow = isinstance(one, torch.distributions.TransformedDistribution)
        super().__init__(torch.Size(), one.event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return dist.ExpandedDistribution(self, batch_shape)  # log_prob broadcasts already

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            k = torch.randint(len(self.h), torch.Size(sample_shape), device=self.h.device)
            return self.family(self.h[k]).sample()

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        size = max(1, (VAMP_CHUNK if self.flow else VAMP_CHUNK_NORMAL) // max(1, z[..., 0].numel()))
        if not self.flow:
            parts = [self._component_log_probs(h, z) for h in self.h.split(size)]
        elif size >= len(self.h):
            parts = [self._component_log_probs(self.h, z)]
        else:
            parts = [_Recomputed.apply(self._component_log_probs, h, z, *self.parameters) for h in self.h.split(size)]
        return torch.logsumexp(torch.cat(parts, dim=-1), dim=-1) - math.log(len(self.h))

    def _component_log_probs(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log q(z | h_k) for the components h (k, P): shape (..., k)."""
        padded = z.unsqueeze(-2).expand(*z.shape[:-1], len(h), z.shape[-1])
        return _nan_to_neg_inf(self.family(h).log_prob(padded))


class _Recomputed(torch.autograd.Function):
    """``fn(h, z)`` computed without keeping its graph; the backward pass runs it again, with
    gradients, for h, z and the ``parameters`` it reads. Unlike ``torch.utils.checkpoint`` (which
    keeps about 300 MB per chunk of the IAF inverse's bookkeeping, or, re-entrant, refuses
    ``torch.autograd.grad``), nothing of a chunk outlives its forward pass."""

    @staticmethod
    def forward(ctx, fn, h, z, *parameters):
        ctx.fn = fn
        ctx.save_for_backward(h, z, *parameters)
        with torch.no_grad():
            return fn(h, z)

    @staticmethod
    def backward(ctx, grad_output):
        h, z, *parameters = ctx.saved_tensors
        with torch.enable_grad():
            h_, z_ = h.detach().requires_grad_(ctx.needs_input_grad[1]), z.detach().requires_grad_(ctx.needs_input_grad[2])
            wanted = [t for t, need in zip((h_, z_, *parameters), ctx.needs_input_grad[1:]) if need]
            grads = iter(torch.autograd.grad(ctx.fn(h_, z_), wanted, grad_output, allow_unused=True))
        return (None, *(next(grads) if need else None for need in ctx.needs_input_grad[1:]))


#: (data points x components) per chunk of the VampPrior's density with a flow guide (about 200 MB)
VAMP_CHUNK = 2**11
#: the same with a Normal guide, whose chunks are kept for the backward pass (about 250 MB at z_dim = 50)
VAMP_CHUNK_NORMAL = 2**18


def _nan_to_neg_inf(t: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(t, nan=-math.inf)


@PRIORS.register
class FlowPrior(Prior):
    """p(z): a standard Normal pushed through ``num_flows`` affine coupling layers.

    Coupling layers (Dinh et al. 2017) invert in one pass, so log p(z) of a guide
    sample costs as much as a sample from the prior; a fixed permutation between
    layers lets every dimension be transformed.
    """

    name = "flow"

    def __init__(self, num_flows: int = 4, hidden: int = 64) -> None:
        super().__init__(num_flows=num_flows, hidden=hidden)
        self.num_flows = positive_int("flow num_flows", num_flows)
        self.hidden = positive_int("flow hidden", hidden)

    def bind(self, vae: torch.nn.Module) -> None:
        super().bind(vae)
        if vae.z_dim < 2:
            raise PyvaeError("the flow prior needs z_dim >= 2 (coupling layers split z in two)")
        self.flows = torch.nn.ModuleList(
            T.affine_coupling(vae.z_dim, hidden_dims=[self.hidden, self.hidden]) for _ in range(self.num_flows)
        )
        # reversed, not random, between layers: a checkpoint must rebuild the same prior
        self.register_buffer("reverse", torch.arange(vae.z_dim - 1, -1, -1))
        self.register_buffer("loc", torch.zeros(vae.z_dim))
        self.register_buffer("scale", torch.ones(vae.z_dim))

    def forward(self) -> dist.TorchDistribution:
        steps = []
        for i, flow in enumerate(self.flows):
            if i > 0:
                steps.append(Permute(self.reverse))
            steps.append(flow)
        return dist.TransformedDistribution(dist.Normal(self.loc, self.scale).to_event(1), steps)

