"""One process of the 2-process data-parallel tests: ``torchrun --nproc_per_node=2
tests/train/ddp_worker.py OUT [OPTIONS]``.

It trains a small VAE with ``pyvae.fit`` (rank 0 writes OUT/run) and leaves each
process's final parameters in OUT/ranks/<rank>.pt for the test to compare. OPTIONS is
JSON: arguments of ``fit``; ``sigterm_rank1_at_step`` to send SIGTERM to rank 1
alone during that training step, ``sigterm_rank1_at_scoring`` during that epoch's scoring;
``rank1_points`` to give rank 1 another data set; ``auto_min_seconds`` for
``pyvae.train.step.AUTO_MIN_SECONDS``; ``grads_at_step`` to leave the gradients of that
step in OUT/ranks/<rank>.grads.pt; ``batchnorm`` to normalize the encoder's input by batch
(running statistics: buffers that each step updates).
"""

import json
import os
import signal
import sys
from pathlib import Path

import torch

import pyvae

out = Path(sys.argv[1])
options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
rank = int(os.environ["RANK"])
stop_at = options.pop("sigterm_rank1_at_step", None)
rank1_points = options.pop("rank1_points", 500)
points = rank1_points if rank == 1 else 500
if stop_at is not None and rank == 1:
    forward, calls = pyvae.train.objectives.Objective.forward, []

    def forward_then_signal(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, *args, **kwargs)

    pyvae.train.objectives.Objective.forward = forward_then_signal
pyvae.train.step.AUTO_MIN_SECONDS = options.pop("auto_min_seconds", 20.0)
scored_at = options.pop("sigterm_rank1_at_scoring", None)
if scored_at is not None and rank == 1:
    scores = pyvae.train.validation.Validation.scores

    def scores_then_signal(self, record):
        if record["epoch"] == scored_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return scores(self, record)

    pyvae.train.validation.Validation.scores = scores_then_signal
g = torch.Generator().manual_seed(1)
prototypes = (torch.rand(4, 32, generator=g) > 0.5).float()
data = (
    prototypes[torch.randint(0, 4, (600,), generator=g)]
    + (torch.rand(600, 32, generator=g) < 0.05).float()
) % 2

grads_at, callbacks = options.pop("grads_at_step", None), []
if grads_at is not None:

    class Grads(pyvae.train.Callback):
        def on_step_end(self, run):
            if run.step == grads_at:
                grads = {n: p.grad.clone() for n, p in run.model.named_parameters()}
                (out / "ranks").mkdir(parents=True, exist_ok=True)
                torch.save(grads, out / "ranks" / f"{rank}.grads.pt")

    callbacks.append(Grads())

# different initial weights in each process: DistributedDataParallel must align them
torch.manual_seed(rank)
vae = pyvae.VAE(x_dim=32, z_dim=3, hidden=(24,))
if options.pop("batchnorm", False):
    vae.encoder = torch.nn.Sequential(torch.nn.BatchNorm1d(32), *vae.encoder)
try:
    pyvae.fit(
        vae,
        data[:points],
        test=data[500:],
        device="cpu",
        out=out / "run",
        callbacks=callbacks,
        **{"epochs": 4, "batch_size": 25, "seed": 0, "progress": False, **options},
    )
finally:
    (out / "ranks").mkdir(parents=True, exist_ok=True)
    torch.save(vae.state_dict(), out / "ranks" / f"{rank}.pt")
