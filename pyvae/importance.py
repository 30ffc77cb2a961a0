"""Importance-sampled log-likelihoods and diagnostics of the guide.

The estimator, per data point x, with the guide as proposal::

    z_1..z_K ~ q(z|x),   w_k = p(z_k) p(x|z_k) / q(z_k|x)
    log p^(x) = log (1/K) sum_k w_k

E[log p^(x)] <= log p(x) (Jensen): the IWAE-K bound (Burda et al. 2016). It rises
with K and reaches log p(x) as K -> infinity; K = 1 is the ELBO. Its Monte Carlo
standard error comes from the delta method on the mean of the weights,
se = sqrt(Var(w) / K) / mean(w), which is itself unreliable when the weights are
heavy-tailed: the Pareto k^ of the weights (PSIS, Vehtari et al. 2024) says when.
With k^ above min(1 - 1/log10 K, 0.7) the estimate should not be trusted.

The log-weights come from the same distribution objects the model and guide use
(``vae.prior()``, ``vae.decode(z)``, ``vae.encode(x)``), so every prior,
likelihood and guide is supported without a second implementation. Everything is
in nats per data point; the NLL is the negative of ``log_px``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import arviz
import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from .errors import PyvaeError, positive_int
from .model import VAE
from .train import Batches, as_images, resolve_device

#: how many floats one chunk's largest tensor may hold: 8 MB in float32 on a CPU, so the
#: elementwise passes over the decoded images run from cache; 128 MB on a GPU, where
#: bigger kernels pay off
CHUNK_ELEMENTS = {"cpu": 2**21, "cuda": 2**25}

KHAT_BANDS = (("good", -math.inf, 0.5), ("ok", 0.5, 0.7), ("bad", 0.7, 1.0), ("very bad", 1.0, math.inf))


def khat_threshold(num_samples: int) -> float:
    """The sample-size dependent reliability threshold min(1 - 1/log10 K, 0.7) of Vehtari et al."""
    return min(1 - 1 / math.log10(num_samples), 0.7) if num_samples > 10 else 0.0


@dataclass
class LogLikelihood:
    """Per-data-point results of :func:`log_likelihood`, each a tensor of shape (N,).

    ``log_px``: log (1/K) sum_k w_k, the IWAE-K estimate of log p(x);
    ``stderr``: its Monte Carlo standard error; ``elbo``: mean_k log w_k, the ELBO
    estimated from the same K draws; ``khat``: the Pareto shape of the weights;
    ``ess``: 1 / sum_k w~_k^2 with w~ the normalized weights (K when the weights are equal);
    ``iwae``: {K': the IWAE-K' bound} for K' dividing the draws into K/K' groups;
    ``z_mean``: (N, z_dim) the guide's mean E_q[z|x], estimated from the draws.
    """

    log_px: torch.Tensor
    stderr: torch.Tensor
    elbo: torch.Tensor
    khat: torch.Tensor
    ess: torch.Tensor
    iwae: dict[int, torch.Tensor]
    z_mean: torch.Tensor
    num_samples: int
    log_weights: torch.Tensor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return self.log_px.shape[0]

    def khat_bands(self) -> dict[str, float]:
        """Fraction of points whose k^ is good (< 0.5), ok (< 0.7), bad (< 1) and very bad (>= 1)."""
        k = self.khat
        return {name: float(((k >= lo) & (k < hi)).float().mean()) for name, lo, hi in KHAT_BANDS}


def iwae_sizes(num_samples: int) -> list[int]:
    """1, 5, 10, 50, 100, ... up to and always including ``num_samples``."""
    sizes, base = [], 1
    while base <= num_samples:
        sizes += [k for k in (base, 5 * base) if k < num_samples]
        base *= 10
    return sorted(set(sizes)) + [num_samples]


@torch.no_grad()
def log_likelihood(
    vae: VAE,
    x: torch.Tensor,
    num_samples: int = 5000,
    batch_size: int | None = None,
    *,
    device: str | torch.device | None = None,
    keep_log_weights: bool = False,
    progress: bool = False,
) -> LogLikelihood:
    """Importance-sampled log p(x) of every row of ``x`` (shape (N, x_dim)), K = ``num_samples``.

    Vectorized over samples and data points and chunked so that memory is bounded by
    the chunk, not by K x N: ``batch_size`` data points at a time (chosen from
    :data:`CHUNK_ELEMENTS` when None), their K samples in as few passes as fit.
    The (N, K) log-weights are kept only with ``keep_log_weights``.
    """
    positive_int("num_samples", num_samples)
    x = evaluation_images(x)
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != vae.x_dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise PyvaeError(f"x must have shape (N, {vae.x_dim}) with N > 0; got {shape}")
    device = resolve_device(device or next(vae.parameters()).device)
    vae.to(device).eval()
    vae.likelihood.check_support(x)
    rows = max(1, CHUNK_ELEMENTS.get(device.type, 2**21) // _elements_per_row(vae))
    if batch_size is None:
        batch_size = max(1, min(x.shape[0], rows // num_samples))
    positive_int("batch_size", batch_size)
    sample_chunk = max(1, min(num_samples, rows // batch_size))
    sizes = iwae_sizes(num_samples)

    # results go into tensors allocated once: thousands of small per-chunk tensors kept
    # alive between the large chunk buffers fragment the heap until memory grows with N
    n = x.shape[0]
    out = {name: torch.empty(n) for name in ("log_px", "stderr", "elbo", "khat", "ess")}
    iwae = torch.empty(len(sizes), n)
    z_mean = torch.empty(n, vae.z_dim)
    log_weights = torch.empty(n, num_samples) if keep_log_weights else None
    batches = Batches(x, device)
    bar = tqdm(total=n, desc=f"log p(x), K={num_samples}", unit="pt", disable=not progress, leave=False)
    # the data were checked above; re-validating every chunk would only repeat that work
    with pyro.validation_enabled(False):
        for start, xb in zip(range(0, n, batch_size), batches.in_order(batch_size)):
            span = slice(start, start + xb.shape[0])
            log_w, z_mean[span] = _log_weights(vae, xb, num_samples, sample_chunk)
            for name, values in _summarize(log_w, sizes).items():
                if name == "iwae":
                    iwae[:, span] = values
                else:
                    out[name][span] = values
            if keep_log_weights:
                log_weights[span] = log_w
            bar.update(xb.shape[0])
    bar.close()
    return LogLikelihood(
        **out,
        iwae={size: iwae[i] for i, size in enumerate(sizes)},
        z_mean=z_mean,
        num_samples=num_samples,
        log_weights=log_weights,
    )


def evaluation_images(x) -> torch.Tensor:
    """A tensor (N, x_dim) from a tensor, an ImageSet (one draw if it binarizes dynamically) or a Dataset."""
    from .data import ImageSet

    if isinstance(x, ImageSet):
        return x.draw()
    if isinstance(x, torch.utils.data.Dataset) and not isinstance(x, torch.Tensor):
        return as_images(x)[0]
    return x


def _elements_per_row(vae: VAE) -> int:
    """Floats held per (sample, data point) row: decoder output and the prior's mixture terms dominate."""
    components = getattr(vae.prior, "num_components", 1)
    return vae.x_dim * max(2, vae.likelihood.params_per_pixel) + components * vae.z_dim


def _log_weights(vae: VAE, x: torch.Tensor, num_samples: int, sample_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log w of shape (M, K), E_q[z|x] of shape (M, z_dim)) for a chunk of M points."""
    q = vae.encode(x)
    prior = vae.prior()
    log_w, z_sum = [], 0.0
    for start in range(0, num_samples, sample_chunk):
        z = q.sample((min(sample_chunk, num_samples - start),))  # (S, M, z_dim)
        log_w.append(prior.log_prob(z) + vae.decode(z).log_prob(x) - q.log_prob(z))
        z_sum = z_sum + z.sum(0)
    return torch.cat(log_w).T.contiguous(), z_sum / num_samples


#: log-weights of a point that span less than this (nats) are equal: ratios within 0.1%
CONSTANT_WEIGHTS = 1e-3


def pareto_khat(log_w: torch.Tensor) -> torch.Tensor:
    """Pareto k^ of each row's importance weights, from ``arviz.psislw``.

    Two cases arviz cannot fit are made explicit: weights equal to within
    :data:`CONSTANT_WEIGHTS` have no tail (k^ = 0, where arviz returns inf), and with
    too few samples for a tail of 5 (K <= 20) k^ is not estimated (NaN).
    """
    if math.ceil(min(0.2 * log_w.shape[1], 3 * math.sqrt(log_w.shape[1]))) < 5:
        return torch.full((log_w.shape[0],), math.nan)
    with warnings.catch_warnings():
        # arviz warns about large k^; we report every point's k^ and the bands ourselves
        warnings.simplefilter("ignore")
        _, khat = arviz.psislw(log_w.double().cpu().numpy())
    khat = torch.as_tensor(np.asarray(khat), dtype=torch.float32).reshape(-1)
    spread = (log_w.max(1).values - log_w.min(1).values).cpu()
    return torch.where(spread < CONSTANT_WEIGHTS, torch.zeros_like(khat), khat)


def _summarize(log_w: torch.Tensor, sizes: list[int]) -> dict[str, torch.Tensor]:
    """Per-point statistics of log-weights of shape (M, K)."""
    k = log_w.shape[1]
    log_px = torch.logsumexp(log_w, dim=1) - math.log(k)
    normalized = torch.exp(log_w - log_px.unsqueeze(1))  # w_k / mean(w), mean 1
    second_moment = (normalized**2).mean(1)
    iwae = []
    for size in sizes:
        groups = log_w[:, : (k // size) * size].reshape(log_w.shape[0], -1, size)
        iwae.append((torch.logsumexp(groups, dim=2) - math.log(size)).mean(1))
    return {
        "log_px": log_px,
        "stderr": ((second_moment - 1).clamp(min=0) / max(k - 1, 1)).sqrt(),
        "elbo": log_w.mean(1),
        "ess": k / second_moment,
        "khat": pareto_khat(log_w),
        "iwae": torch.stack(iwae),
    }
