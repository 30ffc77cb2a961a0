"""The VAE: a Pyro model p(z) p_theta(x|z) and guide q_phi(z|x) around two networks.

Everything probabilistic goes through four distribution objects, so training,
the IWAE bound and importance-sampled log-likelihoods share one code path:

* ``vae.prior()``           p(z)          event shape (z_dim,)
* ``vae.decode(z)``         p_theta(x|z)  event shape (x_dim,)
* ``vae.encode(x)``         q_phi(z|x)    event shape (z_dim,)
* ``vae.model`` / ``vae.guide``  the Pyro programs that sample from them inside a data plate.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyvae.errors import PyvaeError, positive_int
from pyvae.models.shared import image_shape_for
from pyvae.parts.component import is_custom
from pyvae.parts.guides import GUIDES, Guide
from pyvae.parts.likelihoods import LIKELIHOODS, Likelihood
from pyvae.parts.nets import NETS, ConvDecoder, ConvEncoder, ResidualDecoder, ResidualEncoder, mlp
from pyvae.parts.priors import PRIORS, Prior
from pyvae.program import data_plate

_instance_ids = itertools.count()


class VAE(nn.Module):
    """A variational autoencoder whose model and guide are Pyro programs.

    Generative model, for each data point n in a plate of size N (the data set)::

        z_n ~ p(z)                      (prior, default N(0, I))
        x_n ~ p_theta(x | z_n)          (likelihood of decoder(z_n), default Bernoulli logits)

    Guide::

        z_n ~ q_phi(z | x_n)            (guide family of encoder(x_n), default diagonal Normal)

    Args:
        x_dim: number of pixels (data are flat float tensors of shape (batch, x_dim)).
        z_dim: number of latent dimensions.
        hidden: widths of the MLP hidden layers of encoder and decoder (mirrored); ``()`` is linear.
            Unused by ``net="conv"`` and ``net="resnet"`` (residual blocks whose depth follows the
            image size).
        prior: a built-in name, a spec dict ``{"name": ..., **settings}`` or an object from
            :mod:`pyvae.parts.priors`.
        likelihood: the same, from :mod:`pyvae.parts.likelihoods`.
        guide: the same, from :mod:`pyvae.parts.guides`.
        encoder: optional custom ``nn.Module`` replacing the encoder MLP (contract in
            :mod:`pyvae.parts.nets`).
        decoder: the same for the decoder MLP.
        activation: nonlinearity of the MLPs (``softplus``, as in Pyro's VAE example).
        image_shape: (channels, height, width) for pictures; inferred for square one-channel images.
        net: ``mlp`` or ``conv`` (two stride-2 convolutions each way, for images such as 28x28).

    The networks are registered with Pyro by ``pyro.module`` under a name unique to
    this instance, so two VAEs in one process never share parameters through Pyro's
    global param store.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden: Sequence[int] = (400,),
        prior: str | dict | Prior = "normal",
        likelihood: str | dict | Likelihood = "bernoulli",
        guide: str | dict | Guide = "normal",
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        activation: str = "softplus",
        image_shape: Sequence[int] | None = None,
        net: str = "mlp",
    ) -> None:
        super().__init__()
        self.x_dim = positive_int("x_dim", x_dim)
        self.z_dim = positive_int("z_dim", z_dim)
        hidden = tuple(hidden)
        for h in hidden:
            positive_int("each hidden width", h)
        self.image_shape = image_shape_for(x_dim, image_shape)

        self.prior = PRIORS.resolve(prior)
        self.likelihood = LIKELIHOODS.resolve(likelihood)
        # not ``self.guide``: that name is the guide program below
        self.posterior = GUIDES.resolve(guide)

        if net not in NETS:
            raise PyvaeError(f"unknown net {net!r}; choose from {', '.join(NETS)}")
        if net != "mlp" and self.image_shape is None:
            raise PyvaeError(f"net {net!r} needs image_shape; x_dim={x_dim} is not a square image")
        custom = {"encoder": encoder is not None, "decoder": decoder is not None}
        encoder_outputs = self.posterior.encoder_outputs(z_dim)
        if encoder is None:
            encoder = (
                mlp(x_dim, hidden, encoder_outputs, activation)
                if net == "mlp"
                else {"conv": ConvEncoder, "resnet": ResidualEncoder}[net](
                    self.image_shape, encoder_outputs, activation
                )
            )
        if decoder is None:
            decoder = (
                mlp(z_dim, hidden[::-1], self.likelihood.params_per_pixel * x_dim, activation)
                if net == "mlp"
                else {"conv": ConvDecoder, "resnet": ResidualDecoder}[net](
                    z_dim, self.image_shape, self.likelihood.params_per_pixel, activation
                )
            )
        self.encoder, self.decoder = encoder, decoder
        for component in (self.likelihood, self.posterior, self.prior):
            component.bind(self)

        self.config = {
            "model": "vae",
            "x_dim": x_dim,
            "z_dim": z_dim,
            "hidden": list(hidden),
            "prior": self.prior.spec(),
            "likelihood": self.likelihood.spec(),
            "guide": self.posterior.spec(),
            "encoder": "custom" if custom["encoder"] else net,
            "decoder": "custom" if custom["decoder"] else net,
            "activation": activation,
            "net": net,
            "image_shape": list(self.image_shape) if self.image_shape is not None else None,
        }
        self._pyro_name = f"vae{next(_instance_ids)}"
        self.latent_site = "z"

    @classmethod
    def from_config(cls, config: dict, path="checkpoint", **parts) -> VAE:
        """Rebuild from a checkpoint's ``config``; custom parts (not built-in names) must be in
        ``parts``."""
        kwargs = {k: v for k, v in config.items() if k != "model"}
        needed = ("x_dim", "z_dim", "prior", "likelihood", "guide", "encoder", "decoder")
        if any(k not in kwargs for k in needed):
            raise PyvaeError(
                f"{path} is a pyvae checkpoint without a complete model description; it cannot be "
                "loaded"
            )
        for part, registry in (("prior", PRIORS), ("likelihood", LIKELIHOODS), ("guide", GUIDES)):
            spec = kwargs[part] if isinstance(kwargs[part], dict) else {"name": kwargs[part]}
            if is_custom(spec, registry) and part not in parts:
                raise PyvaeError(
                    f"{path} was saved with a custom {part} {spec['name']!r}; pass {part}=... to "
                    "pyvae.load"
                )
        for part in ("encoder", "decoder"):
            if kwargs.pop(part) == "custom" and part not in parts:
                raise PyvaeError(
                    f"{path} was saved with a custom {part}; pass {part}=... to pyvae.load"
                )
        unknown = sorted(set(parts) - {"prior", "likelihood", "guide", "encoder", "decoder"})
        if unknown:
            raise PyvaeError(
                f"unknown part {unknown[0]!r} for pyvae.load; allowed: prior, likelihood, guide, "
                "encoder, decoder"
            )
        return cls(**{**kwargs, **parts})

    # -- the four distributions -------------------------------------------------
    def encode(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q_phi(z|x) for a batch x of shape (..., x_dim)."""
        return self.posterior(self.encoder(x))

    def decode(self, z: torch.Tensor) -> dist.TorchDistribution:
        """p_theta(x|z) for latents z of shape (..., z_dim)."""
        return self.likelihood(self.decoder(z))

    # -- the Pyro programs ------------------------------------------------------
    def model(self, x: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """p(z) p_theta(x|z) for a minibatch x of shape (M, x_dim) from a data set of ``num_data``
        points.

        The data plate has size N = ``num_data`` and the minibatch as subsample, so Pyro
        scales the log-densities by N/M. (beta and KL warm-up are applied by the trainer,
        by a handler on the latent site: not an argument here.)
        """
        pyro.module(f"{self._pyro_name}.decoder", self.decoder)
        pyro.module(f"{self._pyro_name}.prior", self.prior)
        with data_plate(x, num_data):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", self.decode(z), obs=x)
        return z

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """q_phi(z|x) for the same minibatch, in the same plate."""
        pyro.module(f"{self._pyro_name}.encoder", self.encoder)
        pyro.module(f"{self._pyro_name}.posterior", self.posterior)
        with data_plate(x, num_data):
            return pyro.sample("z", self.encode(x))

    def check_batch(self, x: torch.Tensor) -> None:
        """Refuse data of the wrong width or outside the likelihood's support (one-line errors)."""
        if x.ndim != 2 or x.shape[1] != self.x_dim:
            raise PyvaeError(
                f"data has {x.shape[-1]} features per point; the VAE expects x_dim={self.x_dim}"
            )
        self.likelihood.check_support(x)

    # -- conveniences for pictures ----------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """n images E[x|z], shape (n, x_dim), for z = m + T (z0 - m) with z0 ~ p(z) and m the
        prior's mean (estimated from samples where the prior has none); T = 1 samples p(z)."""
        prior = self.prior()
        z = prior.sample((n,))
        if temperature != 1.0:
            try:
                center = prior.mean
            except NotImplementedError:
                center = prior.sample((4096,)).mean(0)
            z = center + temperature * (z - center)
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def latent_mean(self, x: torch.Tensor, num_samples: int = 256) -> torch.Tensor:
        """E_q[z|x], shape (..., z_dim): exact where the guide family has a mean, else a Monte Carlo
        average."""
        q = self.encode(x)
        try:
            return q.mean
        except NotImplementedError:  # e.g. a flow guide
            return q.sample((num_samples,)).mean(0)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x|z] at the guide's mean z = E_q[z|x], shape like x."""
        return self.likelihood.mean(self.decoder(self.latent_mean(x)))
