"""Training speed: pyvae's SVI epoch against a hand-written PyTorch VAE, in one process.

    python benchmarks/train_speed.py --device cpu --batch-sizes 128 512 --rounds 3

Static binarized MNIST (50,000 images), MLP 784-400-50, Adam lr 1e-3. For each batch
size the configurations run one epoch each, round-robin for ``--rounds`` rounds after a
warm-up epoch; the median epoch time of each is reported as images/s and as a ratio
to the hand-written epoch (1.00 = as fast as plain PyTorch).
"""

import argparse
import statistics
import time

import pyro
import torch
from common import add_common_arguments, setup, static_mnist, sync
from handwritten import PlainVAE, TutorialVAE

import pyvae


def handwritten_epoch(state, x, batch_size, device):
    vae, optimizer = state
    n = x.shape[0]
    sync(device)
    start = time.perf_counter()
    order = torch.randperm(n, device=x.device)
    for i in range(0, n, batch_size):
        batch = x[order[i : i + batch_size]]
        optimizer.zero_grad(set_to_none=True)
        loss = vae.loss(batch, n)
        loss.backward()
        optimizer.step()
    sync(device)
    return time.perf_counter() - start


def tutorial_epoch(state, x, batch_size, device):
    svi = state
    n = x.shape[0]
    sync(device)
    start = time.perf_counter()
    order = torch.randperm(n, device=x.device)
    for i in range(0, n, batch_size):
        svi.step(x[order[i : i + batch_size]])
    sync(device)
    return time.perf_counter() - start


def pyvae_epoch(elbo):
    def epoch(vae, x, batch_size, device):
        (record,) = pyvae.fit(
            vae, x, epochs=1, batch_size=batch_size, elbo=elbo, device=device, progress=False
        )
        return record["seconds"]

    return epoch


def main():
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-points", type=int, help="use the first N training images")
    args = parser.parse_args()
    device = setup(args)
    x = static_mnist("train", args.data_dir)[: args.num_points].to(device)
    n = x.shape[0]
    print(f"data: static binarized MNIST, {n} training images, on {device}")

    for batch_size in args.batch_sizes:
        torch.manual_seed(0)
        plain = PlainVAE().to(device)
        plain_fused = PlainVAE().to(device)
        tutorial = TutorialVAE().to(device)
        pyro.clear_param_store()
        configs = {
            "hand-written PyTorch (analytic KL)": (
                handwritten_epoch,
                (plain, torch.optim.Adam(plain.parameters(), lr=1e-3)),
            ),
            # pyvae uses fused Adam; this line separates Pyro's cost from the optimizer's
            "hand-written, fused Adam": (
                handwritten_epoch,
                (plain_fused, torch.optim.Adam(plain_fused.parameters(), lr=1e-3, fused=True)),
            ),
            "Pyro tutorial: SVI + Trace_ELBO": (
                tutorial_epoch,
                pyro.infer.SVI(
                    tutorial.model,
                    tutorial.guide,
                    pyro.optim.Adam({"lr": 1e-3}),
                    pyro.infer.Trace_ELBO(),
                ),
            ),
            "pyvae fit, elbo=trace": (pyvae_epoch("trace"), pyvae.VAE(784, 50).to(device)),
            "pyvae fit, elbo=meanfield": (pyvae_epoch("meanfield"), pyvae.VAE(784, 50).to(device)),
        }
        times = {name: [] for name in configs}
        for round_ in range(args.rounds + 1):
            for name, (epoch, state) in configs.items():
                seconds = epoch(state, x, batch_size, device)
                if round_ > 0:  # round 0 warms up allocators, caches and CUDA kernels
                    times[name].append(seconds)
        base = statistics.median(times["hand-written PyTorch (analytic KL)"])
        print(f"\nbatch size {batch_size}: median of {args.rounds} epochs")
        print(f"  {'configuration':38s} {'s/epoch':>8s} {'images/s':>10s} {'ratio':>6s}")
        for name, values in times.items():
            t = statistics.median(values)
            print(f"  {name:38s} {t:8.2f} {n / t:10.0f} {t / base:6.2f}")


if __name__ == "__main__":
    main()
