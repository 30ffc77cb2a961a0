"""What happens around the SVI steps of a run, as callbacks (see :mod:`pyvae.train.loop` for the
story of a run and the order in which ``fit`` calls them).

A callback subclasses :class:`Callback` and overrides any of its hooks; each gets the
:class:`~pyvae.train.run.Training` ``run`` (its ``model``, ``optimizer``, ``world``, ``out``,
``epoch``, ``step``, ``loss``, ``history``, ...) and may end training after the current epoch by
setting ``run.stop = True``. Every process of a ``torchrun`` job calls every hook; what only rank
0 writes checks ``run.world.main``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from pyvae.errors import PyvaeError
from pyvae.parts.likelihoods import coding
from pyvae.runs import save
from pyvae.train import protocol
from pyvae.train import resume as state

#: the numbers an epoch also reports in bits per dimension, and their labels in the epoch line
BPD_KEYS = {
    "train_elbo": "train",
    "test_elbo": "test",
    "test_iwae": "test IWAE",
    "valid_elbo": "valid",
    "valid_iwae": "valid IWAE",
    "valid_log_px": "valid log p(x)",
}


class Callback:
    """Hooks of a training run; each does nothing unless overridden."""

    def on_train_begin(self, run) -> None:
        """Before the first epoch (after a resumed run's state is restored)."""

    def on_epoch_begin(self, run) -> None:
        """Before the first step of ``run.epoch``."""

    def on_step_end(self, run) -> None:
        """After the Adam step ``run.step`` (``run.step_in_epoch`` of the epoch); ``run.loss`` is
        its minibatch loss, an estimate of -ELBO summed over the N points."""

    def on_epoch_end(self, run, record: dict) -> None:
        """After the epoch's ``record`` (its ELBOs, validation, metrics) joined ``run.history``."""

    def on_stop(self, run) -> None:
        """A signal (``run.signum``) asked training to stop inside the step after ``run.step``,
        which was undone: the run is as it was after ``run.step``."""

    def on_train_end(self, run, error: BaseException | None) -> None:
        """After the last epoch, or when training fails (``error``, re-raised after the hooks)."""


class Callbacks(Callback):
    """Calls each hook of its callbacks in their order."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = list(callbacks)

    def on_train_begin(self, run) -> None:
        for callback in self.callbacks:
            callback.on_train_begin(run)

    def on_epoch_begin(self, run) -> None:
        for callback in self.callbacks:
            callback.on_epoch_begin(run)

    def on_step_end(self, run) -> None:
        for callback in self.callbacks:
            callback.on_step_end(run)

    def on_epoch_end(self, run, record: dict) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(run, record)

    def on_stop(self, run) -> None:
        for callback in self.callbacks:
            callback.on_stop(run)

    def on_train_end(self, run, error: BaseException | None) -> None:
        for callback in self.callbacks:
            callback.on_train_end(run, error)


class LRSchedule(Callback):
    """Steps the run's learning-rate schedule after every epoch with its validation objective."""

    def on_epoch_end(self, run, record: dict) -> None:
        run.schedule.step(record.get(run.objective_key))


class EpochLine(Callback):
    """Prints one line per epoch on stdout (see :func:`epoch_line`)."""

    def __init__(self, num_particles: int, metrics: dict | None) -> None:
        self.num_particles, self.metrics = num_particles, metrics

    def on_epoch_end(self, run, record: dict) -> None:
        line = epoch_line(record, run.epochs, self.num_particles, self.metrics, coding(run.model))
        tqdm.write(line, file=sys.stdout)


class EarlyStopping(Callback):
    """Ends training once the best validation objective is ``patience`` epochs old
    (:func:`pyvae.train.protocol.stalled`); checked on the history alone, so a resumed run stops
    where an uninterrupted one does."""

    def __init__(self, patience: int | None, progress: bool) -> None:
        self.patience, self.progress = patience, progress

    def on_train_begin(self, run) -> None:
        self._check(run)

    def on_epoch_end(self, run, record: dict) -> None:
        self._check(run)

    def _check(self, run) -> None:
        history, key = run.history, run.objective_key
        if not history or history[-1]["epoch"] >= run.epochs:
            return
        if protocol.stalled(history, key, self.patience):
            run.stop = True
            if self.progress:
                epoch, value = protocol.best_epoch(history, key)
                tqdm.write(
                    f"early stop after epoch {history[-1]['epoch']}: the validation "
                    f"{protocol.LABELS[key]} has not improved for {history[-1]['epoch'] - epoch} "
                    f"epochs (patience {self.patience}); the best, {value:.3f} nats/point, was "
                    f"epoch {epoch}",
                    file=sys.stdout,
                )


class BestCheckpoint(Callback):
    """``out/best.pt``: the weights of the epoch with the highest validation objective (the
    earliest on ties), written before that epoch's ``checkpoint.pt``, so that a run killed
    between the two redoes the epoch and writes it again."""

    def on_epoch_end(self, run, record: dict) -> None:
        key, epoch = run.objective_key, record["epoch"]
        if run.world.main and protocol.best_epoch(run.history, key) == (epoch, record.get(key)):
            save(run.model, run.out / "best.pt", epoch=epoch, objective={key: record[key]})


class MetricsFile(Callback):
    """``out/metrics.jsonl``: one JSON line per completed epoch (rank 0)."""

    def on_train_begin(self, run) -> None:
        # a resumed run: exactly the completed epochs, no torn or repeated lines
        if run.resumed and run.world.main:
            with open(run.out / "metrics.jsonl", "wb") as f:
                f.write("".join(json.dumps(h) + "\n" for h in run.history).encode())

    def on_epoch_end(self, run, record: dict) -> None:
        if run.world.main:
            with open(run.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


class Checkpoints(Callback):
    """``out/checkpoint.pt`` after every epoch (the one before kept as ``checkpoint.prev.pt``), and
    mid-epoch when a signal asked training to stop (``run.signum``), which then raises
    :class:`TrainingStopped`. It holds what resuming needs (:mod:`pyvae.train.resume`)."""

    def on_step_end(self, run) -> None:
        if run.signum:
            self.on_stop(run)

    def on_stop(self, run) -> None:
        self.save(
            run,
            run.epoch - 1,
            step_in_epoch=run.step_in_epoch,
            partial_total=run.world.gather(run.sums.tolist()),
            partial_seconds=run.seconds(),
        )
        raise TrainingStopped(
            run.signum,
            f"stopped by {signal.Signals(run.signum).name} at epoch {run.epoch}, "
            + (f"step {run.step_in_epoch}" if run.step_in_epoch else "before its first step")
            + f"; checkpoint written to {run.out / 'checkpoint.pt'}; continue with --resume "
            f"{run.out}",
        )

    def on_epoch_end(self, run, record: dict) -> None:
        self.save(run, record["epoch"])

    @staticmethod
    def save(run, epoch: int, **partial) -> None:
        """Rank 0 writes the weights and the training state, every process's generators
        included."""
        rngs = run.world.gather(state.rng_state())
        if run.world.main:
            training = {
                "version": state.VERSION,
                "step": run.step,
                "order_seed": run.order_seed,
                "optimizer": run.optimizer.state_dict(),
                "schedule": run.schedule.state_dict(),
                "rng": rngs,
                **partial,
            }
            save(
                run.model,
                run.out / "checkpoint.pt",
                keep_previous=True,
                epoch=epoch,
                history=run.history,
                training=training,
            )
        run.world.barrier()  # no process exits before the checkpoint is complete


class TrainingStopped(KeyboardInterrupt):
    """Training stopped by SIGINT or SIGTERM after writing a checkpoint it can resume from."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


class StepAborted(BaseException):
    """Raised by :class:`StopOnSignal` inside a step that can be undone (a ``BaseException``, so
    that no ``except Exception`` in a model swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopOnSignal:
    """Turns SIGINT and SIGTERM into a request to stop (main thread only): ``signum`` is the
    signal received, None before any. Inside :meth:`abortable` (a step's loss and gradients, or an
    epoch's scores, which change nothing yet) the signal stops the work at once, raising
    :class:`StepAborted`, so that a step of minutes does not hold it up; elsewhere training stops
    after the current step."""

    def __init__(self, enabled: bool = True) -> None:
        self.signum: int | None = None
        self.previous, self.inside = {}, False
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._request)

    def _request(self, signum, frame) -> None:
        self.signum = signum
        if self.inside:
            self.inside = False
            raise StepAborted(signum)

    @contextlib.contextmanager
    def abortable(self, allowed: bool = True) -> Iterator[None]:
        """A section a signal may abort (``allowed``: one process; with several, each stops
        after the step, together); a signal already received aborts it before it starts."""
        if allowed and self.previous and self.signum:
            raise StepAborted(self.signum)
        self.inside = allowed and bool(self.previous)
        try:
            yield
        finally:
            self.inside = False

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


#: the files of a run folder that :class:`MLflowCallback` logs as artifacts (not the checkpoints)
ARTIFACT_SUFFIXES = (".png", ".json", ".jsonl", ".yaml", ".txt")


class MLflowCallback(Callback):
    """Tracks the run in MLflow (rank 0 only): ``params`` when training begins, every number of
    each epoch's record as a metric at step = epoch, and at the end the run folder's pictures,
    JSON and YAML files (:data:`ARTIFACT_SUFFIXES`) as artifacts, the run then marked FINISHED,
    KILLED (stopped by a signal) or FAILED. ``tracking_uri`` defaults to the file store
    ``out/mlruns`` (``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri RUN/mlruns``:
    MLflow >= 3.18 reads file stores only when so told, and this callback sets that variable
    unless it is set). A resumed run continues the MLflow run of the same folder. Files written
    after ``fit`` (the CLI's pictures and eval.json) are added with :meth:`log_files`, numbers with
    :meth:`log_metrics`."""

    def __init__(
        self,
        params: dict | None = None,
        tracking_uri: str | None = None,
        experiment: str = "pyvae",
    ) -> None:
        try:
            import mlflow  # optional dependency
        except ImportError:
            raise PyvaeError(
                'tracking with mlflow needs the mlflow package: pip install "pyvae[mlflow]"'
            ) from None
        self.mlflow, self.tracking_uri = mlflow, tracking_uri
        self.params, self.experiment = dict(params or {}), experiment
        self.client, self.run_id, self.folder = None, None, None

    def on_train_begin(self, run) -> None:
        if not run.world.main:
            return
        if self.tracking_uri is None and run.out is None:
            raise PyvaeError("MLflowCallback needs a tracking_uri when fit has no out folder")
        self.folder = run.out
        uri = self.tracking_uri or (Path(run.out) / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3.18 refuses its file store unless asked for it; a run folder is one
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = self.mlflow.tracking.MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name(self.experiment)
        experiment = found.experiment_id if found else None
        experiment = experiment or self.client.create_experiment(self.experiment)
        tag = {"pyvae.run_folder": str(Path(run.out).resolve()) if run.out else ""}
        previous = self._previous_run(experiment, tag) if run.resumed else None
        if previous is not None:
            self.run_id = previous
            self.client.update_run(previous, status="RUNNING")
            return
        self.run_id = self.client.create_run(experiment, tags=tag).info.run_id
        params = [self.mlflow.entities.Param(k, str(v)) for k, v in self.params.items()]
        self.client.log_batch(self.run_id, params=params)

    def _previous_run(self, experiment: str, tag: dict) -> str | None:
        ((key, folder),) = tag.items()
        runs = self.client.search_runs(
            [experiment], f"tags.`{key}` = '{folder}'", order_by=["start_time DESC"], max_results=1
        )
        return runs[0].info.run_id if runs else None

    def on_epoch_end(self, run, record: dict) -> None:
        if run.world.main:
            self.log_metrics(record, record["epoch"])

    def log_metrics(self, numbers: dict, step: int) -> None:
        """Log the numeric entries of ``numbers`` (but ``epoch``) at ``step``."""
        now = int(1000 * time.time())
        metrics = [
            self.mlflow.entities.Metric(key, float(value), now, step)
            for key, value in numbers.items()
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_files(self, folder: str | Path | None = None) -> None:
        """Log the files of ``folder`` (default the run folder) with :data:`ARTIFACT_SUFFIXES`
        as artifacts; also after the run has ended."""
        folder = Path(folder or self.folder)
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix in ARTIFACT_SUFFIXES:
                self.client.log_artifact(self.run_id, str(path))

    def on_train_end(self, run, error: BaseException | None) -> None:
        if self.run_id is None:
            return
        if run.out is not None:
            self.log_files(run.out)
        status = "FINISHED" if error is None else "FAILED"
        if isinstance(error, KeyboardInterrupt):
            status = "KILLED"
        self.client.set_terminated(self.run_id, status)


def epoch_line(
    record: dict,
    epochs: int,
    num_particles: int,
    metrics: dict | None,
    coded: tuple[int, int] | None = None,
) -> str:
    """``epoch   5/10  train ELBO ...  test ELBO ...  valid ELBO ...  nats/point  lr ...  (4.4 s)``;
    for a likelihood that is a mass over ``coded`` = (pixels, levels), the same numbers in bits/dim
    after them."""
    parts = [f"epoch {record['epoch']:3d}/{epochs}  train ELBO {record['train_elbo']:9.3f}"]
    if "train_elbo_labelled" in record:
        parts.append(
            f"(labelled {record['train_elbo_labelled']:.3f}, unlabelled "
            f"{record['train_elbo_unlabelled']:.3f})"
        )
    for split in ("test", "valid"):
        if f"{split}_elbo" in record:
            parts.append(f"{split} ELBO {record[f'{split}_elbo']:9.3f}")
        if f"{split}_iwae" in record:
            parts.append(f"{split} IWAE-{num_particles} {record[f'{split}_iwae']:9.3f}")
    if "valid_log_px" in record:
        parts.append(f"valid log p(x) {record['valid_log_px']:9.3f}")
    parts.append("nats/point")
    if coded is not None:
        parts.append(
            f"bits/dim ({coded[1]} levels) "
            + "  ".join(
                f"{label} {record[f'{k}_bpd']:.4f}" for k, label in BPD_KEYS.items() if k in record
            )
        )
    parts += [f"{name} {record[name]:.3f}" for name in metrics or {}]
    parts.append(f"lr {record['lr']:.3g}  ({record['seconds']:.1f} s)")
    return "  ".join(parts)
