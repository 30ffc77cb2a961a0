"""``python -m pyvae reconstruct RUN``: test images, each row above its reconstructions."""

from __future__ import annotations

from pyvae.cli.trained import explore_setup, held_out_images, needs_labels
from pyvae.viz import plots


def main(args) -> None:
    vae, config, out = explore_setup(args, "n")
    data, x, _ = held_out_images(vae, config, args)
    labels = data.labels if needs_labels(vae) else None
    rows = max(1, args.n // 8)
    plots.reconstructions(vae, x, out / "reconstructions.png", per_row=8, rows=rows, labels=labels)
    print(f"wrote {out}/reconstructions.png")
