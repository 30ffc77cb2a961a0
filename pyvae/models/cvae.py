"""The conditional VAE: p(z) p(x | z, y), q(z | x, y) for labelled data (Sohn et al. 2015)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyvae.errors import PyvaeError, positive_int
from pyvae.models.shared import check_x, image_shape_for, resolve_prior
from pyvae.parts.guides import DiagonalNormal
from pyvae.parts.likelihoods import LIKELIHOODS, Likelihood
from pyvae.parts.nets import mlp
from pyvae.parts.priors import Prior
from pyvae.program import data_plate

_instance_ids = itertools.count()


class CVAE(nn.Module):
    """A class-conditional VAE: the label y is given, the latent z holds everything else ("style").

    Generative model, for each data point n with its label y_n in a plate of size N::

        z_n ~ p(z)                               (prior, default N(0, I))
        x_n ~ p(x | decoder(z_n, onehot(y_n)))   (likelihood, default Bernoulli logits)

    Guide::

        z_n ~ N(m(x_n, onehot(y_n)), diag s(x_n, onehot(y_n))^2)

    The one-hot label is concatenated to the input of both MLPs; sigma = softplus(.) + 1e-4
    (:class:`pyvae.parts.guides.DiagonalNormal`). log p(x | y) is what the importance sampler
    scores.
    Sites: ``"z"`` and ``"x"``; a batch is ``(x, y)`` with y int64 labels in 0..C-1.

    Args:
        x_dim: pixels per data point.
        num_classes: C, the number of labels.
        z_dim: latent width.
        hidden: hidden widths of the encoder MLP (the decoder mirrors them).
        prior: as for :class:`pyvae.VAE` (the ``vamp`` prior excepted).
        likelihood: as for :class:`pyvae.VAE`.
        activation: as for :class:`pyvae.VAE`.
        image_shape: as for :class:`pyvae.VAE`.

    The defaults (z 50, one hidden layer of 500 softplus units) are the networks of Kingma
    et al. (2014)'s M2 on MNIST, whose generative model p(x | y, z) this is: a CVAE and an
    M2 with the same settings compare directly.
    """

    #: the model's name in ``pyvae.models.MODELS`` and its config
    name = "cvae"
    #: the smallest label a batch may hold (M2 allows -1, "unlabelled")
    min_label = 0

    def __init__(
        self,
        x_dim: int,
        num_classes: int,
        z_dim: int = 50,
        hidden: Sequence[int] = (500,),
        prior: str | dict | Prior = "normal",
        likelihood: str | dict | Likelihood = "bernoulli",
        activation: str = "softplus",
        image_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.x_dim = positive_int("x_dim", x_dim)
        self.num_classes = positive_int("num_classes", num_classes)
        self.z_dim = positive_int("z_dim", z_dim)
        hidden = tuple(positive_int("each hidden width", h) for h in hidden)
        self.image_shape = image_shape_for(x_dim, image_shape)
        self.prior = resolve_prior(prior, self.name)
        self.likelihood = LIKELIHOODS.resolve(likelihood)
        self.gaussian = DiagonalNormal()  # encoder output (mean, raw scale) -> q(z | x, y)
        c = self.num_classes
        self.encoder = mlp(x_dim + c, hidden, 2 * z_dim, activation)
        self.decoder = mlp(
            z_dim + c, hidden[::-1], self.likelihood.params_per_pixel * x_dim, activation
        )
        for component in (self.likelihood, self.prior):
            component.bind(self)

        self.latent_site = "z"
        self.config = {
            "model": self.name,
            "x_dim": x_dim,
            "num_classes": num_classes,
            "z_dim": z_dim,
            "hidden": list(hidden),
            "prior": self.prior.spec(),
            "likelihood": self.likelihood.spec(),
            "activation": activation,
            "image_shape": list(self.image_shape) if self.image_shape is not None else None,
        }
        self._pyro_name = f"{self.name}{next(_instance_ids)}"

    # -- the two networks as distributions -------------------------------------
    def encode(self, x: torch.Tensor, y: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x, y), event shape (z_dim,); x and the labels y broadcast against each other."""
        return self.gaussian(self.encoder(concat(x, self.one_hot(y, x.dtype))))

    def decode(self, z: torch.Tensor, y: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z, y), event shape (x_dim,)."""
        return self.likelihood(self.decoder(concat(z, self.one_hot(y, z.dtype))))

    def one_hot(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.one_hot(y, self.num_classes).to(dtype)

    # -- the Pyro programs ------------------------------------------------------
    def model(self, x: torch.Tensor, y: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """p(z) p(x | z, y) for a minibatch (x, y) of ``num_data`` points."""
        pyro.module(f"{self._pyro_name}.decoder", self.decoder)
        pyro.module(f"{self._pyro_name}.prior", self.prior)
        pyro.module(f"{self._pyro_name}.likelihood", self.likelihood)
        with data_plate(x, num_data):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", self.decode(z, y), obs=x)
        return z

    def guide(self, x: torch.Tensor, y: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """q(z | x, y) for the same minibatch, in the same plate."""
        pyro.module(f"{self._pyro_name}.encoder", self.encoder)
        with data_plate(x, num_data):
            return pyro.sample("z", self.encode(x, y))

    def check_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Refuse x of the wrong width or outside the likelihood's support, and labels that are not
        integers ``min_label``..C-1, one per row of x (one-line errors)."""
        check_x(x, self.x_dim, self.name)
        self.likelihood.check_support(x)
        check_labels(y, len(x), self.min_label, self.num_classes, self.name)


def concat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[a, b] along the last dimension, the leading dimensions broadcast: a network input from x (M,
    D) and labels of shape (C, 1, M) or particles z (K, M, Z)."""
    lead = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*lead, a.shape[-1]), b.expand(*lead, b.shape[-1])], dim=-1)


def check_labels(y: torch.Tensor, n: int, low: int, num_classes: int, model_name: str) -> None:
    """Refuse labels that are not ``n`` integers in ``low``..num_classes-1."""
    allowed = f"{'-1 (unlabelled) or ' if low < 0 else ''}0..{num_classes - 1}"
    if (
        not torch.is_tensor(y)
        or y.dtype.is_floating_point
        or y.dtype.is_complex
        or y.dtype == torch.bool
    ):
        kind = y.dtype if torch.is_tensor(y) else type(y).__name__
        raise PyvaeError(f"labels must be an integer tensor ({allowed}); got {kind}")
    if y.shape != (n,):
        raise PyvaeError(
            f"labels have shape {tuple(y.shape)}; {model_name} expects one per data point: ({n},)"
        )
    bad = y[(y < low) | (y >= num_classes)]
    if bad.numel():
        raise PyvaeError(
            f"label {int(bad[0])} is outside the classes of this {model_name} "
            f"(num_classes={num_classes}): allowed {allowed}"
        )
