"""Training speed against NumPyro's jitted SVI on the same model, data, ELBO, optimizer and batch.

    python benchmarks/numpyro_peer.py --device cpu --batch-sizes 128 --rounds 5 --repeats 2

NumPyro is an optional peer: it runs in a virtual environment of its own, made by this script
the first time (``--venv``, default ``~/.cache/pyvae-benchmarks/numpyro``; ``pip install numpyro
jax[cpu]`` from the package registry), in a child process. The model is the one of
``train_speed.py``: static binarized MNIST, an MLP 784-400-50 with softplus, a diagonal Normal
guide (sigma = softplus(.) + 1e-4), a N(0, I) prior and Bernoulli logits, the mean-field ELBO
(analytic KL) and Adam at lr 1e-3. NumPyro runs it two ways: ``jit(svi.update)`` once per step, as
its users write it, and a whole epoch in one ``jit`` (``lax.fori_loop`` over the steps, as its VAE
example does). The configurations take turns epoch by epoch, NumPyro's included (its child stays
up and runs an epoch when asked), so that this machine's drifting speed moves them all alike: the
hand-written PyTorch epoch (the baseline), pyvae's epoch (``elbo="meanfield"``, as written and
compiled; a ``fit`` call per epoch, which records the compiled step again each time, so the
compiled epoch of a long run, its median step time x the steps, is printed beside it) and both
NumPyro epochs; one warm-up round, then the median of ``--rounds`` of each one's ratio to the
baseline's epoch of the same round.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import add_common_arguments, setup, static_mnist
from handwritten import PlainVAE
from train_speed import PyvaeRun, Repeated, handwritten_epoch, measure

import pyvae

VENV = Path.home() / ".cache" / "pyvae-benchmarks" / "numpyro"
PACKAGES = ["numpyro>=0.15,<1", "jax[cpu]>=0.4.30,<1"]

#: the child: NumPyro's epoch times, as JSON on its last line
CHILD = r"""
import json, statistics, sys, time
import numpy as np, jax, jax.numpy as jnp
from jax import lax, random
from jax.example_libraries import stax
import numpyro, numpyro.distributions as dist
from numpyro.infer import SVI, TraceMeanField_ELBO

path, batch_size = sys.argv[1], int(sys.argv[2])
x = jnp.asarray(np.load(path), dtype=jnp.float32)
n, steps = x.shape[0], x.shape[0] // batch_size

def mlp(out):
    return stax.serial(stax.Dense(400), stax.Softplus, stax.Dense(out))

def model(batch):
    decode = numpyro.module("decoder", mlp(784), (batch_size, 50))
    with numpyro.plate("data", n, subsample_size=batch.shape[0]):
        z = numpyro.sample("z", dist.Normal(0, 1).expand([50]).to_event(1))
        numpyro.sample("x", dist.Bernoulli(logits=decode(z)).to_event(1), obs=batch)

def guide(batch):
    encode = numpyro.module("encoder", mlp(100), (batch_size, 784))
    loc, raw = jnp.split(encode(batch), 2, axis=-1)
    with numpyro.plate("data", n, subsample_size=batch.shape[0]):
        numpyro.sample("z", dist.Normal(loc, jax.nn.softplus(raw) + 1e-4).to_event(1))

svi = SVI(model, guide, numpyro.optim.Adam(1e-3), TraceMeanField_ELBO())
state = svi.init(random.PRNGKey(0), x[:batch_size])
update = jax.jit(svi.update)

def per_step(state, key):
    order = np.asarray(random.permutation(key, n))
    for i in range(steps):
        state, loss = update(state, x[order[i * batch_size:(i + 1) * batch_size]])
    return state, loss

@jax.jit
def whole_epoch(state, key):
    order = random.permutation(key, n)
    def body(i, carry):
        state, _ = carry
        batch = x[lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)]
        return svi.update(state, batch)
    return lax.fori_loop(0, steps, body, (state, jnp.zeros(())))

epochs = {"per_step": per_step, "whole_epoch": whole_epoch}
print(json.dumps({"jax": jax.__version__, "numpyro": numpyro.__version__}), flush=True)
for r, name in enumerate(sys.stdin):
    start = time.perf_counter()
    state, loss = epochs[name.strip()](state, random.PRNGKey(r))
    jax.block_until_ready(loss)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "loss": float(loss) / n}), flush=True)
"""


def venv_python(venv: Path) -> Path:
    """The venv's python, the venv made and NumPyro installed into it when missing."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making {venv} with {' '.join(PACKAGES)} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", *PACKAGES]
        subprocess.run(pip, check=True)
    return python


class NumpyroPeer:
    """NumPyro's epoch (``kind``: "per_step" or "whole_epoch") in its ``child``, a configuration of
    :func:`train_speed.measure`; seconds per step are not known there (None)."""

    def __init__(self, child: "Child", kind: str) -> None:
        self.child, self.kind = child, kind

    def start(self, x, batch_size, device, epochs):
        pass

    def epoch(self):
        return self.child.ask(self.kind)["seconds"], None

    def finish(self):
        pass


class Child:
    """NumPyro's child process, up until closed: it runs one epoch of a kind per request."""

    def __init__(self, python: Path, data: Path, batch_size: int) -> None:
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        command = [str(python), "-c", CHILD, str(data), str(batch_size)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.versions = self._answer()

    def ask(self, kind: str) -> dict:
        self.process.stdin.write(kind + "\n")
        self.process.stdin.flush()
        return self._answer()

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"numpyro child failed (exit {self.process.wait()}; its stderr above)")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


BASE = "hand-written PyTorch (analytic KL)"
COMPILED = "pyvae fit, elbo=meanfield, compile on"
#: pyvae compiled's epoch in a long run: its median step time x the steps of an epoch
STEADY = "pyvae compiled, median step x steps"
PER_STEP = "NumPyro, jit(svi.update) per step"


def epochs(x: torch.Tensor, batch_size: int, rounds: int, device, child: Child) -> dict:
    """Every configuration's epoch seconds, round by round (round 0, the warm-up, left out);
    pyvae compiled's long-run epoch (:data:`STEADY`) from its median step of each round."""
    torch.manual_seed(0)
    plain = PlainVAE().to(device)
    configs = {
        BASE: Repeated(
            handwritten_epoch, (plain.loss, torch.optim.Adam(plain.parameters(), lr=1e-3))
        ),
        "pyvae fit, elbo=meanfield": PyvaeRun("meanfield", "off", pyvae.VAE(784, 50).to(device)),
        COMPILED: PyvaeRun("meanfield", "on", pyvae.VAE(784, 50).to(device)),
        PER_STEP: NumpyroPeer(child, "per_step"),
        "NumPyro, epoch in one jit": NumpyroPeer(child, "whole_epoch"),
    }
    times, steps, _ = measure(configs, x, batch_size, device, rounds)
    # a run of many epochs records its step once; each fit call here records it again
    times[STEADY] = [step * math.ceil(len(x) / batch_size) for step in steps[COMPILED]]
    return times


def report(times: dict, repeat: int, n: int) -> None:
    """Median seconds, images per second and ratio to the hand-written epoch of the same round
    (median and spread), one line each; then pyvae compiled's long-run epoch over NumPyro's."""
    for name, values in times.items():
        t = statistics.median(values)
        ratios = [a / b for a, b in zip(values, times[BASE], strict=True)]
        print(
            f"  repeat {repeat + 1}  {name:38s} {t:7.2f} s  {n / t:8.0f} img/s  "
            f"{statistics.median(ratios):5.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        )
    ratios = [a / b for a, b in zip(times[STEADY], times[PER_STEP], strict=True)]
    print(
        f"  repeat {repeat + 1}  pyvae compiled (long run) / NumPyro jit per step: "
        f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
    )


def main():
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="whole measurements")
    parser.add_argument("--num-points", type=int, help="use the first N training images")
    parser.add_argument("--venv", type=Path, default=VENV, help="NumPyro's virtual environment")
    args = parser.parse_args()
    device = setup(args)
    if device.type != "cpu":
        raise SystemExit("the NumPyro peer runs on the CPU here (jax[cpu]); pass --device cpu")
    x = static_mnist("train", args.data_dir)[: args.num_points].to(device)
    python = venv_python(args.venv)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "x.npy"
        np.save(data, x.cpu().numpy().astype(np.uint8))
        for batch_size in args.batch_sizes:
            print(f"\nbatch size {batch_size}, {len(x)} images: median of {args.rounds} rounds")
            child = Child(python, data, batch_size)
            print(f"  (jax {child.versions['jax']}, numpyro {child.versions['numpyro']})")
            for repeat in range(args.repeats):
                report(epochs(x, batch_size, args.rounds, device, child), repeat, len(x))
            child.close()


if __name__ == "__main__":
    main()
