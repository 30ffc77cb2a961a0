"""Training speed: pyvae's SVI epoch against a hand-written PyTorch VAE, in one process.

    python benchmarks/train_speed.py --device cpu --batch-sizes 128 512 --rounds 3
    python benchmarks/train_speed.py --device cpu --model tiny --batch-sizes 128 --rounds 3

Static binarized MNIST (50,000 images), MLP 784-400-50 (``--model tiny``: the images pooled
to 8x8, MLP 64-16-2), Adam lr 1e-3. For each batch size the configurations run one epoch
each, round-robin for ``--rounds`` rounds after a warm-up epoch; the median epoch time of each
is reported as images/s and as a ratio to the hand-written eager epoch (1.00 = as fast as plain
PyTorch), and the median time of one step (data served, loss, gradients, update) beside it.
pyvae's compiled configurations call ``fit`` once per epoch, so each epoch pays a recording
(0.1-0.3 s) and two steps as written; the compilation itself is paid in the warm-up epoch
(the compiled graph is kept in the process) and reported from ``fit``'s line.
"""

import argparse
import statistics
import time

import pyro
import torch
from common import add_common_arguments, setup, static_mnist, sync
from handwritten import PlainVAE, TutorialVAE

import pyvae
from pyvae.train import Callback


def handwritten_epoch(state, x, batch_size, device):
    loss_of, optimizer = state
    n = x.shape[0]
    sync(device)
    start = time.perf_counter()
    ticks = []
    order = torch.randperm(n, device=x.device)
    for i in range(0, n, batch_size):
        batch = x[order[i : i + batch_size]]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(batch, n)
        loss.backward()
        optimizer.step()
        ticks.append(time.perf_counter())
    sync(device)
    return time.perf_counter() - start, step_seconds(ticks)


def tutorial_epoch(state, x, batch_size, device):
    svi = state
    n = x.shape[0]
    sync(device)
    start = time.perf_counter()
    ticks = []
    order = torch.randperm(n, device=x.device)
    for i in range(0, n, batch_size):
        svi.step(x[order[i : i + batch_size]])
        ticks.append(time.perf_counter())
    sync(device)
    return time.perf_counter() - start, step_seconds(ticks)


class StepClock(Callback):
    """The time at the end of every step of a ``fit``."""

    def __init__(self):
        self.ticks = []

    def on_step_end(self, training):
        self.ticks.append(time.perf_counter())


def pyvae_epoch(elbo, compile="off"):
    def epoch(vae, x, batch_size, device):
        clock = StepClock()
        (record,) = pyvae.fit(
            vae,
            x,
            epochs=1,
            batch_size=batch_size,
            elbo=elbo,
            device=device,
            progress=False,
            compile=compile,
            callbacks=[clock],
        )
        return record["seconds"], step_seconds(clock.ticks)

    return epoch


def step_seconds(ticks):
    """The median time between consecutive steps' ends (the first and last steps left out: the
    first may record, the last is a short batch)."""
    return statistics.median(b - a for a, b in zip(ticks[1:-2], ticks[2:-1], strict=True))


def tiny_mnist(x):
    """The images pooled to 8x8 and binarized again: 64 pixels."""
    return torch.nn.functional.adaptive_avg_pool2d(x.view(-1, 1, 28, 28), 8).view(-1, 64).round()


def main():
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-points", type=int, help="use the first N training images")
    parser.add_argument("--model", choices=["default", "tiny"], default="default")
    args = parser.parse_args()
    device = setup(args)
    x = static_mnist("train", args.data_dir)[: args.num_points]
    x = (tiny_mnist(x) if args.model == "tiny" else x).to(device)
    n = x.shape[0]
    print(f"data: static binarized MNIST, {n} training images, on {device}")

    sizes = {"default": (784, 400, 50), "tiny": (64, 16, 2)}[args.model]
    print(f"model: MLP {'-'.join(map(str, sizes))}")
    for batch_size in args.batch_sizes:
        configs = configurations(sizes, device)
        times = {name: [] for name in configs}
        steps = {name: [] for name in configs}
        for round_ in range(args.rounds + 1):
            for name, (epoch, state) in configs.items():
                seconds, step = epoch(state, x, batch_size, device)
                if round_ > 0:  # round 0 warms up allocators, caches, compilers, CUDA kernels
                    times[name].append(seconds)
                    steps[name].append(step)
        base = statistics.median(times[BASE])
        base_step = statistics.median(steps[BASE])
        print(f"\nbatch size {batch_size}: median of {args.rounds} epochs")
        print(
            f"  {'configuration':40s} {'s/epoch':>8s} {'images/s':>10s} {'ratio':>6s} "
            f"{'ms/step':>8s} {'ratio':>6s}"
        )
        for name, values in times.items():
            t, step = statistics.median(values), statistics.median(steps[name])
            print(
                f"  {name:40s} {t:8.2f} {n / t:10.0f} {t / base:6.2f} {step * 1e3:8.3f} "
                f"{step / base_step:6.2f}"
            )


BASE = "hand-written PyTorch (analytic KL)"


def configurations(sizes, device):
    """Each configuration's epoch function and state, the models alike at the start."""
    x_dim, hidden, z_dim = sizes
    torch.manual_seed(0)
    plain, fused, compiled = (PlainVAE(*sizes).to(device) for _ in range(3))
    tutorial = TutorialVAE(*sizes).to(device)
    pyro.clear_param_store()

    def vae():
        return pyvae.VAE(x_dim, z_dim, hidden=(hidden,)).to(device)

    def adam(model, **kwargs):
        return torch.optim.Adam(model.parameters(), lr=1e-3, **kwargs)

    svi = pyro.infer.SVI(
        tutorial.model, tutorial.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO()
    )
    return {
        BASE: (handwritten_epoch, (plain.loss, adam(plain))),
        # pyvae uses fused Adam; this line separates Pyro's cost from the optimizer's
        "hand-written, fused Adam": (handwritten_epoch, (fused.loss, adam(fused, fused=True))),
        # the limit: the same code through torch.compile
        "hand-written, torch.compile, fused Adam": (
            handwritten_epoch,
            (torch.compile(compiled.loss), adam(compiled, fused=True)),
        ),
        "Pyro tutorial: SVI + Trace_ELBO": (tutorial_epoch, svi),
        "pyvae fit, elbo=trace": (pyvae_epoch("trace"), vae()),
        "pyvae fit, elbo=meanfield": (pyvae_epoch("meanfield"), vae()),
        "pyvae fit, elbo=meanfield, compile on": (pyvae_epoch("meanfield", "on"), vae()),
        "pyvae fit, elbo=trace, compile on": (pyvae_epoch("trace", "on"), vae()),
    }


if __name__ == "__main__":
    main()
