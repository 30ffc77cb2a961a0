"""Checkpoints: the weights, the model's class and (for built-in models) its constructor arguments.

:func:`load` rebuilds a built-in model from the checkpoint alone, or loads into an
instance the caller built (``model=``), checking that the class and every parameter's
name and shape match; a checkpoint of one class never comes back as another.

Files are written atomically (:func:`pyvae.runs.files.atomic_write`), so a crash leaves
either the old checkpoint or the new one, never half of one. They are read with
``torch.load(weights_only=True)``, which never unpickles code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pyvae.errors import PyvaeError
from pyvae.models import MODELS
from pyvae.runs.files import atomic_write
from pyvae.runs.user_code import USER_MODEL

FORMAT = "pyvae-checkpoint"
FORMAT_VERSION = 1


def class_name(module: torch.nn.Module) -> str:
    """``module.qualname`` of the model's class: what a checkpoint records and :func:`load`
    checks."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def save(
    model: torch.nn.Module, path: str | os.PathLike, keep_previous: bool = False, **extra
) -> None:
    """Write ``model`` (weights, class, constructor arguments if it has ``config``) to ``path``;
    ``extra`` entries are stored alongside, and so is the record of a model built from a user's
    file (:data:`USER_MODEL`): what rebuilds it by importing that file again (no code is saved).

    With ``keep_previous`` the checkpoint being replaced survives as ``<name>.prev<suffix>``;
    at every moment ``path`` holds a complete checkpoint (the old one, then the new one).
    """
    if not Path(path).parent.is_dir():
        raise PyvaeError(f"cannot save to {path}: its folder {Path(path).parent} does not exist")
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "class": class_name(model),
        "config": getattr(model, "config", None),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    if getattr(model, USER_MODEL, None) is not None:
        payload["user_model"] = getattr(model, USER_MODEL)
    path = Path(path)
    if keep_previous and path.is_file():
        previous = path.with_name(f"{path.stem}.prev{path.suffix}")
        link = previous.with_name(f".{previous.name}.link")
        link.unlink(missing_ok=True)
        os.link(path, link)  # a second name for the current file, then renamed into place
        os.replace(link, previous)
    atomic_write(path, lambda f: torch.save(payload, f))


def read(path: str | os.PathLike) -> dict:
    """The raw checkpoint dict, checked to be a pyvae checkpoint of a version we read."""
    path = Path(path)
    if not path.is_file():
        raise PyvaeError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupted, or needs arbitrary unpickling
        raise PyvaeError(_unreadable(path, e)) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PyvaeError(f"{path} is not a pyvae checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise PyvaeError(
            f"{path} has checkpoint format version {payload.get('format_version')!r}; "
            f"this pyvae reads version {FORMAT_VERSION}"
        )
    return payload


def _unreadable(path: Path, error: Exception) -> str:
    """One line on why ``path`` cannot be read: damaged (a zip archive cut short or corrupted,
    whose torch message is a page of miniz internals) or the first line of torch's reason; with the
    ``<name>.prev<suffix>`` that :func:`save` keeps beside it offered when there is one."""
    text = str(error).strip()
    if "PytorchStreamReader" in text or "zip archive" in text or "miniz" in text:
        why = "the file is damaged (cut short or corrupted: not a complete zip archive)"
    else:
        why = (text.splitlines() or [type(error).__name__])[0]
    previous = path.with_name(f"{path.stem}.prev{path.suffix}")
    offer = (
        f"; the previous checkpoint {previous} is beside it: use that" if previous.is_file() else ""
    )
    return f"cannot read checkpoint {path}: {why}{offer}"


def load(path: str | os.PathLike, model: torch.nn.Module | None = None, **parts) -> torch.nn.Module:
    """The model saved at ``path``.

    ``load(path)`` rebuilds a built-in model (:data:`pyvae.models.MODELS`) from the
    checkpoint; built-in parts (priors, likelihoods, guides, nets) are rebuilt by name, and
    custom ones are passed again, e.g. ``load(path, prior=MyPrior())``.
    ``load(path, model=instance)`` loads the weights into ``instance``, which must be of the
    class that was saved, with the same parameter names and shapes.
    """
    payload = read(path)
    saved = payload.get("class")
    config = payload.get("config")
    if (
        saved is None and isinstance(config, dict) and "x_dim" in config
    ):  # written before models had classes
        saved, config = "pyvae.models.vae.VAE", {"model": "vae", **config}
    if "state_dict" not in payload or not isinstance(saved, str):
        raise PyvaeError(
            f"{path} is a pyvae checkpoint without a complete model description; it cannot be "
            "loaded"
        )
    record = payload.get("user_model")
    if model is None and isinstance(record, dict):
        cls, file = record.get("class"), record.get("file")
        raise PyvaeError(
            f"{path} holds {cls} from {file}, a class of your own: pyvae.load needs "
            f"an instance, pyvae.load(path, model={cls}(...)) (python -m pyvae "
            "commands import the file themselves)"
        )
    if model is None:
        name = config.get("model") if isinstance(config, dict) else None
        if name not in MODELS or class_name_of(MODELS[name]) != saved:
            raise PyvaeError(
                f"{path} holds a {saved}, not a built-in model; build one and pass it: "
                "pyvae.load(path, model=...)"
            )
        cls = MODELS[name]
        if hasattr(cls, "from_config"):
            model = cls.from_config(config, path=path, **parts)
        else:
            model = cls(**{**{k: v for k, v in config.items() if k != "model"}, **parts})
    elif parts:
        raise PyvaeError(
            f"pass either model= or parts ({', '.join(parts)}) to pyvae.load, not both"
        )
    if isinstance(record, dict) and type(model).__qualname__ == record.get("class"):
        # imported from its file under a module name of pyvae's: the class's own name decides
        saved = class_name(model)
    if class_name(model) != saved:
        hint = (
            " (a class saved from a script is __main__.<name>: save and load it from the same "
            "module)"
            if "__main__." in saved + class_name(model)
            else ""
        )
        raise PyvaeError(
            f"{path} holds a {saved}; it cannot be loaded into a {class_name(model)}{hint}"
        )
    load_weights(model, payload["state_dict"], path)
    return model


def class_name_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def load_weights(model: torch.nn.Module, state_dict: dict, path) -> None:
    """``model.load_state_dict`` with a one-line error naming the missing, unexpected and
    mis-shaped entries."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and own[k].shape != state_dict[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"missing {', '.join(missing[:5])}" if missing else "",
            f"unexpected {', '.join(unexpected[:5])}" if unexpected else "",
            f"shapes differ (saved vs model): {', '.join(shapes[:5])}" if shapes else "",
        ]
        raise PyvaeError(
            f"checkpoint {path} does not match the model: " + "; ".join(p for p in parts if p)
        )
    model.load_state_dict(state_dict)
