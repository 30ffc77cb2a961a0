"""AIS speed: time per point per 1000 annealing steps against the arithmetic floor of its gradient
evaluations.

    python benchmarks/ais_speed.py --run runs/binarized_mnist-... \
        --num-points 20 --num-chains 8 --num-steps 200

Without ``--run`` it first trains the quickstart's default model (``--epochs``, default 20) on
static binarized MNIST. In one process it then reports:

* the floor: every matrix product (mm, addmm, bmm, convolution) that one gradient evaluation of
  the AIS potential performs, forward and backward, through the model's and the guide's programs,
  recorded by a dispatch mode (the products of a public AIS run with one more transition, less
  those of the shorter run) and then timed alone, back to back, with the same shapes
  (the best of ``--floor-repeats``);
* AIS: ``pyvae.ais_log_likelihood`` on ``--num-points`` test images with ``--num-chains``
  chains and ``--num-steps`` steps of ``--leapfrog-steps`` leapfrog steps, its time per gradient
  evaluation, per point per 1000 steps, and the ratio to the floor, both as the program runs
  (``compile=False``) and compiled (``compile=True``; its one-off compilation is timed apart, and
  the recording per chunk is in the timed runs);

``--repeats`` times (median and spread), each ratio against the best floor of the run (the
machine's rate at its best: a replay slowed by a passing load is no floor). The floor is what the
arithmetic itself costs at torch's own matrix-product rate (MKL on a CPU); the ratio is what Pyro's
bookkeeping, the elementwise densities and the sampler add on top, less what a compiled kernel
that beats that rate (inductor's, packing frozen weights) takes off.
"""

import argparse
import collections
import statistics
import tempfile
import time
import warnings

import torch
from common import add_common_arguments, setup, static_mnist, sync
from torch.utils._python_dispatch import TorchDispatchMode

import pyvae
from pyvae.data import spread

MATMULS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward"}


class RecordMatmuls(TorchDispatchMode):
    """Records (op, input shapes) of every matrix product dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMULS:
            self.calls.append(
                (func, [a.shape if torch.is_tensor(a) else a for a in args], kwargs or {})
            )
        return func(*args, **(kwargs or {}))


def floor_seconds(calls, device, repeats):
    """The best time of the recorded products, replayed on random tensors of the same shapes."""
    replay = [
        (
            func,
            [torch.randn(a, device=device) if isinstance(a, torch.Size) else a for a in args],
            kwargs,
        )
        for func, args, kwargs in calls
    ]
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for func, args, kwargs in replay:
            func(*args, **kwargs)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def flops(calls):
    total = 0
    for func, args, _ in calls:
        name = func.overloadpacket.__name__
        if name == "mm":
            total += 2 * args[0][0] * args[0][1] * args[1][1]
        elif name == "addmm":
            total += 2 * args[1][0] * args[1][1] * args[2][1]
        elif name in ("bmm", "baddbmm"):
            a, b = args[-2], args[-1]
            total += 2 * a[0] * a[1] * a[2] * b[2]
    return total


def default_model(epochs, device, data_dir):
    out = tempfile.mkdtemp(prefix="ais-speed-")
    vae = pyvae.VAE(784, 50)
    pyvae.fit(
        vae,
        static_mnist("train", data_dir),
        epochs=epochs,
        batch_size=128,
        device=device,
        out=out,
        seed=0,
    )
    return vae


def one_evaluation(vae, x, settings, device):
    """The matrix products of one gradient evaluation of the AIS potential on ``x``: those of a run
    with one more transition of one leapfrog step, less those of the shorter run (the public
    ``pyvae.ais_log_likelihood`` both times, so the start, the guide's draws and the end cancel)."""
    runs = []
    for num_steps in (2, 3):
        with RecordMatmuls() as recorder:
            pyvae.ais_log_likelihood(
                vae, x, **{**settings, "num_steps": num_steps, "leapfrog_steps": 1}, device=device
            )
        runs.append(recorder.calls)
    shorter = collections.Counter(map(signature, runs[0]))
    extra = []
    for call in runs[1]:
        if shorter[signature(call)] > 0:
            shorter[signature(call)] -= 1
        else:
            extra.append(call)
    return extra


def signature(call):
    """A recorded product as a hashable key: the op, its arguments' shapes and its options."""
    func, args, kwargs = call
    return func, repr(args), repr(sorted(kwargs.items()))


def timed_runs(vae, x, settings, calls, evaluations, args, device):
    """(floors, seconds per evaluation {compile: [...]}) of ``--repeats`` rounds, each a replay of
    ``calls`` and an AIS run of ``evaluations`` gradient evaluations, as written and compiled."""
    floors, per_eval = [], {False: [], True: []}
    for repeat in range(args.repeats):
        floors.append(floor_seconds(calls, device, args.floor_repeats))
        print(
            f"run {repeat + 1}: floor {1e3 * floors[-1]:.2f} ms per evaluation "
            f"({flops(calls) / floors[-1] / 1e9:.0f} GFLOP/s)"
        )
        for compiled in (False, True):
            sync(device)
            start = time.perf_counter()
            result = pyvae.ais_log_likelihood(vae, x, **settings, compile=compiled, device=device)
            sync(device)
            seconds = time.perf_counter() - start
            per_eval[compiled].append(seconds / evaluations)
            per_point_1000 = seconds / len(x) * 1000 / args.num_steps
            print(
                f"  compile={compiled}: {1e3 * per_eval[compiled][-1]:.2f} ms per evaluation, "
                f"{seconds:.1f} s, {per_point_1000:.2f} s per point per 1000 steps; log p^ "
                f"{float(result.log_px.mean()):.3f}"
            )
    return floors, per_eval


def report(floors, per_eval, calls, args):
    """Each way's ratio to the best floor, and compiled against as written."""
    # the machine's rate is its best measured in this run: a replay slowed by a passing load is not
    # the floor
    floor = min(floors)
    print(
        f"floor: {1e3 * floor:.2f} ms per evaluation (best of {len(floors)} x {args.floor_repeats} "
        f"replays, {flops(calls) / floor / 1e9:.0f} GFLOP/s)"
    )
    for compiled, times in per_eval.items():
        ratios = [t / floor for t in times]
        print(
            f"compile={compiled}: ratio to floor median {statistics.median(ratios):.2f}, spread "
            f"{min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} runs"
        )
    speedup = [a / b for a, b in zip(per_eval[False], per_eval[True], strict=True)]
    print(
        f"compiled against the program as written: {statistics.median(speedup):.2f}x faster "
        f"(spread {min(speedup):.2f}-{max(speedup):.2f})"
    )


def arguments():
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument(
        "--run", help="a run folder (default: train the quickstart's model for --epochs)"
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--num-points", type=int, default=20)
    parser.add_argument("--num-chains", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=200)
    parser.add_argument("--leapfrog-steps", type=int, default=10)
    parser.add_argument("--start", default="guide", choices=["guide", "prior"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--floor-repeats", type=int, default=20)
    return parser.parse_args()


def main():
    args = arguments()
    device = setup(args)
    vae = (
        pyvae.load(f"{args.run}/checkpoint.pt")
        if args.run
        else default_model(args.epochs, device, args.data_dir)
    )
    vae.to(device).eval()
    x = spread(static_mnist("test", args.data_dir), args.num_points).to(device)
    settings = {
        "num_steps": args.num_steps,
        "num_chains": args.num_chains,
        "leapfrog_steps": args.leapfrog_steps,
        "start": args.start,
    }
    # a compiled run that fell back must stop here, not be timed as compiled
    warnings.simplefilter("error", pyvae.PyvaeWarning)
    calls = one_evaluation(vae, x, settings, device)
    evaluations = (args.num_steps - 1) * args.leapfrog_steps + 1
    print(
        f"{len(x)} points x {args.num_chains} chains = {len(x) * args.num_chains} rows; T = "
        f"{args.num_steps}, {args.leapfrog_steps} leapfrog steps: {evaluations} gradient "
        f"evaluations; {len(calls)} matrix products, {flops(calls) / 1e6:.1f} "
        "MFLOP per evaluation (mm/addmm)"
    )
    # the one-off compilation of this chunk size, so that the timed runs below find it compiled
    start = time.perf_counter()
    pyvae.ais_log_likelihood(vae, x, **{**settings, "num_steps": 2}, compile=True, device=device)
    print(
        "compile=True: recording and compiling the densities and the gradients-only graph took "
        f"{time.perf_counter() - start:.1f} s (once per chunk size)"
    )
    report(*timed_runs(vae, x, settings, calls, evaluations, args, device), calls, args)


if __name__ == "__main__":
    main()
