"""A training step's loss and gradients: the objective run as written, or recorded and compiled.

As written, each step runs the user's model and guide through Pyro's handlers and autograd:
Python, the traces' bookkeeping, and some forty small kernels one at a time. Compiled, the step is
recorded once per kind of step (:func:`pyvae.compiled.compile_function`): the same objective, run
with tensors standing for the minibatch and the parameters, its loss and
``torch.autograd.grad`` of it traced into one graph of aten operations, which inductor compiles.
The guide's reparameterized draws (``loc + scale * eps``) take their noise ``eps`` as an input,
drawn as the program draws it (:class:`pyvae.compiled.Noise`): compiled and as written, a seeded
step gives the same loss and gradients up to floating-point reassociation, and a resumed run
draws what an uninterrupted one draws. Each later step of that kind calls the compiled graph.

A kind of step is what the recording depends on: the calls' shapes, strides, dtypes, devices and
sizes (N, the group, the kind), the KL weight unless it changes (KL warm-up makes it an input),
which parameters, buffers and submodules the modules hold and which parameters are trainable (a
callback that freezes the encoder mid-epoch), and the values of every submodule's Python settings
(train/eval mode, numbers, strings: a model whose code branches on ``self.temperature`` is
recorded again when it changes), all checked each step (a few microseconds); which settings and
public plain tensor attributes (``self.mask``) a module has are listed again each epoch, and when a
module gains or loses an attribute (:class:`pyvae.compiled.Watched`). A kind is recorded the
second time an epoch serves it (under ``auto``, once five steps were timed as written): the first
step of a run is checked by Pyro's validation as written, and the one short last batch of an epoch
costs no compilation; under ``auto`` a kind that a setting's new value made is compiled only if
it would live long enough to repay its compilation, judged by the kinds its earlier values made,
or once it has lived twice as long as they did (and five steps). The recording leaves the model
as it found it (BatchNorm's running statistics count the steps, not the recording). What the
program computes from anything else (a global variable) is frozen at the recording: train such a
program with ``compile="off"``.

A program that cannot be recorded (its Python reads a computed tensor's value: ``.tolist()``,
``if z.sum() > 0``; noise whose distribution it computes, as a Gamma's; draws from Python's or
numpy's generators; a computed tensor it stores on its module; a score-function gradient's
surrogate that reads values) trains as written, with a one-line notice naming why. On a CPU
dropout's noise is an input like the guide's (on a GPU torch's fused dropout reads its input: as
written).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import pyro
import torch

from pyvae.compiled import (
    Compiled,
    NotCompiled,
    Watched,
    check_compile,
    compile_function,
    describe,
)
from pyvae.data.batching import Call
from pyvae.distributed import World
from pyvae.program import invalid_named, recordable

#: ``auto`` compiles a run whose remaining steps would take at least this long as written: a
#: compilation saves 25-70% of a step on a CPU and takes 2-5 s for the default model (4-5 s the
#: first time, 2-3 s from inductor's cache; 12-15 s on a machine that never ran torch.compile:
#: benchmarks/RESULTS.md), which the smallest saving repays from here on
AUTO_MIN_SECONDS = 20.0
#: steps timed as written before ``auto`` compiles, and compiled steps timed before it keeps the
#: compiled step (or goes back)
AUTO_TRIALS = 5


class Recorded(NamedTuple):
    """A compiled step and which of the trainable parameters it gives a gradient (the others keep
    ``.grad`` None, as the step as written leaves them)."""

    compiled: Compiled
    used: list[bool]


class Step:
    """``step(calls, beta, validate, remaining)``: the loss of one step's calls
    (:class:`pyvae.train.objectives.Objective`, (2, C)) with the gradients of its sum put in the
    parameters' ``.grad``; as written (through ``loss_of``, the objective or its
    ``DistributedDataParallel`` wrapper), or compiled (see the module's docstring). ``mode`` is
    one of :data:`pyvae.compiled.COMPILE_CHOICES`; ``beta_varies``: the KL weight changes step by
    step (an input of the recording); ``say`` prints what ``auto`` chose and why a program runs as
    written. Under torchrun (``world``) a compiled step averages the processes' gradients and takes
    rank 0's buffers itself, as ``DistributedDataParallel`` does for a step as written; the
    processes record each kind of step together (all of them, or none: then all run as written),
    and ``auto`` times each step by its slowest process, so that all of them choose alike."""

    def __init__(
        self,
        objective: torch.nn.Module,
        loss_of: Callable,
        mode: str,
        beta_varies: bool,
        say: Callable[[str], None],
        world: World | None = None,
    ) -> None:
        self.objective, self.loss_of, self.mode = objective, loss_of, check_compile(mode)
        self.beta_varies, self.say, self.world = beta_varies, say, world or World()
        self.compiled: dict[tuple, Recorded | None] = {}
        self.seen: Counter = Counter()
        self.eager_seconds: list[float] = []
        self.trials: dict[tuple, list[float]] = {}
        #: why the program runs as written (once a recording failed, no other is tried)
        self.uncompiled: str | None = "compile is off" if mode == "off" else None
        self.watched = Watched(objective)
        self.said_changed: set[str] = set()  # settings named by _say_why_again
        self.said_short: set[str] = set()  # and by _short_lived
        # auto's ledger: the steps each kind served after it was first considered for compiling,
        # what compiling it took, the seconds a compiled step of it saved (once judged), the
        # kinds left as written as short-lived, with the steps after which they are not, and
        # those that outlived that
        self.lived: Counter = Counter()
        self.cost: dict[tuple, float] = {}
        self.saved: dict[tuple, float] = {}
        self.skipped: dict[tuple, float] = {}
        self.outlived: set[tuple] = set()

    def new_epoch(self) -> None:
        self.seen.clear()
        self.watched.refresh()

    def __call__(self, calls: list[Call], beta: float, validate: bool, remaining: int):
        key = self._key(calls, beta)
        if key in self.compiled:  # a kind once considered (a setting changed every step is not)
            self.lived[key] += 1
            if key in self.skipped and self.lived[key] > self.skipped[key]:
                del self.skipped[key], self.compiled[key]  # it outlived the earlier values
                self.outlived.add(key)
        if key not in self.compiled and self.uncompiled is None:
            self.seen[key] += 1
            # auto waits for a step timed as written (the first, validated, is slower)
            if self.seen[key] >= 2 and (self.mode != "auto" or self.eager_seconds):
                self._compile(key, calls, beta, remaining)
        recorded = self.compiled.get(key)
        if recorded is None:
            return self._as_written(calls, beta, validate)
        started = time.perf_counter()
        losses = self._run(recorded, calls, beta)
        if key in self.trials:
            self._judge(key, self._timed(started, losses), remaining)
        return losses

    def _as_written(self, calls: list[Call], beta: float, validate: bool) -> torch.Tensor:
        started = time.perf_counter()
        # the first step runs with Pyro's and torch's validation (shapes, supports, parameter
        # constraints), which catches a broken model or part; the data were checked before, so
        # the remaining steps skip those checks (they cost about 5% of a step on a CPU)
        with (
            pyro.validation_enabled(validate and pyro.infer.util.is_validation_enabled()),
            invalid_named("the first training step: "),
        ):
            losses = self.loss_of(calls, beta)  # (model's, auxiliary) x calls
        losses.sum().backward()
        if not validate and self.mode == "auto" and self.uncompiled is None:  # auto may decide
            seconds = self._timed(started, losses)
            self.eager_seconds = [*self.eager_seconds[-(AUTO_TRIALS - 1) :], seconds]
        return losses.detach()

    def _run(self, recorded: Recorded, calls: list[Call], beta: float) -> torch.Tensor:
        self.world.share(self.objective.buffers())
        losses, *grads = recorded.compiled(*self._inputs(calls, beta))
        self.world.average(grads)
        grads = iter(grads)
        for p, used in zip(self.watched.params, recorded.used, strict=True):
            p.grad = next(grads) if used else None
        return losses

    # -- what a recording depends on -----------------------------------------------------
    def _key(self, calls: list[Call], beta: float) -> tuple:
        calls_key = tuple(
            (c.kind, c.group, c.num_data, tuple(describe(a) for a in c.args)) for c in calls
        )
        return calls_key, None if self.beta_varies else beta, self.watched.key()

    def _inputs(self, calls: list[Call], beta: float) -> list[torch.Tensor]:
        tensors = [a for c in calls for a in c.args if isinstance(a, torch.Tensor)]
        if self.beta_varies:
            tensors.append(torch.full((), float(beta), device=tensors[0].device))
        return [*tensors, *self.watched.params]

    # -- recording and compiling -----------------------------------------------------------
    def _compile(self, key: tuple, calls: list[Call], beta: float, remaining: int) -> None:
        """Record and compile the step of ``key`` (``auto``: if the run is long enough, once
        :data:`AUTO_TRIALS` steps were timed as written: the first few warm up, and one alone
        would flatter the compiled step)."""
        if self.mode == "auto":
            eager = _median(self.eager_seconds)
            if eager * remaining < AUTO_MIN_SECONDS:
                self.compiled[key] = None
                self.say(
                    f"compile auto: runs as written (its remaining {remaining} steps take about "
                    f"{eager * remaining:.0f} s, too few to repay a compilation)"
                )
                self.uncompiled = "too short a run"
                return
            if len(self.eager_seconds) < AUTO_TRIALS:
                return
            if self._short_lived(key, remaining):
                self.compiled[key] = None
                return
        self.compiled[key] = None
        started = time.perf_counter()
        try:
            recorded, why = self._record(calls, beta), None
        except NotCompiled as failed:
            why = str(failed)
        why = self._why_any_failed(why)
        if why is not None:
            self.uncompiled = why
            self.say(f"compile {self.mode}: the program trains as written: {why}")
            return
        self.compiled[key] = recorded
        seconds = self._timed(started, None)
        self.cost[key] = seconds
        self._say_why_again(key, seconds)
        if self.mode == "auto":
            self.trials[key] = []
        else:
            self.say(f"compile on: the training step compiled in {seconds:.1f} s")

    def _timed(self, started: float, result: torch.Tensor | None) -> float:
        """:func:`_seconds`; under torchrun the slowest process's, which every process then has: a
        step lasts as long as its slowest process, and ``auto`` decides alike in all of them."""
        seconds = _seconds(started, result)
        if self.world.size == 1:
            return seconds
        mine = torch.tensor([seconds], dtype=torch.float64, device=self.watched.params[0].device)
        return self.world.max(mine).item()

    def _why_any_failed(self, why: str | None) -> str | None:
        """Why this process, or under torchrun the first that did, could not record its step:
        the processes run the same kind of step (a compiled step's all-reduce of the gradients
        meets no other's)."""
        if self.world.size == 1:
            return why
        return next((reason for reason in self.world.gather(why) if reason is not None), None)

    def _siblings(self, key: tuple) -> list[tuple]:
        """The kinds recorded before ``key`` that differ from it only in the settings' values."""
        calls, beta, (listed, _) = key
        return [
            other
            for other in self.compiled
            if other != key and (other[0], other[1], other[2][0]) == (calls, beta, listed)
        ]

    def _changed_settings(self, key: tuple) -> set[str]:
        """The settings whose values set ``key`` apart from the kinds recorded before it."""
        values = key[2][1]
        return {
            f"{type(module).__name__}.{name}"
            for other in self._siblings(key)
            for (module, name), now, then in zip(
                self.watched.settings, values, other[2][1], strict=True
            )
            if now != then
        }

    def _short_lived(self, key: tuple, remaining: int) -> bool:
        """``auto``: whether ``key``, a kind that new values of settings made, would not repay its
        compilation if it lived as long as the compiled kinds the same settings made before it
        (the median of the steps they served): the median of what a compiled step of theirs
        saved, times that life, falls short of the median of what compiling them took. Such a
        kind runs as written until it has lived twice that life and the steps of a judgement
        more (a value annealed, then held: having outlived the others, it is likely to live as
        long again), and is then compiled, unless compiled steps saved nothing at all."""
        made = [k for k in self._siblings(key) if k in self.cost]
        savings = [saved for k in made if (saved := self._saving(k)) is not None]
        if not savings:
            return False
        life = min(_median([self.lived[k] for k in made]), remaining)
        saving, cost = _median(savings), _median([self.cost[k] for k in made])
        if saving > 0 and (key in self.outlived or saving * life >= cost):
            return False
        self.skipped[key] = 2 * life + AUTO_TRIALS
        changed = self._changed_settings(key)
        if not changed <= self.said_short:
            self.said_short |= changed
            repays = (
                f"each value lasted about {life:.0f} steps, which save {saving * life:.1f} s "
                f"compiled against a compilation of {cost:.1f} s"
                if saving > 0
                else "compiled, the earlier values' steps were no faster"
            )
            self.say(
                f"compile auto: steps after {', '.join(sorted(changed))} changed run as written: "
                + repays
            )
        return True

    def _saving(self, key: tuple) -> float | None:
        """What a compiled step of ``key`` saved: as judged, or from the steps timed before its
        kind ended (a value that lived fewer steps than a judgement takes; the first compiled
        call, which may still warm up, only if it was the one); None if none."""
        if key in self.saved:
            return self.saved[key]
        trials = self.trials.get(key, [])
        timed = trials[1:] or trials
        return _median(self.eager_seconds) - _median(timed) if timed else None

    def _say_why_again(self, key: tuple, seconds: float) -> None:
        """Name the settings whose new values made ``key`` a kind of its own, the first time: a
        number annealed by a callback costs a compilation at each change."""
        changed = self._changed_settings(key)
        if changed and not changed <= self.said_changed:
            self.said_changed |= changed
            self.say(
                f"compile {self.mode}: the step was recorded again ({seconds:.1f} s) because "
                f"{', '.join(sorted(changed))} changed; a number that changes often costs a "
                "compilation each time: keep it in a tensor buffer updated in place, which the "
                "compiled step reads at every call"
            )

    def _record(self, calls: list[Call], beta: float) -> Recorded:
        names = [n for n, p in self.objective.named_parameters() if p.requires_grad]
        if len(names) != len(self.watched.params):  # the parameters changed since the epoch began
            self.watched.refresh()
        inputs = self._inputs(calls, beta)
        split = len(inputs) - len(names)
        used: list[bool] = []

        def step(*tensors: torch.Tensor) -> tuple:
            leaves = [p.detach().requires_grad_() for p in tensors[split:]]
            served, step_beta = _rebuilt(calls, tensors[:split], beta, self.beta_varies)
            with recordable():
                losses = torch.func.functional_call(
                    self.objective, dict(zip(names, leaves, strict=True)), (served, step_beta)
                )
            grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
            used[:] = [g is not None for g in grads]
            laid = (_laid_like(g, p) for g, p in zip(grads, leaves, strict=True) if g is not None)
            return (losses.detach(), *laid)

        compiled = compile_function(step, *inputs, module=self.objective, autotune=False)
        trainable = [t for t in compiled.constants if t.requires_grad]
        if trainable:
            raise NotCompiled(
                f"it reads a trainable tensor of shape {tuple(trainable[0].shape)} that is not "
                "a parameter of the model, whose gradient the recording would not take"
            )
        return Recorded(compiled, used)

    def _judge(self, key: tuple, seconds: float, remaining: int) -> None:
        """``auto``: keep the compiled step if it measured faster than as written."""
        trials = self.trials[key]
        trials.append(seconds)
        if len(trials) <= AUTO_TRIALS:  # the first call may still be warming up
            return
        self.saved[key] = saving = self._saving(key)
        del self.trials[key]
        eager = _median(self.eager_seconds)
        compiled = eager - saving
        if saving <= 0:
            self.compiled[key] = None
            self.say(
                f"compile auto: runs as written: the compiled step took {compiled * 1e3:.2f} ms "
                f"against {eager * 1e3:.2f} ms as written"
            )
            return
        self.say(
            f"compile auto: the training step compiled in {self.cost[key]:.1f} s runs in "
            f"{compiled * 1e3:.2f} ms against {eager * 1e3:.2f} ms as written (about "
            f"{saving * remaining:.0f} s saved over the run's remaining {remaining} "
            "steps)"
        )


def _rebuilt(calls: list[Call], tensors: tuple, beta: float, beta_varies: bool):
    """``calls`` with their tensors replaced by ``tensors`` (and the KL weight by the last of them
    when it varies): what the recording runs the objective on."""
    given = iter(tensors)
    served = [
        Call(
            tuple(next(given) if isinstance(a, torch.Tensor) else a for a in c.args),
            c.group,
            c.num_data,
            c.kind,
        )
        for c in calls
    ]
    return served, next(given) if beta_varies else beta


def _laid_like(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``grad`` with ``param``'s strides, as autograd lays out a ``.grad`` (fused Adam reads a
    gradient and its parameter element by element in memory order: a transposed one would update
    the wrong entries)."""
    if grad.stride() == param.stride():
        return grad
    return grad.new_empty_strided(param.shape, param.stride()).copy_(grad)


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else math.inf


def _seconds(started: float, result: torch.Tensor | None) -> float:
    """Seconds since ``started``, once the work that made ``result`` on a GPU is done."""
    if result is not None and result.device.type == "cuda":
        torch.cuda.synchronize(result.device)
    return time.perf_counter() - started
