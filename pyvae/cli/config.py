"""Run configuration: defaults, then a YAML file (``--config``), then command-line flags.

Every key is a field of :class:`TrainConfig`, whose metadata is the one description of its flag
(``help``, ``choices``, bounds): ``train --help`` and :func:`pyvae.cli.flags.markdown_table` read
it. An unknown key, a value of the wrong type or outside its allowed range is a
:class:`~pyvae.errors.PyvaeError` naming the key, the value and what is allowed. This module is
light (no torch): the checks that need the registries are :func:`pyvae.cli.train.configure`'s.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from pyvae.cli import names
from pyvae.cli.console import writable_dir
from pyvae.errors import PyvaeError

MODEL_HELP = (
    "vae, hvae, cvae or m2 (in YAML also {name: hvae, z_dims: [100, 50], ...}), or "
    "FILE.py:Class, a model class of your own: a torch.nn.Module with Pyro methods "
    "model and guide (in YAML {file: FILE.py, class: Class, args: {z_dim: 10}}); every "
    "command that follows the run imports that file again, and refuses it once changed"
)
DATASET_HELP = (
    f"{', '.join(names.DATASETS)}, any image set of torchvision.datasets by name (celeba, stl10, "
    "...), or the path of an image folder, .npz or .npy"
)


def _meta(help: str, **checks) -> dict:
    return {"help": help, **checks}


def _part(kind: str, default: str, density: str, example: str):
    """The field of a registry part: a built-in name, or in YAML a mapping with its settings."""
    choices = {"prior": names.PRIORS, "likelihood": names.LIKELIHOODS, "guide": names.GUIDES}
    help = f"the {kind} {density}: a name, or in YAML a mapping such as {example}"
    return field(default=default, metadata=_meta(help, registry=kind, choices=choices[kind]))


@dataclass
class TrainConfig:
    """Everything a training run needs; ``config.yaml`` in a run folder is one of these."""

    # data
    dataset: str = field(default="binarized_mnist", metadata=_meta(DATASET_HELP, dataset=True))
    test_fraction: float = field(
        default=0.1,
        metadata=_meta(
            "a PATH or torchvision data set without a test split: hold out this fraction as test",
            open_unit=True,
        ),
    )
    image_size: int | None = field(
        default=None,
        metadata=_meta(
            "a PATH image data set or a torchvision one read image by image: resize the shorter "
            "side to S and centre-crop S x S (default: the images' own size)",
            min=1,
        ),
    )
    data_dir: str | None = field(
        default=None, metadata=_meta("data root (default: $PYVAE_DATA, else ./data)")
    )
    strict_data: bool = field(
        default=False, metadata=_meta("fail instead of falling back to digits")
    )
    download: bool = field(default=True, metadata=_meta("download missing data files"))
    binarize: str = field(
        default="auto",
        metadata=_meta(
            "auto: dynamic where the likelihood needs 0/1 data and the images are grey, else "
            "none; static: one fixed Bernoulli draw of the grey levels; dynamic: a fresh draw "
            "every epoch (tests: one fixed draw); none: the grey levels as they are",
            choices=("auto", *names.BINARIZE_MODES),
        ),
    )
    valid_fraction: float | None = field(
        default=None,
        metadata=_meta(
            "hold out this fraction of the training set for validation (default: the data set's "
            "valid split, if any)",
            open_unit=True,
        ),
    )
    # model
    model: str | dict = field(default="vae", metadata=_meta(MODEL_HELP, models=True))
    num_labels: int | None = field(
        default=None,
        metadata=_meta(
            "semi-supervised models (m2, a class of your own with model(xs, ys=None)): labelled "
            "training points, class-balanced; the rest unlabelled (default: every label)",
            min=1,
        ),
    )
    labelled_share: float | None = field(
        default=None,
        metadata=_meta(
            "semi-supervised data: the labelled part of every minibatch, served as its own "
            "call, each part scaled to its group (default: their share of the data)",
            open_unit=True,
        ),
    )
    z_dim: int = field(
        default=50, metadata=_meta("dimensions of the latent z (vae, cvae, m2)", min=1)
    )
    hidden: list[int] = field(
        default_factory=lambda: [512],
        metadata=_meta("widths of the hidden layers of encoder and decoder (vae, cvae, m2)", min=1),
    )
    activation: str = field(
        default="relu",
        metadata=_meta("nonlinearity of the MLP layers", choices=names.ACTIVATIONS),
    )
    net: str = field(
        default="mlp",
        metadata=_meta(
            "encoder and decoder: mlp, conv (a small DCGAN-style pair) or resnet",
            choices=names.NETS,
        ),
    )
    prior: str | dict = _part("prior", "normal", "p(z)", "{name: vamp, num_components: 100}")
    likelihood: str | dict = _part(
        "likelihood", "bernoulli", "p(x | z)", "{name: normal, scale: 0.1}"
    )
    guide: str | dict = _part("guide", "normal", "q(z | x)", "{name: lowrank, rank: 2}")
    # inference
    elbo: str = field(
        default="auto",
        metadata=_meta(
            "auto: the analytic KL (meanfield) where it is exact and torch has it, enum for "
            "enumerated guide sites (m2), else trace",
            choices=names.ELBOS,
        ),
    )
    num_particles: int = field(
        default=1, metadata=_meta("samples of z per point (K for iwae)", min=1)
    )
    beta: float = field(
        default=1.0, metadata=_meta("weight of the KL term (beta-VAE)", positive=True)
    )
    kl_warmup_epochs: int = field(
        default=0, metadata=_meta("epochs of linear KL warm-up from 0 to beta", min=0)
    )
    clip_norm: float | None = field(
        default=None,
        metadata=_meta(
            "clip the gradient's total norm to this (default: no clipping)", positive=True
        ),
    )
    compile: str = field(
        default="auto",
        metadata=_meta(
            "run each step's loss and gradients (and the test log-likelihood's chunks) as one "
            "graph recorded from the program and compiled: auto (when the run is long enough to "
            "repay it and it measures faster), on, off",
            choices=names.COMPILE,
        ),
    )
    epochs: int = field(default=10, metadata=_meta("passes over the training set", min=1))
    batch_size: int = field(default=128, metadata=_meta("data points per SVI step", min=1))
    lr: float = field(default=2e-3, metadata=_meta("Adam's learning rate", positive=True))
    lr_schedule: str = field(
        default="cosine",
        metadata=_meta(
            "none; iwae: Burda et al.'s 3^i-epoch stages at lr*10^(-i/7); plateau: halve on a "
            "stalled validation objective; cosine over the epochs",
            choices=names.LR_SCHEDULES,
        ),
    )
    patience: int | None = field(
        default=None,
        metadata=_meta(
            "stop when the validation objective has not improved for this many epochs "
            "(default: never stop early)",
            min=1,
        ),
    )
    valid_samples: int = field(
        default=0,
        metadata=_meta(
            "K: also the validation log p(x) by importance sampling (1000 points at most), then "
            "the objective; 0 skips it",
            min=0,
        ),
    )
    device: str = field(
        default="auto",
        metadata=_meta("where to train (auto: CUDA when available)", choices=names.DEVICES),
    )
    seed: int = field(
        default=0, metadata=_meta("seeds the weights, the data's order and every draw", min=0)
    )
    # evaluation after training
    eval_samples: int = field(
        default=1000,
        metadata=_meta("K for the test log-likelihood at the end; 0 skips it", min=0),
    )
    eval_points: int = field(
        default=1000, metadata=_meta("test points for it, evenly spread; 0 means all", min=0)
    )
    eval_checkpoint: str = field(
        default="best",
        metadata=_meta(
            "evaluate best.pt (the best validation epoch; last when there is none) or the last "
            "epoch",
            choices=names.CHECKPOINTS,
        ),
    )
    # output
    tensorboard: bool = field(
        default=False,
        metadata=_meta(
            "write TensorBoard events into RUN/tensorboard (tensorboard --logdir runs/)"
        ),
    )
    track: str = field(
        default="none",
        metadata=_meta(
            "also log the run's settings, metrics and outputs to an experiment tracker "
            "(mlflow: into $MLFLOW_TRACKING_URI, else RUN/mlruns; pip install 'pyvae[mlflow]')",
            choices=names.TRACKERS,
        ),
    )
    resume: str | None = field(
        default=None,
        metadata=_meta(
            "continue the run in this folder from its checkpoint, exactly: after its last "
            "completed epoch, or inside the epoch where a signal (Ctrl-C, SIGTERM) stopped it"
        ),
    )
    out: str | None = field(
        default=None, metadata=_meta("run folder (default: runs/<dataset>-<timestamp>)")
    )

    def validate(self) -> TrainConfig:
        """Each value's type, range and choices; the values :func:`pyvae.cli.train.configure`
        resolves (data set, model, parts) only as far as their metadata allows here."""
        for f in dataclasses.fields(self):
            check(f, getattr(self, f.name))
        return self

    def output_dir(self, name: str) -> Path:
        """The run folder (``name``: the data set's, for the default), checked to be writable but
        not made yet (training makes it once its input is checked)."""
        return writable_dir(self.out or f"runs/{name}-{datetime.now():%Y%m%d-%H%M%S}", create=False)

    def to_yaml(self) -> str:
        """YAML that reruns this configuration (``out`` left empty so a rerun gets a new folder)."""
        values = dataclasses.asdict(self)
        values["out"] = None
        values["resume"] = None
        return yaml.safe_dump(values, sort_keys=False)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)


def default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def check(f: dataclasses.Field, value) -> None:
    """A one-line error unless ``value`` suits field ``f``: a registry part may be a mapping, the
    data set and the model are resolved by training (their strings pass here)."""
    kind, meta = HINTS[f.name], f.metadata
    bad = PyvaeError(f"invalid value {value!r} for {f.name!r}; allowed: {allowed(f)}")
    if value is None:
        if type(None) not in typing.get_args(kind):
            raise bad
        return
    if "registry" in meta or "models" in meta or "dataset" in meta:
        if not isinstance(value, str | dict):
            raise bad
        return
    base = base_type(kind)
    if typing.get_origin(base) is list:
        if not isinstance(value, list) or not all(_is_int(v) for v in value):
            raise bad
        if any(v < meta.get("min", -math.inf) for v in value):
            raise bad
    elif base is bool:
        if not isinstance(value, bool):
            raise bad
    elif base is int:
        if not _is_int(value) or value < meta.get("min", -math.inf):
            raise bad
    elif base is float:
        if not _in_range(value, meta):
            raise bad
    elif not isinstance(value, str) or ("choices" in meta and value not in meta["choices"]):
        raise bad


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_range(value, meta) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    if (meta.get("positive") and value <= 0) or value < meta.get("min", -math.inf):
        return False
    return not meta.get("open_unit") or 0 < value < 1


def base_type(kind):
    """``T`` for ``T | None``; ``kind`` itself otherwise."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def allowed(f: dataclasses.Field) -> str:
    """What field ``f`` allows, in words."""
    kind, meta = HINTS[f.name], f.metadata
    if "dataset" in meta:
        return (
            f"{', '.join(names.DATASETS)}, a torchvision data set by name (celeba, stl10, ...), "
            "or the path of an existing image folder, .npz or .npy"
        )
    if "models" in meta:
        return ", ".join([*names.MODELS, "FILE.py:Class"])
    if "choices" in meta:
        return ", ".join(meta["choices"])
    base = base_type(kind)
    if typing.get_origin(base) is list:
        return "a list of positive integers"
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[base]
    if "min" in meta:
        words += f" >= {meta['min']}"
    if meta.get("positive"):
        words = "a positive number"
    if meta.get("open_unit"):
        words = "a number in (0, 1)"
    return words + (" or null" if type(None) in typing.get_args(kind) else "")


def read_yaml(path: Path, what: str):
    """The YAML document in ``path``; an unreadable file or invalid YAML is a one-line error."""
    try:
        return yaml.safe_load(path.read_text())
    except OSError as e:
        raise PyvaeError(f"cannot read {what} {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise PyvaeError(f"{what} {path} is not UTF-8 text: {e.reason} at byte {e.start}") from e
    except yaml.YAMLError as e:
        raise PyvaeError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from e


def from_yaml(path: str | Path) -> dict:
    """The keys of a YAML config file, checked against :class:`TrainConfig`'s fields."""
    path = Path(path)
    values = read_yaml(path, "config")
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise PyvaeError(
            f"config {path} must be a mapping of keys to values; got {type(values).__name__}"
        )
    for key, value in values.items():
        if key not in FIELDS:
            raise PyvaeError(f"unknown config key {key!r} in {path}; allowed: {', '.join(FIELDS)}")
        if HINTS[key] is float and isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                values[key] = float(value)
            except ValueError:
                pass
    return values
