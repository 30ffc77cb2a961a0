"""Guide families q(z|x).

A guide family turns the encoder's output into a Pyro distribution over z with
``event_shape == (z_dim,)``; ``encoder_outputs(z_dim)`` says how many numbers the
encoder must produce per data point.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
import torch.nn.functional as F

from .components import Component, Registry

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
        self.min_scale = min_scale

    def encoder_outputs(self, z_dim: int) -> int:
        return 2 * z_dim

    def forward(self, encoder_output: torch.Tensor) -> dist.TorchDistribution:
        loc, raw_scale = encoder_output.chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(raw_scale) + self.min_scale).to_event(1)
