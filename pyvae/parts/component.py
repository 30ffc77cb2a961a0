"""The shared shape of priors, likelihoods and guides.

Each is a ``torch.nn.Module`` built in two steps: the constructor takes only
hyper-parameters (``VampPrior(num_components=500)``), and :meth:`Component.bind`
is called by :class:`pyvae.VAE` once the dimensions are known, to create the
parameters. The hyper-parameters are recorded so that a checkpoint can rebuild the
component by name (see :func:`resolve`).

A user's own files (``--parts FILE.py``, ``--model FILE.py:Class``) are imported by
:mod:`pyvae.runs.user_code`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, ClassVar

import torch

from pyvae.errors import PyvaeError


class Component(torch.nn.Module):
    #: the name used by ``--prior/--likelihood/--guide`` flags, config keys and checkpoints
    name: ClassVar[str] = ""

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        self.hparams = hparams

    def bind(self, vae: torch.nn.Module) -> None:
        """Create parameters once ``vae.x_dim`` and ``vae.z_dim`` are known."""

    def spec(self) -> dict:
        """Name and hyper-parameters: enough to rebuild this component with :func:`resolve`.

        A class that does not set ``name`` itself (a user's subclass of a built-in, say)
        is recorded by its class name, so loading never silently rebuilds the parent.
        """
        spec = {"name": recorded_name(type(self)), **self.hparams}
        cls = type(self)
        # a user's part, marked so even under a built-in's name
        if not cls.__module__.startswith("pyvae."):
            # its file, else where it lived
            spec["source"] = source_of(cls) or f"{cls.__module__}:{cls.__qualname__}"
        return spec


class Registry(dict):
    """Built-in components of one kind (``prior``, ``likelihood``, ``guide``) by name."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, cls: type[Component]) -> type[Component]:
        self[cls.name] = cls
        return cls

    def resolve(self, value: str | dict | Component) -> Component:
        """A component from a name (default settings), a spec dict or an instance."""
        if isinstance(value, Component):
            return value
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict) or "name" not in value:
            raise PyvaeError(
                f"{self.kind} must be a name ({', '.join(sorted(self))}), a dict with 'name', "
                f"or a pyvae {self.kind} object; got {value!r}"
            )
        kwargs = dict(value)
        name = kwargs.pop("name")
        # recorded by Component.spec for a user's class, even one named like a built-in
        if "source" in kwargs:
            raise PyvaeError(
                f"{self.kind} {name!r} is a custom part defined in "
                f"{kwargs['source'].rsplit(':', 1)[0]}; pass an instance ({self.kind}=...) or, "
                "from the command line, --parts FILE.py"
            )
        if name not in self:
            raise PyvaeError(f"unknown {self.kind} {name!r}; choose from {', '.join(sorted(self))}")
        cls = self[name]
        check_settings(cls, kwargs, f"{self.kind} {name!r}")
        return cls(**kwargs)


def check_settings(cls: type, settings: dict, named: str) -> set[str]:
    """The names ``cls``'s constructor takes, every key of ``settings`` among them: else a
    one-line error naming the first that is not and the ones allowed."""
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise PyvaeError(
            f"unknown setting {unknown[0]!r} for {named}; "
            f"allowed: {', '.join(sorted(allowed)) or 'none'}"
        )
    return allowed


def is_custom(spec: dict, registry: Registry) -> bool:
    """Whether a recorded part is a user's: a name no built-in has, or the source
    :meth:`Component.spec` records."""
    return spec.get("name") not in registry or "source" in spec


def recorded_name(cls: type[Component]) -> str:
    """The name a checkpoint records a part under: its own ``name``, else its class name."""
    return cls.__dict__.get("name") or cls.__name__


def source_of(cls: type) -> str | None:
    """``/path/file.py:Class`` for a class a file defines at top level, else None (a notebook's, a
    function's)."""
    if "<locals>" in cls.__qualname__:
        return None
    # its methods' code knows the file even when the module was loaded by path, outside sys.modules;
    # a decorated method (``@torch.no_grad()``) is a wrapper whose code lives in torch: unwrap it
    methods = [inspect.unwrap(f) for f in vars(cls).values() if inspect.isfunction(f)]
    files = [f.__code__.co_filename for f in methods if hasattr(f, "__code__")]
    if not files or not Path(files[0]).is_file():
        return None
    return f"{Path(files[0]).resolve()}:{cls.__qualname__}"
