"""What the commands on a trained run share: its model and configuration from a run folder or
checkpoint file, the data it is scored on, and where the outputs go."""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import torch

from pyvae import distributed
from pyvae.cli.config import read_yaml
from pyvae.cli.console import writable_dir
from pyvae.cli.names import CHECKPOINTS
from pyvae.data.batching import resolve_device
from pyvae.data.datasets import evaluation_split, load_dataset, resolve_binarize, spread
from pyvae.errors import PyvaeError
from pyvae.parts.likelihoods import LIKELIHOODS
from pyvae.program import batch_arity
from pyvae.runs import load, read
from pyvae.runs.user_code import custom_parts, rebuild_user_model
from pyvae.train.protocol import LABELS


def load_run(path: str | Path, which: str | None = None, parts: str | None = None):
    """(vae, config dict or None, the checkpoint file loaded) from a run folder or a checkpoint
    file.

    In a run folder ``which`` picks ``best`` (``best.pt``, the epoch with the best validation
    objective) or ``last`` (``checkpoint.pt``); None takes best.pt when there is one. Which file
    was loaded is said on stdout (by rank 0 under torchrun).
    """
    checkpoint = checkpoint_file(Path(path), which)
    config_path = checkpoint.parent / "config.yaml"
    config = read_yaml(config_path, "run config") if config_path.is_file() else None
    if config is not None and not isinstance(config, dict):
        raise PyvaeError(
            f"run config {config_path} must be a mapping of keys to values; "
            f"got {type(config).__name__}"
        )
    payload = read(checkpoint)
    model = checkpoint_model(checkpoint, payload, parts)
    if os.environ.get("RANK", "0") == "0":
        print(f"checkpoint: {describe_checkpoint(checkpoint, payload)}")
    return model, config, checkpoint


def checkpoint_model(checkpoint: Path, payload: dict, parts: str | None = None):
    """The model of a checkpoint file (``payload``: its contents, read): a class of the user's own
    is imported again from the file it recorded, which must be there and unchanged; a built-in
    model is rebuilt from the checkpoint, with its custom parts from ``parts`` (--parts FILE.py)."""
    record = payload.get("user_model")
    if isinstance(record, dict):
        return load(checkpoint, model=rebuild_user_model(record, str(checkpoint)))
    return load(checkpoint, **custom_parts(payload.get("config") or {}, parts, str(checkpoint)))


def checkpoint_file(path: Path, which: str | None = None) -> Path:
    """The checkpoint file of a run folder ``path`` (see :func:`load_run`), or ``path`` itself
    when it is a file."""
    if which not in (None, *CHECKPOINTS):
        raise PyvaeError(f"unknown checkpoint {which!r}; choose from {', '.join(CHECKPOINTS)}")
    neither = f"{path} is neither a run folder with checkpoint.pt nor a checkpoint file"
    if not path.is_dir():
        if not path.is_file():
            raise PyvaeError(neither)
        if which is not None:
            raise PyvaeError(
                f"--checkpoint {which} picks a file of a run folder; {path} is a checkpoint "
                "file already"
            )
        return path
    best, last = path / "best.pt", path / "checkpoint.pt"
    if not last.is_file():
        raise PyvaeError(neither)
    if which == "best" and not best.is_file():
        raise PyvaeError(
            f"{path} has no best.pt (it was trained without validation data); use --checkpoint last"
        )
    return best if which != "last" and best.is_file() else last


def describe_checkpoint(path: Path, payload: dict | None = None) -> str:
    """``RUN/best.pt (epoch 37 of 50: the best validation ELBO, -88.123)`` or
    ``RUN/checkpoint.pt (epoch 50, the last)``; ``payload``: the checkpoint already read, if the
    caller has it."""
    payload = payload if payload is not None else read(path)
    epoch, history = payload.get("epoch"), payload.get("history")
    objective = payload.get("objective")
    if isinstance(objective, dict) and len(objective) == 1:
        ((key, value),) = objective.items()
        return f"{path} (epoch {epoch}: the best validation {LABELS.get(key, key)}, {value:.3f})"
    if epoch is not None and history is not None:
        return f"{path} (epoch {epoch}, the last)"
    return str(path)


def last_suffix(checkpoint: Path) -> str:
    """``-last`` in the default output folder's name when the last epoch's checkpoint of a run
    that keeps a best.pt too was loaded (``--checkpoint last``, RUN/checkpoint.pt,
    ``--eval-checkpoint last``), so that it does not overwrite the evaluation of best.pt."""
    keeps_best = checkpoint.name == "checkpoint.pt" and (checkpoint.parent / "best.pt").is_file()
    return "-last" if keeps_best else ""


def evaluation_data(vae, config, dataset, split, data_dir, download=True):
    """(the split a run is evaluated on, binarized as it was trained, how: ``static``, ``none`` or
    ``dynamic``, the last evaluated as one fixed draw)."""
    config = config or {}
    dataset = dataset or config.get("dataset")
    if dataset is None:
        raise PyvaeError(
            "no config.yaml beside the checkpoint says which data set it was trained on; "
            "pass --dataset"
        )
    own = dataset == config.get("dataset")
    data = load_dataset(
        dataset,
        split,
        data_dir=data_dir or config.get("data_dir"),
        download=download and config.get("download", True),
        **(data_options(config) if own else {}),
    )
    # another data set than the run's is binarized as the likelihood needs, not as the run's was
    mode = resolve_binarize(
        likelihood_of(vae, config), data, config.get("binarize", "auto") if own else "auto"
    )
    return evaluation_split(data, mode, config.get("seed", 0)), mode


def likelihood_of(vae, config: dict):
    """The model's likelihood; for a class of the user's own without one, the run's --likelihood
    (bernoulli by default), which decided how its data were binarized."""
    if hasattr(vae, "likelihood"):
        return vae.likelihood
    return LIKELIHOODS.resolve(config.get("likelihood", "bernoulli"))


def data_options(config: dict) -> dict:
    """How a PATH data set is split and sized, as a run's configuration recorded it."""
    return {
        "test_fraction": config.get("test_fraction", 0.1),
        "image_size": config.get("image_size"),
    }


def scored(model, data):
    """What a model is scored on: x alone, or (x, y) for a model that needs labels (cvae: log
    p(x | y)); a model that sums the labels itself (m2) scores the images as unlabelled."""
    if needs_labels(model):
        if data.labels is None:
            raise PyvaeError(
                f"{type(model).__name__} scores labelled images; the {data.name} {data.split} "
                "split has no labels"
            )
        return data.images, data.labels
    return unlabelled(model, data.images)


def needs_labels(model) -> bool:
    """A model whose batches are (x, y) and that has no classifier of its own to sum y with."""
    return batch_arity(model) == 2 and not hasattr(model, "classify")


def unlabelled(model, x):
    """Images as a model scores them without labels: x, or (x, -1) for a model with a classifier,
    which sums the classes; a model that needs labels cannot."""
    if batch_arity(model) == 1:
        return x
    if needs_labels(model):
        raise PyvaeError(
            f"{type(model).__name__} scores labelled images only; anomaly scores need p(x) "
            "without labels"
        )
    return x, torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)


def check_positive(args, *names: str, optional: bool = False) -> None:
    """Each named flag must be a positive integer (or, with ``optional``, not given)."""
    for name in names:
        value = getattr(args, name)
        if (value is None and not optional) or (value is not None and value < 1):
            raise PyvaeError(f"--{name.replace('_', '-')} must be a positive integer; got {value}")


def ais_settings(args) -> dict:
    """The keyword arguments of :func:`pyvae.ais.ais_log_likelihood` the flags ask for."""
    check_positive(args, "num_steps", "num_chains", "leapfrog_steps")
    return {
        "num_steps": args.num_steps,
        "num_chains": args.num_chains,
        "leapfrog_steps": args.leapfrog_steps,
        "schedule": args.schedule,
        "start": args.ais_start,
        "compile": args.compile == "on",
    }


def scored_run(args, split: str, num_points: int | None):
    """What evaluate, bdmc and gap start from: (world, device, the run's model on it, its
    checkpoint file, the data set, its ``num_points`` scored points evenly spread, on the device:
    x or (x, y))."""
    world, device = distributed.init(resolve_device(args.device))
    vae, config, checkpoint = load_run(args.run, args.checkpoint, args.parts)
    vae.to(device)
    data, _ = evaluation_data(vae, config, args.dataset, split, args.data_dir, not args.no_download)
    x = scored(vae, data)
    x = (
        tuple(spread(t, num_points).to(device) for t in x)
        if isinstance(x, tuple)
        else spread(x, num_points).to(device)
    )
    return world, device, vae, checkpoint, data, x


def explore_setup(args, *positive: str):
    """(vae on its device, config, output folder) for an exploration command; checks the
    ``positive`` flags."""
    check_positive(args, *positive)
    vae, config, checkpoint = load_run(args.run, args.checkpoint, args.parts)
    vae.to(resolve_device(args.device)).eval()
    pyro.set_rng_seed(args.seed)
    out = args.out or checkpoint.parent / f"explore{last_suffix(checkpoint)}"
    return vae, config, writable_dir(out)


def held_out_images(vae, config, args, n=None, dataset=None):
    """(the test split of ``dataset`` (default: the run's) as the run was evaluated, n of its
    images evenly spread on the model's device, how it was binarized: see
    :func:`evaluation_data`)."""
    data, mode = evaluation_data(
        vae, config, dataset or args.dataset, "test", args.data_dir, not args.no_download
    )
    device = next(vae.parameters()).device
    return data, spread(data.images, n).to(device), mode
