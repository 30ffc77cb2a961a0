"""The hierarchical VAE: L >= 2 stochastic layers, top-down model, bottom-up guide (Burda et al.
2016)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from types import SimpleNamespace

import pyro
import torch
from torch import nn

from pyvae.errors import PyvaeError, positive_int
from pyvae.models.shared import check_x, image_shape_for, resolve_prior
from pyvae.parts.guides import DiagonalNormal
from pyvae.parts.likelihoods import LIKELIHOODS, Likelihood
from pyvae.parts.nets import mlp
from pyvae.parts.priors import Prior
from pyvae.program import data_plate

_instance_ids = itertools.count()


class HVAE(nn.Module):
    """A VAE with L >= 2 layers of latent variables z_1 (next to x) ... z_L (the top).

    Generative model, top-down, for each data point n in a plate of size N::

        z_L ~ p(z_L)                                              (prior, default N(0, I))
        z_l ~ N(mu_l(z_{l+1}), diag sigma_l(z_{l+1})^2)          for l = L-1, ..., 1
        x   ~ p(x | z_1)                                          (likelihood, default Bernoulli)

    Guide, bottom-up (each layer sees only the one below: q(z_l | z_{l-1}), z_0 = x)::

        z_l ~ N(m_l(z_{l-1}), diag s_l(z_{l-1})^2)               for l = 1, ..., L

    Each mu/sigma pair comes from an MLP whose last layer outputs the mean and an unconstrained
    s, sigma = softplus(s) + 1e-4 (:class:`pyvae.parts.guides.DiagonalNormal`). Sites: ``"z1"`` ...
    ``"zL"`` and ``"x"``.

    Args:
        x_dim: pixels per data point (flat float tensors of shape (batch, x_dim)).
        z_dims: widths of z_1, ..., z_L (bottom first); at least two layers.
        hidden: one tuple of hidden widths per stochastic layer: ``hidden[l-1]`` is the MLP from
            z_{l-1} (or x) up to z_l in the guide, and reversed, from z_l down, in the model.
        prior: p(z_L), a name, spec dict or object from :mod:`pyvae.parts.priors` (not ``vamp``).
        likelihood: p(x | z_1), from :mod:`pyvae.parts.likelihoods`.
        activation: nonlinearity of every MLP.
        image_shape: (channels, height, width) for pictures; inferred for square one-channel images.

    The defaults are the two-layer architecture of the IWAE paper for MNIST: x(784)-200-200-z1(100)
    -100-100-z2(50) in the guide, mirrored in the model, with tanh units as in the paper, so its
    numbers are the reference for this model.
    """

    def __init__(
        self,
        x_dim: int,
        z_dims: Sequence[int] = (100, 50),
        hidden: Sequence[Sequence[int]] = ((200, 200), (100, 100)),
        prior: str | dict | Prior = "normal",
        likelihood: str | dict | Likelihood = "bernoulli",
        activation: str = "tanh",
        image_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.x_dim = positive_int("x_dim", x_dim)
        self.z_dims = tuple(positive_int("each of z_dims", z) for z in z_dims)
        if len(self.z_dims) < 2:
            raise PyvaeError(
                f"hvae needs at least 2 stochastic layers (z_dims); got {list(z_dims)} — use model "
                "'vae' for one"
            )
        self.hidden = tuple(
            tuple(positive_int("each hidden width", h) for h in layer) for layer in hidden
        )
        if len(self.hidden) != len(self.z_dims):
            raise PyvaeError(
                f"hidden needs one list of widths per stochastic layer ({len(self.z_dims)}); got "
                f"{len(self.hidden)}"
            )
        self.image_shape = image_shape_for(x_dim, image_shape)
        self.prior = resolve_prior(prior, "hvae")
        self.likelihood = LIKELIHOODS.resolve(likelihood)
        # network output (mean, raw scale) -> diagonal Normal, for every layer
        self.gaussian = DiagonalNormal()

        # what layer l's guide network reads: x, z_1, ..., z_{L-1}
        inputs = (x_dim, *self.z_dims[:-1])
        outputs = (self.likelihood.params_per_pixel * x_dim, *(2 * z for z in self.z_dims[:-1]))
        # encoders[l]: z_{l} (x for l = 0) -> q(z_{l+1});
        # decoders[l]: z_{l+1} -> p(z_l) (p(x) for l = 0)
        self.encoders = nn.ModuleList(
            mlp(i, h, 2 * z, activation)
            for i, h, z in zip(inputs, self.hidden, self.z_dims, strict=True)
        )
        self.decoders = nn.ModuleList(
            mlp(z, h[::-1], o, activation)
            for z, h, o in zip(self.z_dims, self.hidden, outputs, strict=True)
        )
        self.likelihood.bind(self)
        # the prior is over the top layer; it sees a view of this model whose z_dim is z_L's width
        self.prior.bind(SimpleNamespace(x_dim=x_dim, z_dim=self.z_dims[-1]))

        self.latent_site = f"z{len(self.z_dims)}"
        self.config = {
            "model": "hvae",
            "x_dim": x_dim,
            "z_dims": list(self.z_dims),
            "hidden": [list(h) for h in self.hidden],
            "prior": self.prior.spec(),
            "likelihood": self.likelihood.spec(),
            "activation": activation,
            "image_shape": list(self.image_shape) if self.image_shape is not None else None,
        }
        self._pyro_name = f"hvae{next(_instance_ids)}"

    # -- the Pyro programs ------------------------------------------------------
    def model(self, x: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """p(z_L) prod_{l<L} p(z_l | z_{l+1}) p(x | z_1) for a minibatch x (M, x_dim) of
        ``num_data`` points."""
        pyro.module(f"{self._pyro_name}.decoders", self.decoders)
        pyro.module(f"{self._pyro_name}.prior", self.prior)
        pyro.module(f"{self._pyro_name}.likelihood", self.likelihood)
        top = len(self.z_dims)
        with data_plate(x, num_data):
            z = pyro.sample(f"z{top}", self.prior())
            for layer in range(top - 1, 0, -1):  # z_l from z_{l+1}, from the top down
                z = pyro.sample(f"z{layer}", self.gaussian(self.decoders[layer](z)))
            pyro.sample("x", self.likelihood(self.decoders[0](z)), obs=x)
        return z

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """q(z_1 | x) prod_{l>1} q(z_l | z_{l-1}) for the same minibatch, in the same plate."""
        pyro.module(f"{self._pyro_name}.encoders", self.encoders)
        with data_plate(x, num_data):
            z = x
            for layer, encoder in enumerate(self.encoders, start=1):  # from the bottom up
                z = pyro.sample(f"z{layer}", self.gaussian(encoder(z)))
        return z

    def check_batch(self, x: torch.Tensor) -> None:
        """Refuse data of the wrong width or outside the likelihood's support (one-line errors)."""
        check_x(x, self.x_dim, "hvae")
        self.likelihood.check_support(x)
