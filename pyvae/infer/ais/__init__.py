"""Annealed importance sampling (AIS) of log p(x), forward and reverse (:mod:`.api`), split as
Pyro's MCMC is: the temperature path and the latents' layout (:mod:`.schedule`), the annealed
densities of the programs (:mod:`.potential`), the HMC kernel (:mod:`.hmc`)."""

from pyvae.infer.ais.api import (
    STARTS,
    AISResult,
    ais_log_likelihood,
    check,
    reverse_ais,
)
from pyvae.infer.ais.hmc import DIVERGENCE, velocity_verlet
from pyvae.infer.ais.potential import compile_session
from pyvae.infer.ais.schedule import SCHEDULES, ais_ladder, schedule
from pyvae.infer.importance import STREAMS, point_seed

__all__ = [
    "DIVERGENCE",
    "SCHEDULES",
    "STARTS",
    "STREAMS",
    "AISResult",
    "ais_log_likelihood",
    "check",
    "compile_session",
    "ais_ladder",
    "point_seed",
    "reverse_ais",
    "schedule",
    "velocity_verlet",
]
