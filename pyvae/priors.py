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
    the aggregate posterior of K learned "images".
    """

    name = "vamp"

    def __init__(self, num_components: int = 500) -> None:
        super().__init__(num_components=num_components)
        self.num_components = positive_int("vamp num_components", num_components)

    def bind(self, vae: torch.nn.Module) -> None:
        super().bind(vae)
        self.pseudo_inputs = torch.nn.Parameter(0.5 + 0.1 * torch.randn(self.num_components, vae.x_dim))
        # a bound method, not a submodule: the encoder stays owned by the VAE alone
        self._encode = vae.encode

    def forward(self) -> dist.TorchDistribution:
        components = self._encode(self.pseudo_inputs.clamp(0, 1))
        uniform = dist.Categorical(logits=torch.zeros(self.num_components, device=self.pseudo_inputs.device))
        return _ExpandedMixture(uniform, components)


class _ExpandedMixture(dist.MixtureSameFamily):
    """A mixture that hands its components z expanded to one copy per component.

    Conditioned flows (the ``iaf`` guide) broadcast their context against z's batch
    shape but not the other way round, so z of shape (..., 1, D) must become (..., K, D).
    """

    def _pad(self, x):
        x = super()._pad(x)
        return x.expand(*x.shape[:-2], self._num_component, x.shape[-1])

    def log_prob(self, x):
        # a flow guide inverted far from its own posterior can overflow to NaN where
        # the component density is simply ~0: count it as 0 (log -inf), not as NaN
        log_prob_x = _nan_to_neg_inf(self.component_distribution.log_prob(self._pad(x)))
        log_mix_prob = torch.log_softmax(self.mixture_distribution.logits, dim=-1)
        return torch.logsumexp(log_prob_x + log_mix_prob, dim=-1)


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

