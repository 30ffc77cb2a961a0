"""M2 of Kingma et al. (2014), "Semi-supervised learning with deep generative models":
labelled and unlabelled points in one minibatch, one code path."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from pyvae.errors import PyvaeError
from pyvae.models.cvae import CVAE, check_labels
from pyvae.parts.likelihoods import Likelihood
from pyvae.parts.nets import mlp
from pyvae.parts.priors import Prior
from pyvae.program import data_plate


class M2(CVAE):
    """M2: a class-conditional VAE whose label is a latent variable where it is not observed.

    Generative model, for each data point n in a plate of size N::

        y_n ~ Cat(1/C, ..., 1/C)                     (uniform over the C classes)
        z_n ~ p(z)                                   (prior, default N(0, I))
        x_n ~ p(x | decoder(z_n, onehot(y_n)))       (likelihood, default Bernoulli logits)

    Guide (a batch is (x, y), y_n = -1 for an unlabelled point)::

        y_n ~ q(y | x_n) = Cat(softmax(classifier(x_n)))     if y_n = -1
        y_n ~ point mass at y_n                              if y_n is a label
        z_n ~ q(z | x_n, y_n) = N(m(x_n, onehot(y_n)), diag s(x_n, onehot(y_n))^2)

    The guide's ``"y"`` is enumerated (``infer={"enumerate": "parallel"}``). ``TraceEnum_ELBO``
    (max_plate_nesting=1) sums its C values exactly and skips those q gives probability 0, so
    one program yields M2's bound for both kinds of point in the same minibatch::

        labelled:    L(x, y) = E_q(z|x,y)[log p(x|y,z) + log p(y) + log p(z) - log q(z|x,y)]
        unlabelled:  U(x) = sum_y q(y|x) L(x, y) + H(q(y|x))

    and :func:`pyvae.program.log_weights` scores log p(x, y) and log p(x) = log sum_y p(x, y).

    Classification: q(y|x) appears above only for unlabelled points, so the model adds for each
    of the M_l labelled points of a minibatch of M the factor alpha * (M / M_l) * log q(y_n | x_n)
    (``pyro.factor``: training objective only, never part of log p(x)). With the data plate's
    N/M (``num_data`` = N), a minibatch's objective is an estimate of

        sum_labelled L(x, y) + sum_unlabelled U(x) + alpha * N * E_labelled[log q(y | x)]

    Kingma et al.'s J^alpha (their eq. 9) with their weight 0.1 N written as alpha * N: the
    default alpha = 0.1 is their setting, whatever N and the number of labels (with N_l labels
    in all it is a weight of alpha N / N_l per labelled point, 50 for 100 labels of 50,000).
    ``pyvae.fit`` serves semi-supervised data as a labelled and an unlabelled call per step, each
    with a fixed share of the minibatch (``labelled_share``), and scales each call's densities to
    its own group (N_l/M_l, N_u/M_u); the factor keeps the N/M this program gives it, so the
    estimate above stays unbiased whatever the share.

    Args: as :class:`CVAE`, plus ``alpha`` >= 0; the classifier is an MLP with the same ``hidden``
    widths and ``activation``. Defaults are Kingma et al.'s MNIST networks: z 50, one hidden
    layer of 500 softplus units.
    """

    name = "m2"
    min_label = -1

    def __init__(
        self,
        x_dim: int,
        num_classes: int,
        z_dim: int = 50,
        hidden: Sequence[int] = (500,),
        alpha: float = 0.1,
        prior: str | dict | Prior = "normal",
        likelihood: str | dict | Likelihood = "bernoulli",
        activation: str = "softplus",
        image_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__(
            x_dim, num_classes, z_dim, hidden, prior, likelihood, activation, image_shape
        )
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not 0 <= alpha < math.inf
        ):
            raise PyvaeError(
                "alpha must be a number >= 0 (the weight of the classification term); got "
                f"{alpha!r}"
            )
        self.alpha = float(alpha)
        self.classifier = mlp(x_dim, self.config["hidden"], num_classes, activation)
        # log p(y): uniform; a buffer so it follows the model to its device
        self.register_buffer("class_log_prior", torch.full((num_classes,), -math.log(num_classes)))
        # "model" is already "m2", and the Pyro names "m2<i>"
        self.config = {**self.config, "alpha": alpha}

    # -- q(y | x) ----------------------------------------------------------------
    def classifier_dist(self, x: torch.Tensor) -> dist.Categorical:
        """q(y | x) = Cat(softmax(classifier(x)))."""
        return dist.Categorical(logits=self.classifier(x))

    def guide_logits(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log q(y | x) for unlabelled rows (y = -1); 0 at the label and -inf elsewhere for labelled
        ones.

        -inf, not probs with zeros: a Categorical given probs clamps them to 1e-7, and then neither
        Pyro's enumeration nor pyvae's importance sampler sees the other classes as impossible.
        """
        log_q = torch.log_softmax(self.classifier(x), dim=-1)
        point = torch.zeros_like(log_q).masked_fill(
            self.one_hot(y.clamp(min=0), torch.bool).logical_not(), -math.inf
        )
        return torch.where((y >= 0).unsqueeze(-1), point, log_q)

    # -- the Pyro programs ------------------------------------------------------
    def model(self, x: torch.Tensor, y: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """p(y) p(z) p(x | y, z), plus the classification factor on labelled points (see the class
        docstring).

        "y" is not observed here even for labelled points: the guide fixes its value there.
        """
        for part in ("decoder", "prior", "likelihood", "classifier"):
            pyro.module(f"{self._pyro_name}.{part}", getattr(self, part))
        labelled = y >= 0
        with data_plate(x, num_data):
            label = pyro.sample("y", dist.Categorical(logits=self.class_log_prior))
            z = pyro.sample("z", self.prior())
            pyro.sample("x", self.decode(z, label), obs=x)
            # alpha * (M / M_l) * log q(y | x) on the M_l labelled points; none labelled: masked out
            weight = self.alpha * len(y) / labelled.sum().clamp(min=1)
            with poutine.mask(mask=labelled):
                pyro.factor("classify", weight * self.classifier_dist(x).log_prob(y.clamp(min=0)))
        return z

    def guide(self, x: torch.Tensor, y: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """q(y | x) (a point mass where labelled), enumerated, then q(z | x, y), in the same
        plate."""
        pyro.module(f"{self._pyro_name}.classifier", self.classifier)
        pyro.module(f"{self._pyro_name}.encoder", self.encoder)
        with data_plate(x, num_data):
            label = pyro.sample(
                "y",
                dist.Categorical(logits=self.guide_logits(x, y)),
                infer={"enumerate": "parallel"},
            )
            return pyro.sample("z", self.encode(x, label))

    # -- the classifier on its own -----------------------------------------------
    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable class under q(y | x), shape (M,)."""
        return self.classifier(x).argmax(-1)

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The fraction of points whose label y (0..C-1 each) is the most probable class under
        q(y | x)."""
        check_labels(y, len(x), 0, self.num_classes, self.name)
        return float((self.classify(x) == y.to(x.device)).float().mean())
