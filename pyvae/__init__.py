"""pyvae: variational autoencoders written as Pyro programs.

Layers, from the bottom: :mod:`pyvae.nets` (networks), :mod:`pyvae.priors`,
:mod:`pyvae.likelihoods`, :mod:`pyvae.guides` (distributions), :mod:`pyvae.models`
(Pyro models and guides; :mod:`pyvae.program` reads any such program), :mod:`pyvae.train` (SVI; :mod:`pyvae.distributed` under torchrun), :mod:`pyvae.importance` (importance
sampling), :mod:`pyvae.ais` (annealed importance sampling), :mod:`pyvae.bdmc`, :mod:`pyvae.gap`
and :mod:`pyvae.diagnostics`, :mod:`pyvae.data`, :mod:`pyvae.plots`,
:mod:`pyvae.config`, :mod:`pyvae.cli`.

All ELBOs and log-likelihoods are in nats per data point; NLL is their negative.
"""

from pyvae import program
from pyvae.errors import DataNotFound, PyvaeError, PyvaeWarning
from pyvae.infer import ais, bdmc, gap  # noqa: E402  (after diagnostics, which they build on)
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
