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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


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
    mode = resolve_binarize(vae.likelihood, data, config.get("binarize", "auto"))
    return evaluation_split(data, mode, config.get("seed", 0))


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def evaluate_main(argv: list[str]) -> None:
    import pyro

    from .data import spread
    from .diagnostics import evaluate

    parser = Parser(prog="python -m pyvae evaluate", description="Importance-sampled log p(x) and guide diagnostics of a trained run.")
    parser.add_argument("run", help="run folder (with checkpoint.pt and config.yaml) or checkpoint file")
    parser.add_argument("--dataset", help="data set (default: the run's)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-samples", type=int, default=5000, help="K importance samples per point")
    parser.add_argument("--batch-size", type=int, help="data points per chunk (default: chosen to bound memory)")
    parser.add_argument("--num-points", type=int, help="evaluate this many points, evenly spread over the split")
    parser.add_argument("--data-dir")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="output folder (default RUN/eval-<dataset>-<split>-K<K>)")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    for name in ("num_samples", "batch_size", "num_points"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise PyvaeError(f"--{name.replace('_', '-')} must be a positive integer; got {value}")

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


COMMANDS = {"evaluate": evaluate_main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        given = repr(argv[0]) if argv else "nothing"
        print(f"usage: python -m pyvae {{{','.join(COMMANDS)}}} ...; got {given}", file=sys.stderr)
        sys.exit(2)
    run(COMMANDS[argv[0]], argv[1:])
