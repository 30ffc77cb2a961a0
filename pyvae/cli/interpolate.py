"""``python -m pyvae interpolate RUN``: decoded paths between test images, linear and spherical
in z (a vae)."""

from __future__ import annotations

from pyvae.cli.trained import explore_setup, held_out_images
from pyvae.infer.explore import interpolations, require_vae
from pyvae.viz import plots


def main(args) -> None:
    vae, config, out = explore_setup(args, "pairs", "steps")
    require_vae(vae, "interpolate")
    _, x, _ = held_out_images(vae, config, args, 2 * args.pairs)
    x_from, x_to = x[0::2], x[1::2]
    for kind in ("linear", "spherical"):
        images = interpolations(vae, x_from, x_to, args.steps, spherical=kind == "spherical")
        plots.save_grid(images, vae.image_shape, out / f"interpolate_{kind}.png", nrow=args.steps)
    print(f"wrote {out}/interpolate_linear.png, interpolate_spherical.png")
