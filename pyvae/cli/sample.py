"""``python -m pyvae sample RUN``: images decoded from latents drawn from the prior."""

from __future__ import annotations

from pyvae.cli.trained import explore_setup
from pyvae.errors import PyvaeError
from pyvae.viz import plots


def main(args) -> None:
    vae, _, out = explore_setup(args, "n")
    if not args.temperature > 0:
        raise PyvaeError(f"--temperature must be a positive number; got {args.temperature}")
    plots.samples(vae, out / "samples.png", args.n, args.label, args.temperature)
    print(f"wrote {out}/samples.png")
