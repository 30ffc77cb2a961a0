"""What a trained model learned: prior samples, reconstructions, interpolation, traversals,
embeddings, anomaly scores.

:func:`prior_images` and :func:`reconstructions` run any model's programs (labels for the
conditional and semi-supervised models); interpolation and traversals decode a single
latent z and so need the built-in :class:`~pyvae.VAE`.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from pyvae import program
from pyvae.errors import PyvaeError
from pyvae.models import VAE


@torch.no_grad()
@program.evaluates
def prior_images(
    model: torch.nn.Module, n: int, label: int | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """n images E[x | latents] with the latents drawn from the model; a labelled model draws class
    ``label`` (default: the classes in turn). ``temperature`` scales z about the prior mean (VAE
    only)."""
    labelled = program.batch_arity(model) == 2
    if label is not None and not labelled:
        raise PyvaeError(
            f"--label is for models with labels (cvae, m2); {type(model).__name__} has none"
        )
    if isinstance(model, VAE):
        return model.sample(n, temperature)
    if temperature != 1.0:
        raise PyvaeError(
            "temperature is defined for the vae model's single prior; "
            f"{type(model).__name__} samples at 1 only"
        )
    device = next(model.parameters()).device
    x = torch.zeros(n, model.x_dim, device=device)
    if not labelled:
        return program.generate(model, (x,))
    if label is not None and not 0 <= label < model.num_classes:
        raise PyvaeError(f"--label {label} is outside the classes 0..{model.num_classes - 1}")
    y = (torch.full((n,), label) if label is not None else torch.arange(n) % model.num_classes).to(
        device
    )
    latent = (
        "y" in program.structure(model, (x, y)).latent_sites
    )  # m2's class is a latent site, cvae's an input
    return program.generate(model, (x, y), fixed={"y": y} if latent else None)


@torch.no_grad()
@program.evaluates
def reconstructions(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor | None = None
) -> torch.Tensor:
    """E[x | latents] at latents from the guide (the VAE: at its mean); a labelled model takes the
    labels ``y`` (m2 without them treats the images as unlabelled)."""
    if isinstance(model, VAE):
        return model.reconstruct(x)
    if program.batch_arity(model) == 1:
        return program.reconstruct(model, (x,))
    if y is None:
        if not hasattr(model, "classify"):
            raise PyvaeError(
                f"{type(model).__name__} reconstructs labelled images; the data set has no labels"
            )
        y = torch.full((x.shape[0],), -1, device=x.device)
    return program.reconstruct(model, (x, y))


def require_vae(model: torch.nn.Module, what: str) -> VAE:
    if not isinstance(model, VAE):
        raise PyvaeError(
            f"{what} decodes a single latent z: it needs the vae model, not {type(model).__name__}"
        )
    return model


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of a and b at fractions t (shape (steps,)): (rows,
    steps, dim)."""
    a_n, b_n = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.arccos((a_n * b_n).sum(-1).clamp(-1 + 1e-7, 1 - 1e-7)).unsqueeze(-1)  # (rows, 1)
    t = t.reshape(1, -1, 1)
    omega = omega.unsqueeze(-1)
    return (
        torch.sin((1 - t) * omega) * a.unsqueeze(1) + torch.sin(t * omega) * b.unsqueeze(1)
    ) / torch.sin(omega)


@torch.no_grad()
@program.evaluates
def interpolations(
    vae: VAE, x_from: torch.Tensor, x_to: torch.Tensor, steps: int = 10, spherical: bool = False
) -> torch.Tensor:
    """Decoded paths between the latent means of paired images: (pairs * steps, x_dim), row by
    row."""
    a, b = vae.latent_mean(x_from), vae.latent_mean(x_to)
    t = torch.linspace(0, 1, steps, device=a.device)
    z = slerp(a, b, t) if spherical else a.unsqueeze(1) + t.reshape(1, -1, 1) * (b - a).unsqueeze(1)
    return vae.likelihood.mean(vae.decoder(z)).reshape(-1, vae.x_dim)


@torch.no_grad()
def prior_quantiles(vae: VAE, quantiles: torch.Tensor, num_samples: int = 20000) -> torch.Tensor:
    """The prior's marginal quantiles per latent dimension, (len(quantiles), z_dim), from
    samples."""
    z = vae.prior().sample((num_samples,))
    return torch.quantile(z, quantiles.to(z.device), dim=0)


@torch.no_grad()
@program.evaluates
def traversal(vae: VAE, dims: list[int], steps: int = 9) -> torch.Tensor:
    """Each latent dimension in ``dims`` swept over the prior's 5%..95% quantiles, the others at
    their prior medians: (len(dims) * steps, x_dim), one row per dimension."""
    q = torch.linspace(0.05, 0.95, steps)
    grid = prior_quantiles(vae, torch.cat([q, torch.tensor([0.5])]))
    values, median = grid[:-1], grid[-1]
    z = median.repeat(len(dims), steps, 1)
    for row, d in enumerate(dims):
        z[row, :, d] = values[:, d]
    return vae.likelihood.mean(vae.decoder(z)).reshape(-1, vae.x_dim)


@torch.no_grad()
@program.evaluates
def manifold(vae: VAE, steps: int = 15) -> torch.Tensor:
    """For z_dim = 2: images decoded on the grid of the prior's marginal quantiles (steps x
    steps)."""
    values = prior_quantiles(vae, torch.linspace(0.03, 0.97, steps))
    z = torch.stack(torch.meshgrid(values[:, 0], values[:, 1].flip(0), indexing="xy"), -1).reshape(
        -1, 2
    )
    return vae.likelihood.mean(vae.decoder(z))


def linear_probe(z: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Logistic-regression accuracy from latent means, on a stratified 50/50 split, and k-means
    purity."""
    z_train, z_test, y_train, y_test = train_test_split(
        z, labels, test_size=0.5, random_state=seed, stratify=labels
    )
    probe = LogisticRegression(max_iter=2000).fit(z_train, y_train)
    classes = np.unique(labels)
    clusters = KMeans(n_clusters=len(classes), n_init=10, random_state=seed).fit_predict(z)
    purity = sum(np.bincount(labels[clusters == c]).max() for c in np.unique(clusters)) / len(
        labels
    )
    majority = np.bincount(y_test).max() / len(y_test)
    return {
        "probe_accuracy": float(probe.score(z_test, y_test)),
        "majority_baseline": float(majority),
        "kmeans_purity": float(purity),
        "num_points": int(len(labels)),
        "num_classes": int(len(classes)),
    }


def embedding_2d(z: np.ndarray) -> tuple[np.ndarray, str]:
    """The latent means themselves when z_dim = 2, otherwise their first two principal
    components."""
    if z.shape[1] == 2:
        return z, "z"
    return PCA(n_components=2).fit_transform(z), "PCA of z"


def anomaly_auc(log_px_in: torch.Tensor, log_px_ood: torch.Tensor) -> float:
    """ROC AUC of -log p(x) as an anomaly score, out-of-distribution points the positives."""
    scores = torch.cat([-log_px_in, -log_px_ood]).numpy()
    truth = np.r_[np.zeros(len(log_px_in)), np.ones(len(log_px_ood))]
    return float(roc_auc_score(truth, scores))


__all__ = [
    "prior_images",
    "reconstructions",
    "slerp",
    "interpolations",
    "traversal",
    "manifold",
    "linear_probe",
    "embedding_2d",
    "anomaly_auc",
]
