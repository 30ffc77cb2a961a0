"""Priors p(z).

A prior is a :class:`Prior`: the model calls it with no arguments and gets a Pyro
distribution over z with ``event_shape == (z_dim,)`` and empty batch shape; the
data plate broadcasts it over the minibatch. A user-defined prior is a few lines::

    class LaplacePrior(pyvae.parts.priors.Prior):
        def bind(self, vae):
            self.register_buffer("loc", torch.zeros(vae.z_dim))

        def forward(self):
            return dist.Laplace(self.loc, 1.0).to_event(1)

Fixed tensors are buffers (they follow ``.to(device)``), learnable ones parameters.
"""

from __future__ import annotations

import ctypes
import math

import pyro.distributions as dist
import torch
from pyro.distributions import transforms as T
from pyro.distributions.transforms import Permute
from torch.distributions import constraints

from pyvae.errors import PyvaeError, positive_int, positive_number
from pyvae.parts.component import Component, Registry

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
    """p(z) = prod_d StudentT(z_d; df, 0, scale): polynomial tails,
    N(0, scale^2) as df -> infinity."""

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
        components = dist.Normal(self.locs, torch.nn.functional.softplus(self.raw_scales)).to_event(
            1
        )
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)


@PRIORS.register
class VampPrior(Prior):
    """The VampPrior (Tomczak & Welling 2018): p(z) = (1/K) sum_k q_phi(z | u_k).

    The K pseudo-inputs u_k are learnable points of data space (kept in [0, 1] like
    the data), pushed through the VAE's own encoder and guide family, so the prior is
    the aggregate posterior of K learned "images". Its density is computed a chunk of
    components at a time (:class:`VampMixture`), so memory does not grow with K.

    ``components``: ``guide``, the guide family itself (the paper's prior), or ``base``, the guide
    family's base distribution, p(z) = (1/K) sum_k b(z | u_k): for a flow guide (iaf) the diagonal
    Normal before the flow, for every other guide the same as ``guide``. Under a flow guide the
    paper's prior needs log q(z | u_k) at z the flow did not draw, which inverts the flow one
    dimension at a time for every (point, pseudo-input) pair: 20-100x the default model's step, so
    training refuses it (:meth:`training_refusal`) and ``base`` is the fast choice; a trained run
    of it still loads and is evaluated as it was trained.
    """

    name = "vamp"

    def __init__(self, num_components: int = 500, components: str = "guide") -> None:
        super().__init__(num_components=num_components, components=components)
        self.num_components = positive_int("vamp num_components", num_components)
        if components not in VAMP_COMPONENTS:
            raise PyvaeError(
                f"vamp components must be one of {', '.join(VAMP_COMPONENTS)}; got {components!r}"
            )
        self.components = components

    def bind(self, vae: torch.nn.Module) -> None:
        super().bind(vae)
        self.pseudo_inputs = torch.nn.Parameter(
            0.5 + 0.1 * torch.randn(self.num_components, vae.x_dim)
        )
        # bound methods, not submodules: the encoder and the guide family stay owned by the VAE
        # alone
        self._encoder, self._family, self._family_parameters = (
            vae.encoder.__call__,
            vae.posterior.__call__,
            vae.posterior.parameters,
        )
        self._encoder_outputs = vae.posterior.encoder_outputs(vae.z_dim)

    def _base(self, h: torch.Tensor) -> dist.TorchDistribution:
        q = self._family(h)
        return q.base_dist if isinstance(q, dist.TransformedDistribution) else q

    def forward(self) -> dist.TorchDistribution:
        family = self._family if self.components == "guide" else self._base
        return VampMixture(
            self._encoder(self.pseudo_inputs.clamp(0, 1)),
            family,
            list(self._family_parameters()) if self.components == "guide" else [],
        )

    def training_refusal(self) -> str | None:
        """Why training with this prior is refused, or None (see the class). Whether the family is
        a flow is read from it alone: the encoder may normalize by batch, and this look is no step
        of its running statistics."""
        with torch.no_grad():
            q = self._family(self.pseudo_inputs.new_zeros(1, self._encoder_outputs))
        if self.components == "guide" and isinstance(q, dist.TransformedDistribution):
            return (
                "the vamp prior under a flow guide inverts the flow for every (point, "
                "pseudo-input) pair, 20-100x slower than the default model; use "
                "{name: vamp, components: base} (its components the guide's base Normal), another "
                "prior, or guide normal or lowrank"
            )
        return None


#: :class:`VampPrior`'s ``components``
VAMP_COMPONENTS = ("guide", "base")


class VampMixture(dist.TorchDistribution):
    """(1/K) sum_k q(z | h_k): the guide family ``family`` at K encoder outputs ``h`` (K, P).

    ``log_prob`` scores every z against every component with the family's own ``log_prob``, on a
    grid of (z, component) chunks each within :data:`VAMP_CHUNK_BYTES`; with gradients, no chunk's
    intermediate values are kept: the backward pass recomputes each chunk (:class:`_Recomputed`).
    Memory is one chunk plus the (z, component) log-densities, 4 bytes a pair, whatever the batch,
    the particles and K. A flow guide's log q(z|h_k) at a z it did not draw inverts the flow one
    dimension at a time, whose intermediate values for every pair would otherwise all be held (about
    100 KB per pair for a 2-step IAF on z_dim = 50: 32 GB for a minibatch of 128, K = 500 and 5
    particles); a diagonal Normal's pair holds about 400 bytes, still gigabytes with IWAE's 50
    particles. What a pair holds is measured (:func:`_bytes_per_pair`), so a custom guide family is
    bounded too. The result is the same sum; the price, where the pairs do not fit one chunk, is one
    more forward pass. A component whose flow overflows far from its own posterior counts as
    density 0.
    ``parameters``: the family's own (a flow's), which the gradient must reach.
    """

    arg_constraints = {}
    support = constraints.real_vector

    def __init__(self, h: torch.Tensor, family, parameters=()) -> None:
        self.h, self.family, self.parameters = h, family, [p for p in parameters if p.requires_grad]
        super().__init__(torch.Size(), family(h[:1]).event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return dist.ExpandedDistribution(self, batch_shape)  # log_prob broadcasts already

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            k = torch.randint(len(self.h), torch.Size(sample_shape), device=self.h.device)
            return self.family(self.h[k]).sample()

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        rows = z.reshape(-1, z.shape[-1])
        n, k = len(rows), len(self.h)
        budget = VAMP_CHUNK_BYTES.get(z.device.type, VAMP_CHUNK_BYTES["cpu"])
        pairs = max(1, budget // _bytes_per_pair(self._component_log_probs, self.h, rows))
        if n * k <= pairs:
            log_q = self._component_log_probs(self.h, rows)
        else:
            columns = min(k, max(1, pairs // n))
            height = min(n, max(1, pairs // columns))
            grid = [
                (slice(c, c + columns), slice(r, r + height))
                for r in range(0, n, height)
                for c in range(0, k, columns)
            ]
            if torch.is_grad_enabled():
                log_q = _Recomputed.apply(
                    self._component_log_probs, grid, self.h, rows, *self.parameters
                )
            else:
                log_q = _in_chunks(self._component_log_probs, grid, self.h, rows)
        return (torch.logsumexp(log_q, dim=-1) - math.log(k)).reshape(z.shape[:-1])

    def _component_log_probs(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log q(z_i | h_k) for the components h (k, P) and the rows z (r, D): shape (r, k)."""
        padded = z.unsqueeze(-2).expand(len(z), len(h), z.shape[-1])
        return _nan_to_neg_inf(self.family(h).log_prob(padded))


#: bytes of intermediate values one chunk of the VampPrior's density may hold: on a CPU, a few
#: components of a flow guide at batch 128; larger on a GPU, where each chunk costs kernel launches
VAMP_CHUNK_BYTES = {"cpu": 2**27, "cuda": 2**30}


def _in_chunks(fn, grid, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The (rows, components) values of ``fn(h, z)``, a chunk of ``grid`` at a time, into one
    tensor."""
    out = None
    for components, rows in grid:
        values = fn(h[components], z[rows])
        if out is None:
            out = values.new_empty(len(z), len(h))
        out[rows, components] = values
        del values
        _release_free_memory(z.device)
    return out


class _Recomputed(torch.autograd.Function):
    """:func:`_in_chunks` that keeps no chunk's graph: the backward pass runs each chunk again, with
    gradients, for h, z and the ``parameters`` it reads (inputs of this node, so each one's gradient
    leaves it once, as ``DistributedDataParallel``'s hooks expect). Unlike
    ``torch.utils.checkpoint`` (which keeps about 300 MB per chunk of the IAF inverse's bookkeeping,
    or, re-entrant, refuses ``torch.autograd.grad``), nothing of a chunk outlives it."""

    @staticmethod
    def forward(ctx, fn, grid, h, z, *parameters):
        ctx.fn, ctx.grid = fn, grid
        ctx.save_for_backward(h, z, *parameters)
        return _in_chunks(fn, grid, h, z)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        h, z, *parameters = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        grads = [
            torch.zeros_like(t) if need else None
            for t, need in zip((h, z, *parameters), needs, strict=True)
        ]
        for components, rows in ctx.grid:
            with torch.enable_grad():
                inputs = (
                    h[components].detach().requires_grad_(needs[0]),
                    z[rows].detach().requires_grad_(needs[1]),
                )
                values = ctx.fn(*inputs)
            wanted = [(i, t) for i, t in enumerate((*inputs, *parameters)) if needs[i]]
            chunk = torch.autograd.grad(
                values, [t for _, t in wanted], grad_output[rows, components], allow_unused=True
            )
            for (i, _), g in zip(wanted, chunk, strict=True):
                if g is not None:
                    (
                        grads[0][components] if i == 0 else grads[1][rows] if i == 1 else grads[i]
                    ).add_(g)
            del values, chunk
            _release_free_memory(z.device)
        return (None, None, *grads)


def _release_free_memory(device: torch.device) -> None:
    """Hand the heap's free pages back to the system after a chunk (glibc's ``malloc_trim``;
    elsewhere nothing).

    glibc keeps a chunk's freed buffers, and the smaller tensors allocated between them (gradients,
    Adam's state) keep them from being merged and reused: one step of vamp + iaf + trace at batch
    128 peaked at 1.7 GB without trimming, 1.2 GB with it. A trim costs about a millisecond.
    """
    if device.type == "cpu" and _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, Windows, musl)
        return None


_LIBC = _glibc()


def _bytes_per_pair(fn, h: torch.Tensor, z: torch.Tensor) -> int:
    """Bytes autograd keeps for one more (z, component) pair of ``fn(h, z)``: two rows less one, so
    that what every call keeps once (a flow's masked weights) is not counted per pair. Without
    gradients a chunk's temporaries are at most its graph, so the same bound serves."""
    if len(z) >= 2:
        return max(1, _saved_bytes(fn, h[:1], z[:2]) - _saved_bytes(fn, h[:1], z[:1]))
    if len(h) >= 2:
        return max(1, _saved_bytes(fn, h[:2], z[:1]) - _saved_bytes(fn, h[:1], z[:1]))
    return 1  # a single pair: nothing to chunk


def _saved_bytes(fn, h: torch.Tensor, z: torch.Tensor) -> int:
    total = 0

    def pack(t):
        nonlocal total
        # an expanded tensor holds its storage once; a slice of a larger one only its own elements
        total += min(t.numel() * t.element_size(), t.untyped_storage().nbytes())
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(h.detach().requires_grad_(), z.detach().requires_grad_())
    return total


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
            T.affine_coupling(vae.z_dim, hidden_dims=[self.hidden, self.hidden])
            for _ in range(self.num_flows)
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
