"""What a user would otherwise write: the same VAE in plain PyTorch, and Pyro's tutorial VAE.

Both are baselines for ``train_speed.py``; neither is part of the package.
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn


class PlainVAE(nn.Module):
    """784-400-50 MLP VAE, softplus activations; the loss is the negative ELBO with the analytic KL.

    The same math as pyvae's default model under ``TraceMeanField_ELBO``: a
    reparameterized diagonal Normal guide (sigma = softplus(s) + 1e-4), a N(0, I)
    prior and Bernoulli logits, summed over pixels and latents, scaled by N/M.
    """

    def __init__(self, x_dim=784, hidden=400, z_dim=50):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(x_dim, hidden), nn.Softplus(), nn.Linear(hidden, 2 * z_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(z_dim, hidden), nn.Softplus(), nn.Linear(hidden, x_dim)
        )

    def loss(self, x, num_data):
        loc, raw = self.encoder(x).chunk(2, dim=-1)
        scale = F.softplus(raw) + 1e-4
        z = loc + scale * torch.randn_like(loc)
        logits = self.decoder(z)
        log_px = -F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = 0.5 * (loc**2 + scale**2 - 1 - 2 * torch.log(scale)).sum()
        return -(log_px - kl) * num_data / x.shape[0]


class TutorialVAE(nn.Module):
    """The VAE as Pyro's tutorial writes it: ``pyro.module``, a data plate, ``SVI`` with
    ``pyro.optim.Adam``."""

    def __init__(self, x_dim=784, hidden=400, z_dim=50):
        super().__init__()
        self.z_dim = z_dim
        self.encoder = nn.Sequential(
            nn.Linear(x_dim, hidden), nn.Softplus(), nn.Linear(hidden, 2 * z_dim)
        )
        self.decoder = nn.Sequential(
            nn.Linear(z_dim, hidden), nn.Softplus(), nn.Linear(hidden, x_dim)
        )

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(x.shape[0], self.z_dim)
            z = pyro.sample("latent", dist.Normal(z_loc, torch.ones_like(z_loc)).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, dim=-1)
            pyro.sample("latent", dist.Normal(loc, F.softplus(raw) + 1e-4).to_event(1))


class PerPointNLL:
    """Pythae's ``get_nll`` loop: one data point at a time, its K samples in chunks of ``chunk``
    (the last one shorter when ``chunk`` does not divide K).

    Same estimator as ``pyvae.log_likelihood`` (log-mean-exp of p(x, z)/q(z|x) with z ~ q):
    the baseline for ``eval_speed.py``.
    """

    def __init__(self, vae: PlainVAE, num_samples=5000, chunk=100):
        self.vae, self.num_samples, self.chunk = vae, num_samples, chunk

    @torch.no_grad()
    def __call__(self, x):
        out = []
        for point in x:
            log_w = []
            for start in range(0, self.num_samples, self.chunk):
                xs = point.expand(min(self.chunk, self.num_samples - start), -1)
                loc, raw = self.vae.encoder(xs).chunk(2, dim=-1)
                q = torch.distributions.Normal(loc, F.softplus(raw) + 1e-4)
                z = q.sample()
                logits = self.vae.decoder(z)
                log_px_z = -F.binary_cross_entropy_with_logits(logits, xs, reduction="none").sum(-1)
                log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
                log_w.append(log_px_z + log_pz - q.log_prob(z).sum(-1))
            log_w = torch.cat(log_w)
            out.append(torch.logsumexp(log_w, 0) - torch.log(torch.tensor(float(len(log_w)))))
        return torch.stack(out)
