"""``python -m pyvae traverse RUN``: each latent dimension swept over the prior's quantiles,
the dimensions in order of their KL (a vae)."""

from __future__ import annotations

import torch

from pyvae.cli.trained import explore_setup, held_out_images
from pyvae.infer.explore import manifold, require_vae, traversal
from pyvae.infer.importance import log_likelihood
from pyvae.viz import plots


def main(args) -> None:
    vae, config, out = explore_setup(args, "dims", "steps")
    require_vae(vae, "traverse")
    _, x, _ = held_out_images(vae, config, args, 1000)
    per_dim = log_likelihood(vae, x, num_samples=20).kl_per_dim.get("z")
    if per_dim is not None:
        kl = per_dim.mean(0)
    else:  # no factorized marginals: rank by how much the latent means vary instead
        kl = vae.latent_mean(x).var(0).cpu()
    order = torch.argsort(kl, descending=True)[: args.dims].tolist()
    grid = traversal(vae, order, args.steps)
    plots.save_grid(grid, vae.image_shape, out / "traverse.png", nrow=args.steps)
    print(f"wrote {out}/traverse.png (rows: dimensions {order})")
    if vae.z_dim == 2:
        plots.save_grid(manifold(vae), vae.image_shape, out / "manifold.png", nrow=15)
        print(f"wrote {out}/manifold.png")
