"""Peak memory of training, prior x guide x objective, each configuration in a fresh process.

    python benchmarks/memory.py          # the worst case at MNIST size, beside the baseline
    python benchmarks/memory.py --all    # every built-in prior x guide x objective
    python benchmarks/memory.py --only vamp,iaf,iwae normal,normal,trace

A child process trains ``--steps`` SVI steps with ``pyvae.fit`` on random binary MNIST-sized data
(784 pixels, batch ``--batch-size``, z_dim 50, the VampPrior with 500 pseudo-inputs, IWAE with
``--num-particles``) and reports its peak resident set size (``getrusage`` ``ru_maxrss``), its
resident size before training (torch imported, model built) and the seconds per step (the steps
run as written: ``compile="off"``). A refused configuration reports its one-line reason. The first
configuration is the baseline every ratio is against. ``--max-gb`` caps each child's address space,
so a configuration that does not fit fails with an allocation error instead of taking the machine
down.
"""

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import pyvae
from pyvae.parts.guides import GUIDES
from pyvae.parts.priors import PRIORS

OBJECTIVES = ("trace", "meanfield", "iwae")
#: the priors of --all: the built-in ones, and the VampPrior whose components are the guide's base
#: distribution (what trains under a flow guide; the paper's is refused there)
ALL_PRIORS = (*PRIORS, "vamp-base")
WORST = ("vamp-base", "iaf", "iwae")
#: the prior spec of each name this script takes
SPECS = {
    "vamp": {"name": "vamp", "num_components": 500},
    "vamp-base": {"name": "vamp", "num_components": 500, "components": "base"},
}
BASELINE = ("normal", "normal", "trace")


def child(prior: str, guide: str, elbo: str, args) -> dict:
    """Train one configuration in this process; its memory and time."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = (torch.rand(args.batch_size * args.steps, 784) < 0.13).float()
    vae = pyvae.VAE(
        x_dim=784,
        z_dim=50,
        prior=SPECS.get(prior, prior),
        guide=guide,
    )
    before = resident_mb()
    start = time.perf_counter()
    particles = args.num_particles if elbo == "iwae" else 1
    pyvae.fit(
        vae,
        x,
        epochs=1,
        batch_size=args.batch_size,
        elbo=elbo,
        num_particles=particles,
        device="cpu",
        seed=0,
        progress=False,
        compile="off",
    )
    return {
        "configuration": f"{prior} + {guide} + {elbo}"
        + (f" K={particles}" if elbo == "iwae" else ""),
        "before_mb": before,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds_per_step": (time.perf_counter() - start) / args.steps,
    }


def resident_mb() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(configuration: tuple[str, str, str], args) -> dict:
    """One configuration in a child process (address space capped at ``--max-gb``); its report or
    its error."""
    argv = [
        sys.executable,
        __file__,
        "--child",
        ",".join(configuration),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--num-particles",
        str(args.num_particles),
        "--threads",
        str(args.threads),
    ]

    def cap():
        limit = int(args.max_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    result = subprocess.run(argv, capture_output=True, text=True, preexec_fn=cap)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return {
            "configuration": " + ".join(configuration),
            "error": f"exit {result.returncode}: {last[:160]}",
        }
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", nargs="+", help="configurations prior,guide,objective (the first is the baseline)"
    )
    parser.add_argument(
        "--all", action="store_true", help="every built-in prior x guide x objective"
    )
    parser.add_argument(
        "--steps", type=int, default=3, help="SVI steps per configuration (default 3)"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--num-particles", type=int, default=5, help="K of the IWAE objective (default 5)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--max-gb", type=float, default=8.0, help="address-space cap of each child (default 8)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child.split(","), args)))
        return
    if args.all:
        configurations = [BASELINE] + [
            c for c in itertools.product(ALL_PRIORS, GUIDES, OBJECTIVES) if c != BASELINE
        ]
    else:
        configurations = (
            [tuple(c.split(",")) for c in args.only] if args.only else [BASELINE, WORST]
        )
    print(
        f"batch {args.batch_size}, 784 pixels, z_dim 50, vamp K = 500, iwae K = "
        f"{args.num_particles}, {args.steps} steps, {args.threads} thread(s), address space capped "
        f"at {args.max_gb:g} GB"
    )
    print(
        "| configuration | resident before training | peak resident | peak / baseline | s per step "
        "|\n|---|---|---|---|---|"
    )
    baseline = None
    for configuration in configurations:
        r = measure(configuration, args)
        if "error" in r:
            print(f"| {r['configuration']} | | {r['error']} | | |", flush=True)
            continue
        baseline = baseline or r["peak_mb"]
        print(
            f"| {r['configuration']} | {r['before_mb']:.0f} MB | {r['peak_mb']:.0f} MB | "
            f"{r['peak_mb'] / baseline:.2f} | {r['seconds_per_step']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
