"""The command line: ``python -m pyvae evaluate RUN``, and how every entry point reports bad input.

Bad input is one line on stderr and exit code 2 (a traceback with ``--debug``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import PyvaeError


def run(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Call ``main(argv)``; a :class:`PyvaeError` becomes ``error: ...`` and exit 2 (a traceback with ``--debug``)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except PyvaeError as e:
        if "--debug" in argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr)
        sys.exit(128 + getattr(e, "signum", 2))


def load_run(path: str | Path):
    """(vae, config dict or None, run folder) from a run folder or a checkpoint file."""
    from .checkpoint import load

    path = Path(path)
    checkpoint = path / "checkpoint.pt" if path.is_dir() else path
    if not checkpoint.is_file():
        raise PyvaeError(f"{path} is neither a run folder with checkpoint.pt nor a checkpoint file")
    from .config import read_yaml

    config_path = checkpoint.parent / "config.yaml"
    config = read_yaml(config_path, "run config") if config_path.is_file() else None
    if config is not None and not isinstance(config, dict):
        raise PyvaeError(f"run config {config_path} must be a mapping of keys to values; got {type(config).__name__}")
    return load(checkpoint), config, checkpoint.parent


def evaluation_data(vae, config: dict | None, dataset: str | None, split: str, data_dir: str | None):
    """The split a run is evaluated on, binarized as it was trained (one fixed draw where training drew afresh)."""
    from .data import evaluation_split, load_dataset, resolve_binarize

    config = config or {}
    dataset = dataset or config.get("dataset")
    if dataset is None:
        raise PyvaeError("no config.yaml beside the checkpoint says which data set it was trained on; pass --dataset")
    data = load_dataset(dataset, split, data_dir=data_dir or config.get("data_dir"), download=config.get("download", True))
    # another data set than the run's is binarized as the likelihood needs, not as the run's was
    mode = config.get("binarize", "auto") if dataset == config.get("dataset") else "auto"
    mode = resolve_binarize(vae.likelihood, data, mode)
    return evaluation_split(data, mode, config.get("seed", 0))


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def evaluate_main(argv: list[str]) -> None:
    import pyro

    from .data import spread
    from .diagnostics import evaluate

    parser = run_parser("evaluate", "Importance-sampled log p(x) and guide diagnostics of a trained run.", "RUN/eval-<dataset>-<split>-K<K>")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-samples", type=int, default=5000, help="K importance samples per point")
    parser.add_argument("--batch-size", type=int, help="data points per chunk (default: chosen to bound memory)")
    parser.add_argument("--num-points", type=int, help="evaluate this many points, evenly spread over the split")
    args = parser.parse_args(argv)
    check_positive(args, "num_samples", "batch_size", "num_points", optional=True)

    vae, config, run_dir = load_run(args.run)
    data = evaluation_data(vae, config, args.dataset, args.split, args.data_dir)
    x = spread(data.images, args.num_points)
    out = writable_dir(args.out or run_dir / f"eval-{data.name}-{args.split}-K{args.num_samples}")

    pyro.set_rng_seed(args.seed)
    result = evaluate(
        vae, x, args.num_samples, args.batch_size, device=args.device, dataset=data.name, split=args.split, progress=True
    )
    print(result.table())
    result.write(out)
    print(f"wrote {out}/eval.json, eval.nc, khat.png, iwae_curve.png" + (", kl_per_dim.png" if result.kl_per_dim is not None else ""))


def writable_dir(path: str | Path) -> Path:
    """``path`` as a folder we have just created or checked we can write in; else a clear error."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise PyvaeError(f"cannot write to output folder {out}: {e.strerror or e}") from e
    return out


def run_parser(command: str, description: str, default_out: str = "RUN/explore") -> Parser:
    """The arguments every ``python -m pyvae`` command on a trained run shares."""
    parser = Parser(prog=f"python -m pyvae {command}", description=description)
    parser.add_argument("run", help="run folder (with checkpoint.pt and config.yaml) or checkpoint file")
    parser.add_argument("--dataset", help="data set (default: the run's)")
    parser.add_argument("--data-dir")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help=f"output folder (default {default_out})")
    parser.add_argument("--debug", action="store_true")
    return parser


def check_positive(args, *names: str, optional: bool = False) -> None:
    """Each named flag must be a positive integer (or, with ``optional``, not given)."""
    for name in names:
        value = getattr(args, name)
        if (value is None and not optional) or (value is not None and value < 1):
            raise PyvaeError(f"--{name.replace('_', '-')} must be a positive integer; got {value}")


def explore_setup(args, *positive: str):
    """(vae on its device, config, output folder) for an exploration command; checks positive flags."""
    import pyro

    from .train import resolve_device

    check_positive(args, *positive)
    vae, config, run_dir = load_run(args.run)
    vae.to(resolve_device(args.device)).eval()
    pyro.set_rng_seed(args.seed)
    return vae, config, writable_dir(args.out or run_dir / "explore")


def held_out_images(vae, config, args, n=None):
    """(the test split as the run was evaluated, n of its images evenly spread on the model's device)."""
    from .data import spread

    data = evaluation_data(vae, config, args.dataset, "test", args.data_dir)
    device = next(vae.parameters()).device
    return data, spread(data.images, n).to(device)


def sample_main(argv: list[str]) -> None:
    from . import plots

    parser = run_parser("sample", "Images decoded from latents drawn from the prior.")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="scale of z about the prior mean")
    args = parser.parse_args(argv)
    vae, _, out = explore_setup(args, "n")
    if not args.temperature > 0:
        raise PyvaeError(f"--temperature must be a positive number; got {args.temperature}")
    plots.save_grid(vae.sample(args.n, args.temperature), vae.image_shape, out / "samples.png", nrow=_side(args.n))
    print(f"wrote {out}/samples.png")


def reconstruct_main(argv: list[str]) -> None:
    from . import plots

    parser = run_parser("reconstruct", "Test images, each row above its reconstructions.")
    parser.add_argument("--n", type=int, default=32, help="images (rows of 8)")
    args = parser.parse_args(argv)
    vae, config, out = explore_setup(args, "n")
    _, x = held_out_images(vae, config, args)
    plots.reconstructions(vae, x, out / "reconstructions.png", per_row=8, rows=max(1, args.n // 8))
    print(f"wrote {out}/reconstructions.png")


def interpolate_main(argv: list[str]) -> None:
    from . import plots
    from .explore import interpolations

    parser = run_parser("interpolate", "Decoded paths between test images, linear and spherical in z.")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    vae, config, out = explore_setup(args, "pairs", "steps")
    _, x = held_out_images(vae, config, args, 2 * args.pairs)
    x_from, x_to = x[0::2], x[1::2]
    for kind in ("linear", "spherical"):
        images = interpolations(vae, x_from, x_to, args.steps, spherical=kind == "spherical")
        plots.save_grid(images, vae.image_shape, out / f"interpolate_{kind}.png", nrow=args.steps)
    print(f"wrote {out}/interpolate_linear.png, interpolate_spherical.png")


def traverse_main(argv: list[str]) -> None:
    import torch

    from . import plots
    from .diagnostics import kl_per_dimension
    from .explore import manifold, traversal

    parser = run_parser("traverse", "Each latent dimension swept over the prior's quantiles, by KL.")
    parser.add_argument("--dims", type=int, default=10, help="how many dimensions, largest KL first")
    parser.add_argument("--steps", type=int, default=9)
    args = parser.parse_args(argv)
    vae, config, out = explore_setup(args, "dims", "steps")
    _, x = held_out_images(vae, config, args, 1000)
    kl = kl_per_dimension(vae, x)
    if kl is None:  # no factorized marginals: rank by how much the latent means vary instead
        kl = vae.latent_mean(x).var(0).cpu()
    order = torch.argsort(kl, descending=True)[: args.dims].tolist()
    plots.save_grid(traversal(vae, order, args.steps), vae.image_shape, out / "traverse.png", nrow=args.steps)
    print(f"wrote {out}/traverse.png (rows: dimensions {order})")
    if vae.z_dim == 2:
        plots.save_grid(manifold(vae), vae.image_shape, out / "manifold.png", nrow=15)
        print(f"wrote {out}/manifold.png")


def embed_main(argv: list[str]) -> None:
    import json

    from . import plots
    from .checkpoint import atomic_write
    from .explore import embedding_2d, linear_probe

    parser = run_parser("embed", "Latent means of the test set: a scatter, a linear probe, k-means purity.")
    parser.add_argument("--num-points", type=int, help="test images, evenly spread (default all)")
    args = parser.parse_args(argv)
    vae, config, out = explore_setup(args)
    data, _ = held_out_images(vae, config, args)
    if data.labels is None:
        raise PyvaeError(f"the {data.name} test split has no labels; pass --dataset with a labelled set")
    from .data import spread

    x, labels = spread(data.images, args.num_points), spread(data.labels, args.num_points)
    z = vae.latent_mean(x.to(next(vae.parameters()).device)).cpu().numpy()
    result = linear_probe(z, labels.numpy(), seed=args.seed)
    points, axis_name = embedding_2d(z)
    plots.embedding(points, labels.numpy(), axis_name, out / "embedding.png")
    atomic_write(out / "embed.json", lambda f: f.write(json.dumps({"dataset": data.name, **result}, indent=2).encode()))
    print(
        f"{data.name} test, {result['num_points']} points: linear probe accuracy {result['probe_accuracy']:.3f} "
        f"(majority class {result['majority_baseline']:.3f}); k-means purity {result['kmeans_purity']:.3f}"
    )
    print(f"wrote {out}/embedding.png, embed.json")


def anomaly_main(argv: list[str]) -> None:
    import json

    from . import plots
    from .checkpoint import atomic_write
    from .explore import anomaly_auc
    from .importance import log_likelihood

    parser = run_parser("anomaly", "log p(x) as an anomaly score: ROC AUC of test images against another set.")
    parser.add_argument("--ood", required=True, help="the out-of-distribution data set, e.g. fashion_mnist")
    parser.add_argument("--num-samples", type=int, default=100, help="K importance samples per image")
    parser.add_argument("--num-points", type=int, default=1000, help="images of each set, evenly spread")
    args = parser.parse_args(argv)
    vae, config, out = explore_setup(args, "num_samples", "num_points")
    data, x_in = held_out_images(vae, config, args, args.num_points)
    ood_args = argparse.Namespace(**{**vars(args), "dataset": args.ood})
    ood, x_ood = held_out_images(vae, config, ood_args, args.num_points)
    if x_ood.shape[1] != vae.x_dim:
        raise PyvaeError(f"{args.ood} images have {x_ood.shape[1]} pixels; the model expects {vae.x_dim}")
    ll_in = log_likelihood(vae, x_in, args.num_samples).log_px
    ll_ood = log_likelihood(vae, x_ood, args.num_samples).log_px
    auc = anomaly_auc(ll_in, ll_ood)
    result = {
        "in_distribution": data.name,
        "out_of_distribution": ood.name,
        "num_points": len(x_in),
        "num_samples": args.num_samples,
        "roc_auc": auc,
        "log_px_in": float(ll_in.mean()),
        "log_px_ood": float(ll_ood.mean()),
    }
    plots.anomaly_histogram(ll_in, ll_ood, (data.name, ood.name), auc, out / "anomaly_hist.png")
    atomic_write(out / "anomaly.json", lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(f"ROC AUC of -log p(x), {data.name} (in) vs {ood.name} (out): {auc:.3f}")
    print(f"  mean log p(x): in {result['log_px_in']:.2f}, out {result['log_px_ood']:.2f} nats")
    if auc < 0.5:
        print(
            "  caveat: the out-of-distribution images got *higher* likelihood on average. This is a known "
            "failure of likelihood-based detection (Nalisnick et al. 2019): simple images score high under "
            "any density model, whatever it was trained on."
        )
    print(f"wrote {out}/anomaly_hist.png, anomaly.json")


def _side(n: int) -> int:
    return max(1, round(n**0.5))


COMMANDS = {
    "evaluate": evaluate_main,
    "sample": sample_main,
    "reconstruct": reconstruct_main,
    "interpolate": interpolate_main,
    "traverse": traverse_main,
    "embed": embed_main,
    "anomaly": anomaly_main,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        given = repr(argv[0]) if argv else "nothing"
        print(f"usage: python -m pyvae {{{','.join(COMMANDS)}}} ...; got {given}", file=sys.stderr)
        sys.exit(2)
    run(COMMANDS[argv[0]], argv[1:])
