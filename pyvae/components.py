"""The shared shape of priors, likelihoods and guides.

Each is a ``torch.nn.Module`` built in two steps: the constructor takes only
hyper-parameters (``VampPrior(num_components=500)``), and :meth:`Component.bind`
is called by :class:`pyvae.VAE` once the dimensions are known, to create the
parameters. The hyper-parameters are recorded so that a checkpoint can rebuild the
component by name (see :func:`resolve`).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch

from .errors import PyvaeError


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
        own_name = type(self).__dict__.get("name")
        return {"name": own_name or type(self).__name__, **self.hparams}


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
        if name not in self:
            raise PyvaeError(f"unknown {self.kind} {name!r}; choose from {', '.join(sorted(self))}")
        cls = self[name]
        allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise PyvaeError(
                f"unknown setting {unknown[0]!r} for {self.kind} {name!r}; "
                f"allowed: {', '.join(sorted(allowed)) or 'none'}"
            )
        return cls(**kwargs)
