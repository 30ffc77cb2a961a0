"""Parts the built-in models share: their image shape, the priors a hierarchy can take, the check of
x."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pyvae.errors import PyvaeError
from pyvae.parts.priors import PRIORS, Prior, VampPrior


def image_shape_for(x_dim: int, image_shape: Sequence[int] | None) -> tuple[int, ...] | None:
    """``image_shape`` checked to hold ``x_dim`` pixels; without one, (1, s, s) when x_dim = s^2,
    else None."""
    if image_shape is None:
        side = math.isqrt(x_dim)
        return (1, side, side) if side * side == x_dim else None
    shape = tuple(image_shape)
    if math.prod(shape) != x_dim:
        raise PyvaeError(f"image_shape {shape} does not hold x_dim={x_dim} pixels")
    return shape


def resolve_prior(prior: str | dict | Prior, model_name: str) -> Prior:
    """A prior from :mod:`pyvae.parts.priors`, except the VampPrior: its components q(z | u) need an
    encoder from x alone to this model's z, which only the one-layer ``vae`` has."""
    prior = PRIORS.resolve(prior)
    if isinstance(prior, VampPrior):
        allowed = ", ".join(sorted(name for name in PRIORS if name != VampPrior.name))
        raise PyvaeError(
            f"prior 'vamp' needs the encoder q(z|x) of model 'vae'; {model_name} allows {allowed}"
        )
    return prior


def check_x(x: torch.Tensor, x_dim: int, model_name: str) -> None:
    """Refuse x that is not a (M, x_dim) float tensor."""
    if not torch.is_tensor(x) or x.ndim != 2 or x.shape[1] != x_dim:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise PyvaeError(f"data has shape {shape}; {model_name} expects (batch, x_dim={x_dim})")
