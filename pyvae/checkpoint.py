"""Checkpoints: the weights plus the constructor arguments, so :func:`load` needs nothing else.

Files are written atomically (temporary file in the same folder, flush, fsync,
rename), so a crash leaves either the old checkpoint or the new one, never half of
one. They are read with ``torch.load(weights_only=True)``, which never unpickles
code.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import PyvaeError
from .guides import GUIDES
from .likelihoods import LIKELIHOODS
from .model import VAE
from .priors import PRIORS

FORMAT = "pyvae-checkpoint"
FORMAT_VERSION = 1


def atomic_write(path: str | os.PathLike, write: Callable[[object], None]) -> None:
    """Call ``write(file_object)`` on a temporary file and rename it to ``path`` when complete."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(vae: VAE, path: str | os.PathLike, keep_previous: bool = False, **extra) -> None:
    """Write ``vae`` (weights and constructor arguments) to ``path``; ``extra`` entries are stored alongside.

    With ``keep_previous`` the checkpoint being replaced survives as ``<name>.prev<suffix>``;
    at every moment ``path`` holds a complete checkpoint (the old one, then the new one).
    """
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": vae.config,
        "state_dict": {k: v.detach().cpu() for k, v in vae.state_dict().items()},
        **extra,
    }
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
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PyvaeError(f"cannot read checkpoint {path}: {first_line}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PyvaeError(f"{path} is not a pyvae checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise PyvaeError(
            f"{path} has checkpoint format version {payload.get('format_version')!r}; "
            f"this pyvae reads version {FORMAT_VERSION}"
        )
    return payload


def load(path: str | os.PathLike, **components) -> VAE:
    """Rebuild the VAE saved at ``path``.

    Built-in priors, likelihoods, guides and MLPs are rebuilt from the checkpoint;
    a model saved with custom parts needs them passed again, e.g.
    ``load(path, prior=MyPrior(), encoder=my_encoder)``.
    """
    payload = read(path)
    kwargs = payload.get("config")
    parts = ("x_dim", "z_dim", "prior", "likelihood", "guide", "encoder", "decoder")
    if not isinstance(kwargs, dict) or any(k not in kwargs for k in parts) or "state_dict" not in payload:
        raise PyvaeError(f"{path} is a pyvae checkpoint without a complete model description; it cannot be loaded")
    kwargs = dict(kwargs)
    for part, registry in (("prior", PRIORS), ("likelihood", LIKELIHOODS), ("guide", GUIDES)):
        name = kwargs[part]["name"] if isinstance(kwargs[part], dict) else kwargs[part]
        if name not in registry and part not in components:
            raise PyvaeError(f"{path} was saved with a custom {part} {name!r}; pass {part}=... to pyvae.load")
    for part in ("encoder", "decoder"):
        if kwargs.pop(part) == "custom" and part not in components:
            raise PyvaeError(f"{path} was saved with a custom {part}; pass {part}=... to pyvae.load")
    kwargs.update(components)
    vae = VAE(**kwargs)
    try:
        vae.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise PyvaeError(f"checkpoint {path} does not match the model it describes: {str(e).splitlines()[0]}") from e
    return vae
