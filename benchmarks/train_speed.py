"""Training speed: pyvae's SVI epoch against a hand-written PyTorch VAE, in one process.

    python benchmarks/train_speed.py --device cpu --batch-sizes 128 512 --rounds 3
    python benchmarks/train_speed.py --device cpu --model tiny --batch-sizes 128 --rounds 3

Static binarized MNIST (50,000 images), MLP 784-400-50 (``--model tiny``: the images pooled
to 8x8, MLP 64-16-2), Adam lr 1e-3. For each batch size the configurations take turns, one epoch
each, for ``--rounds`` + 1 rounds (pyvae's each a ``fit`` call, :class:`PyvaeRun`). The first
round is a warm-up: it holds the compilations (torch.compile's; pyvae's recording and compiling
of the step), so its excess over the median epoch, printed beside it, is what they cost in this
process (inductor's on-disk cache makes a second process's cheaper). The median epoch time of
each configuration is reported as images/s and as a ratio to the hand-written eager epoch (1.00 =
as fast as plain PyTorch), and the median time of one step (data served, loss, gradients, update)
beside it: for pyvae compiled, the time of every step of a long run.
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
    """Each epoch's step ends of a ``fit``."""

    def __init__(self):
        self.epochs = []

    def on_epoch_begin(self, training):
        self.epochs.append([])

    def on_step_end(self, training):
        self.epochs[-1].append(time.perf_counter())


class Repeated:
    """A hand-written configuration: ``epoch()`` runs one epoch, (seconds, seconds per step)."""

    def __init__(self, epoch, state):
        self.run, self.state = epoch, state

    def start(self, x, batch_size, device, epochs):
        self.args = (x, batch_size, device)

    def epoch(self):
        return self.run(self.state, *self.args)

    def finish(self):
        pass


class PyvaeRun(Callback):
    """pyvae's configuration: ``epoch()`` is one ``fit`` call of one epoch. A run of many epochs
    records its compiled step once; here each call records it again (0.1-0.3 s, a cache hit for
    the compilation) and runs its first two steps as written, which the epoch's time includes and
    the median step time does not. (One ``fit`` call per configuration, its epochs taking turns
    with the others', would need threads: Pyro's handler stack is global to the process, and idle
    OpenMP teams of parked threads slow the running one.)"""

    def __init__(self, elbo, compile, vae):
        self.elbo, self.compile, self.vae = elbo, compile, vae

    def start(self, x, batch_size, device, epochs):
        self.args = (x, batch_size, device)

    def on_epoch_begin(self, run):
        self.ticks = []

    def on_step_end(self, run):
        self.ticks.append(time.perf_counter())

    def epoch(self):
        x, batch_size, device = self.args
        (record,) = pyvae.fit(
            self.vae,
            x,
            epochs=1,
            batch_size=batch_size,
            elbo=self.elbo,
            device=device,
            progress=False,
            compile=self.compile,
            callbacks=[self],
        )
        return record["seconds"], step_seconds(self.ticks)

    def finish(self):
        pass


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
        times, steps, warmups = measure(configs, x, batch_size, device, args.rounds)
        base = statistics.median(times[BASE])
        base_step = statistics.median(steps[BASE])
        print(f"\nbatch size {batch_size}: median of {args.rounds} epochs")
        print(
            f"  {'configuration':40s} {'s/epoch':>8s} {'images/s':>10s} {'ratio':>6s} "
            f"{'ms/step':>8s} {'ratio':>6s} {'1st epoch +s':>12s}"
        )
        for name, values in times.items():
            t, step = statistics.median(values), statistics.median(steps[name])
            print(
                f"  {name:40s} {t:8.2f} {n / t:10.0f} {t / base:6.2f} {step * 1e3:8.3f} "
                f"{step / base_step:6.2f} {warmups[name] - t:12.2f}"
            )


BASE = "hand-written PyTorch (analytic KL)"


def measure(configs, x, batch_size, device, rounds):
    """Each configuration's epochs, round-robin: round 0 warms up (allocators, caches,
    compilers, CUDA kernels); ({name: epoch seconds}, {name: seconds per step}, {name: round 0's
    seconds})."""
    for config in configs.values():
        config.start(x, batch_size, device, rounds + 1)
    times, steps, warmups = ({name: [] for name in configs} for _ in range(3))
    for round_ in range(rounds + 1):
        for name, config in configs.items():
            seconds, step = config.epoch()
            if round_ == 0:
                warmups[name] = seconds
            else:
                times[name].append(seconds)
                steps[name].append(step)
    for config in configs.values():
        config.finish()
    return times, steps, warmups


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
        BASE: Repeated(handwritten_epoch, (plain.loss, adam(plain))),
        # pyvae uses fused Adam; this line separates Pyro's cost from the optimizer's
        "hand-written, fused Adam": Repeated(
            handwritten_epoch, (fused.loss, adam(fused, fused=True))
        ),
        # the limit: the same code through torch.compile
        "hand-written, torch.compile, fused Adam": Repeated(
            handwritten_epoch, (torch.compile(compiled.loss), adam(compiled, fused=True))
        ),
        "Pyro tutorial: SVI + Trace_ELBO": Repeated(tutorial_epoch, svi),
        "pyvae fit, elbo=trace": PyvaeRun("trace", "off", vae()),
        "pyvae fit, elbo=meanfield": PyvaeRun("meanfield", "off", vae()),
        "pyvae fit, elbo=meanfield, compile on": PyvaeRun("meanfield", "on", vae()),
        "pyvae fit, elbo=trace, compile on": PyvaeRun("trace", "on", vae()),
    }


if __name__ == "__main__":
    main()
