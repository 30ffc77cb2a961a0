"""pyvae: variational autoencoders written as Pyro programs.

The packages, floor by floor from the bottom (a module imports only from floors below its own;
CONTRIBUTING.md draws the house):

* :mod:`pyvae.errors`: ``PyvaeError``, ``PyvaeWarning``.
* :mod:`pyvae.program`: reads any Pyro ``model``/``guide`` pair: its sites, plates and weights.
* :mod:`pyvae.data` and :mod:`pyvae.parts`: data sets; networks, priors, likelihoods, guides.
* :mod:`pyvae.models`: the built-in Pyro programs ``VAE``, ``HVAE``, ``CVAE``, ``M2``.
* :mod:`pyvae.runs`: checkpoints (``save``, ``load``), atomic files, a user's own code.
* :mod:`pyvae.infer`: importance-sampled and annealed log p(x), BDMC, the inference gap,
  ``evaluate``.
* :mod:`pyvae.viz`: pictures. :mod:`pyvae.train`: ``fit`` by SVI. :mod:`pyvae.cli`: commands.

All ELBOs and log-likelihoods are in nats per data point; NLL is their negative.
"""

import importlib

from pyvae.errors import DataNotFound, PyvaeError, PyvaeWarning

#: each public name and the module that defines it (or is it: pyvae.program),
#: imported on first use: ``python -m pyvae --help`` then loads no torch
_EXPORTS = {
    **dict.fromkeys(["ais", "bdmc", "gap"], "pyvae.infer"),
    **dict.fromkeys(["AISResult", "ais_log_likelihood"], "pyvae.infer.ais"),
    **dict.fromkeys(["Evaluation", "evaluate"], "pyvae.infer.diagnostics"),
    **dict.fromkeys(["LogLikelihood", "log_likelihood"], "pyvae.infer.importance"),
    **dict.fromkeys(["CVAE", "HVAE", "M2", "VAE"], "pyvae.models"),
    **dict.fromkeys(["guides", "likelihoods", "priors"], "pyvae.parts"),
    **dict.fromkeys(["load", "save"], "pyvae.runs"),
    **dict.fromkeys(["evaluate_elbo", "fit"], "pyvae.train.loop"),
    **{name: f"pyvae.{name}" for name in ["data", "infer", "models", "parts", "program", "runs"]},
    **{name: f"pyvae.{name}" for name in ["train", "viz"]},
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pyvae' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if module.__name__.endswith(f".{name}") else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__version__ = "0.1.0"
__all__ = [
    "VAE",
    "HVAE",
    "CVAE",
    "M2",
    "fit",
    "evaluate_elbo",
    "log_likelihood",
    "ais_log_likelihood",
    "AISResult",
    "ais",
    "bdmc",
    "gap",
    "LogLikelihood",
    "evaluate",
    "Evaluation",
    "save",
    "load",
    "priors",
    "program",
    "likelihoods",
    "guides",
    "PyvaeError",
    "PyvaeWarning",
    "DataNotFound",
]
