"""``python -m pyvae bdmc RUN``: forward and reverse AIS on data simulated from the model, a
sandwich around log p(x) that says how far AIS at T steps can be from it."""

from __future__ import annotations

from pyvae import distributed
from pyvae.cli.console import writable_dir
from pyvae.cli.trained import ais_settings, check_positive, last_suffix, scored_run
from pyvae.infer.bdmc import bdmc
from pyvae.viz import plots


def main(args) -> None:
    check_positive(args, "num_points")
    ais = ais_settings(args)
    world, _, vae, checkpoint, _, template = scored_run(args, "test", args.num_points)
    folder = f"bdmc-T{args.num_steps}-C{args.num_chains}{last_suffix(checkpoint)}"
    out = writable_dir(args.out or checkpoint.parent / folder, create=False)
    batch = template if isinstance(template, tuple) else (template,)
    result = bdmc(vae, batch, seed=args.seed, world=world, **ais)
    if world.main:
        print(result.table())
        written = result.write(out)
        plots.bdmc(result.summary(), out / "bdmc.png")
        print(f"wrote {out}/" + ", ".join([*written, "bdmc.png"]))
    distributed.shutdown()
