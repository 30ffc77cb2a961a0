"""The annealed densities of AIS, read from the programs themselves.

At temperature b a chain's unnormalized log density in unconstrained coordinates u is

    log f_b(u) = (1 - b) log f_0(z) + b log p(x, z) + log |det dz/du|,     z = T(u),

with f_0 = q(z|x) (the guide) or p(z) (the prior): the model and the guide conditioned on the
chain's values and traced (:mod:`pyvae.program`). With ``compile=True`` one evaluation, gradients
included, is recorded as a graph and compiled (:mod:`pyvae.compiled`), and a second graph returns
the gradients alone, for the leapfrog steps inside a trajectory; a program whose Python decides by
the latents' values runs as written, and :func:`compile_session` warns once why.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from pyro import poutine

from pyvae import program
from pyvae.compiled import NotCompiled, compile_function
from pyvae.errors import warn
from pyvae.infer.ais.schedule import Layout

#: why the AIS runs of the current :func:`compile_session` run uncompiled, once one could not
_session: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "pyvae_ais_compile_session", default=None
)


@contextlib.contextmanager
def compile_session() -> Iterator[dict]:
    """The AIS runs inside share one attempt at ``compile=True``: the first that must run the
    program uncompiled warns why, and the rest run it as written without trying (or warning)
    again. Each :func:`~pyvae.infer.ais.ais_log_likelihood` call is a session of its own unless it
    runs inside one (evaluate, bdmc and gap run all their chunks and ladders inside one)."""
    outer = _session.get()
    if outer is not None:
        yield outer
        return
    token = _session.set({})
    try:
        yield _session.get()
    finally:
        _session.reset(token)


class Potential:
    """log f_0, log p(x, z) and log |J| of R rows of one vectorized program run, and their
    gradients in u; ``evaluate(u)`` is a chain's state, ``gradients(u)`` the two gradients alone."""

    def __init__(self, model, batch: tuple, shape, layout: Layout, start: str) -> None:
        self.model, self.batch, self.shape, self.layout, self.start = (
            model,
            batch,
            shape,
            layout,
            start,
        )
        self.rows, self.device = batch[0].shape[0], batch[0].device
        self.guide_sites = None  # set by prepare: the guide's sites when they do not move with z
        self.potential, self.gradients = self.densities, self.densities_gradients

    def prepare(self, u: torch.Tensor, compile: bool) -> None:
        """Read the guide's sites once if they do not depend on z, and compile if asked."""
        self.guide_sites = self.constant_guide(u) if self.start == "guide" else None
        if compile:
            self.compile(u)

    @property
    def compiled(self) -> bool:
        return self.potential != self.densities

    def _guide_trace(self, values: dict):
        conditioned = poutine.condition(self.model.guide, data=values)
        return poutine.trace(conditioned).get_trace(*self.batch)

    def constant_guide(self, u: torch.Tensor) -> dict | None:
        """The guide's sites, if none of their distributions depends on the latents (a guide whose
        parameters are functions of x alone): then log q(z|x) is their ``log_prob`` at the chain's
        z without running the guide's networks again. None for a guide like q(z1|x) q(z2|z1)."""
        with torch.enable_grad():
            values, _ = self.layout.constrain(u.detach().requires_grad_(True))
            with program.LocalParams():
                trace = self._guide_trace(values)
        sites = {s["name"]: s for s in program.sample_sites(trace)}
        # the parameters are frozen here, so only a path from u makes a tensor need a gradient
        if any(s["fn"].log_prob(s["value"].detach()).requires_grad for s in sites.values()):
            return None
        return sites

    def _log_prob(self, trace, names=None) -> torch.Tensor:
        total = torch.zeros(self.rows, device=self.device)
        sites = trace.values() if isinstance(trace, dict) else program.sample_sites(trace)
        for site in sites:
            if site["infer"].get("is_auxiliary") or (
                names is not None and site["name"] not in names
            ):
                continue
            nesting, plate = self.shape.max_plate_nesting, self.shape.data_plate
            total = total + program.site_log_prob(site, nesting, 0, self.rows, plate)[0]
        return total

    def _log_f0(self, u0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log q(z|x), log |J|) at u0, from the guide's constant sites when it has them."""
        values0, log_jac0 = self.layout.constrain(u0)
        if self.guide_sites is None:
            return self._log_prob(self._guide_trace(values0)), log_jac0
        sites = {n: {**site, "value": values0[n]} for n, site in self.guide_sites.items()}
        return self._log_prob(sites), log_jac0

    def densities(self, u: torch.Tensor) -> tuple:
        """(log f_0, log p(x, z), log |J|, d/du (log f_0 + log |J|), d/du (log p + log |J|)) per
        row at u, from the programs as written.

        The two densities see two leaves holding the same u, so one backward pass gives both
        gradients.
        """
        with torch.enable_grad():
            u0, u1 = u.detach().requires_grad_(True), u.detach().requires_grad_(True)
            values, log_jac = self.layout.constrain(u1)
            with program.LocalParams():
                conditioned = poutine.condition(self.model.model, data=values)
                model_trace = poutine.trace(conditioned).get_trace(*self.batch)
                log_joint = self._log_prob(model_trace)
                if self.start == "prior":
                    log_f0 = self._log_prob(model_trace, set(self.shape.latent_sites))
                else:
                    log_f0, log_jac0 = self._log_f0(u0)
            if self.start == "prior":  # f_0 is part of the model's trace: a second pass
                g0 = torch.autograd.grad((log_f0 + log_jac).sum(), u1, retain_graph=True)[0]
                g1 = torch.autograd.grad((log_joint + log_jac).sum(), u1)[0]
            else:
                total = (log_f0 + log_jac0).sum() + (log_joint + log_jac).sum()
                g0, g1 = torch.autograd.grad(total, (u0, u1))
        return log_f0.detach(), log_joint.detach(), log_jac.detach(), g0, g1

    def densities_gradients(self, u: torch.Tensor) -> tuple:
        """The two gradients of :meth:`densities` alone: all that a leapfrog step short of the
        trajectory's end reads. Compiled, the values it does not return are not computed (on the
        default model the likelihood's log-mass over every pixel: 9 of 10 evaluations skip it)."""
        return self.densities(u)[3:]

    def compile(self, u: torch.Tensor) -> None:
        """:meth:`densities` and :meth:`densities_gradients` compiled at u
        (:func:`pyvae.compiled.compile_function`) as ``potential`` and ``gradients``, if they give
        the program's numbers there (to float rounding: fusion reorders sums); else the program
        as written, with a warning saying why the first time in the :func:`compile_session`."""
        session = _session.get()
        if "uncompiled" in session:
            return
        frozen = [*self.model.parameters(), *self.model.buffers()]
        try:
            potential = compile_function(self.densities, u, module=self.model, frozen=frozen)
            gradients = compile_function(
                self.densities_gradients, u, module=self.model, frozen=frozen
            )
            program_s = self.densities(u)
            mine = (*potential(u), *gradients(u))
            if not all(map(_same, mine, (*program_s, *program_s[3:]))):
                raise NotCompiled("its compiled densities differ from the program's")
        except NotCompiled as why:
            session["uncompiled"] = str(why)
            warn(f"AIS runs the program uncompiled: {why}")
            return
        self.potential, self.gradients = potential, gradients

    def evaluate(self, u: torch.Tensor) -> dict:
        """A chain's state at u: its coordinates, the densities and their gradients."""
        f0, joint, jac, g0, g1 = self.potential(u)
        return {"u": u.detach(), "f0": f0, "joint": joint, "jac": jac, "g0": g0, "g1": g1}


def log_density(state: dict, b: float) -> torch.Tensor:
    """log f_b at a state (:meth:`Potential.evaluate`)."""
    return (1 - b) * state["f0"] + b * state["joint"] + state["jac"]


def grad_log_density(state: dict, b: float) -> torch.Tensor:
    """d/du log f_b at a state."""
    return (1 - b) * state["g0"] + b * state["g1"]


def _same(mine: torch.Tensor, program_s: torch.Tensor) -> bool:
    """Whether a compiled density (or gradient) is the program's to float rounding (1e-4 of the
    largest finite magnitude in the row: fusion reorders sums), NaN and infinities in the same
    places."""
    if mine.shape != program_s.shape or mine.dtype != program_s.dtype:
        return False
    a, b = mine.reshape(len(mine), -1), program_s.reshape(len(program_s), -1)
    scale = 1 + torch.where(torch.isfinite(b), b.abs(), torch.zeros_like(b)).amax(1, keepdim=True)
    close = torch.isclose(a, b, rtol=0, atol=0, equal_nan=True) | ((a - b).abs() <= 1e-4 * scale)
    return bool(close.all())
