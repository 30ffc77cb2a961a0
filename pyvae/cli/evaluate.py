"""``python -m pyvae evaluate RUN``: log p(x) by importance sampling (or AIS) and guide
diagnostics of a trained run."""

from __future__ import annotations

import pyro

from pyvae import distributed
from pyvae.cli.console import writable_dir
from pyvae.cli.trained import ais_settings, check_positive, last_suffix, scored_run
from pyvae.infer.diagnostics import evaluate
from pyvae.viz import plots


def main(args) -> None:
    check_positive(args, "num_samples", "batch_size", "num_points", optional=True)
    ais = ais_settings(args) if args.method == "ais" else None
    world, device, vae, checkpoint, data, x = scored_run(args, args.split, args.num_points)
    name = f"ais-T{args.num_steps}-C{args.num_chains}" if ais else f"K{args.num_samples}"
    folder = f"eval-{data.name}-{args.split}-{name}{last_suffix(checkpoint)}"
    out = writable_dir(args.out or checkpoint.parent / folder, create=False)
    pyro.set_rng_seed(args.seed)
    result = evaluate(
        vae,
        x,
        args.num_samples,
        args.batch_size,
        site=args.site,
        device=device,
        dataset=data.name,
        split=args.split,
        progress=world.main,
        seed=args.seed,
        ais=ais,
        world=world,
        compile=args.compile,
    )
    if world.main:
        print(result.table())
        written = result.write(out) + plots.evaluation(result, out)
        print(f"wrote {out}/" + ", ".join(written))
    distributed.shutdown()
