"""The shared shape of priors, likelihoods and guides.

Each is a ``torch.nn.Module`` built in two steps: the constructor takes only
hyper-parameters (``VampPrior(num_components=500)``), and :meth:`Component.bind`
is called by :class:`pyvae.VAE` once the dimensions are known, to create the
parameters. The hyper-parameters are recorded so that a checkpoint can rebuild the
component by name (see :func:`resolve`).
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
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
        spec = {"name": recorded_name(type(self)), **self.hparams}
        cls = type(self)
        if not cls.__module__.startswith("pyvae."):  # a user's part, marked so even under a built-in's name
            spec["source"] = source_of(cls) or f"{cls.__module__}:{cls.__qualname__}"  # its file, else where it lived
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
        if "source" in kwargs:  # recorded by Component.spec for a user's class, even one named like a built-in
            raise PyvaeError(f"{self.kind} {name!r} is a custom part defined in {kwargs['source'].rsplit(':', 1)[0]}; "
                             f"pass an instance ({self.kind}=...) or, from the command line, --parts FILE.py")
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


def is_custom(spec: dict, registry: Registry) -> bool:
    """Whether a recorded part is a user's: a name no built-in has, or the source :meth:`Component.spec` records."""
    return spec.get("name") not in registry or "source" in spec


def recorded_name(cls: type[Component]) -> str:
    """The name a checkpoint records a part under: its own ``name``, else its class name."""
    return cls.__dict__.get("name") or cls.__name__


def source_of(cls: type) -> str | None:
    """``/path/file.py:Class`` for a class a file defines at top level, else None (a notebook's, a function's)."""
    if "<locals>" in cls.__qualname__:
        return None
    # its methods' code knows the file even when the module was loaded by path, outside sys.modules;
    # a decorated method (``@torch.no_grad()``) is a wrapper whose code lives in torch: unwrap it
    methods = [inspect.unwrap(f) for f in vars(cls).values() if inspect.isfunction(f)]
    files = [f.__code__.co_filename for f in methods if hasattr(f, "__code__")]
    if not files or not Path(files[0]).is_file():
        return None
    return f"{Path(files[0]).resolve()}:{cls.__qualname__}"


def import_parts(path: str | Path) -> list[type[Component]]:
    """The parts (:class:`Component` subclasses) a user's Python file defines.

    The file is run once as a module named after it (its ``if __name__ == "__main__"`` block
    is not), with its folder on ``sys.path`` so that it can import the modules beside it; the CLI's
    ``--parts FILE`` asks for this explicitly, since a checkpoint never runs code.
    """
    path = Path(path)
    if path.suffix != ".py" or not path.is_file():
        raise PyvaeError(f"--parts must be a Python file defining the run's custom parts; got {str(path)!r}")
    name = f"pyvae_parts_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.modules[name] = module  # before running it, as ``import`` does: dataclasses and pickling look it up
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise PyvaeError(f"cannot import --parts {path}: {type(e).__name__}: {e}") from e
    # its own classes and those it imports from its neighbours; pyvae's built-ins are found by name anyway
    return [c for c in vars(module).values()
            if inspect.isclass(c) and issubclass(c, Component) and not c.__module__.startswith("pyvae.")]


def custom_parts(config: dict, parts_file: str | Path | None, where: str = "the checkpoint") -> dict[str, Component]:
    """The prior, likelihood and guide of a saved model's ``config`` that are no built-in, built from
    the classes ``parts_file`` defines with their recorded settings ({} when all are built in)."""
    from .guides import GUIDES, Guide
    from .likelihoods import LIKELIHOODS, Likelihood
    from .priors import PRIORS, Prior

    kinds = {"prior": (PRIORS, Prior), "likelihood": (LIKELIHOODS, Likelihood), "guide": (GUIDES, Guide)}
    custom = {part: spec for part, (registry, _) in kinds.items()
              if isinstance(spec := config.get(part), dict) and is_custom(spec, registry)}
    if not custom:
        return {}
    if parts_file is None:
        named = ", ".join(f"{part} {s['name']}" + (f" (defined in {s['source'].rsplit(':', 1)[0]})" if s.get("source") else "")
                          for part, s in custom.items())
        raise PyvaeError(f"{where} was trained with a custom {named}; pass --parts FILE.py, the file that defines it")
    classes = import_parts(parts_file)
    built = {}
    for part, spec in custom.items():
        of_kind = {recorded_name(c): c for c in classes if issubclass(c, kinds[part][1])}
        if spec["name"] not in of_kind:
            raise PyvaeError(f"--parts {parts_file} defines no {part} {spec['name']!r}; "
                             f"its {part}s: {', '.join(of_kind) or 'none'}")
        built[part] = of_kind[spec["name"]](**{k: v for k, v in spec.items() if k not in ("name", "source")})
    return built
