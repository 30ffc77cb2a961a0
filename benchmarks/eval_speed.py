"""Evaluation speed: pyvae.log_likelihood against its arithmetic floor and a per-point loop.

    python benchmarks/eval_speed.py --device cpu --num-samples 5000 --num-points 500

On static binarized MNIST test images with a 784-512-50 ReLU MLP VAE (Pythae's default
network) it reports, in one process:

* the matrix-multiply rate of this machine, measured on the decoder's own shapes;
* the floor: (decoder + likelihood FLOPs per sample) x K x N / that rate;
* pyvae's time and its ratio to the floor, as written and compiled (``compile="on"``; the
  compilation, on three images first, timed apart);
* the per-point loop that Pythae's ``get_nll`` runs (one image at a time, samples in
  chunks of 100) on the same network, and pyvae's speed-up over it;
* the peak resident memory of a process that runs only the evaluation, for two chunk
  sizes, against the K x N x 784 floats an unchunked evaluation would hold.
"""

import argparse
import multiprocessing
import resource
import time

import torch
from common import add_common_arguments, setup, static_mnist, sync
from handwritten import PerPointNLL

import pyvae
import pyvae.infer.importance as importance
from pyvae.data import spread
from pyvae.infer.importance import scoring_session


def counted_compilations() -> list:
    """A list that gets an item each time importance sampling compiles a kind of chunk."""
    counted, compile_function = [], importance.compile_function

    def counting(*args, **kwargs):
        counted.append(1)
        return compile_function(*args, **kwargs)

    importance.compile_function = counting
    return counted


def matmul_rate(hidden, x_dim, device, repeats=20):
    """Best GFLOP/s of (rows x hidden) @ (hidden x x_dim) plus bias, the decoder's big product, over
    row counts."""
    best_rate = 0.0
    for rows in (1024, 2048, 4096, 8192):
        a = torch.randn(rows, hidden, device=device)
        w = torch.randn(x_dim, hidden, device=device)
        b = torch.randn(x_dim, device=device)
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            torch.addmm(b, a, w.T)
            sync(device)
            best_rate = max(
                best_rate, 2 * rows * hidden * x_dim / (time.perf_counter() - start) / 1e9
            )
    return best_rate


def flops_per_sample(z_dim, hidden, x_dim):
    """Decoder matrix products, plus Bernoulli log p(x|z): x*l - softplus(l) summed, ~3 per
    pixel."""
    return 2 * (z_dim * hidden + hidden * x_dim) + 3 * x_dim


def _peak_rss_child(queue, num_samples, num_points, batch_size, data_dir):
    torch.set_num_threads(1)
    x = static_mnist("test", data_dir)[:num_points]
    vae = pyvae.VAE(784, 50, hidden=(512,), activation="relu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pyvae.log_likelihood(vae, x, num_samples, batch_size, device="cpu")
    queue.put((before / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def peak_rss(num_samples, num_points, batch_size, data_dir):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_peak_rss_child, args=(queue, num_samples, num_points, batch_size, data_dir)
    )
    proc.start()
    result = queue.get()
    proc.join()
    return result


def memory_report(k, data_dir):
    """Peak resident memory of child processes that only evaluate, chunked as pyvae chooses."""
    full = k * 10000 * 784 * 4 / 2**30
    print(
        "\npeak resident memory of a process that only evaluates (1 thread); unchunked, the "
        f"decoded images alone would take {full:.0f} GiB for K = {k} and 10k images"
    )
    for samples, points, batch_size in (
        (k, 100, None),
        (1000, 200, None),
        (1000, 2000, None),
        (1000, 2000, 16),
    ):
        before, after = peak_rss(samples, points, batch_size, data_dir)
        print(
            f"  K = {samples:5d}, {points:5d} images, batch_size {batch_size or 'auto':>4}: "
            f"{after:6.0f} MiB peak ({after - before:5.0f} MiB above the loaded process)"
        )


def arguments():
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--num-samples", type=int, default=5000)
    parser.add_argument(
        "--num-points", type=int, default=500, help="test images for pyvae (10000 = all)"
    )
    parser.add_argument(
        "--baseline-points", type=int, default=5, help="test images for the per-point loop"
    )
    parser.add_argument(
        "--memory", action="store_true", help="also measure peak memory in child processes (CPU)"
    )
    return parser.parse_args()


def main():
    args = arguments()
    device = setup(args)
    k = args.num_samples
    x = spread(static_mnist("test", args.data_dir), args.num_points)
    torch.manual_seed(0)
    # Pythae's default MLP VAE: ReLU between the layers
    vae = pyvae.VAE(784, 50, hidden=(512,), activation="relu").to(device)

    rate = matmul_rate(512, 784, device)
    floor_per_point = flops_per_sample(50, 512, 784) * k / (rate * 1e9)
    print(
        f"matrix-multiply rate: {rate:.1f} GFLOP/s (best of (R x 512) @ (512 x 784) + bias, R = "
        "1024..8192)"
    )

    pyvae.log_likelihood(vae, x[:2], k, device=device, compile="off")  # warm-up
    sync(device)
    torch.manual_seed(1)  # the same draws as the compiled run below
    start = time.perf_counter()
    ll = pyvae.log_likelihood(vae, x, k, device=device, compile="off")
    sync(device)
    ours = (time.perf_counter() - start) / len(x)
    compilations = counted_compilations()
    with scoring_session():  # the compiled chunks shared by the calls, as evaluate shares them
        start = time.perf_counter()
        pyvae.log_likelihood(vae, x[:3], k, device=device, compile="on")  # records, compiles
        compiling = time.perf_counter() - start
        sync(device)
        torch.manual_seed(1)
        start = time.perf_counter()
        compiled_ll = pyvae.log_likelihood(vae, x, k, device=device, compile="on")
        sync(device)
        compiled = (time.perf_counter() - start) / len(x)

    loop = PerPointNLL(vae, num_samples=k, chunk=100)
    xb = x[: args.baseline_points].to(device)
    loop(xb[:1])  # warm-up
    sync(device)
    start = time.perf_counter()
    theirs_values = loop(xb)
    sync(device)
    theirs = (time.perf_counter() - start) / len(xb)
    agreement = (ll.log_px[: len(xb)] - theirs_values.cpu()).abs().max().item()

    print(
        f"\nK = {k}, 784-512-50 VAE, {len(x)} test images ({args.baseline_points} for the "
        "per-point loop)"
    )
    print(f"  {'':34s} {'s/image':>9s} {'10k images':>11s} {'ratio':>7s}")
    print(
        f"  {'arithmetic floor':34s} {floor_per_point:9.4f} {floor_per_point * 1e4 / 60:9.1f} m "
        f"{1.0:7.2f}"
    )
    print(
        f"  {'pyvae.log_likelihood':34s} {ours:9.4f} {ours * 1e4 / 60:9.1f} m "
        f"{ours / floor_per_point:7.2f}  (x floor)"
    )
    print(
        f"  {'pyvae.log_likelihood, compile on':34s} {compiled:9.4f} {compiled * 1e4 / 60:9.1f} m "
        f"{compiled / floor_per_point:7.2f}  (x floor; "
        + (
            f"compiled in {compiling:.1f} s)"
            if compilations
            else "nothing compiled: every chunk was a kind of its own, seen once)"
        )
    )
    print(
        f"  {'per-point loop (Pythae get_nll)':34s} {theirs:9.4f} {theirs * 1e4 / 60:9.1f} m "
        f"{theirs / ours:7.2f}  (x pyvae)"
    )
    gap = (compiled_ll.log_px - ll.log_px).abs().max().item()
    print(f"  compiled and as written, the same draws: log p(x) within {gap:.1e} nats")
    print(
        f"  the two estimates differ by at most {agreement:.3f} nats on the shared images (Monte "
        "Carlo noise)"
    )

    if args.memory:
        memory_report(k, args.data_dir)


if __name__ == "__main__":
    main()
