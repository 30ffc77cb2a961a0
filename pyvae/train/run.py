"""One training run: :class:`Training`, whose loop takes the SVI steps and calls the callbacks of
:mod:`pyvae.train.callbacks` around them (each epoch's further numbers:
:class:`pyvae.train.validation.Validation`).

All ELBO numbers are in nats per data point (see :mod:`pyvae.train.loop`).
"""

from __future__ import annotations

import contextlib
import sys
import time

import pyro
import torch
from tqdm.auto import tqdm

from pyvae.data.batching import KINDS
from pyvae.distributed import by_dtype
from pyvae.errors import PyvaeError
from pyvae.train import protocol
from pyvae.train import resume as state
from pyvae.train.callbacks import Callbacks, StepAborted, StopOnSignal
from pyvae.train.step import Step
from pyvae.train.validation import speaker

#: at most this many seconds of steps pass between two reads of :class:`Faults` on the host
FAULT_CHECK_SECONDS = 1.0


def make_adam(params, lr: float) -> torch.optim.Adam:
    """Adam with torch's fused kernel where the device supports it (one kernel for all parameters
    instead of a Python loop over them); the plain implementation elsewhere. Same update rule."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


class Training:
    """The state of a run (model, optimizer, schedule, step counter, history) and its loop.

    The KL weight at step t is beta min(1, t / (W S)) for a warm-up of W epochs of S steps, else
    beta. The loss is a module (the objective, or under ``torchrun`` the objective wrapped in
    ``DistributedDataParallel``, which averages the processes' gradients and sends rank 0's
    buffers each step: a user's network may keep running statistics; compiled steps do the
    same themselves, :class:`~pyvae.train.step.Step`).

    What callbacks read: ``model``, ``optimizer``, ``schedule``, ``world``, ``out`` (the run
    folder or None), ``epochs``, ``epoch`` (the current one; the last completed before the first),
    ``step`` (Adam steps so far), ``step_in_epoch``, ``loss`` (the last step's), ``history``,
    ``resumed`` (the restored training state, {} for a fresh run), ``objective_key`` (the
    validation objective's record key), ``num_data`` (N); what they may set: ``stop``.
    """

    def __init__(
        self, model, objective, plan, world, device, validation, settings: dict, callbacks
    ) -> None:
        self.model, self.plan, self.world, self.device = model, plan, world, device
        self.validation = validation
        self.epochs, self.out = settings["epochs"], settings["out"]
        self.settings = settings
        self.optimizer = make_adam(model.parameters(), settings["lr"])
        # before a resumed optimizer state: it sets the rate
        self.schedule = protocol.Schedule(settings["lr_schedule"], self.optimizer, self.epochs)
        self.objective_key = protocol.objective_key(settings["elbo"], settings["valid_samples"])
        self.num_data = settings["num_data"]
        self.callbacks = Callbacks(callbacks)
        loss_of = (
            objective if world.size == 1 else torch.nn.parallel.DistributedDataParallel(objective)
        )
        self.step_of = Step(
            objective,
            loss_of,
            settings["compile"],
            beta_varies=bool(settings["kl_warmup_epochs"]),
            say=speaker(settings["progress"]),
            world=world,
        )
        self.step, self.history, self.resumed = 0, [], {}
        self.stop, self.signum, self.validated, self.loss = False, 0, False, None
        self._seed_or_restore(settings["seed"])
        # under torchrun the processes agree on a signal every step, a read anyway: the faults are
        # read with it, so that all of them raise at the same step
        self.faults = Faults(self.optimizer, self.step, device, deferred=world.size == 1)
        self.epoch, self.step_in_epoch = len(self.history), 0

    def _seed_or_restore(self, seed: int | None) -> None:
        """One permutation of the data per epoch, drawn from (order_seed, epoch) alike in every
        process; each process draws different noise. A resumed run takes both from its state."""
        self.order_seed = self.world.broadcast(
            seed if seed is not None else int(torch.randint(2**31, ()))
        )
        if seed is not None or self.world.size > 1:
            pyro.set_rng_seed(self.order_seed + self.world.rank)
        self.steps_per_epoch = self.plan.steps(self.order_seed)
        if self.settings["resume"]:
            self.history, self.resumed = state.restore(
                self.model, self.optimizer, self.out / "checkpoint.pt", self.world, self.schedule
            )
            self.step, self.order_seed = self.resumed["step"], self.resumed["order_seed"]

    def run(self) -> list[dict]:
        """Train from the epoch after the history's last; return the history."""
        signals, error = StopOnSignal(enabled=self.out is not None), None
        self.first_epoch = len(self.history) + 1
        try:
            self.callbacks.on_train_begin(self)
            for epoch in range(self.first_epoch, self.epochs + 1):
                if self.stop:
                    break
                self.epoch = epoch
                self.callbacks.on_epoch_begin(self)
                for step_in_epoch, calls, before in self.batches():
                    self.step_in_epoch = step_in_epoch
                    if self.train_step(calls, signals, before):
                        self.callbacks.on_step_end(self)
                    else:
                        self.check_faults()  # a stop's checkpoint is never written after one
                        self.callbacks.on_stop(self)
                self.history.append(self.closing_record(signals))
                self.callbacks.on_epoch_end(self, self.history[-1])
        except BaseException as e:
            error = e
            self._note_unread_fault(e)
            raise
        finally:
            signals.restore()  # also when training fails: the caller's Ctrl-C must work again
            self.callbacks.on_train_end(self, error)
        return self.history

    def batches(self):
        """The epoch's minibatch calls, numbered from 1 within it. A run stopped by a signal
        mid-epoch resumes inside it: the epoch's order is drawn again, the batches already used
        are skipped, the generators go on from the stop."""
        self.model.train()
        self.step_of.new_epoch()
        self.epoch_lr = self.schedule.lr
        done = self.resumed.get("step_in_epoch", 0) if self.epoch == self.first_epoch else 0
        self.step_in_epoch = done
        self.started = time.perf_counter() - (self.resumed["partial_seconds"] if done else 0.0)
        self.sums = torch.zeros(len(KINDS), 3, device=self.device)
        if done:
            points = done * self.settings["batch_size"]
            self.sums = resumed_sums(self.resumed["partial_total"], points, self.device)
        bar = tqdm(
            self.plan.epoch(self.epoch, self.order_seed, done),
            total=self.steps_per_epoch,
            initial=done,
            desc=f"epoch {self.epoch}/{self.epochs}",
            leave=False,
            # no carriage-return frames in log files
            disable=not self.settings["progress"] or not sys.stderr.isatty(),
            file=sys.stderr,
        )
        return self._with_generators(enumerate(bar, start=done + 1))

    def _with_generators(self, numbered):
        """(step in epoch, calls, torch's generators before the calls were drawn) of each step:
        a dynamically binarized minibatch draws from them as it is served."""
        while True:
            before = state.torch_rng(self.device)
            step = next(numbered, None)
            if step is None:
                return
            yield (*step, before)

    def kl_weight(self) -> float:
        warmup = self.settings["kl_warmup_epochs"]
        beta = self.settings["beta"]
        return beta * min(1.0, self.step / (warmup * self.steps_per_epoch)) if warmup else beta

    def train_step(self, calls: list, signals: StopOnSignal, before: tuple) -> bool:
        """One Adam step on the minibatch ``calls``; a non-finite loss or gradient is an error
        (:class:`Faults`: the weights stay as they were before it). A signal while its loss and
        gradients are computed undoes it (``before``: torch's generators as they were) and
        returns False: nothing of the step remains, so the run resumes with it exactly."""
        self.step += 1
        try:
            with signals.abortable(self.world.size == 1):
                losses = self._gradients(calls)
        except StepAborted as stopped:
            self.step, self.step_in_epoch, self.signum = (
                self.step - 1,
                self.step_in_epoch - 1,
                stopped.signum,
            )
            self.optimizer.zero_grad(set_to_none=True)
            state.set_torch_rng(before, self.device)
            return False
        self._update(calls, signals, losses)
        return True

    def _gradients(self, calls: list) -> torch.Tensor:
        """The minibatch's loss and its gradients (nothing changed yet but ``.grad``)."""
        self.optimizer.zero_grad(set_to_none=True)
        remaining = self.epochs * self.steps_per_epoch - self.step
        losses = self.step_of(calls, self.kl_weight(), not self.validated, remaining)
        self.loss, self.validated = losses.sum(), True
        return losses

    def _update(self, calls: list, signals: StopOnSignal, losses: torch.Tensor) -> None:
        """Adam's step from the gradients, unless this or an earlier step's loss or gradient was
        not finite (:class:`Faults`)."""
        if self.settings["clip_norm"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings["clip_norm"])
        finite = self.faults.check(self.loss, self.model.parameters())
        signum = signals.signum or 0
        # the processes skip, stop and fail together: on a fault or a signal in any of them
        if self.world.size > 1:
            flags = torch.cat([(~finite).long(), torch.full((1,), signum, device=self.device)])
            flags = self.world.max(flags)
            finite, signum = flags[:2] == 0, int(flags[2])
        self.faults.record(finite)
        if signum or self.faults.due():
            self.check_faults()
        self.optimizer.step()
        self.signum = signum
        tally(self.sums, calls, losses)

    def check_faults(self) -> None:
        """Raise the run's first non-finite loss or gradient, if there was one (after an epoch's
        steps, before a stop's checkpoint, and at least every :data:`FAULT_CHECK_SECONDS`)."""
        fault = self._first_fault()
        if fault is not None:
            raise PyvaeError(fault)

    def _note_unread_fault(self, error: BaseException) -> None:
        """Add to ``error`` the fault the steps had and the host had not read yet (a Ctrl-C, or a
        callback's error, would hide it: the parameters are those from before it)."""
        with contextlib.suppress(Exception):  # a device that fails to answer: the error stands
            fault = self._first_fault()
            if fault is not None and fault not in str(error):
                error.add_note(f"before it: {fault}")

    def _first_fault(self) -> str | None:
        """The message of the run's first fault (:meth:`Faults.first`, read now), or None."""
        first = self.faults.first()
        if first is None:
            return None
        what, step = first
        return self._fault(what, step - (self.step - self.step_in_epoch))

    def closing_record(self, signals: StopOnSignal) -> dict:
        """:meth:`epoch_record`, which a signal aborts at once (one process; with several, the
        processes agree once all have scored): scoring changes nothing, so the run stops as after
        the epoch's last step, its generators put back, and the resumed run scores the epoch with
        the same draws (a validation of many importance samples, or its first compilation, may
        take a while). The user's metrics may draw from python's or numpy's generators: all of
        them are put back."""
        self.check_faults()  # the weights from before a fault are not worth scoring
        before, trained = state.rng_state(), self.seconds()
        try:
            with signals.abortable(self.world.size == 1):
                record = self.epoch_record()
            if self.world.size > 1 and (signum := self._any_signal(signals)):
                raise StepAborted(signum)  # the scores were not abortable: all ran them through
            return record
        except StepAborted as stopped:
            self.signum = stopped.signum
            state.set_rng_state(before)
            # the resumed run scores the epoch again: its seconds count one scoring, not two
            self.started = time.perf_counter() - trained
            self.callbacks.on_stop(self)  # writes the checkpoint and raises TrainingStopped
            raise

    def _any_signal(self, signals: StopOnSignal) -> int:
        """The signal any of the processes received (0: none); all of them must ask."""
        flag = torch.tensor([signals.signum or 0], device=self.device)
        return int(self.world.max(flag).item())

    def epoch_record(self) -> dict:
        """The epoch's ``train_elbo`` (each process summed its shard; together they cover the
        padded data set once), the KL weight at its end, the :class:`Validation` scores, the
        learning rate it trained with and its seconds."""
        record = {
            "epoch": self.epoch,
            **train_elbos(self.world.sum(self.sums), self.plan.sizes),
            "beta": self.kl_weight(),
        }
        self.validation.scores(record)
        record["lr"], record["seconds"] = self.epoch_lr, self.seconds()
        return record

    def seconds(self) -> float:
        """Seconds the current epoch has trained (before a stop included)."""
        return time.perf_counter() - self.started

    def _fault(self, what: str, step_in_epoch: int) -> str:
        last = None if self.out is None else self.out / "checkpoint.pt"
        last = last if last is not None and last.is_file() else None
        return (
            f"non-finite {what} at epoch {self.epoch}, step {step_in_epoch}; likely causes: a "
            "learning rate too high, a likelihood scale too small for the data, or exploding "
            "decoder outputs (try a lower --lr or --clip-norm); last good checkpoint: "
            f"{last or 'none written yet'}"
        )


class Faults:
    """The first non-finite loss or gradient of a run, kept on the device: a step need not wait
    for its loss to reach the host (on a GPU that would stall the device's queue every step).

    Fused Adam reads :attr:`found` as its ``found_inf`` (torch's protocol for ``GradScaler``) and
    skips its update on the device from the first fault on, moments and step counts included, so
    the parameters and the optimizer stay as they were before it until the host reads it
    (:meth:`first`); buffers (BatchNorm's running statistics) and the callbacks of the steps in
    between go on. Not ``deferred`` (or with an optimizer that cannot skip on the device), it is
    read after every step, before its update."""

    def __init__(self, optimizer: torch.optim.Optimizer, step: int, device, deferred: bool) -> None:
        self.start = step
        self.deferred = deferred and bool(optimizer.defaults.get("fused"))
        self.finite = torch.ones(2, dtype=torch.bool, device=device)  # [loss, gradient] so far
        self.steps = torch.zeros(2, dtype=torch.long, device=device)  # steps before either's fault
        self.found = torch.zeros((), dtype=torch.float32, device=device)  # 1.0: skip updates
        self.bad_gradient = torch.zeros((), dtype=torch.float32, device=device)
        self.one = torch.ones((), dtype=torch.float32, device=device)
        if self.deferred:
            optimizer.found_inf = self.found
        self.read_at = time.perf_counter()

    def check(self, loss: torch.Tensor, params) -> torch.Tensor:
        """This step's [loss is finite, every gradient is finite], on the device; the gradients in
        one pass, by GradScaler's check (which multiplies them by 1 as it reads them)."""
        self.bad_gradient.zero_()
        for same_dtype in by_dtype(p.grad for p in params if p.grad is not None):
            torch._amp_foreach_non_finite_check_and_unscale_(
                same_dtype, self.bad_gradient, self.one
            )
        return torch.stack([torch.isfinite(loss), self.bad_gradient == 0])

    def record(self, finite: torch.Tensor) -> None:
        """One step's :meth:`check` (agreed by the processes), before its update."""
        self.finite.logical_and_(finite)
        self.steps.add_(self.finite)
        torch.logical_not(self.finite.all(), out=self.found)

    def due(self) -> bool:
        """Whether the host should read the faults now."""
        return not self.deferred or time.perf_counter() - self.read_at >= FAULT_CHECK_SECONDS

    def first(self) -> tuple[str, int] | None:
        """The first fault ("loss" or "gradient", the run's step that had it; the loss on a tie),
        or None."""
        self.read_at = time.perf_counter()
        finite, steps = self.finite.tolist(), self.steps.tolist()
        faulted = [k for k in (0, 1) if not finite[k]]
        if not faulted:
            return None
        kind = min(faulted, key=lambda k: steps[k])
        return ("loss", "gradient")[kind], self.start + steps[kind] + 1


def tally(sums: torch.Tensor, calls: list, losses: torch.Tensor) -> None:
    """Add one step to ``sums`` (kinds x [objective, model's loss, points],
    :data:`~pyvae.batching.KINDS`): each call's losses, which estimate the sum over its group's N_c
    points, weighted by M_c / N_c, so that over an epoch they sum the per-point losses of the points
    served."""
    for i, call in enumerate(calls):
        weight = call.args[0].shape[0] / call.group
        row = sums[KINDS.index(call.kind)]
        row[0] += losses[:, i].sum() * weight
        row[1] += losses[0, i] * weight
        row[2] += call.args[0].shape[0]


def resumed_sums(partial, points: int, device) -> torch.Tensor:
    """The accumulators :func:`tally` saved at a stop mid-epoch; a checkpoint of an older pyvae kept
    one number, the objective's sum over ``points`` points of single calls: their first row."""
    if isinstance(partial, (int, float)):
        sums = torch.zeros(len(KINDS), 3, device=device)
        sums[0] = torch.tensor([partial, partial, points], device=device)
        return sums
    return torch.tensor(partial, device=device)


def train_elbos(sums: torch.Tensor, sizes: dict) -> dict:
    """The epoch's ``train_elbo`` per point of the data set, sum_c N_c (objective per point of c) /
    N, and for semi-supervised steps ``train_elbo_labelled``/``_unlabelled``: the model's ELBO per
    point of each group (auxiliary losses left out)."""
    total = sum(sizes.values())
    means = {kind: sums[KINDS.index(kind)] for kind in sizes}
    record = {
        "train_elbo": -sum(n * float(means[k][0] / means[k][2]) for k, n in sizes.items()) / total
    }
    if len(sizes) > 1:
        record.update({f"train_elbo_{k}": -float(means[k][1] / means[k][2]) for k in sizes})
    return record
