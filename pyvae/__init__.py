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

from pyvae import program
from pyvae.errors import DataNotFound, PyvaeError, PyvaeWarning
from pyvae.infer import ais, bdmc, gap
from pyvae.infer.ais import AISResult, ais_log_likelihood
from pyvae.infer.diagnostics import Evaluation, evaluate
from pyvae.infer.importance import LogLikelihood, log_likelihood
from pyvae.models import CVAE, HVAE, M2, VAE
from pyvae.parts import guides, likelihoods, priors
from pyvae.runs import load, save
from pyvae.train.loop import evaluate_elbo, fit

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
