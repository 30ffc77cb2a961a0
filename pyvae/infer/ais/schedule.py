"""The path of AIS: the temperatures b_0 = 0 < ... < b_T = 1, and the layout of a chain's
latent sites as one flat vector u of unconstrained coordinates, z = T(u)."""

from __future__ import annotations

import math

import torch
from torch.distributions import biject_to, transforms

from pyvae.errors import PyvaeError, positive_int
from pyvae.infer.importance import point_dim

SCHEDULES = ("sigmoid", "linear")


def schedule(num_steps: int, kind: str = "sigmoid", sharpness: float = 4.0) -> torch.Tensor:
    """b_0 = 0 < ... < b_T = 1 as a float64 tensor of T + 1 values.

    ``sigmoid`` (Grosse et al. 2013, Wu et al. 2017): b~_t = sigmoid(sharpness (2t/T - 1)),
    rescaled to run from 0 to 1: small steps at both ends, where the densities change most.
    ``linear``: b_t = t / T.
    """
    positive_int("num_steps", num_steps)
    t = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    if kind == "linear":
        return t
    if kind != "sigmoid":
        raise PyvaeError(f"unknown AIS schedule {kind!r}; choose from {', '.join(SCHEDULES)}")
    b = torch.sigmoid(sharpness * (2 * t - 1))
    return (b - b[0]) / (b[-1] - b[0])


def ais_ladder(num_steps: int) -> list[int]:
    """T/100, T/10 and T, keeping those >= 10 (and T itself always): whether log p^ still moves
    with T."""
    positive_int("num_steps", num_steps)
    return sorted({t for t in (num_steps // 100, num_steps // 10) if t >= 10} | {num_steps})


class Layout:
    """Where each continuous latent site lives in a chain's flat vector of unconstrained
    coordinates.

    Sites are kept row first (the data dimension moved to the front), so that a site's
    transform sees its event dimensions last and every row's coordinates are contiguous.
    """

    def __init__(self, trace, sites: list[str], rows: int, plate: str) -> None:
        self.sites = []
        for name in sites:
            site = trace.nodes[name]
            dim, transform = point_dim(site, plate), biject_to(site["fn"].support)
            rest = transform.inv(site["value"].movedim(dim, 0)).shape[1:]
            self.sites.append((name, dim, transform, rest, math.prod(rest)))
        self.rows, self.dim = rows, sum(s[-1] for s in self.sites)

    def unconstrain(self, values: dict) -> torch.Tensor:
        """(rows, D) coordinates of site values as the programs hold them."""
        parts = [
            t.inv(values[name].movedim(dd, 0)).reshape(self.rows, size)
            for name, dd, t, _, size in self.sites
        ]
        return torch.cat(parts, dim=1)

    def constrain(self, u: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """({site: value as the programs hold it}, log |det dz/du| per row) of coordinates u
        (rows, D)."""
        values, log_jac, offset = {}, torch.zeros(u.shape[0], dtype=u.dtype, device=u.device), 0
        for name, dim, transform, rest, size in self.sites:
            piece = u[:, offset : offset + size].reshape(u.shape[0], *rest)
            offset += size
            z = transform(piece)
            if not _is_identity(transform):
                jac = transform.log_abs_det_jacobian(piece, z)
                log_jac = log_jac + jac.reshape(u.shape[0], -1).sum(1)
            values[name] = z.movedim(0, dim)
        return values, log_jac


def _is_identity(transform) -> bool:
    """Whether ``biject_to`` gave the identity (real support): no Jacobian to compute."""
    while isinstance(transform, transforms.IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, transforms.ComposeTransform) and not transform.parts
