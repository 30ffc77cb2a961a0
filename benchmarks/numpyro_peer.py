"""Training speed against NumPyro's jitted SVI on the same model, data, ELBO, optimizer and batch.

    python benchmarks/numpyro_peer.py --device cpu --batch-sizes 128 --rounds 3 --repeats 2

NumPyro is an optional peer: it runs in a virtual environment of its own, made by this script
the first time (``--venv``, default ``~/.cache/pyvae-benchmarks/numpyro``; ``pip install numpyro
jax[cpu]`` from the package registry), in a child process. The model is the one of
``train_speed.py``: static binarized MNIST, an MLP 784-400-50 with softplus, a diagonal Normal
guide (sigma = softplus(.) + 1e-4), a N(0, I) prior and Bernoulli logits, the mean-field ELBO
(analytic KL) and Adam at lr 1e-3. NumPyro runs it two ways: ``jit(svi.update)`` once per step, as
its users write it, and a whole epoch in one ``jit`` (``lax.fori_loop`` over the steps, as its VAE
example does). Each repeat measures the hand-written PyTorch epoch (the baseline), pyvae's epoch
(``elbo="meanfield"``, as written and compiled; a ``fit`` call per epoch, which records the
compiled step again each time, so the compiled epoch of a long run, its median step time x the
steps, is printed beside it) and both NumPyro epochs, one warm-up epoch then the median of
``--rounds``; the ratios are to that repeat's hand-written epoch (NumPyro's in its child, run
right after).
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

path, batch_size, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
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

times = {"per_step": [], "whole_epoch": []}
for r in range(rounds + 1):
    for name, epoch in (("per_step", per_step), ("whole_epoch", whole_epoch)):
        start = time.perf_counter()
        state, loss = epoch(state, random.PRNGKey(r))
        jax.block_until_ready(loss)
        if r > 0:
            times[name].append(time.perf_counter() - start)
print(json.dumps({"jax": jax.__version__, "numpyro": numpyro.__version__,
                  "loss": float(loss) / n, "times": times}))
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


def numpyro_epochs(python: Path, data: Path, batch_size: int, rounds: int) -> dict:
    """NumPyro's per-step and whole-epoch times in a child process (XLA uses every core)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [str(python), "-c", CHILD, str(data), str(batch_size), str(rounds)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"numpyro child failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def torch_epochs(x: torch.Tensor, batch_size: int, rounds: int, device) -> dict:
    """The hand-written and pyvae epochs: a warm-up, then the median of ``rounds``."""
    torch.manual_seed(0)
    plain = PlainVAE().to(device)
    configs = {
        "hand-written PyTorch (analytic KL)": Repeated(
            handwritten_epoch, (plain.loss, torch.optim.Adam(plain.parameters(), lr=1e-3))
        ),
        "pyvae fit, elbo=meanfield": PyvaeRun("meanfield", "off", pyvae.VAE(784, 50).to(device)),
        "pyvae fit, elbo=meanfield, compile on": PyvaeRun(
            "meanfield", "on", pyvae.VAE(784, 50).to(device)
        ),
    }
    times, steps, _ = measure(configs, x, batch_size, device, rounds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    # a run of many epochs records its step once; each fit call here records it again
    per_epoch = math.ceil(len(x) / batch_size)
    compiled = "pyvae fit, elbo=meanfield, compile on"
    medians[STEADY] = statistics.median(steps[compiled]) * per_epoch
    return medians


#: pyvae compiled's epoch in a long run: its median step time x the steps of an epoch
STEADY = "pyvae compiled, median step x steps"


def main():
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="whole measurements, each paired")
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
            print(f"\nbatch size {batch_size}, {len(x)} images: median of {args.rounds} epochs")
            for repeat in range(args.repeats):
                times = torch_epochs(x, batch_size, args.rounds, device)
                peer = numpyro_epochs(python, data, batch_size, args.rounds)
                for name, key in PEER_NAMES.items():
                    times[name] = statistics.median(peer["times"][key])
                report(times, repeat, len(x))
                print(f"  (jax {peer['jax']}, numpyro {peer['numpyro']}, loss {peer['loss']:.1f})")


PEER_NAMES = {
    "NumPyro, jit(svi.update) per step": "per_step",
    "NumPyro, epoch in one jit": "whole_epoch",
}


def report(times: dict, repeat: int, n: int) -> None:
    """Seconds, images per second and the ratio to the hand-written epoch, one line each."""
    base = times["hand-written PyTorch (analytic KL)"]
    for name, t in times.items():
        print(f"  repeat {repeat + 1}  {name:38s} {t:7.2f} s  {n / t:8.0f} img/s  {t / base:5.2f}")


if __name__ == "__main__":
    main()
