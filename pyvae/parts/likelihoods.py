"""Likelihoods p(x|z).

A likelihood turns the decoder's output into a Pyro distribution over x with
``event_shape == (x_dim,)``, says what the decoder must output
(``params_per_pixel`` numbers per pixel), what data it accepts
(:meth:`Likelihood.check_support`), and what to draw as "the" image for a latent
(:meth:`Likelihood.mean`).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch.distributions import constraints

from pyvae.errors import PyvaeError, positive_number
from pyvae.parts.component import Component, Registry

LIKELIHOODS = Registry("likelihood")


class Likelihood(Component):
    """Base class: ``forward(decoder_output)`` returns p(x|z) with event shape ``(x_dim,)``."""

    #: decoder outputs per pixel (e.g. 2 for a loc and a scale)
    params_per_pixel: int = 1
    #: whether the data must be 0/1 (grayscale data then gets binarized by default)
    binary_data: bool = False
    #: the number of values per pixel of a probability *mass* (2 for 0/1, 256 for 8-bit); None for a
    #: density, whose log p(x) is not a code length, so no bits per dimension are reported for it
    levels: int | None = None

    def bind(self, vae: torch.nn.Module) -> None:
        self.x_dim = vae.x_dim

    def forward(self, decoder_output: torch.Tensor) -> dist.TorchDistribution:
        raise NotImplementedError

    def mean(self, decoder_output: torch.Tensor) -> torch.Tensor:
        """E[x|z], used for sample and reconstruction pictures."""
        return self(decoder_output).mean

    def check_support(self, x: torch.Tensor) -> None:
        """Raise :class:`PyvaeError` when ``x`` lies outside this likelihood's support."""


def bits_per_dim(log_px: float, dims: int) -> float:
    """-log p(x) / (D ln 2): nats per point as bits per pixel, for a mass over discrete pixel
    values."""
    return -log_px / (dims * math.log(2))


def coding(model) -> tuple[int, int] | None:
    """(pixels, values per pixel) of a model whose likelihood is a mass over 8-bit-like pixel values
    (``levels`` > 2: the discretized logistic), where bits per dimension are the usual unit; else
    None."""
    likelihood, dims = getattr(model, "likelihood", None), getattr(model, "x_dim", None)
    levels = getattr(likelihood, "levels", None)
    return (dims, levels) if levels and levels > 2 and dims else None


def value_range(x: torch.Tensor) -> str:
    return f"[{x.min().item():.4g}, {x.max().item():.4g}]"


def check_unit_interval(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()) or x.min() < 0 or x.max() > 1:
        raise PyvaeError(
            f"{name} needs data in [0, 1]; got values in {value_range(x)} — rescale the data to "
            "[0, 1]"
        )


def check_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        raise PyvaeError(f"{name} needs finite data; got NaN or infinite values")


class BernoulliPixels(dist.Independent):
    """``Bernoulli(logits=l).to_event(1)`` with the same log-probability computed in fewer passes.

    log p(x) = sum_i [x_i l_i - softplus(l_i)]. Without gradients (importance sampling,
    which scores thousands of decoded images per data point) the products are summed by one
    ``einsum`` (no (..., D) temporary, and x of shape (M, D) broadcasts against particles
    of logits (S, M, D)) and softplus(l) = logaddexp(l, 0) takes one more pass (stable,
    and on a CPU faster than ``F.softplus``). When training, torch's fused
    ``binary_cross_entropy_with_logits`` is cheaper, its backward pass being a single
    sigmoid(l) - x (measured: a training step at batch 512 about 10% faster on a CPU).
    Both are exactly the Bernoulli mass.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self.base_dist._validate_sample(value)
        logits = self.base_dist.logits
        if torch.is_grad_enabled() and logits.requires_grad:
            return -F.binary_cross_entropy_with_logits(
                logits, value.expand_as(logits), reduction="none"
            ).sum(-1)
        softplus = torch.logaddexp(logits, logits.new_zeros(()))
        return torch.einsum("...i,...i->...", value, logits) - softplus.sum(-1)


@LIKELIHOODS.register
class Bernoulli(Likelihood):
    """x_i ~ Bernoulli(sigmoid(logit_i)) independently; binary data only."""

    name = "bernoulli"
    binary_data = True
    levels = 2

    def forward(self, logits: torch.Tensor) -> dist.TorchDistribution:
        return BernoulliPixels(dist.Bernoulli(logits=logits), 1)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def check_support(self, x: torch.Tensor) -> None:
        if not bool(((x == 0) | (x == 1)).all()):
            raise PyvaeError(
                f"bernoulli needs 0/1 data; got values in {value_range(x)} "
                "— use --binarize static|dynamic or a likelihood for continuous data"
            )


@LIKELIHOODS.register
class ContinuousBernoulli(Likelihood):
    """x_i ~ ContinuousBernoulli(logit_i) on [0, 1] (Loaiza-Ganem & Cunningham 2019).

    The density C(lambda) lambda^x (1 - lambda)^(1 - x) includes its normalizing
    constant C(lambda), so it is a proper density on [0, 1], unlike the Bernoulli
    "likelihood" often applied to grayscale data. Its mean is not lambda.
    """

    name = "continuous_bernoulli"

    def forward(self, logits: torch.Tensor) -> dist.TorchDistribution:
        return dist.ContinuousBernoulli(logits=logits).to_event(1)

    def check_support(self, x: torch.Tensor) -> None:
        check_unit_interval(self.name, x)


@LIKELIHOODS.register
class Normal(Likelihood):
    """x_i ~ N(mu_i, sigma^2) with the decoder's mu and a fixed sigma.

    -log p(x|z) = ||x - mu||^2 / (2 sigma^2) + D log(sigma sqrt(2 pi)): the squared-error
    loss with weight 1/(2 lambda) for lambda = sigma^2. sigma is the standard deviation.
    """

    name = "normal"

    def __init__(self, scale: float = 0.1) -> None:
        super().__init__(scale=scale)
        self.scale = positive_number("normal scale", scale)

    def forward(self, loc: torch.Tensor) -> dist.TorchDistribution:
        return dist.Normal(loc, self.scale).to_event(1)

    def mean(self, loc: torch.Tensor) -> torch.Tensor:
        return loc

    def check_support(self, x: torch.Tensor) -> None:
        check_finite(self.name, x)


@LIKELIHOODS.register
class NormalLearnedScale(Likelihood):
    """x_i ~ N(mu_i, sigma_i^2) with a learned standard deviation.

    ``scale_from="pixel"``: one learned sigma per pixel, shared by all data points;
    ``scale_from="decoder"``: the decoder predicts sigma_i(z) (two outputs per pixel).
    sigma = softplus(s) + ``min_scale``, which keeps the density bounded on data
    with constant pixels.
    """

    name = "normal_learned"

    def __init__(self, scale_from: str = "pixel", min_scale: float = 1e-3) -> None:
        super().__init__(scale_from=scale_from, min_scale=min_scale)
        if scale_from not in ("pixel", "decoder"):
            raise PyvaeError(
                f"normal_learned scale_from must be 'pixel' or 'decoder'; got {scale_from!r}"
            )
        self.scale_from = scale_from
        self.min_scale = positive_number("normal_learned min_scale", min_scale)
        self.params_per_pixel = 2 if scale_from == "decoder" else 1

    def bind(self, vae: torch.nn.Module) -> None:
        super().bind(vae)
        if self.scale_from == "pixel":
            self.raw_scale = torch.nn.Parameter(torch.zeros(vae.x_dim))

    def _loc_scale(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.scale_from == "decoder":
            loc, raw = out.chunk(2, dim=-1)
        else:
            loc, raw = out, self.raw_scale
        return loc, F.softplus(raw) + self.min_scale

    def forward(self, out: torch.Tensor) -> dist.TorchDistribution:
        loc, scale = self._loc_scale(out)
        return dist.Normal(loc, scale.expand_as(loc)).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return self._loc_scale(out)[0]

    def check_support(self, x: torch.Tensor) -> None:
        check_finite(self.name, x)


@LIKELIHOODS.register
class Laplace(Likelihood):
    """x_i ~ Laplace(mu_i, b) with a fixed scale b: the absolute-error loss
    |x - mu| / b + D log(2b)."""

    name = "laplace"

    def __init__(self, scale: float = 0.1) -> None:
        super().__init__(scale=scale)
        self.scale = positive_number("laplace scale", scale)

    def forward(self, loc: torch.Tensor) -> dist.TorchDistribution:
        return dist.Laplace(loc, self.scale).to_event(1)

    def mean(self, loc: torch.Tensor) -> torch.Tensor:
        return loc

    def check_support(self, x: torch.Tensor) -> None:
        check_finite(self.name, x)


def _log_beta_cdf_near_zero(
    x: float, a: torch.Tensor, b: torch.Tensor, terms: int = 40
) -> torch.Tensor:
    """log I_x(a, b), the Beta(a, b) CDF at a small x, from its hypergeometric series.

    I_x(a, b) = x^a (1 - x)^b / (a B(a, b)) * sum_n t_n, t_0 = 1,
    t_{n+1} = t_n (a + b + n) x / (a + 1 + n); for x = 1e-4 the terms shrink by
    a factor of about (a + b) x per step, so 40 terms are exact to float precision
    for any a + b below a few hundred.
    """
    log_beta = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
    term, total = torch.ones_like(a), torch.ones_like(a)
    for n in range(terms):
        term = term * (a + b + n) * x / (a + 1 + n)
        total = total + term
    return a * math.log(x) + b * math.log1p(-x) - torch.log(a) - log_beta + torch.log(total)


class _CensoredBeta(dist.Beta):
    """A Beta(a, b) whose values within ``eps`` of 0 or 1 are censored to the ends.

    log p(x) is the Beta density for eps < x < 1 - eps, log P(X <= eps) for x <= eps and
    log P(X >= 1 - eps) for x >= 1 - eps: point masses at the ends plus a density in
    between, which together integrate to one. Images hold many pixels of exactly 0 or 1,
    where the plain Beta density is 0 or infinite.
    """

    support = constraints.unit_interval

    def __init__(self, concentration1, concentration0, eps: float, validate_args=None):
        self.eps = eps
        super().__init__(concentration1, concentration0, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(_CensoredBeta, _instance)
        new.eps = self.eps
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value):
        a, b = self.concentration1, self.concentration0
        inside = super().log_prob(value.clamp(self.eps, 1 - self.eps))
        lower = _log_beta_cdf_near_zero(self.eps, a, b)
        upper = _log_beta_cdf_near_zero(self.eps, b, a)  # P(X >= 1 - eps) = I_eps(b, a)
        return torch.where(
            value <= self.eps, lower, torch.where(value >= 1 - self.eps, upper, inside)
        )


@LIKELIHOODS.register
class Beta(Likelihood):
    """x_i on [0, 1] from a Beta(a_i, b_i) with a and b from the decoder (two outputs per pixel).

    Images have pixels at exactly 0 and 1, where a Beta density is 0 or infinite, so
    values within eps (1e-4 by default) of either end are censored: they score the Beta's
    probability of that end interval. Density in between plus the two end masses
    integrate to one, so log-likelihoods compare across likelihoods.
    """

    name = "beta"
    params_per_pixel = 2

    def __init__(self, eps: float = 1e-4) -> None:
        super().__init__(eps=eps)
        self.eps = positive_number("beta eps", eps)
        if self.eps > 1e-2:
            raise PyvaeError(
                f"beta eps must be at most 0.01 (the end masses use a small-x series); got {eps!r}"
            )

    def forward(self, out: torch.Tensor) -> dist.TorchDistribution:
        a, b = out.chunk(2, dim=-1)
        return _CensoredBeta(F.softplus(a) + 1e-3, F.softplus(b) + 1e-3, self.eps).to_event(1)

    def check_support(self, x: torch.Tensor) -> None:
        check_unit_interval(self.name, x)


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate at both ends (Maechler 2012)."""
    a = a.clamp(max=-1e-30)
    near_zero = a > -math.log(2)
    # each formula only sees inputs where it is finite, so the branch torch.where
    # discards cannot send NaN gradients back (0 * inf)
    a_near = torch.where(near_zero, a, -math.log(2))
    a_far = torch.where(near_zero, -math.log(2), a)
    return torch.where(near_zero, torch.log(-torch.expm1(a_near)), torch.log1p(-torch.exp(a_far)))


class DiscretizedLogisticDistribution(dist.TorchDistribution):
    """A logistic distribution discretized onto the grid {0, 1/(B-1), ..., 1} of B levels.

    P(x) = F((x + h - mu)/s) - F((x - h - mu)/s) with F the logistic CDF and h half a
    bin; the end bins take the tails, P(0) = F((h - mu)/s) and P(1) = 1 - F((1 - h - mu)/s),
    so the masses sum to one (Salimans et al. 2017, for B = 256 levels of 8-bit images).
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.unit_interval
    has_rsample = False

    def __init__(self, loc, scale, num_levels: int = 256, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        self.num_levels = num_levels
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogisticDistribution, _instance)
        new.loc = self.loc.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        new.num_levels = self.num_levels
        super(DiscretizedLogisticDistribution, new).__init__(
            torch.Size(batch_shape), validate_args=False
        )
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value):
        half = 0.5 / (self.num_levels - 1)
        centered = value - self.loc
        upper = (centered + half) / self.scale
        lower = (centered - half) / self.scale
        log_cdf_upper, log_cdf_lower = F.logsigmoid(upper), F.logsigmoid(lower)
        log_sf_upper, log_sf_lower = F.logsigmoid(-upper), F.logsigmoid(-lower)
        # log(F(u) - F(l)) = log F(u) + log(1 - F(l)/F(u)), or with survival functions on the
        # right of the mode, so neither side subtracts two numbers that round to 1
        left = log_cdf_upper + _log1mexp(log_cdf_lower - log_cdf_upper)
        right = log_sf_lower + _log1mexp(log_sf_upper - log_sf_lower)
        log_mass = torch.where(centered < 0, left, right)
        return torch.where(
            value < half, log_cdf_upper, torch.where(value > 1 - half, log_sf_lower, log_mass)
        )

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            u = torch.rand(shape, device=self.loc.device).clamp(1e-6, 1 - 1e-6)
            x = self.loc.expand(shape) + self.scale.expand(shape) * (torch.log(u) - torch.log1p(-u))
            levels = self.num_levels - 1
            return (x * levels).round().clamp(0, levels) / levels

    @property
    def mean(self):
        """E[x] = sum_k g_k P(g_k) = sum_{k>=1} (g_k - g_{k-1}) P(X >= g_k) over the grid
        g_k = k/(B-1), and P(X >= g_k) = 1 - F((g_k - h - mu)/s) = sigmoid((mu - g_k + h)/s): one
        sigmoid per level and pixel, summed level by level (no (B, ...) temporary; 60 times faster
        than the masses on a CPU)."""
        levels = self.num_levels - 1
        total = torch.zeros_like(self.loc)
        for k in range(1, self.num_levels):
            total += torch.sigmoid((self.loc - (k - 0.5) / levels) / self.scale)
        return total / levels


@LIKELIHOODS.register
class DiscretizedLogistic(Likelihood):
    """x_i on the 8-bit grid {0, 1/255, ..., 1}: a logistic with the decoder's mu_i and s_i,
    discretized.

    A probability mass, so log p(x) in nats compares directly with the bits/dim
    reported for 8-bit image models (bits/dim = -log p(x) / (D log 2)).
    """

    name = "discretized_logistic"
    params_per_pixel = 2

    def __init__(self, num_levels: int = 256) -> None:
        super().__init__(num_levels=num_levels)
        if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
            raise PyvaeError(
                f"discretized_logistic num_levels must be an integer >= 2; got {num_levels!r}"
            )
        self.num_levels = self.levels = num_levels

    def forward(self, out: torch.Tensor) -> dist.TorchDistribution:
        loc, raw_scale = out.chunk(2, dim=-1)
        return DiscretizedLogisticDistribution(
            loc, F.softplus(raw_scale) + 1e-3, self.num_levels
        ).to_event(1)

    def check_support(self, x: torch.Tensor) -> None:
        levels = self.num_levels - 1
        on_grid = (x * levels - (x * levels).round()).abs() < 1e-3
        if (
            not bool(torch.isfinite(x).all())
            or x.min() < 0
            or x.max() > 1
            or not bool(on_grid.all())
        ):
            raise PyvaeError(
                f"discretized_logistic needs data on the grid k/{levels} in [0, 1]; got values in "
                f"{value_range(x)}{'' if bool(on_grid.all()) else ' off the grid'} — use 8-bit "
                f"images scaled by 1/{levels}"
            )
