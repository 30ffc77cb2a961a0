"""The HMC kernel of AIS: leapfrog, the Metropolis step, and the step-size rule.

HMC (identity mass matrix) moves unconstrained coordinates u with momentum p ~ N(0, I) and
energy H(u, p) = -log f_b(u) + |p|^2 / 2; a proposal is accepted with probability
min(1, exp(-(H_1 - H_0))). Each chain has its own step size, multiplied after every transition
by ``adapt`` when its acceptance probability is above ``target_acceptance`` and divided by it
below (Wu et al.'s rule). A proposal whose energy is not finite or off by more than
:data:`DIVERGENCE` nats is rejected and counted as a divergence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pyvae.infer.ais.potential import Potential, grad_log_density, log_density
from pyvae.infer.importance import point_seed

#: an energy error above this many nats counts as a divergent (and rejected) proposal
DIVERGENCE = 1000.0


def velocity_verlet(
    u: torch.Tensor,
    p: torch.Tensor,
    step: torch.Tensor,
    num_steps: int,
    grad_fn: Callable[[torch.Tensor], torch.Tensor],
    grad_u: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, p) after ``num_steps`` leapfrog steps of size ``step`` for the energy -log f + |p|^2/2,
    from d/du log f = ``grad_u`` at u; ``grad_fn(u)`` is d/du log f at later points. The last
    half kick is the caller's: it needs the end's density as well as its gradient.

        p += step/2 g(u);  (u += step p;  p += step g(u)) x (n - 1);  u += step p
    """
    p = p + 0.5 * step * grad_u
    for _ in range(num_steps - 1):
        u = u + step * p
        p = p + step * grad_fn(u)
    return u + step * p, p


class Streams:
    """One random stream per data point (seeded by (seed, point index)), C chains each: a point's
    draws do not depend on which points share its chunk."""

    def __init__(self, seed: int, ids: torch.Tensor, chains: int, device: torch.device) -> None:
        self.generators = [torch.Generator().manual_seed(point_seed(seed, int(i))) for i in ids]
        self.chains, self.device = chains, device

    def normal(self, dim: int) -> torch.Tensor:
        draws = [torch.randn(self.chains, dim, generator=g) for g in self.generators]
        return torch.cat(draws).to(self.device)

    def uniform(self) -> torch.Tensor:
        draws = [torch.rand(self.chains, generator=g) for g in self.generators]
        return torch.cat(draws).to(self.device)


def transition(
    potential: Potential,
    streams: Streams,
    state: dict,
    b: float,
    eps: torch.Tensor,
    leapfrog_steps: int,
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One HMC transition leaving f_b invariant: (new state, acceptance probability, divergent)
    per row."""
    momentum = streams.normal(state["u"].shape[1])
    step = eps[:, None]
    h0 = -log_density(state, b) + 0.5 * (momentum**2).sum(1)

    def grad_fn(u):
        g0, g1 = potential.gradients(u)
        return grad_log_density({"g0": g0, "g1": g1}, b)

    u, p = velocity_verlet(
        state["u"], momentum, step, leapfrog_steps, grad_fn, grad_log_density(state, b)
    )
    proposal = potential.evaluate(u)  # the trajectory's end: its densities too
    p = p + 0.5 * step * grad_log_density(proposal, b)
    error = -log_density(proposal, b) + 0.5 * (p**2).sum(1) - h0
    diverged = ~torch.isfinite(error) | (error > DIVERGENCE)
    accept = torch.where(diverged, torch.zeros_like(error), torch.exp(-error.clamp(min=0)))
    take = streams.uniform() < accept
    new = {
        k: torch.where(take.reshape(-1, *(1,) * (v.dim() - 1)), proposal[k], v)
        for k, v in state.items()
    }
    return new, accept, diverged.float()


def adapt_step_size(
    eps: torch.Tensor, accept: torch.Tensor, target_acceptance: float, adapt: float
) -> torch.Tensor:
    """eps x ``adapt`` where the acceptance probability is above the target, else eps / adapt,
    kept within [1e-5, 10]."""
    factor = torch.where(accept > target_acceptance, adapt, 1 / adapt)
    return (eps * factor).clamp(1e-5, 10.0)
