"""Every command's flags, described once: names, help, choices and defaults, in a light module.

``python -m pyvae COMMAND --help`` is built from these specs without importing torch, and so is
:func:`markdown_table`, which the docs embed. ``train``'s flags are the fields of
:class:`~pyvae.cli.config.TrainConfig`, read from their metadata.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import dataclass, field

from pyvae.cli import names
from pyvae.cli.config import FIELDS, HINTS, base_type, default
from pyvae.cli.console import Parser


@dataclass(frozen=True)
class Flag:
    """One command-line argument: ``name`` is ``--flag`` or a positional's name; the rest go to
    :meth:`argparse.ArgumentParser.add_argument` (``default`` is also what help shows)."""

    name: str
    help: str
    default: object = None
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Spec:
    """A command: its one-line ``summary``, the ``description`` its help opens with, its flags."""

    name: str
    summary: str
    description: str
    flags: tuple[Flag, ...]


def run_flags(default_out: str = "RUN/explore") -> tuple[Flag, ...]:
    """The flags every command on a trained run shares."""
    return (
        Flag("run", "run folder (with checkpoint.pt and config.yaml) or checkpoint file"),
        Flag("--dataset", "data set (default: the run's)"),
        Flag("--data-dir", "data root (default: the run's, else $PYVAE_DATA, else ./data)"),
        Flag("--no-download", "never fetch missing data files", False, {"action": "store_true"}),
        Flag(
            "--device",
            "where to compute (auto: CUDA when available)",
            "auto",
            {"choices": names.DEVICES},
        ),
        Flag("--seed", "seeds the random draws", 0, {"type": int}),
        Flag("--out", f"output folder (default: {default_out})"),
        Flag(
            "--checkpoint",
            "in a run folder: best.pt, the best validation epoch, or checkpoint.pt, the last "
            "(default: best.pt when there is one)",
            None,
            {"choices": names.CHECKPOINTS},
        ),
        Flag(
            "--parts",
            "the Python file defining the run's custom prior, likelihood or guide (imported; its "
            "__main__ block is not run)",
            None,
            {"metavar": "FILE.py"},
        ),
    )


def number(name: str, help: str, value, kind: type = int) -> Flag:
    return Flag(name, help, value, {"type": kind})


AIS_FLAGS = (
    number("--num-steps", "T, intermediate distributions of AIS", 1000),
    number("--num-chains", "AIS chains per point", 16),
    number("--leapfrog-steps", "HMC leapfrog steps per AIS transition", 10),
    Flag("--schedule", "the annealing schedule", "sigmoid", {"choices": names.AIS_SCHEDULES}),
    Flag(
        "--ais-start",
        "where the path starts: q(z|x) (guide) or the prior",
        "guide",
        {"choices": names.AIS_STARTS},
    ),
    Flag(
        "--compile",
        "record the programs' densities once as a graph and compile it (torch.compile): "
        "importance sampling compiles on auto when points x K >= 2 million; AIS's densities and "
        "gradients only on 'on' (about 2.5-3x faster per step on a CPU, after 30-45 s of "
        "compiling); --compile alone means on",
        "auto",
        {"choices": names.COMPILE, "nargs": "?", "const": "on"},
    ),
)

MODEL_ARG_HELP = (
    "with --model FILE.py:Class: a keyword argument of the class's constructor, the value read "
    "as YAML (3, 0.5, 1e-3, [64, 64], true, text); repeat for more. x_dim, image_shape and "
    "num_classes come from the data set where the constructor takes them and they are not "
    "given; flags such as --z-dim and --hidden are not passed to the class"
)


class ModelChoices(tuple):
    """--model's choices: the built-in names and any ``FILE.py:Class`` (checked on import)."""

    def __contains__(self, value) -> bool:
        return tuple.__contains__(self, value) or ":" in value


def train_flags() -> tuple[Flag, ...]:
    """``train``'s flags: ``--config``, then a flag per field of TrainConfig from its metadata."""
    flags = [Flag("--config", "YAML file of defaults; flags override it")]
    for name, f in FIELDS.items():
        base, meta = base_type(HINTS[name]), f.metadata
        options = {"choices": meta["choices"]} if "choices" in meta else {}
        if "models" in meta:
            choices = ModelChoices([*names.MODELS, "FILE.py:Class"])
            options = {"choices": choices, "metavar": "{" + ",".join(choices) + "}"}
        elif base is bool:
            options = {"action": argparse.BooleanOptionalAction}
        elif typing.get_origin(base) is list:
            options = {"type": int, "nargs": "*", "metavar": "H"}
        elif "registry" not in meta:
            options["type"] = base
        flags.append(Flag("--" + name.replace("_", "-"), meta["help"], default(f), options))
        if "models" in meta:
            flags.append(
                Flag(
                    "--model-arg",
                    MODEL_ARG_HELP,
                    None,
                    {"action": "append", "metavar": "KEY=VALUE"},
                )
            )
    return tuple(flags)


def _specs(*specs: Spec) -> dict[str, Spec]:
    return {s.name: s for s in specs}


SPECS = _specs(
    Spec(
        "train",
        "Train a model by SVI: checkpoints, metrics, pictures and the test log-likelihood.",
        "Train a VAE by SVI and write its pictures, metrics and test log-likelihood.",
        train_flags(),
    ),
    Spec(
        "evaluate",
        "log p(x) by importance sampling or AIS, and guide diagnostics of a trained run.",
        "log p(x) by importance sampling (or AIS) and guide diagnostics of a trained run.",
        (
            *run_flags(
                "RUN/eval-<dataset>-<split>-K<K>, with AIS RUN/eval-<dataset>-<split>-ais-T<T>-C<C>"
            ),
            Flag(
                "--split", "which split to score", "test", {"choices": ("train", "valid", "test")}
            ),
            number("--num-samples", "K importance samples per point", 5000),
            Flag(
                "--batch-size",
                "data points per chunk (default: chosen to bound memory)",
                None,
                {"type": int},
            ),
            Flag(
                "--num-points",
                "evaluate this many points, evenly spread over the split (default: all)",
                None,
                {"type": int},
            ),
            Flag(
                "--site", "the latent site the plots show (default: the model's top-level latent)"
            ),
            Flag(
                "--method",
                "is: importance sampling with the guide; ais: annealed importance sampling (HMC), "
                "IS kept beside it",
                "is",
                {"choices": ("is", "ais")},
            ),
            *AIS_FLAGS,
        ),
    ),
    Spec(
        "bdmc",
        "BDMC: forward and reverse AIS on data simulated from the model, a sandwich around "
        "log p(x).",
        "Bidirectional Monte Carlo: how far AIS at T steps can be from log p(x).",
        (
            *run_flags("RUN/bdmc-T<T>-C<C>"),
            number("--num-points", "points simulated from the model", 20),
            *AIS_FLAGS,
        ),
    ),
    Spec(
        "gap",
        "The inference gap split into approximation and amortization gaps (AIS and per-point "
        "guides).",
        "The inference gap log p(x) - ELBO split into approximation and amortization gaps.",
        (
            *run_flags("RUN/gap-T<T>"),
            number("--num-points", "test points, evenly spread", 20),
            number("--num-samples", "draws for each ELBO", 1000),
            number("--local-steps", "at most this many Adam steps per point's guide", 2000),
            number("--lr", "Adam learning rate of the per-point guides", 1e-3, float),
            *AIS_FLAGS,
        ),
    ),
    Spec(
        "sample",
        "Images decoded from latents drawn from the prior (--label for cvae, m2).",
        "Images decoded from latents drawn from the prior.",
        (
            *run_flags(),
            number("--n", "how many images", 64),
            number("--temperature", "scale of z about the prior mean (vae)", 1.0, float),
            Flag(
                "--label",
                "class to draw (cvae, m2) (default: the classes in turn)",
                None,
                {"type": int},
            ),
        ),
    ),
    Spec(
        "reconstruct",
        "Test images, each row above its reconstructions.",
        "Test images, each row above its reconstructions.",
        (*run_flags(), number("--n", "images (rows of 8)", 32)),
    ),
    Spec(
        "interpolate",
        "Decoded paths between test images, linear and spherical in z (vae).",
        "Decoded paths between test images, linear and spherical in z.",
        (
            *run_flags(),
            number("--pairs", "pairs of test images, one row each", 8),
            number("--steps", "images along each path, ends included", 10),
        ),
    ),
    Spec(
        "traverse",
        "Each latent dimension swept over the prior's quantiles, by KL (vae).",
        "Each latent dimension swept over the prior's quantiles, by KL.",
        (
            *run_flags(),
            number("--dims", "how many dimensions, largest KL first", 10),
            number("--steps", "quantiles of the prior per dimension", 9),
        ),
    ),
    Spec(
        "embed",
        "Latent means of the test set: a scatter, a linear probe, k-means purity.",
        "Latent means of the test set: a scatter, a linear probe, k-means purity.",
        (
            *run_flags(),
            Flag("--num-points", "test images, evenly spread (default: all)", None, {"type": int}),
        ),
    ),
    Spec(
        "anomaly",
        "log p(x) as an anomaly score: ROC AUC of test images against another set.",
        "log p(x) as an anomaly score: ROC AUC of test images against another set.",
        (
            *run_flags(),
            Flag(
                "--ood",
                "the out-of-distribution data set, e.g. fashion_mnist",
                None,
                {"required": True},
            ),
            number("--num-samples", "K importance samples per image", 100),
            number("--num-points", "images of each set, evenly spread", 1000),
        ),
    ),
)


def described(flag: Flag) -> str:
    """The flag's help with its default, unless the help says the default itself or there is
    none to say (None, a switch that is off)."""
    if flag.default is None or flag.default is False or "default" in flag.help:
        return flag.help
    value = " ".join(map(str, flag.default)) if isinstance(flag.default, list) else flag.default
    return f"{flag.help} (default: {value})"


def parser(command: str, prog: str | None = None) -> Parser:
    """The argument parser of ``command``; ``prog`` names it in usage lines (default: the
    script). train's parser leaves out the flags not given: a --config file fills them."""
    spec = SPECS[command]
    train = command == "train"
    result = Parser(
        prog=prog,
        description=spec.description,
        argument_default=argparse.SUPPRESS if train else None,
    )
    for flag in spec.flags:
        options = dict(flag.options)
        if not train:
            options["default"] = flag.default
        result.add_argument(flag.name, help=described(flag), **options)
    return result


def markdown_table(command: str) -> str:
    """``command``'s flags as a Markdown table: flag, default, description."""
    rows = ["| flag | default | description |", "| --- | --- | --- |"]
    for flag in SPECS[command].flags:
        value = str(flag.default).lower() if isinstance(flag.default, bool) else flag.default
        shown = "" if flag.default is None else f"`{value}`"
        text = flag.help.replace("|", "\\|")
        rows.append(f"| `{flag.name}` | {shown} | {text} |")
    return "\n".join(rows) + "\n"


__all__ = ["SPECS", "Flag", "Spec", "markdown_table", "parser"]
