"""A number annealed by a callback, trained with ``compile`` off, on and auto, in one process.

    python benchmarks/anneal_speed.py --device cpu --epochs 14 --rounds 2

A user's VAE (Pyro's tutorial, 784-400-50 softplus) whose decoder divides its logits by a
``temperature``, a Python float that a callback lowers at the start of every epoch: each new
value is a new kind of step (its code reads the number), so ``on`` records and compiles the step
again every epoch, ``off`` runs it as written, and ``auto`` compiles a new value only while a
value's life of compiled steps repays what compiling one cost. Static binarized MNIST, batch 128,
Adam lr 1e-3. The three take turns, a whole ``fit`` each, for ``--rounds`` rounds; every run
anneals through values of its own (a tiny offset), so no run finds another's compilations in
inductor's caches. Prints each run's seconds and, per setting, the median and its ratio to ``off``
in the same round.
"""

import argparse
import statistics
import time

import torch
from common import add_common_arguments, setup, static_mnist
from handwritten import TutorialVAE
from torch import nn

import pyvae
from pyvae.train import Callback


class Tempered(nn.Module):
    """Logits divided by ``temperature``, a Python number its code reads (a decoder's last
    layer)."""

    temperature = 1.0

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature


class Anneal(Callback):
    """``temperature`` = 1 / (1 + epoch / 10), offset by ``offset``, set before each epoch."""

    def __init__(self, tempered: Tempered, offset: float) -> None:
        self.tempered, self.offset = tempered, offset

    def on_epoch_begin(self, run) -> None:
        self.tempered.temperature = 1.0 / (1.0 + run.epoch / 10) + self.offset


def timed_fit(x, mode: str, epochs: int, offset: float, device) -> float:
    torch.manual_seed(0)
    model = TutorialVAE()
    model.decoder.append(Tempered())
    started = time.perf_counter()
    pyvae.fit(
        model,
        x,
        epochs=epochs,
        batch_size=128,
        lr=1e-3,
        elbo="trace",
        device=device,
        compile=mode,
        callbacks=[Anneal(model.decoder[-1], offset)],
        progress=True,
    )
    return time.perf_counter() - started


def main(args) -> None:
    device = setup(args)
    x = static_mnist("train", args.data_dir)[: args.num_points].to(device)
    seconds: dict[str, list[float]] = {mode: [] for mode in ("off", "on", "auto")}
    run = 0
    for round_ in range(args.rounds):
        for mode in seconds:
            run += 1
            spent = timed_fit(x, mode, args.epochs, run * 1e-6, device)
            seconds[mode].append(spent)
            print(f"round {round_ + 1}, compile {mode}: {spent:.1f} s")
    for mode, spent in seconds.items():
        ratios = [s / off for s, off in zip(spent, seconds["off"], strict=True)]
        print(
            f"compile {mode:4s}: median {statistics.median(spent):.1f} s "
            f"({', '.join(f'{s:.1f}' for s in spent)}), against off "
            f"{statistics.median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)})"
        )


if __name__ == "__main__":
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__))
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-points", type=int, default=50_000)
    main(parser.parse_args())
