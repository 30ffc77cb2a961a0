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

import pyro.distributions as dist
import torch

from .components import Component, Registry

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
