"""Training by stochastic variational inference: ``fit`` and ``evaluate_elbo``.

Each step draws a minibatch of M of the N training points and takes an Adam step on the
objective of :mod:`pyvae.train.objectives` (a negative ELBO for the whole data set, the data plate
scaling the minibatch terms by N/M). The model is any module with Pyro ``model``/``guide`` methods
(:mod:`pyvae.program`); its parameters go straight to a torch optimizer, and
:class:`pyvae.program.LocalParams` keeps them out of Pyro's global param store. Under ``torchrun``
the objective module is wrapped in ``DistributedDataParallel`` (see :mod:`pyvae.distributed`).
Checkpoints hold the training state of :mod:`pyvae.train.resume`.

All ELBO numbers that leave this module are in nats per data point: the ELBO bounds log p(x) from
below (negative for probability masses such as the Bernoulli, possibly positive for densities);
the NLL is its negative.

**The story of one run.** ``fit`` checks its settings and data (a refused run writes nothing),
traces the program once per kind of call to check its contract and settle the ELBO, makes the run
folder, and hands over to a :class:`~pyvae.train.run.Training`, whose loop is::

    on_train_begin                       (a resumed run: weights, optimizer, generators restored)
    for each epoch, unless a callback set run.stop:
        on_epoch_begin
        for each minibatch: one Adam step, then on_step_end
            (a signal while its gradients are computed undoes the step: on_stop)
        the epoch's record: train ELBO, test/valid scores, metrics (run.history gets it)
        on_epoch_end(record)
    on_train_end(error)                  (also when training fails; the error is then re-raised)

The hooks are those of :class:`~pyvae.train.callbacks.Callback`; ``fit`` runs its own callbacks,
in this order, then the user's ``callbacks``:

* ``LRSchedule``: steps the learning-rate schedule with the validation objective;
* ``TensorBoard`` (``tensorboard=``): events per step and per epoch;
* ``EpochLine`` (``progress``): one line per epoch on stdout;
* with ``out``: ``BestCheckpoint`` (best.pt), ``MetricsFile`` (metrics.jsonl), ``Checkpoints``
  (checkpoint.pt after every epoch, and mid-epoch on SIGINT/SIGTERM, at once, then raising
  ``TrainingStopped``);
* ``EarlyStopping``: sets ``run.stop`` once the best validation objective is ``patience`` old;
* ``MLflowCallback`` (``track="mlflow"``): parameters, per-epoch metrics, artifacts.

**The run folder** ``out`` is made only once the input has been checked, together with
``out_files`` ({name: text}, e.g. the CLI's ``config.yaml``): a refused run writes nothing. Then
``metrics.jsonl`` gets one line per epoch and ``checkpoint.pt`` is rewritten atomically after each,
the one before kept as ``checkpoint.prev.pt``; ``best.pt`` holds the weights of the epoch with the
highest validation objective (the earliest on ties). A non-finite loss or gradient stops training
with a :class:`PyvaeError` naming the epoch and step, the parameters as they were before that step
(:class:`pyvae.train.run.Faults`); they are then not saved: no checkpoint ever holds NaNs.

**Resume**: with ``resume`` (and ``out``), training continues after the last completed epoch of
``out/checkpoint.pt`` (or inside the epoch a signal stopped): weights, optimizer and learning-rate
schedule state, step counter (the warm-up schedule), history and the random number generators of
python, numpy and torch are restored, so an interrupted and resumed run reaches the same parameters
as an uninterrupted one (and stops early where it does). Resuming with another ``lr_schedule`` is
an error, and so is a fresh run into a folder that holds one (its ``metrics.jsonl``): two runs'
epochs would mix in it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pyro
import torch

from pyvae import distributed
from pyvae.compiled import NotCompiled, check_compile
from pyvae.data.batching import (
    Batches,
    check_data,
    fitting_batch_size,
    resolve_device,
    serving,
)
from pyvae.errors import PyvaeError, PyvaeWarning, positive_int, positive_number, warn
from pyvae.infer.importance import compiles
from pyvae.program import structure
from pyvae.runs import atomic_write
from pyvae.train import callbacks as hooks
from pyvae.train import protocol
from pyvae.train.callbacks import Callback, StopOnSignal, TrainingStopped
from pyvae.train.objectives import (
    Objective,
    choose_elbo,
    enumerable_sites,
    make_elbo,
    mean_field_violation,
    sites_without_analytic_kl,
)
from pyvae.train.run import Training, make_adam
from pyvae.train.validation import BatchLosses, Validation, shared_elbo, speaker

# importable from here as before the split
__all__ = [
    "StopOnSignal",
    "TrainingStopped",
    "evaluate_elbo",
    "fit",
    "make_adam",
    "resolve_device",
]


def fit(
    model: torch.nn.Module,
    train,
    *,
    test=None,
    valid=None,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    lr_schedule: str = "none",
    patience: int | None = None,
    valid_samples: int = 0,
    elbo: str | pyro.infer.ELBO = "auto",
    num_particles: int = 1,
    beta: float = 1.0,
    kl_warmup_epochs: int = 0,
    kl_sites: list[str] | None = None,
    metrics: dict[str, Callable[[torch.nn.Module], float]] | None = None,
    clip_norm: float | None = None,
    device: str | torch.device = "auto",
    seed: int | None = None,
    out: str | Path | None = None,
    out_files: dict[str, str] | None = None,
    resume: bool = False,
    progress: bool = True,
    tensorboard=None,
    auxiliary=(),
    labelled_share: float | None = None,
    callbacks: list[Callback] | None = None,
    track: str | None = None,
    tracking_uri: str | None = None,
    compile: str = "auto",
) -> list[dict]:
    """Train ``model`` in place by SVI with Adam; return one dict per epoch. How a run goes, what
    its folder ``out`` holds and how ``resume`` continues it: see the module's docstring.

    ``model`` is any module with Pyro ``model(*batch, num_data=None)`` and ``guide`` methods
    (:mod:`pyvae.program`); ``train``/``test``/``valid`` are a tensor x, a tuple (x, y), an
    ImageSet or a Dataset, served as ``(x,)`` or ``(x, y)`` as the model's signature asks.
    ``elbo`` is ``trace``, ``meanfield``, ``iwae`` (with ``num_particles`` = K), ``enum``
    (``TraceEnum_ELBO``, for enumerated discrete guide sites), a ``pyro.infer.ELBO``, or ``auto``
    (:func:`pyvae.train.objectives.choose_elbo`: meanfield where the analytic KL is exact and
    available, enum for enumerated sites, else trace; said on stdout with ``progress``).
    ``beta`` weights the KL terms (beta-VAE) of all latent sites, or of ``kl_sites``; with
    ``kl_warmup_epochs`` > 0 the weight rises linearly, step by step, from 0 to ``beta`` over
    that many epochs. ``metrics`` maps names to functions of the model computed after every epoch
    (e.g. a test accuracy) and recorded with the ELBOs. ``clip_norm`` rescales the gradient to at
    most that total norm.

    ``valid`` is scored after every epoch: ``valid_elbo`` (and ``valid_iwae`` for ``iwae``), and
    with ``valid_samples`` = K > 0 ``valid_log_px``, the importance-sampled log p(x) with K
    samples on at most :data:`~pyvae.train.run.VALID_IS_POINTS` points evenly spread over
    ``valid``. The validation objective (:mod:`pyvae.train.protocol`) is ``valid_log_px`` when
    computed, else ``valid_iwae`` when computed, else ``valid_elbo``; with ``patience`` = P
    training stops once its best is P epochs old. ``lr_schedule`` is ``none``, ``iwae`` (Burda et
    al.'s 3^i-epoch stages at lr·10^(-i/7)), ``plateau`` (halved when the validation objective
    stalls) or ``cosine`` (over ``epochs``), stepped after every epoch.

    Each dict has ``epoch``, ``train_elbo`` (the average of the minibatch values of the training
    objective during the epoch: the beta-weighted ELBO when beta is not 1, the IWAE bound for
    ``iwae``, the program's ``poutine.scale`` weights included), ``beta`` (the KL weight at the end
    of the epoch), ``test_elbo`` (the plain ELBO, beta = 1 and no ``poutine.scale`` weights, as
    log p(x) has none, on ``test`` after the epoch, when given; for ``iwae`` also ``test_iwae``, the
    K-sample bound), the validation numbers, ``lr`` (the rate the epoch trained with) and
    ``seconds``; all in nats per data point.

    ``callbacks`` are :class:`~pyvae.train.callbacks.Callback` instances whose hooks run after
    fit's own. ``track="mlflow"`` tracks the run in MLflow
    (:class:`~pyvae.train.callbacks.MLflowCallback`: fit's settings as parameters, every number of
    each epoch as a metric, the run folder's pictures and JSON/YAML files as artifacts) in the
    store ``tracking_uri``, by default the file store ``out/mlruns``; it needs the optional mlflow
    package (``pip install "pyvae[mlflow]"``).

    ``compile`` is ``auto``, ``on`` or ``off``: whether each step's loss and gradients run as one
    compiled graph recorded from the program (:mod:`pyvae.train.step`; the same numbers up to
    floating-point reassociation, 1.5-5x faster a step on a CPU). ``auto`` compiles a run long
    enough to repay the compilation, keeps it if it measured faster, and says what it chose (with
    ``progress``); ``on`` compiles whenever the program can be recorded. A program that cannot be
    recorded trains as written, with a notice saying why. Under ``torchrun`` every process's step
    is compiled alike (a compiled step averages the gradients itself). The epochs' ELBOs and
    validation log p(x) are compiled with ``on``, and with ``auto`` when they draw enough
    (:class:`pyvae.train.validation.Validation`).
    """
    return _fit(dict(locals()))


def _fit(arguments: dict) -> list[dict]:
    """:func:`fit`, given its ``arguments``: check them, settle the objective, make the folder,
    run the :class:`~pyvae.train.run.Training`."""
    _check_settings(arguments)
    _check_trainable(arguments["model"])
    model, elbo, out, num_particles = (
        arguments[k] for k in ("model", "elbo", "out", "num_particles")
    )
    # auto: chosen below
    objective = Objective(
        model,
        "trace" if elbo == "auto" else elbo,
        num_particles,
        arguments["kl_sites"],
        arguments["auxiliary"],
    )
    weighted = arguments["beta"] != 1 or arguments["kl_warmup_epochs"]
    if isinstance(objective.elbo, pyro.infer.RenyiELBO) and weighted:
        raise PyvaeError(
            "beta and kl_warmup_epochs do not apply to elbo 'iwae' (a scaled latent site inside "
            "the log-mean-exp is not a beta-weighted bound); use trace or meanfield"
        )
    tracker = _tracker(arguments)
    world, device = distributed.init(resolve_device(arguments["device"]))
    progress = arguments["progress"] and world.main
    data = (arguments["train"], arguments["test"], arguments["valid"])
    splits = _served(model, data, device, world)
    batch_size = fitting_batch_size(arguments["batch_size"], len(splits[0]))
    plan = serving(model, splits[0], batch_size, world, arguments["labelled_share"])
    elbo, shape = _settle_objective(
        model, objective, elbo, num_particles, plan, arguments["kl_sites"], world, progress
    )
    if arguments["resume"] and out is None:
        raise PyvaeError("resume needs out, the run folder whose checkpoint.pt to continue from")
    if not arguments["resume"] and out is not None and (Path(out) / "metrics.jsonl").exists():
        raise PyvaeError(
            f"{out} holds a run (metrics.jsonl): continue it with resume (--resume), or train "
            "into another folder"
        )
    # made only now that the input is known to be good: a refused run leaves nothing
    out = _make_folder(out, arguments["out_files"], world)
    settings = {**arguments, "elbo": elbo, "out": out, "progress": progress}
    settings["num_data"] = len(splits[0])
    validation = Validation(model, splits[1], splits[2], world, shape, settings)
    hooks = _callbacks(settings, tracker)
    return Training(model, objective, plan, world, device, validation, settings, hooks).run()


def _callbacks(settings: dict, tracker: Callback | None) -> list[Callback]:
    """fit's callbacks in the order they run: the schedule is stepped before the checkpoint keeps
    its state; best.pt is written before checkpoint.pt; the user's see a saved epoch."""
    chosen: list[Callback] = [hooks.LRSchedule()]
    if settings["tensorboard"] is not None:
        chosen.append(settings["tensorboard"])
    if settings["progress"]:
        chosen.append(hooks.EpochLine(settings["num_particles"], settings["metrics"]))
    if settings["out"] is not None:
        chosen += [hooks.BestCheckpoint(), hooks.MetricsFile(), hooks.Checkpoints()]
    chosen.append(hooks.EarlyStopping(settings["patience"], settings["progress"]))
    if tracker is not None:
        chosen.append(tracker)
    return chosen + list(settings["callbacks"] or [])


def _check_settings(arguments: dict) -> None:
    """One-line errors for numbers out of range and a protocol that cannot run."""
    positive_int("epochs", arguments["epochs"])
    positive_int("batch_size", arguments["batch_size"])
    positive_number("lr", arguments["lr"])
    if arguments["clip_norm"] is not None:
        positive_number("clip_norm", arguments["clip_norm"])
    # a log-density scale must be > 0
    positive_number("beta", arguments["beta"])
    for name in ("kl_warmup_epochs", "valid_samples"):
        value = arguments[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise PyvaeError(f"{name} must be an integer >= 0; got {value!r}")
    valid = arguments["valid"] is not None
    protocol.check(arguments["patience"], arguments["lr_schedule"], valid)
    check_compile(arguments["compile"])
    bad = [c for c in arguments["callbacks"] or [] if not isinstance(c, Callback)]
    if bad:
        raise PyvaeError(
            f"callbacks must be pyvae.train.Callback instances; got {type(bad[0]).__name__}"
        )
    if arguments["track"] not in TRACKERS:
        raise PyvaeError(
            f"unknown track {arguments['track']!r}; choose from "
            f"{', '.join(str(t) for t in TRACKERS)}"
        )


def _check_trainable(model: torch.nn.Module) -> None:
    """A part that would make training a trap says so up front (``training_refusal()``: the
    VampPrior under a flow guide, :class:`pyvae.parts.priors.VampPrior`)."""
    for module in model.modules():
        refusal = getattr(module, "training_refusal", None)
        why = refusal() if callable(refusal) else None
        if why:
            raise PyvaeError(f"{type(model).__name__} is not trained: {why}")


#: fit's ``track`` values: no tracking, or MLflow (:class:`~pyvae.train.callbacks.MLflowCallback`)
TRACKERS = (None, "mlflow")
#: fit arguments that are data, code or files, not settings: not logged as a tracker's parameters
NOT_PARAMS = {
    "model", "train", "test", "valid", "metrics", "out_files", "tensorboard", "callbacks",
    "auxiliary", "tracking_uri", "progress",
}  # fmt: skip


def _tracker(arguments: dict) -> Callback | None:
    """The tracking callback ``track`` asks for (None for none), its parameters fit's settings."""
    track, tracking_uri, out = (arguments[k] for k in ("track", "tracking_uri", "out"))
    if track is None:
        if tracking_uri is not None:
            raise PyvaeError(f"tracking_uri {tracking_uri!r} needs track='mlflow'")
        return None
    if tracking_uri is None and out is None:
        raise PyvaeError("track='mlflow' needs out (its store is out/mlruns) or a tracking_uri")
    params = {k: v for k, v in arguments.items() if k not in NOT_PARAMS}
    params["model"] = type(arguments["model"]).__name__
    return hooks.MLflowCallback(params, tracking_uri)


def _served(model, splits, device, world) -> list[Batches | None]:
    """The training, test and validation data as :class:`~pyvae.data.batching.Batches` on
    ``device`` (None where not given), checked against the model, and the model moved there."""
    names = ("training data", "test data", "validation data")
    served = [
        None if data is None else Batches(data, device, model, name, semi_supervised=i == 0)
        for i, (data, name) in enumerate(zip(splits, names, strict=True))
    ]
    for batches, name in zip(served, names, strict=True):
        if batches is not None:
            check_data(model, batches, name)
    shapes = world.gather(tuple(served[0].images.shape))
    if len(set(shapes)) > 1:
        raise PyvaeError(
            f"the training processes hold different data sets, of shapes {shapes}; each must load "
            "the same one"
        )
    model.to(device)
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise PyvaeError(
            f"parameter {bad[0]} holds NaN or infinite values before training; rebuild or reload "
            "the model"
        )
    return served


def _settle_objective(
    model, objective, elbo, num_particles: int, plan, kl_sites, world, progress: bool
):
    """Check the program's contract on each kind of call before any step (the one with most
    latents leads) and settle the ELBO (``auto`` chosen here); return (elbo, structure)."""
    probes = plan.probes()
    shapes = [structure(model, probe) for probe in probes]
    probe, shape = max(zip(probes, shapes, strict=True), key=lambda pair: len(pair[1].latent_sites))
    shape.max_plate_nesting = max(s.max_plate_nesting for s in shapes)
    if kl_sites is not None and set(kl_sites) - set(shape.latent_sites):
        unknown = sorted(set(kl_sites) - set(shape.latent_sites))[0]
        raise PyvaeError(
            f"kl_sites names {unknown!r}, which is not a latent site of the model; its latent "
            f"sites: {', '.join(shape.latent_sites)}"
        )
    # choose_elbo takes meanfield only where the checks below pass: not run twice
    chosen = elbo == "auto"
    if chosen:
        elbo, why = choose_elbo(model, probe, shape)
        objective.elbo = make_elbo(elbo, num_particles, vectorize=shape.vectorized)
        objective.enumerate = bool(enumerable_sites(model, probe))
        if world.main and progress:
            print(f"elbo auto: {elbo}, {why}")
    elif not shape.vectorized and num_particles > 1 and isinstance(elbo, str):
        objective.elbo = make_elbo(elbo, num_particles, vectorize=False)
    if not shape.vectorized and num_particles > 1 and progress:
        print(
            f"{type(model).__name__} cannot run with particles as a batch dimension: its "
            f"{num_particles} particles are drawn one at a time"
        )
    if shape.enumerated_sites and not isinstance(objective.elbo, pyro.infer.TraceEnum_ELBO):
        raise PyvaeError(
            f"the guide enumerates {', '.join(shape.enumerated_sites)}; train it with elbo 'enum' "
            "(TraceEnum_ELBO)"
        )
    objective.fill_plate_nesting(shape.max_plate_nesting)
    if isinstance(objective.elbo, pyro.infer.TraceMeanField_ELBO) and not chosen:
        _check_mean_field(model, probe, world)
    return elbo, shape


def _check_mean_field(model, probe, world) -> None:
    violation = mean_field_violation(model, probe)
    if violation:
        raise PyvaeError(f"elbo 'meanfield' needs {violation}: use elbo 'trace'")
    missing = sites_without_analytic_kl(model, probe)
    if missing and world.main:
        warnings.warn_explicit(
            f"elbo 'meanfield': torch has no analytic KL for latent site {', '.join(missing)}; "
            "that term is estimated by Monte Carlo, exactly as elbo 'trace' does",
            PyvaeWarning,
            "pyvae",
            0,
        )


def _make_folder(out, out_files: dict | None, world) -> Path | None:
    """The run folder, made (by rank 0) with ``out_files`` in it."""
    if out is None:
        return None
    out = Path(out)
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in (out_files or {}).items():
            atomic_write(out / name, lambda f, text=text: f.write(text.encode()))
    return out


@torch.no_grad()
def evaluate_elbo(
    model: torch.nn.Module,
    data,
    *,
    elbo: str | pyro.infer.ELBO = "trace",
    num_particles: int = 1,
    batch_size: int = 1000,
    device: str | torch.device | None = None,
    compile: str = "auto",
) -> float:
    """The ELBO of ``model`` on ``data`` in nats per data point (a single-sample estimate per point
    by default), computed by running the model's own programs under ``elbo``, their densities
    unweighted by any ``poutine.scale`` in them (as :func:`pyvae.log_likelihood` scores them).

    With ``elbo="iwae"`` and ``num_particles=K``, the K-sample importance-weighted bound instead.

    ``compile`` (``auto``, ``on``, ``off``): each shape of batch is recorded from the programs and
    compiled (:class:`~pyvae.train.validation.BatchLosses`, as a run's validation is), the same
    number up to floating-point reassociation; ``auto`` compiles when the points times
    ``num_particles`` reach :data:`~pyvae.infer.importance.AUTO_DRAWS`. A program that cannot be
    recorded is scored as written, with a warning saying why.
    """
    mode = check_compile(compile)
    if not isinstance(data, Batches):
        device = resolve_device(device or next(model.parameters()).device)
        data = Batches(data, device, model)
        check_data(model, data, "data")
    wanted = compiles(mode, len(data) * num_particles)
    losses = BatchLosses(model, wanted, mode, speaker(False), _elbo_uncompiled)
    world = distributed.World()
    return shared_elbo(model, data, world, elbo, num_particles, batch_size, losses=losses)


def _elbo_uncompiled(why: NotCompiled) -> None:
    """What :func:`evaluate_elbo` says once, when its programs cannot be recorded."""
    warn(f"evaluate_elbo runs the program uncompiled: {why}")
