"""``python -m pyvae embed RUN``: latent means of the test set: a scatter, a linear probe and
k-means purity."""

from __future__ import annotations

from dataclasses import replace

import torch

from pyvae.cli.trained import explore_setup, held_out_images, scored
from pyvae.data.datasets import spread
from pyvae.errors import PyvaeError
from pyvae.infer.explore import embedding_2d, linear_probe
from pyvae.models import VAE
from pyvae.program import latent_means, structure
from pyvae.runs import write_json
from pyvae.viz import plots

#: points per call when the guide's means are read through the program
CHUNK = 500


def main(args) -> None:
    vae, config, out = explore_setup(args)
    data, _, _ = held_out_images(vae, config, args)
    if data.labels is None:
        raise PyvaeError(
            f"the {data.name} test split has no labels; pass --dataset with a labelled set"
        )
    x, labels = spread(data.images, args.num_points), spread(data.labels, args.num_points)
    z = latents(vae, replace(data, images=x, labels=labels))
    result = linear_probe(z, labels.numpy(), seed=args.seed)
    points, axis_name = embedding_2d(z)
    plots.embedding(points, labels.numpy(), axis_name, out / "embedding.png")
    write_json(out / "embed.json", {"dataset": data.name, **result})
    print(
        f"{data.name} test, {result['num_points']} points: linear probe accuracy "
        f"{result['probe_accuracy']:.3f} (majority class {result['majority_baseline']:.3f}); "
        f"k-means purity {result['kmeans_purity']:.3f}"
    )
    print(f"wrote {out}/embedding.png, embed.json")


def latents(vae, data):
    """The latent means of ``data``'s images, a numpy array: a VAE's encoder mean, else the
    guide's mean of the model's latent site (a model with a classifier sees them unlabelled)."""
    device = next(vae.parameters()).device
    if isinstance(vae, VAE):
        return vae.latent_mean(data.images.to(device)).cpu().numpy()
    batch = scored(vae, data)
    batch = tuple(t.to(device) for t in (batch if isinstance(batch, tuple) else (batch,)))
    site = getattr(vae, "latent_site", None)
    if site is None:  # a class of the user's own: its first latent site, evaluate's default too
        site = structure(vae, tuple(t[:2] for t in batch)).latent_sites[0]
    chunks = [
        latent_means(vae, tuple(t[i : i + CHUNK] for t in batch), site)
        for i in range(0, len(batch[0]), CHUNK)
    ]
    return torch.cat(chunks).cpu().numpy()
