"""Pictures of a trained VAE, written atomically (a crash never leaves half a PNG)."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import arviz
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator
from torchvision.utils import make_grid, save_image  # noqa: E402

from pyvae.data.datasets import spread  # noqa: E402
from pyvae.infer.explore import prior_images
from pyvae.infer.explore import reconstructions as reconstruct
from pyvae.infer.importance import khat_threshold
from pyvae.runs import atomic_write  # noqa: E402


def grid(images: torch.Tensor, image_shape: Sequence[int], nrow: int = 8) -> torch.Tensor:
    """Flat images (n, x_dim) in [0, 1] as one (C, H, W) picture with ``nrow`` images per row."""
    return make_grid(
        images.detach().cpu().clamp(0, 1).reshape(-1, *image_shape),
        nrow=nrow,
        padding=2,
        pad_value=1.0,
    )


#: the narrowest picture :func:`save_grid` writes: a 15 x 15 grid of 28 x 28 images is ~450 px
MIN_WIDTH = 600


def save_grid(
    images: torch.Tensor, image_shape: Sequence[int], path: str | Path, nrow: int = 8
) -> None:
    """:func:`grid` as a PNG at least :data:`MIN_WIDTH` pixels wide: small images are enlarged by
    a whole factor, each pixel a square block (nearest neighbour), so none is blurred."""
    picture = grid(images, image_shape, nrow)
    factor = -(-MIN_WIDTH // picture.shape[-1])
    picture = picture.repeat_interleave(factor, -1).repeat_interleave(factor, -2)
    atomic_write(path, lambda f: save_image(picture, f, format="png"))


def save_figure(fig: plt.Figure, path: str | Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def samples(
    model: torch.nn.Module,
    path: str | Path,
    n: int = 64,
    label: int | None = None,
    temperature: float = 1.0,
) -> None:
    """A grid of E[x | latents] for latents drawn from the model (class ``label``, or the classes
    in turn)."""

    save_grid(
        prior_images(model, n, label, temperature),
        model.image_shape,
        path,
        nrow=max(1, round(n**0.5)),
    )


def reconstructions(
    model: torch.nn.Module,
    x: torch.Tensor,
    path: str | Path,
    per_row: int = 8,
    rows: int = 2,
    labels: torch.Tensor | None = None,
) -> None:
    """Rows of test images, each above a row of their reconstructions
    (:func:`reconstruction_pairs`)."""
    per_row = min(per_row, x.shape[0])
    save_grid(
        reconstruction_pairs(model, x, per_row, rows, labels), model.image_shape, path, nrow=per_row
    )


def reconstruction_pairs(
    model: torch.nn.Module,
    x: torch.Tensor,
    per_row: int = 8,
    rows: int = 2,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """(2 * rows * per_row, x_dim): rows of test images, each followed by the row of their
    reconstructions.

    The images are spread evenly over ``x``, so a set sorted by class (static
    binarized MNIST's test split is) shows every class.
    """

    per_row = min(per_row, x.shape[0])
    rows = max(1, min(rows, x.shape[0] // per_row))
    device = next(model.parameters()).device
    y = spread(labels, per_row * rows).to(device) if labels is not None else None
    x = spread(x, per_row * rows).to(device)
    recon = reconstruct(model, x, y)
    return torch.stack(
        [x.reshape(rows, per_row, -1), recon.reshape(rows, per_row, -1)], dim=1
    ).reshape(-1, x.shape[1])


def elbo_curves(history: list[dict], path: str | Path) -> None:
    """Train, validation and test ELBO (nats per data point) against epoch (whole epochs on the
    axis)."""

    fig, ax = plt.subplots(figsize=(5, 3.5))
    epochs = [h["epoch"] for h in history]
    for key, label in (
        ("train_elbo", "train"),
        ("valid_elbo", "validation"),
        ("test_elbo", "test"),
    ):
        if all(key in h for h in history):
            ax.plot(epochs, [h[key] for h in history], marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats per data point)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def khat(ll, path: str | Path) -> None:
    """arviz's Pareto k^ plot: one point per data point, with the reliability thresholds."""

    fig, ax = plt.subplots(figsize=(6, 3.5))
    with warnings.catch_warnings():
        # arviz prefers ELPDData from a posterior; ours are per-point importance weights
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", matplotlib.MatplotlibDeprecationWarning)
        # with K < 21 every k^ is NaN (not estimable) and arviz's histogram of them divides 0 by 0
        warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
        arviz.plot_khat(ll.khat.numpy(), ax=ax, show_hlines=True, show_bins=True, markersize=2)
    ax.axhline(
        khat_threshold(ll.num_samples),
        color="C3",
        lw=1,
        label=f"threshold for K = {ll.num_samples}",
    )
    ax.legend(loc="lower right", fontsize=7)
    ax.set_xlabel("data point")
    ax.set_title(f"Pareto k^ of the importance weights (K = {ll.num_samples})")
    save_figure(fig, path)


def iwae_curve(bounds: dict, path: str | Path) -> None:
    """The IWAE-K bound (nats per data point) against K, from the same draws."""
    ks, values = zip(*sorted((int(k), v) for k, v in bounds.items()), strict=True)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, values, marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("K (importance samples)")
    ax.set_ylabel("IWAE-K bound (nats per data point)")
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def kl_per_dim(kl: torch.Tensor, path: str | Path) -> None:
    """E_x KL(q(z_d|x) || p(z_d)) per latent dimension, largest first."""
    values, order = torch.sort(kl, descending=True)
    fig, ax = plt.subplots(figsize=(max(4, 0.15 * len(kl)), 3.5))
    ax.bar(range(len(kl)), values.numpy())
    ax.set_xticks(range(len(kl)))
    ax.set_xticklabels([str(int(i)) for i in order], fontsize=6, rotation=90)
    ax.set_xlabel("latent dimension (sorted by KL)")
    ax.set_ylabel("KL (nats)")
    save_figure(fig, path)


def embedding(points, labels, axis_name: str, path: str | Path) -> None:
    """A 2-D scatter of latent means coloured by label."""
    fig, ax = plt.subplots(figsize=(5, 4.5))
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=3, alpha=0.7)
    if labels is not None:
        fig.colorbar(scatter, ax=ax, label="label")
    ax.set_xlabel(f"{axis_name} 1")
    ax.set_ylabel(f"{axis_name} 2")
    ax.set_title("latent means of the test set")
    save_figure(fig, path)


def anomaly_histogram(
    log_px_in, log_px_ood, names: tuple[str, str], auc: float, num_samples: int, path: str | Path
) -> None:
    """Histograms of log p(x) for in-distribution and out-of-distribution images."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    values = torch.cat([log_px_in, log_px_ood])
    bins = torch.linspace(float(values.min()), float(values.max()), 60).numpy()
    ax.hist(log_px_in.numpy(), bins=bins, alpha=0.6, density=True, label=f"{names[0]} (in)")
    ax.hist(log_px_ood.numpy(), bins=bins, alpha=0.6, density=True, label=f"{names[1]} (out)")
    ax.set_xlabel("log p(x) (nats)")
    ax.set_ylabel("density")
    ax.set_title(
        f"log p(x) (IS, K = {num_samples}), {len(log_px_in)} + {len(log_px_ood)} images: "
        f"ROC AUC of -log p(x) {auc:.3f}",
        fontsize=9,
    )
    ax.legend()
    save_figure(fig, path)


def ais(runs: dict, log_px_is: float, path: str | Path) -> None:
    """AIS: acceptance and step size along the annealing path of the largest T, and log p^ against T
    (mean over points) beside importance sampling's."""
    top = runs[max(runs)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"wspace": 0.5})
    steps = range(1, len(top.acceptance_by_step) + 1)
    left.plot(steps, top.acceptance_by_step.numpy(), color="C0", lw=1)
    left.set_xlabel(f"annealing step t (T = {top.num_steps}, {top.schedule} schedule)")
    left.set_ylabel("acceptance probability", color="C0")
    left.set_ylim(0, 1.02)
    twin = left.twinx()
    twin.plot(steps, top.step_size_by_step.numpy(), color="C1", lw=1)
    twin.set_ylabel("mean step size", color="C1")
    ts = sorted(runs)
    right.plot(
        ts,
        [float(runs[t].log_px.double().mean()) for t in ts],
        marker="o",
        label=f"AIS, {top.num_chains} chains",
    )
    right.axhline(log_px_is, color="C3", lw=1, ls="--", label="importance sampling")
    right.set_xscale("log")
    right.set_xlabel("T (intermediate distributions)")
    right.set_ylabel("log p(x) (nats per point)")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    save_figure(fig, path)


def evaluation(result, folder: str | Path) -> list[str]:
    """The pictures of an :class:`~pyvae.infer.diagnostics.Evaluation` in ``folder``: ``khat.png``,
    ``iwae_curve.png``, ``kl_per_dim.png`` (a site that factorizes), ``ais.png`` (under AIS);
    their names."""
    folder, summary = Path(folder), result.summary()
    folder.mkdir(parents=True, exist_ok=True)
    khat(result.ll, folder / "khat.png")
    iwae_curve(summary["iwae"], folder / "iwae_curve.png")
    written = ["khat.png", "iwae_curve.png"]
    if result.kl_per_dim is not None:
        kl_per_dim(result.kl_per_dim, folder / "kl_per_dim.png")
        written.append("kl_per_dim.png")
    if result.ais:
        ais(result.ais, summary["log_px_is"], folder / "ais.png")
        written.append("ais.png")
    return written


def bdmc(summary: dict, path: str | Path) -> None:
    """BDMC: the forward (lower) and reverse (upper) AIS bounds and their gap against T."""
    rows = summary["by_num_steps"]
    ts = [int(t) for t in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5), gridspec_kw={"wspace": 0.35})
    left.plot(ts, [rows[str(t)]["lower"] for t in ts], marker="o", label="forward AIS (lower)")
    left.plot(ts, [rows[str(t)]["upper"] for t in ts], marker="o", label="reverse AIS (upper)")
    left.set_ylabel("log p(x) (nats per point)")
    left.legend(fontsize=7)
    right.plot(ts, [max(rows[str(t)]["gap"], 1e-4) for t in ts], marker="o", color="C2")
    right.set_yscale("log")
    right.set_ylabel("BDMC gap upper - lower (nats)")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("T (intermediate distributions)")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{summary['num_points']} points simulated from the model, {summary['num_chains']} chains",
        fontsize=9,
    )
    save_figure(fig, path)
