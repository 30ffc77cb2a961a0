"""A user's Python files, imported again by every command that follows a run.

The parts of ``--parts FILE.py`` (:func:`import_parts`) and the model class of
``--model FILE.py:Class`` (:func:`model_class`), whose record (file, class, arguments, sha256) lets
every command that follows the run import the same, unchanged file again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from pathlib import Path

import torch

from pyvae.errors import PyvaeError
from pyvae.parts.component import Component, is_custom, recorded_name
from pyvae.parts.guides import GUIDES, Guide
from pyvae.parts.likelihoods import LIKELIHOODS, Likelihood
from pyvae.parts.priors import PRIORS, Prior

#: the attribute of a model built from a user's file (``--model FILE.py:Class``) holding its
#: record: file, class, args, sha256 and the data's shape; saved as a checkpoint's ``user_model``
USER_MODEL = "pyvae_user_model"


def import_file(path: Path, module_name: str, what: str):
    """Run a user's Python file once as the module ``module_name`` and return it.

    Its ``if __name__ == "__main__"`` block is not run, and its folder goes on ``sys.path`` so that
    it can import the modules beside it; a failure is a one-line error naming ``what`` (--parts).
    """
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    folder = str(Path(path).resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    # before running it, as ``import`` does: dataclasses and pickling look it up
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        first = (str(e).strip().splitlines() or [""])[0]
        raise PyvaeError(f"cannot import {what} {path}: {type(e).__name__}: {first}") from e
    return module


def import_parts(path: str | Path) -> list[type[Component]]:
    """The parts (:class:`Component` subclasses) a user's Python file defines, imported by
    :func:`import_file`; the CLI's ``--parts FILE`` asks for this explicitly, since a checkpoint
    never runs code."""
    path = Path(path)
    if path.suffix != ".py" or not path.is_file():
        raise PyvaeError(
            f"--parts must be a Python file defining the run's custom parts; got {str(path)!r}"
        )
    module = import_file(path, f"pyvae_parts_{path.stem}", "--parts")
    # its own classes and those it imports from its neighbours; pyvae's built-ins are found by
    # name anyway
    return [
        c
        for c in vars(module).values()
        if inspect.isclass(c) and issubclass(c, Component) and not c.__module__.startswith("pyvae.")
    ]


def custom_parts(
    config: dict, parts_file: str | Path | None, where: str = "the checkpoint"
) -> dict[str, Component]:
    """The prior, likelihood and guide of a saved model's ``config`` that are no built-in, built
    from the classes ``parts_file`` defines with their recorded settings ({} when all are built
    in)."""
    kinds = {
        "prior": (PRIORS, Prior),
        "likelihood": (LIKELIHOODS, Likelihood),
        "guide": (GUIDES, Guide),
    }
    custom = {
        part: spec
        for part, (registry, _) in kinds.items()
        if isinstance(spec := config.get(part), dict) and is_custom(spec, registry)
    }
    if not custom:
        return {}
    if parts_file is None:
        named = ", ".join(
            f"{part} {s['name']}"
            + (f" (defined in {s['source'].rsplit(':', 1)[0]})" if s.get("source") else "")
            for part, s in custom.items()
        )
        raise PyvaeError(
            f"{where} was trained with a custom {named}; pass --parts FILE.py, the file that "
            "defines it"
        )
    classes = import_parts(parts_file)
    built = {}
    for part, spec in custom.items():
        of_kind = {recorded_name(c): c for c in classes if issubclass(c, kinds[part][1])}
        if spec["name"] not in of_kind:
            raise PyvaeError(
                f"--parts {parts_file} defines no {part} {spec['name']!r}; "
                f"its {part}s: {', '.join(of_kind) or 'none'}"
            )
        built[part] = of_kind[spec["name"]](
            **{k: v for k, v in spec.items() if k not in ("name", "source")}
        )
    return built


# -- a model class of the user's own, from a file: ``--model FILE.py:Class`` ---------------
#: the keys of a user model's setting; ``sha256`` is recorded by training, the others are given
MODEL_KEYS = ("file", "class", "args", "sha256")
#: constructor arguments filled from the data set where the class takes them and no --model-arg
#: gives them
DATA_ARGS = ("x_dim", "image_shape", "num_classes")


def is_model_file(value) -> bool:
    """Whether a ``model`` setting names a class in a user's file (``FILE.py:Class``, or a mapping
    with ``file``) rather than a built-in model (no built-in name has a colon)."""
    if isinstance(value, dict):
        return "file" in value
    return isinstance(value, str) and ":" in value


def model_file_spec(value) -> dict:
    """``{file, class, args[, sha256]}`` of a user model setting (``FILE.py:Class`` or that
    mapping), its shape checked: one-line errors naming the bad key or value."""
    if isinstance(value, str):
        file, _, name = value.rpartition(":")
        value = {"file": file, "class": name}
    unknown = sorted(set(value) - set(MODEL_KEYS))
    if unknown:
        raise PyvaeError(
            f"unknown key {unknown[0]!r} in the model mapping; allowed: {', '.join(MODEL_KEYS)}"
        )
    for key in ("file", "class"):
        if not isinstance(value.get(key), str) or not value[key]:
            raise PyvaeError(
                f"model {key!r} must be a non-empty string (FILE.py:Class); got {value.get(key)!r}"
            )
    args = value.get("args") or {}
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise PyvaeError(
            f"model 'args' must be a mapping of argument names to values; got {args!r}"
        )
    bad = next((k for k, v in args.items() if not plain(v)), None)
    if bad is not None:
        raise PyvaeError(
            f"model argument {bad}={args[bad]!r}: allowed are numbers, booleans, "
            "strings, null, and lists or mappings of them"
        )
    sha = {"sha256": value["sha256"]} if value.get("sha256") is not None else {}
    return {"file": value["file"], "class": value["class"], "args": dict(args), **sha}


def plain(value) -> bool:
    """Whether ``value`` is YAML's plain data, which config.yaml and a checkpoint both store."""
    if isinstance(value, (list, tuple)):
        return all(plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    return value is None or isinstance(value, (str, int, float, bool))


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, hex."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def model_class(spec: dict, run: str | None = None) -> tuple[type, dict]:
    """(the class ``spec`` names, imported from its file by :func:`import_file`; the record a run
    keeps: ``spec`` with the file's absolute path and sha256). ``run`` (``run RUN``, a checkpoint
    file) names the run whose record ``spec`` is, for the messages of :func:`model_file_digest`."""
    path = Path(spec["file"]).expanduser().resolve()
    digest = model_file_digest(spec, path, run)
    module = import_file(path, f"pyvae_model_{path.stem}", "--model")
    check_model_class(module, spec, path)
    return getattr(module, spec["class"]), {**spec, "file": str(path), "sha256": digest}


def model_file_digest(spec: dict, path: Path, run: str | None) -> str:
    """The sha256 of the model's file ``path``, which must be a .py file that exists and, where
    ``spec`` records a sha256 (a run's record), is unchanged; else a one-line error saying which."""
    named, run_name = f"{spec['file']}:{spec['class']}", run or "the run"
    if path.suffix != ".py":
        raise PyvaeError(
            f"--model {named}: {spec['file']} is not a Python file; name a .py file "
            "and a class in it"
        )
    if not path.is_file() and "sha256" in spec:
        raise PyvaeError(
            f"the model file {path} that {run_name} was trained with is missing; "
            f"put it back (it defined {spec['class']})"
        )
    if not path.is_file():
        raise PyvaeError(f"--model {named}: there is no file {path}")
    digest = file_sha256(path)
    if spec.get("sha256") not in (None, digest):
        # a config.yaml given again (--config) records the hash too: the edit may be on purpose
        fix = (
            "restore it or train anew"
            if run
            else "restore it, or delete sha256 from the config to train it as it is now"
        )
        raise PyvaeError(
            f"the model file {path} has changed since {run_name} was trained with it "
            f"(sha256 {spec['sha256'][:12]}... then, {digest[:12]}... now); {fix}"
        )
    return digest


def check_model_class(module, spec: dict, path: Path) -> None:
    """The class ``spec`` names in ``module`` must be a torch module with Pyro ``model`` and
    ``guide`` methods, whose constructor takes ``spec['args']`` (:func:`check_model_args`)."""
    name = spec["class"]
    cls = vars(module).get(name)
    if not inspect.isclass(cls):
        own = [
            k
            for k, c in vars(module).items()
            if inspect.isclass(c) and c.__module__ == module.__name__
        ]
        raise PyvaeError(
            f"--model: {path} defines no class {name!r}; its classes: {', '.join(own) or 'none'}"
        )
    lacking = [m for m in ("model", "guide") if not callable(getattr(cls, m, None))]
    if not issubclass(cls, torch.nn.Module) or lacking:
        why = f"has no method {lacking[0]}" if lacking else "is not a torch.nn.Module"
        raise PyvaeError(
            f"--model: {name} in {path} {why}; a pyvae model is a torch.nn.Module "
            "with Pyro methods model(*batch, num_data=None) and guide(...)"
        )
    check_model_args(cls, spec["args"], f"{name} ({path})")


def check_model_args(cls: type, args: dict, named: str) -> None:
    """``cls``'s constructor must take every key of ``args`` and need no other argument but
    :data:`DATA_ARGS`; one-line errors naming the argument and the allowed ones."""
    params = {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}
    keywords = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [] if takes_any else sorted(set(args) - set(keywords))
    if unknown:
        raise PyvaeError(
            f"unknown model argument {unknown[0]!r} for {named}; "
            f"allowed: {', '.join(keywords) or 'none'}"
        )
    needed = [
        k
        for k in keywords
        if params[k].default is params[k].empty and k not in args and k not in DATA_ARGS
    ]
    if needed:
        raise PyvaeError(
            f"{named} needs the argument {needed[0]!r}; pass --model-arg {needed[0]}=VALUE"
        )


def build_user_model(cls: type, record: dict, data: dict) -> torch.nn.Module:
    """``cls(**record['args'])``, with those of ``data`` (x_dim, image_shape, num_classes) that the
    constructor takes and the args do not give. The instance keeps ``record`` and ``data`` for its
    checkpoints (:data:`USER_MODEL`), and the data's shape where it has none of
    its own: pictures need ``x_dim`` and ``image_shape``."""
    params, args = inspect.signature(cls.__init__).parameters, record["args"]
    filled = {k: data[k] for k in DATA_ARGS if k in params and k not in args and k in data}
    if "num_classes" in params and "num_classes" not in args and "num_classes" not in data:
        raise PyvaeError(
            f"{record['class']} takes num_classes; the data set has no labels "
            "(pass --model-arg num_classes=N)"
        )
    if "image_shape" in filled:
        filled["image_shape"] = tuple(filled["image_shape"])
    try:
        model = cls(**filled, **args)
    except Exception as e:  # the user's constructor refused the values: theirs to fix, one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise PyvaeError(f"{record['class']}(**{args}) failed: {type(e).__name__}: {first}") from e
    for key, value in data.items():
        if not hasattr(model, key):
            setattr(model, key, tuple(value) if key == "image_shape" else value)
    kept = {k: record[k] for k in MODEL_KEYS if k in record}
    setattr(model, USER_MODEL, {**kept, "data": dict(data)})
    return model


def rebuild_user_model(record: dict, where: str) -> torch.nn.Module:
    """The model a checkpoint's record (:func:`build_user_model`) describes, its class imported
    again from the recorded file, which must be there and unchanged; the caller loads weights."""
    spec = model_file_spec({k: record.get(k) for k in MODEL_KEYS})
    cls, checked = model_class(spec, where)
    return build_user_model(cls, checked, record.get("data") or {})
