"""Inference on a trained model: how well it explains the data and how good its guide is.

All estimates are in nats per data point (log p(x); NLL is its negative).

* :mod:`pyvae.infer.importance`: importance-sampled log p(x) with Pareto k-hat.
* :mod:`pyvae.infer.ais`: annealed importance sampling, forward and reverse (api, schedule,
  potential, hmc).
* :mod:`pyvae.infer.bdmc`: bidirectional Monte Carlo sandwiches on simulated data.
* :mod:`pyvae.infer.gap`: the inference gap split into approximation and amortization.
* :mod:`pyvae.infer.diagnostics`: ``evaluate``, the whole report.
* :mod:`pyvae.infer.explore`: samples, reconstructions, traversals, embeddings, anomaly scores.
* :mod:`pyvae.infer.report`: the one shape of their results: ``summary()``, ``table()``,
  ``write(folder)`` (the pictures are :mod:`pyvae.viz.plots`'s, drawn by the caller).
"""

from pyvae.infer import ais, bdmc, gap
from pyvae.infer.ais import AISResult, ais_log_likelihood, reverse_ais
from pyvae.infer.bdmc import BDMCResult
from pyvae.infer.diagnostics import Evaluation, evaluate
from pyvae.infer.gap import GapResult, inference_gap
from pyvae.infer.importance import LogLikelihood, log_likelihood
from pyvae.infer.report import Report

__all__ = [
    "AISResult",
    "BDMCResult",
    "Evaluation",
    "GapResult",
    "LogLikelihood",
    "Report",
    "ais",
    "ais_log_likelihood",
    "bdmc",
    "evaluate",
    "gap",
    "inference_gap",
    "log_likelihood",
    "reverse_ais",
]
