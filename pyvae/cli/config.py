"""Run configuration: defaults, then a YAML file (``--config``), then command-line flags.

Every key is a field of :class:`TrainConfig`; an unknown key, a value of the wrong
type or outside its allowed range is a :class:`~pyvae.errors.PyvaeError` naming the
key, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from pyvae.cli.console import Parser, writable_dir
from pyvae.data.batching import DEVICES
from pyvae.data.datasets import BINARIZE_MODES, SPLITS, torchvision_class
from pyvae.data.sources import is_path
from pyvae.errors import PyvaeError
from pyvae.parts.guides import GUIDES
from pyvae.parts.likelihoods import LIKELIHOODS
from pyvae.parts.nets import MLP_ACTIVATIONS, NETS
from pyvae.parts.priors import PRIORS
from pyvae.runs.user_code import is_model_file, model_file_spec, plain
from pyvae.train.objectives import ELBO_CHOICES
from pyvae.train.protocol import SCHEDULES

MODEL_HELP = (
    "vae, hvae, cvae or m2 (in YAML also {name: hvae, z_dims: [100, 50], ...}), or "
    "FILE.py:Class, a model class of your own: a torch.nn.Module with Pyro methods "
    "model and guide (in YAML {file: FILE.py, class: Class, args: {z_dim: 10}}); every "
    "command that follows the run imports that file again, and refuses it once changed"
)


def _choices(*values) -> dict:
    return {"choices": tuple(values)}


@dataclass
class TrainConfig:
    """Everything a training run needs; ``config.yaml`` in a run folder is one of these."""

    # data
    dataset: str = field(
        default="binarized_mnist",
        metadata={
            "dataset": True,
            "help": f"{', '.join(SPLITS)}, any image set of torchvision.datasets by name (celeba, stl10, ...), or the path of an image folder, .npz or .npy",
        },
    )
    test_fraction: float = field(
        default=0.1,
        metadata={
            "open_unit": True,
            "help": "a PATH or torchvision data set without a test split: hold out this fraction as test",
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "min": 1,
            "help": "a PATH image data set or a torchvision one read image by image: resize the shorter side to S and centre-crop S x S",
        },
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "data root (else $PYVAE_DATA, else ./data)"}
    )
    strict_data: bool = field(
        default=False, metadata={"help": "fail instead of falling back to digits"}
    )
    download: bool = field(default=True, metadata={"help": "download missing data files"})
    binarize: str = field(default="auto", metadata=_choices("auto", *BINARIZE_MODES))
    valid_fraction: float | None = field(
        default=None,
        metadata={
            "open_unit": True,
            "help": "hold out this fraction of the training set for validation (default: the data set's valid split, if any)",
        },
    )
    # model
    model: str | dict = field(default="vae", metadata={"models": True, "help": MODEL_HELP})
    num_labels: int | None = field(
        default=None,
        metadata={
            "min": 1,
            "help": "m2: labelled training points, class-balanced; the rest unlabelled",
        },
    )
    labelled_share: float | None = field(
        default=None,
        metadata={
            "open_unit": True,
            "help": "semi-supervised data: the labelled part of every minibatch, served as its own "
            "call, each part scaled to its group (default: their share of the data)",
        },
    )
    z_dim: int = field(default=50, metadata={"min": 1})
    hidden: list[int] = field(default_factory=lambda: [512], metadata={"min": 1})
    activation: str = field(default="relu", metadata=_choices(*MLP_ACTIVATIONS))
    net: str = field(default="mlp", metadata=_choices(*NETS))
    # a name, or in YAML a mapping such as {name: vamp, num_components: 100}
    prior: str | dict = field(default="normal", metadata={"registry": PRIORS})
    likelihood: str | dict = field(default="bernoulli", metadata={"registry": LIKELIHOODS})
    guide: str | dict = field(default="normal", metadata={"registry": GUIDES})
    # inference
    elbo: str = field(
        default="auto",
        metadata={
            **_choices(*ELBO_CHOICES),
            "help": "auto: the analytic KL (meanfield) where it is exact and torch has it, enum for enumerated guide sites (m2), else trace",
        },
    )
    num_particles: int = field(
        default=1, metadata={"min": 1, "help": "samples of z per point (K for iwae)"}
    )
    beta: float = field(
        default=1.0, metadata={"positive": True, "help": "weight of the KL term (beta-VAE)"}
    )
    kl_warmup_epochs: int = field(
        default=0, metadata={"min": 0, "help": "epochs of linear KL warm-up from 0 to beta"}
    )
    clip_norm: float | None = field(
        default=None, metadata={"positive": True, "help": "clip the gradient's total norm"}
    )
    epochs: int = field(default=10, metadata={"min": 1})
    batch_size: int = field(default=128, metadata={"min": 1})
    lr: float = field(default=2e-3, metadata={"positive": True})
    lr_schedule: str = field(
        default="cosine",
        metadata={
            **_choices(*SCHEDULES),
            "help": "none; iwae: Burda et al.'s 3^i-epoch stages at lr*10^(-i/7); plateau: halve on a stalled validation objective; cosine over the epochs",
        },
    )
    patience: int | None = field(
        default=None,
        metadata={
            "min": 1,
            "help": "stop when the validation objective has not improved for this many epochs",
        },
    )
    valid_samples: int = field(
        default=0,
        metadata={
            "min": 0,
            "help": "K: also the validation log p(x) by importance sampling (1000 points at most), then the objective; 0 skips it",
        },
    )
    device: str = field(default="auto", metadata=_choices(*DEVICES))
    seed: int = field(default=0, metadata={"min": 0})
    # evaluation after training
    eval_samples: int = field(
        default=1000,
        metadata={"min": 0, "help": "K for the test log-likelihood at the end; 0 skips it"},
    )
    eval_points: int = field(
        default=1000, metadata={"min": 0, "help": "test points for it, evenly spread; 0 means all"}
    )
    eval_checkpoint: str = field(
        default="best",
        metadata={
            **_choices("best", "last"),
            "help": "evaluate best.pt (the best validation epoch; last when there is none) or the last epoch",
        },
    )
    # output
    tensorboard: bool = field(
        default=False,
        metadata={
            "help": "write TensorBoard events into RUN/tensorboard (tensorboard --logdir runs/)"
        },
    )
    resume: str | None = field(
        default=None,
        metadata={"help": "continue the run in this folder after its last completed epoch"},
    )
    out: str | None = field(
        default=None, metadata={"help": "run folder (default runs/<dataset>-<timestamp>)"}
    )

    def validate(self) -> TrainConfig:
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name))
        return self

    def output_dir(self) -> Path:
        """The run folder, checked to be writable but not made yet (training makes it once its
        input is checked); an unusable path is a clear error."""
        name = Path(self.dataset).stem if is_path(self.dataset) else self.dataset
        return writable_dir(self.out or f"runs/{name}-{datetime.now():%Y%m%d-%H%M%S}", create=False)

    def to_yaml(self) -> str:
        """YAML that reruns this configuration (``out`` left empty so a rerun gets a new folder)."""
        values = dataclasses.asdict(self)
        values["out"] = None
        values["resume"] = None
        return yaml.safe_dump(values, sort_keys=False)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check(f: dataclasses.Field, value) -> None:
    kind = typing.get_type_hints(TrainConfig)[f.name]
    meta = f.metadata
    allowed = _describe(kind, meta)
    bad = PyvaeError(f"invalid value {value!r} for {f.name!r}; allowed: {allowed}")
    if value is None:
        if type(None) not in typing.get_args(kind):
            raise bad
        return
    if "registry" in meta:
        try:
            meta["registry"].resolve(value)
        except PyvaeError as e:
            raise PyvaeError(f"invalid value {value!r} for {f.name!r}: {e}") from None
        return
    if "dataset" in meta:
        if not isinstance(value, str) or (
            value not in SPLITS
            and not (is_path(value) and Path(value).expanduser().exists())
            and torchvision_class(value) is None
        ):
            raise bad
        return
    if "models" in meta:
        from pyvae.models import MODELS

        if is_model_file(value):  # a class of the user's own: its file is imported by training
            model_file_spec(value)
            return
        name = value.get("name") if isinstance(value, dict) else value
        if name not in MODELS:
            raise PyvaeError(
                f"invalid value {value!r} for 'model'; allowed: {', '.join(MODELS)} "
                "(in YAML a mapping with 'name'), or FILE.py:Class (in YAML a "
                "mapping with 'file' and 'class')"
            )
        return
    base = _base(kind)
    if typing.get_origin(base) is list:
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise bad
        if any(v < meta.get("min", -math.inf) for v in value):
            raise bad
        return
    if base is bool:
        if not isinstance(value, bool):
            raise bad
    elif base is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < meta.get("min", -math.inf)
        ):
            raise bad
    elif base is float:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
        ):
            raise bad
        if (meta.get("positive") and value <= 0) or value < meta.get("min", -math.inf):
            raise bad
        if meta.get("open_unit") and not 0 < value < 1:
            raise bad
    elif base is str:
        if not isinstance(value, str) or ("choices" in meta and value not in meta["choices"]):
            raise bad


def _base(kind):
    """``T`` for ``T | None``; ``kind`` itself otherwise."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def _describe(kind, meta) -> str:
    if "dataset" in meta:
        return f"{', '.join(SPLITS)}, a torchvision data set by name (celeba, stl10, ...), or the path of an existing image folder, .npz or .npy"
    if "choices" in meta:
        return ", ".join(meta["choices"])
    if "registry" in meta:
        return ", ".join(meta["registry"])
    if "models" in meta:
        from pyvae.models import MODELS

        return ", ".join([*MODELS, "FILE.py:Class"])
    base = _base(kind)
    if typing.get_origin(base) is list:
        return "a list of positive integers"
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        base, str(base)
    )
    if "min" in meta:
        words += f" >= {meta['min']}"
    if meta.get("positive"):
        words = "a positive number"
    if meta.get("open_unit"):
        words = "a number in (0, 1)"
    if type(None) in typing.get_args(kind):
        words += " or null"
    return words


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
    hints = typing.get_type_hints(TrainConfig)
    for key, value in values.items():
        if key not in FIELDS:
            raise PyvaeError(f"unknown config key {key!r} in {path}; allowed: {', '.join(FIELDS)}")
        if hints[key] is float and isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                values[key] = float(value)
            except ValueError:
                pass
    return values


def build_parser(description: str | None = None, prog: str | None = None) -> Parser:
    parser = Parser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file of defaults; flags override it")
    hints = typing.get_type_hints(TrainConfig)
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        kind = hints[name]
        base = _base(kind)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})".strip()
        if "registry" in f.metadata:
            parser.add_argument(flag, choices=sorted(f.metadata["registry"]), help=help_text)
        elif "models" in f.metadata:
            from pyvae.models import MODELS

            choices = ModelChoices([*MODELS, "FILE.py:Class"])
            metavar = "{" + ",".join(choices) + "}"
            parser.add_argument(flag, choices=choices, metavar=metavar, help=help_text)
            parser.add_argument(
                "--model-arg", action="append", metavar="KEY=VALUE", help=MODEL_ARG_HELP
            )
        elif base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(base) is list:
            parser.add_argument(flag, type=int, nargs="*", metavar="H", help=help_text)
        else:
            parser.add_argument(flag, type=base, choices=f.metadata.get("choices"), help=help_text)
    return parser


MODEL_ARG_HELP = (
    "with --model FILE.py:Class: a keyword argument of the class's constructor, the "
    "value read as YAML (3, 0.5, 1e-3, [64, 64], true, text); repeat for more. "
    "x_dim, image_shape and num_classes come from the data set where the "
    "constructor takes them and they are not given; flags such as --z-dim and "
    "--hidden are not passed to the class"
)


class ModelChoices(tuple):
    """--model's choices: the built-in names and any ``FILE.py:Class`` (checked on import)."""

    def __contains__(self, value) -> bool:
        return tuple.__contains__(self, value) or is_model_file(value)


#: a number in the scientific notation that YAML 1.1 reads as a string (1e-3)
SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def model_args(pairs: list[str]) -> dict:
    """{key: value} of ``--model-arg KEY=VALUE`` flags (the last of a repeated key wins), each value
    read as a YAML scalar or list (3, 0.5, 1e-3, [64, 64], true, text); one-line errors."""
    args = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise PyvaeError(f"--model-arg takes KEY=VALUE, KEY an argument name; got {pair!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise PyvaeError(f"--model-arg {pair}: the value is not valid YAML ({first})") from e
        value = float(value) if isinstance(value, str) and SCIENTIFIC.fullmatch(value) else value
        if not plain(value):
            raise PyvaeError(
                f"--model-arg {pair}: allowed values are numbers, booleans, "
                "strings, null and lists of them"
            )
        args[key] = value
    return args


def with_model_args(model, pairs: list[str] | None, resume: bool) -> str | dict:
    """The ``model`` setting with ``--model-arg`` flags merged into a user model's args (a
    ``FILE.py:Class`` string becomes the mapping); the flags are refused for anything else."""
    if not is_model_file(model):
        if pairs:
            raise PyvaeError(
                f"--model-arg is for a model class of your own (--model "
                f"FILE.py:Class); model {model!r} is built in: it takes --z-dim, "
                "--hidden, ..."
            )
        return model
    if pairs and resume:
        raise PyvaeError(
            "--model-arg cannot change the model of a resumed run; it goes on with "
            "the arguments it was trained with"
        )
    spec = model_file_spec(model)
    return {**spec, "args": {**spec["args"], **model_args(pairs or [])}}


def parse_args(
    argv: list[str] | None = None, description: str | None = None, prog: str | None = None
) -> tuple[TrainConfig, bool]:
    """(config, debug) from defaults, ``--config FILE`` and flags, in that order of precedence."""
    args = vars(build_parser(description, prog).parse_args(argv))
    debug = args.pop("debug", False)
    values = from_yaml(args.pop("config")) if "config" in args else {}
    if args.get("resume"):
        # the run's own configuration, then any flags given now (a larger --epochs, say)
        run = Path(args["resume"])
        if not (run / "config.yaml").is_file() or not (run / "checkpoint.pt").is_file():
            raise PyvaeError(
                f"cannot resume {run}: it needs config.yaml and checkpoint.pt from an earlier run"
            )
        values = {**from_yaml(run / "config.yaml"), "out": str(run)}
    pairs = args.pop("model_arg", None)
    values.update(args)
    model = values.get("model", FIELDS["model"].default)
    values["model"] = with_model_args(model, pairs, bool(args.get("resume")))
    return TrainConfig(**values).validate(), debug
