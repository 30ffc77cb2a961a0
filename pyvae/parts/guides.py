"""Guide families q(z|x).

A guide family turns the encoder's output into a Pyro distribution over z with
``event_shape == (z_dim,)``; ``encoder_outputs(z_dim)`` says how many numbers the
encoder must produce per data point.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import transforms as T
from pyro.distributions.transforms import Permute

from pyvae.errors import PyvaeError, positive_int, positive_number
from pyvae.parts.component import Component, Registry

GUIDES = Registry("guide")


class Guide(Component):
    """Base class: ``forward(encoder_output)`` returns q(z|x) with event shape ``(z_dim,)``."""

    def bind(self, vae: torch.nn.Module) -> None:
        self.z_dim = vae.z_dim

    def encoder_outputs(self, z_dim: int) -> int:
        raise NotImplementedError

    def forward(self, encoder_output: torch.Tensor) -> dist.TorchDistribution:
        raise NotImplementedError


@GUIDES.register
class DiagonalNormal(Guide):
    """q(z|x) = N(mu(x), diag(sigma(x)^2)).

    The encoder outputs mu and an unconstrained s; the *standard deviation* is
    sigma = softplus(s) + min_scale (softplus rather than exp keeps large s from
    overflowing; ``min_scale`` keeps log q finite).
    """

    name = "normal"

    def __init__(self, min_scale: float = 1e-4) -> None:
        super().__init__(min_scale=min_scale)
        self.min_scale = positive_number("normal guide min_scale", min_scale)

    def encoder_outputs(self, z_dim: int) -> int:
        return 2 * z_dim

    def forward(self, encoder_output: torch.Tensor) -> dist.TorchDistribution:
        loc, raw_scale = encoder_output.chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(raw_scale) + self.min_scale).to_event(1)


@GUIDES.register
class LowRankNormal(Guide):
    """q(z|x) = N(mu(x), W(x) W(x)^T + diag(d(x))) with a rank-``rank`` factor W.

    Correlations between latent dimensions, at (rank + 2) * z_dim encoder outputs;
    d = (softplus(s) + min_scale)^2 is a variance.
    """

    name = "lowrank"

    def __init__(self, rank: int = 2, min_scale: float = 1e-4) -> None:
        super().__init__(rank=rank, min_scale=min_scale)
        self.rank = positive_int("lowrank rank", rank)
        self.min_scale = positive_number("lowrank min_scale", min_scale)

    def encoder_outputs(self, z_dim: int) -> int:
        return (self.rank + 2) * z_dim

    def forward(self, encoder_output: torch.Tensor) -> dist.TorchDistribution:
        z_dim = encoder_output.shape[-1] // (self.rank + 2)
        loc, raw_diag, factor = encoder_output.split([z_dim, z_dim, self.rank * z_dim], dim=-1)
        cov_factor = factor.reshape(*factor.shape[:-1], z_dim, self.rank)
        cov_diag = (F.softplus(raw_diag) + self.min_scale) ** 2
        return dist.LowRankMultivariateNormal(loc, cov_factor, cov_diag)


@GUIDES.register
class IAF(Guide):
    """q(z|x): a diagonal Normal followed by ``num_flows`` inverse autoregressive flow steps.

    Each step (Kingma et al. 2016) is an affine autoregressive transform conditioned
    on a context vector h(x) that the encoder outputs beside mu and sigma; its
    Jacobian is triangular, so log q(z|x) = log N(z_0; mu, sigma) - sum of log|scales|
    is exact. Sampling and log q of the guide's own samples take one pass per step.
    """

    name = "iaf"

    def __init__(
        self, num_flows: int = 2, context_dim: int = 32, hidden: int = 64, min_scale: float = 1e-4
    ) -> None:
        super().__init__(
            num_flows=num_flows, context_dim=context_dim, hidden=hidden, min_scale=min_scale
        )
        self.num_flows = positive_int("iaf num_flows", num_flows)
        self.context_dim = positive_int("iaf context_dim", context_dim)
        self.hidden = positive_int("iaf hidden", hidden)
        self.min_scale = positive_number("iaf min_scale", min_scale)

    def encoder_outputs(self, z_dim: int) -> int:
        return 2 * z_dim + self.context_dim

    def bind(self, vae: torch.nn.Module) -> None:

        super().bind(vae)
        if vae.z_dim < 2:
            raise PyvaeError(
                "the iaf guide needs z_dim >= 2 (an autoregressive step on one dimension is affine)"
            )
        self.flows = torch.nn.ModuleList(
            T.conditional_affine_autoregressive(
                vae.z_dim, self.context_dim, hidden_dims=[self.hidden], stable=True
            )
            for _ in range(self.num_flows)
        )
        # reversed between steps so each dimension is conditioned on every other one
        self.register_buffer("reverse", torch.arange(vae.z_dim - 1, -1, -1))

    def forward(self, encoder_output: torch.Tensor) -> dist.TorchDistribution:
        z_dim = self.z_dim
        loc, raw_scale, context = encoder_output.split([z_dim, z_dim, self.context_dim], dim=-1)
        base = dist.Normal(loc, F.softplus(raw_scale) + self.min_scale).to_event(1)
        steps = []
        for i, flow in enumerate(self.flows):
            if i > 0:
                steps.append(Permute(self.reverse))
            steps.append(flow.condition(context))
        return dist.TransformedDistribution(base, steps)
