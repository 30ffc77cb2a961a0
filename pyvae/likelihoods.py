"""Likelihoods p(x|z).

A likelihood turns the decoder's output into a Pyro distribution over x with
``event_shape == (x_dim,)``, says what the decoder must output
(``params_per_pixel`` numbers per pixel), what data it accepts
(:meth:`Likelihood.check_support`), and what to draw as "the" image for a latent
(:meth:`Likelihood.mean`).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch

from .components import Component, Registry
from .errors import PyvaeError

LIKELIHOODS = Registry("likelihood")


class Likelihood(Component):
    """Base class: ``forward(decoder_output)`` returns p(x|z) with event shape ``(x_dim,)``."""

    #: decoder outputs per pixel (e.g. 2 for a loc and a scale)
    params_per_pixel: int = 1
    #: whether the data must be 0/1 (grayscale data then gets binarized by default)
    binary_data: bool = False

    def bind(self, vae: torch.nn.Module) -> None:
        self.x_dim = vae.x_dim

    def forward(self, decoder_output: torch.Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def mean(self, decoder_output: torch.Tensor) -> torch.Tensor:
        """E[x|z], used for sample and reconstruction pictures."""
        return self(decoder_output).mean

    def check_support(self, x: torch.Tensor) -> None:
        """Raise :class:`PyvaeError` when ``x`` lies outside this likelihood's support."""


def value_range(x: torch.Tensor) -> str:
    return f"[{x.min().item():.4g}, {x.max().item():.4g}]"


@LIKELIHOODS.register
class Bernoulli(Likelihood):
    """x_i ~ Bernoulli(sigmoid(logit_i)) independently; binary data only."""

    name = "bernoulli"
    binary_data = True

    def forward(self, logits: torch.Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=logits).to_event(1)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def check_support(self, x: torch.Tensor) -> None:
        if not bool(((x == 0) | (x == 1)).all()):
            raise PyvaeError(
                f"bernoulli needs 0/1 data; got values in {value_range(x)} "
                "— use --binarize static|dynamic or a likelihood for continuous data"
            )
