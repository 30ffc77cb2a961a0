"""``python -m pyvae gap RUN``: the inference gap log p(x) - ELBO split into approximation and
amortization gaps (AIS and per-point guides)."""

from __future__ import annotations

from pyvae import distributed
from pyvae.cli.console import writable_dir
from pyvae.cli.trained import ais_settings, check_positive, last_suffix, scored_run
from pyvae.infer.gap import inference_gap


def main(args) -> None:
    check_positive(args, "num_points", "num_samples", "local_steps")
    ais = ais_settings(args)
    world, _, vae, checkpoint, _, x = scored_run(args, "test", args.num_points)
    folder = f"gap-T{args.num_steps}{last_suffix(checkpoint)}"
    out = writable_dir(args.out or checkpoint.parent / folder, create=False)
    result = inference_gap(
        vae,
        x,
        ais=ais,
        num_samples=args.num_samples,
        local_steps=args.local_steps,
        lr=args.lr,
        seed=args.seed,
        world=world,
    )
    if world.main:
        print(result.table())
        print(f"wrote {out}/" + ", ".join(result.write(out)))
    distributed.shutdown()
