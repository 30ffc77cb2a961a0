"""Neural networks for encoders and decoders.

The contract a custom ``encoder=``/``decoder=`` module must meet:

* the encoder maps x of shape ``(..., x_dim)`` to ``(..., guide.encoder_outputs(z_dim))``
  (``2 * z_dim`` for the default diagonal Normal guide: loc, then unconstrained scale);
* the decoder maps z of shape ``(..., z_dim)`` to ``(..., likelihood.params_per_pixel * x_dim)``
  (``x_dim`` logits for Bernoulli); leading dimensions may include a particle dimension,
  so use layers that act on the last dimension only (``nn.Linear`` does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import PyvaeError

ACTIVATIONS = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
}


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "softplus") -> nn.Sequential:
    """Linear layers of the given widths with ``activation`` between them; ``hidden=()`` is one linear layer."""
    if activation not in ACTIVATIONS:
        raise PyvaeError(f"unknown activation {activation!r}; choose from {', '.join(sorted(ACTIVATIONS))}")
    widths = [in_dim, *hidden, out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if i > 0:
            layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)
