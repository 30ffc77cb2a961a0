"""Which default network and optimizer for the quickstart? Alternatives trained alike, scored by
test log p(x).

    python benchmarks/defaults.py --threads 1 --epochs 20 --rounds 2
    python benchmarks/defaults.py --only default relu512-lr2e-3 --rounds 2

Each configuration is trained as ``python -m pyvae train`` trains it on static binarized MNIST (the
50,000 training images; the test and valid ELBOs after every epoch, as the default run computes
them), then scored by importance sampling, K = ``--num-samples`` (5000) on ``--num-points`` (1000)
test images evenly spread (all 10,000 with 0). Round r trains every configuration with seed r, in
turn, in this one process, so the wall-time ratio to the first configuration (the current default)
is taken within a round; the end prints each configuration's median and spread over rounds.
"""

import argparse
import statistics
import time

import torch
from common import add_common_arguments, setup, static_mnist, sync

import pyvae
from pyvae.data import spread

#: the current default first: every ratio is against it
CONFIGS = {
    "default": dict(hidden=(400,), activation="softplus", elbo="trace", lr=1e-3, batch_size=128),
    "relu512": dict(hidden=(512,), activation="relu", elbo="trace", lr=1e-3, batch_size=128),
    "relu512-lr2e-3": dict(hidden=(512,), activation="relu", elbo="trace", lr=2e-3, batch_size=128),
    "softplus400-lr2e-3": dict(
        hidden=(400,), activation="softplus", elbo="trace", lr=2e-3, batch_size=128
    ),
    "relu512-meanfield": dict(
        hidden=(512,), activation="relu", elbo="meanfield", lr=1e-3, batch_size=128
    ),
    "relu512-cosine-lr2e-3": dict(
        hidden=(512,),
        activation="relu",
        elbo="trace",
        lr=2e-3,
        batch_size=128,
        lr_schedule="cosine",
    ),
    "relu512-meanfield-cosine-lr2e-3": dict(
        hidden=(512,),
        activation="relu",
        elbo="meanfield",
        lr=2e-3,
        batch_size=128,
        lr_schedule="cosine",
    ),
    "relu512-meanfield-cosine-lr3e-3": dict(
        hidden=(512,),
        activation="relu",
        elbo="meanfield",
        lr=3e-3,
        batch_size=128,
        lr_schedule="cosine",
    ),
}


def run(name, settings, data, args, device, seed):
    train, valid, test = data
    torch.manual_seed(seed)
    vae = pyvae.VAE(
        x_dim=784, z_dim=args.z_dim, hidden=settings["hidden"], activation=settings["activation"]
    )
    sync(device)
    start = time.perf_counter()
    history = pyvae.fit(
        vae,
        train,
        test=test,
        valid=valid,
        epochs=args.epochs,
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        lr_schedule=settings.get("lr_schedule", "none"),
        elbo=settings["elbo"],
        device=device,
        seed=seed,
        progress=False,
    )
    sync(device)
    seconds = time.perf_counter() - start
    torch.manual_seed(seed)
    ll = pyvae.log_likelihood(
        vae, spread(test, args.num_points), num_samples=args.num_samples, device=device
    )
    log_px = ll.log_px.double()
    return {
        "name": name,
        "seed": seed,
        "seconds": seconds,
        "log_px": float(log_px.mean()),
        "stderr": float(log_px.std() / len(log_px) ** 0.5),
        "test_elbo": history[-1]["test_elbo"],
    }


def cell(rows, key, digits=2):
    """A table cell: the median of ``key`` over ``rows``, and its range when there are several."""
    values = [r[key] for r in rows]
    middle = statistics.median(values)
    span = f" ({min(values):.{digits}f} to {max(values):.{digits}f})" if len(values) > 1 else ""
    return f"{middle:.{digits}f}{span}"


def main():
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds; round r uses seed r (plus --first-seed)"
    )
    parser.add_argument(
        "--first-seed", type=int, default=0, help="the seed of the first round (default 0)"
    )
    parser.add_argument("--z-dim", type=int, default=50)
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument(
        "--num-points", type=int, default=1000, help="test images, evenly spread; 0 = all"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(CONFIGS),
        help="these configurations (the first is the baseline)",
    )
    args = parser.parse_args()
    device = setup(args)
    data = tuple(static_mnist(split, args.data_dir) for split in ("train", "valid", "test"))
    names = args.only or list(CONFIGS)
    results = []
    for seed in range(args.first_seed, args.first_seed + args.rounds):
        baseline = None
        for name in names:
            r = run(name, CONFIGS[name], data, args, device, seed)
            baseline = baseline or r["seconds"]
            r["ratio"] = r["seconds"] / baseline
            results.append(r)
            print(
                f"round {seed}  {name:<30} {r['seconds']:6.1f} s (x{r['ratio']:.2f})  test ELBO "
                f"{r['test_elbo']:8.2f}  log p(x) {r['log_px']:8.2f} ± {r['stderr']:.2f}",
                flush=True,
            )
    print(
        "\n| configuration | settings | wall time, s (ratio) | test ELBO | test log p(x), IS K = "
        f"{args.num_samples}, {args.num_points or 10000} points |\n|---|---|---|---|---|"
    )
    for name in names:
        mine = [r for r in results if r["name"] == name]
        s = CONFIGS[name]
        settings = (
            f"784-{'-'.join(map(str, s['hidden']))}-{args.z_dim} {s['activation']}, {s['elbo']}, "
            f"lr {s['lr']:g}{' ' + s['lr_schedule'] if 'lr_schedule' in s else ''}, batch "
            f"{s['batch_size']}"
        )
        print(
            f"| {name} | {settings} | {cell(mine, 'seconds', 0)} (x{cell(mine, 'ratio')}) | "
            f"{cell(mine, 'test_elbo')} | {cell(mine, 'log_px')} |"
        )


if __name__ == "__main__":
    main()
