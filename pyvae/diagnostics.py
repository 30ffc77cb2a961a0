"""How healthy is the posterior? KL per latent dimension, active units, the bound's gap, I(x; z).

:func:`evaluate` gathers them with the importance-sampled log-likelihood into an
:class:`Evaluation` that prints a table, writes ``eval.json``, an ``arviz.InferenceData``
netCDF file and the plots.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import arviz
import numpy as np
import pyro
import torch
import xarray
from torch.distributions import Independent, kl_divergence

from .checkpoint import atomic_write
from .data import spread
from .importance import LogLikelihood, evaluation_images, khat_threshold, log_likelihood
from .model import VAE
from .train import Batches, resolve_device

ACTIVE_UNIT_THRESHOLD = 0.01


@torch.no_grad()
def kl_per_dimension(vae: VAE, x: torch.Tensor, num_samples: int = 100, batch_size: int = 500) -> torch.Tensor | None:
    """E_x KL(q(z_d|x) || p(z_d)) for each latent dimension d, in nats; None when q or p does not factorize.

    Analytic where torch knows the KL of the two marginals, else a Monte Carlo
    average over ``num_samples`` draws of log q_d(z_d|x) - log p_d(z_d).
    """
    prior = vae.prior()
    if not _factorizes(prior):
        return None
    total, n = 0.0, 0
    for xb in Batches(x, next(vae.parameters()).device).in_order(batch_size):
        q = vae.encode(xb)
        if not _factorizes(q):
            return None
        q_d, p_d = q.base_dist, prior.base_dist.expand(q.base_dist.batch_shape)
        try:
            kl = kl_divergence(q_d, p_d)
        except NotImplementedError:
            z = q_d.sample((num_samples,))
            kl = (q_d.log_prob(z) - p_d.log_prob(z)).mean(0)
        total = total + kl.sum(0)
        n += xb.shape[0]
    return (total / n).cpu()


def _factorizes(d) -> bool:
    return isinstance(d, Independent) and d.reinterpreted_batch_ndims == 1 and d.base_dist.event_shape == ()


def active_units(z_mean: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD) -> tuple[int, torch.Tensor]:
    """(number of d with Cov_x(E_q[z_d|x]) > threshold, those variances): Burda et al.'s active units."""
    variance = z_mean.var(0)
    return int((variance > threshold).sum()), variance


@torch.no_grad()
def mutual_information(vae: VAE, x: torch.Tensor, max_points: int = 1000, chunk: int = 100) -> float:
    """I(x; z) under q(z, x) = q(z|x) p_data(x), in nats, from N <= ``max_points`` points.

    I = E[log q(z|x)] - E[log q(z)], with the aggregate posterior
    q(z_i) ~ (1/N) sum_j q(z_i|x_j) at one draw z_i ~ q(z|x_i) per point. The
    estimate is biased (it cannot exceed log N); compare runs at the same N.
    """
    device = next(vae.parameters()).device
    x = spread(x, max_points).to(device)
    n = x.shape[0]
    q = vae.encode(x)
    z = q.sample()  # (N, z_dim)
    log_q_own = q.log_prob(z)
    log_q_agg = []
    # q(z_i|x_j) far from x_j's posterior may overflow a flow's inverse: that density is ~0, not NaN
    with pyro.validation_enabled(False):
        for start in range(0, n, chunk):
            zi = z[start : start + chunk].unsqueeze(1).expand(-1, n, -1)  # (c, N, z_dim): z_i against every q(.|x_j)
            log_q = torch.nan_to_num(q.log_prob(zi), nan=-math.inf)
            log_q_agg.append(torch.logsumexp(log_q, dim=1) - math.log(n))
    return float((log_q_own - torch.cat(log_q_agg)).mean())


@dataclass
class Evaluation:
    """The importance-sampled log-likelihood and the posterior diagnostics of one data set."""

    ll: LogLikelihood
    kl_per_dim: torch.Tensor | None
    active_units: int
    unit_variance: torch.Tensor
    mutual_information: float
    dataset: str = ""
    split: str = ""
    seconds: float = math.nan

    def summary(self) -> dict:
        """The numbers of ``eval.json``: means over data points, nats per data point."""
        ll, n = self.ll, len(self.ll)
        log_px, elbo = ll.log_px.double(), ll.elbo.double()
        return {
            "dataset": self.dataset,
            "split": self.split,
            "num_points": n,
            "num_samples": ll.num_samples,
            "log_px": float(log_px.mean()),
            # Monte Carlo error of that mean, for this fixed set of points
            "log_px_mc_stderr": float(ll.stderr.double().pow(2).sum().sqrt() / n),
            # spread over points: the error of the mean as an estimate over the data distribution
            "log_px_data_stderr": float(log_px.std() / math.sqrt(n)) if n > 1 else math.nan,
            "nll": float(-log_px.mean()),
            "elbo": float(elbo.mean()),
            "gap": float((log_px - elbo).mean()),
            "iwae": {str(k): float(v.double().mean()) for k, v in ll.iwae.items()},
            "khat_threshold": khat_threshold(ll.num_samples),
            "khat_bands": ll.khat_bands(),
            "khat_above_threshold": float((ll.khat > khat_threshold(ll.num_samples)).float().mean()),
            "khat_max": float(ll.khat.max()),
            "ess_mean": float(ll.ess.mean()),
            "ess_min": float(ll.ess.min()),
            "active_units": self.active_units,
            "z_dim": int(self.unit_variance.shape[0]),
            "kl": float(self.kl_per_dim.sum()) if self.kl_per_dim is not None else None,
            "kl_per_dim": self.kl_per_dim.tolist() if self.kl_per_dim is not None else None,
            "mutual_information": self.mutual_information,
            "seconds": self.seconds,
        }

    def table(self) -> str:
        s = self.summary()
        bands = ", ".join(f"{name} {100 * frac:.1f}%" for name, frac in s["khat_bands"].items())
        lines = [
            f"{s['dataset']} {s['split']}: {s['num_points']} points, K = {s['num_samples']} importance samples "
            f"({s['seconds']:.1f} s)",
            f"  log p(x)   {s['log_px']:10.3f} ± {s['log_px_mc_stderr']:.3f} (Monte Carlo) "
            f"± {s['log_px_data_stderr']:.3f} (over points)   nats per point; NLL {s['nll']:.3f}",
            f"  ELBO       {s['elbo']:10.3f}    gap log p - ELBO {s['gap']:.3f} (~ KL(q(z|x) || p(z|x)))",
            "  IWAE-K     " + "  ".join(f"K={k}: {v:.3f}" for k, v in s["iwae"].items()),
            f"  Pareto k^  {bands}; above the threshold {s['khat_threshold']:.2f}: "
            f"{100 * s['khat_above_threshold']:.1f}% of points (max {s['khat_max']:.2f})",
            f"  ESS        mean {s['ess_mean']:.1f}, min {s['ess_min']:.1f} of {s['num_samples']}",
            f"  latent     {s['active_units']} of {s['z_dim']} units active; "
            + (f"KL(q || p) {s['kl']:.3f}; " if s["kl"] is not None else "")
            + f"I(x; z) {s['mutual_information']:.3f} nats",
        ]
        return "\n".join(lines)

    def to_inference_data(self) -> arviz.InferenceData:
        """Per-point log p^, its standard error, the ELBO, k^ and ESS as an arviz InferenceData."""
        ll = self.ll
        coords = {"point": np.arange(len(ll))}
        data = {
            name: xarray.DataArray(getattr(ll, name).numpy(), dims=["point"], coords=coords)
            for name in ("log_px", "stderr", "elbo", "khat", "ess")
        }
        data["z_mean"] = xarray.DataArray(
            ll.z_mean.numpy(), dims=["point", "latent"], coords={**coords, "latent": np.arange(ll.z_mean.shape[1])}
        )
        dataset = xarray.Dataset(data, attrs={"num_samples": ll.num_samples, "dataset": self.dataset, "split": self.split, "units": "nats"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # 'importance_sampling' is not one of arviz's standard group names
            return arviz.InferenceData(importance_sampling=dataset)

    def write(self, out: str | Path) -> None:
        """``eval.json``, ``eval.nc`` (InferenceData), ``khat.png``, ``iwae_curve.png``, ``kl_per_dim.png``."""
        from . import plots

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        summary = self.summary()
        atomic_write(out / "eval.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))
        netcdf = self.to_inference_data()
        tmp = out / ".eval.nc.tmp"
        netcdf.to_netcdf(str(tmp))
        tmp.replace(out / "eval.nc")
        plots.khat(self.ll, out / "khat.png")
        plots.iwae_curve(summary["iwae"], out / "iwae_curve.png")
        if self.kl_per_dim is not None:
            plots.kl_per_dim(self.kl_per_dim, out / "kl_per_dim.png")


def evaluate(
    vae: VAE,
    x: torch.Tensor,
    num_samples: int = 5000,
    batch_size: int | None = None,
    *,
    device: str | torch.device | None = None,
    dataset: str = "",
    split: str = "",
    progress: bool = False,
) -> Evaluation:
    """Importance-sampled log p(x) with K = ``num_samples`` plus every posterior diagnostic, for each row of x."""
    import time

    start = time.perf_counter()
    device = resolve_device(device or next(vae.parameters()).device)
    x = evaluation_images(x)
    ll = log_likelihood(vae, x, num_samples, batch_size, device=device, progress=progress)
    count, variance = active_units(ll.z_mean)
    result = Evaluation(
        ll=ll,
        kl_per_dim=kl_per_dimension(vae, x),
        active_units=count,
        unit_variance=variance,
        mutual_information=mutual_information(vae, x),
        dataset=dataset,
        split=split,
    )
    result.seconds = time.perf_counter() - start
    return result
