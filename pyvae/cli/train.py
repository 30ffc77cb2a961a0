"""``python -m pyvae train``: train a model by SVI and write its checkpoints, metrics, pictures
and test log-likelihood (``examples/mnist_svi.py`` runs the same).

The steps: the configuration (defaults, ``--config`` YAML, flags), the data, the model (a Pyro
program around neural networks), SVI by :func:`pyvae.fit`, then pictures and the importance-
sampled test log-likelihood of the checkpoint chosen by ``--eval-checkpoint``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

import torch
import yaml

from pyvae.cli.config import FIELDS, TrainConfig, allowed, from_yaml
from pyvae.cli.flags import parser
from pyvae.cli.trained import (
    checkpoint_file,
    checkpoint_model,
    data_options,
    describe_checkpoint,
    last_suffix,
    needs_labels,
)
from pyvae.data.batching import resolve_device
from pyvae.data.datasets import (
    SPLITS,
    binarize_for,
    evaluation_split,
    load_train_test,
    semi_supervised,
    spread,
    torchvision_class,
    validation_split,
)
from pyvae.data.sources import is_path
from pyvae.data.streaming import StreamedImages
from pyvae.distributed import init, shutdown
from pyvae.errors import DataNotFound, PyvaeError
from pyvae.infer.diagnostics import evaluate
from pyvae.models import MODELS, takes_unlabelled
from pyvae.parts.component import check_settings
from pyvae.parts.guides import GUIDES
from pyvae.parts.likelihoods import LIKELIHOODS, coding
from pyvae.parts.priors import PRIORS
from pyvae.program import batch_arity, batch_slots
from pyvae.runs.checkpoint import load_weights, read
from pyvae.runs.user_code import build_user_model as build_user
from pyvae.runs.user_code import is_model_file, model_class, model_file_spec, plain
from pyvae.train.callbacks import MLflowCallback
from pyvae.train.loop import fit
from pyvae.train.protocol import check
from pyvae.train.tensorboard import TensorBoard
from pyvae.viz import plots

REGISTRIES = {"prior": PRIORS, "likelihood": LIKELIHOODS, "guide": GUIDES}
#: a number in the scientific notation that YAML 1.1 reads as a string (1e-3)
SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_args(argv: list[str], prog: str | None = None) -> tuple[TrainConfig, bool]:
    """(config, debug) from defaults, ``--config FILE`` and flags, in that order of precedence."""
    args = parser("train", prog).parse_args(argv)
    return configure(args), getattr(args, "debug", False)


def configure(args) -> TrainConfig:
    """The checked configuration of ``train``'s parsed flags (only those given are set): over the
    defaults, the ``--config`` file or, with ``--resume``, the run's own config.yaml."""
    args = dict(vars(args))
    args.pop("debug", None)
    values = from_yaml(args.pop("config")) if "config" in args else {}
    if args.get("resume"):
        # the run's own configuration, then any flags given now (a larger --epochs, say)
        run = Path(args["resume"])
        if not (run / "config.yaml").is_file() or not (run / "checkpoint.pt").is_file():
            raise PyvaeError(
                f"cannot resume {run}: it needs config.yaml and checkpoint.pt from an earlier run"
            )
        values = {**from_yaml(run / "config.yaml"), "out": str(run)}
    pairs = args.pop("model_arg", None)
    values.update(args)
    model = values.get("model", FIELDS["model"].default)
    values["model"] = with_model_args(model, pairs, bool(args.get("resume")))
    config = TrainConfig(**values).validate()
    resolve_choices(config)
    return config


def resolve_choices(config: TrainConfig) -> None:
    """The settings that name something: the parts (a name or a mapping of settings), the data
    set (built in, torchvision's or an existing path) and the model; one-line errors."""
    for kind, registry in REGISTRIES.items():
        try:
            registry.resolve(getattr(config, kind))
        except PyvaeError as e:
            raise PyvaeError(f"invalid value {getattr(config, kind)!r} for {kind!r}: {e}") from None
    dataset = config.dataset
    if not (
        dataset in SPLITS
        or (is_path(dataset) and Path(dataset).expanduser().exists())
        or torchvision_class(dataset) is not None
    ):
        raise PyvaeError(
            f"invalid value {dataset!r} for 'dataset'; allowed: {allowed(FIELDS['dataset'])}"
        )
    if is_model_file(config.model):  # a class of the user's own: training imports its file
        model_file_spec(config.model)
        return
    name = config.model.get("name") if isinstance(config.model, dict) else config.model
    if name not in MODELS:
        raise PyvaeError(
            f"invalid value {config.model!r} for 'model'; allowed: {', '.join(MODELS)} "
            "(in YAML a mapping with 'name'), or FILE.py:Class (in YAML a "
            "mapping with 'file' and 'class')"
        )


def model_args(pairs: list[str]) -> dict:
    """{key: value} of ``--model-arg KEY=VALUE`` flags (the last of a repeated key wins), each
    value read as a YAML scalar or list (3, 0.5, 1e-3, [64, 64], true, text); one-line errors."""
    args = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.isidentifier():
            raise PyvaeError(f"--model-arg takes KEY=VALUE, KEY an argument name; got {pair!r}")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0]
            raise PyvaeError(f"--model-arg {pair}: the value is not valid YAML ({first})") from e
        value = float(value) if isinstance(value, str) and SCIENTIFIC.fullmatch(value) else value
        if not plain(value):
            raise PyvaeError(
                f"--model-arg {pair}: allowed values are numbers, booleans, "
                "strings, null and lists of them"
            )
        args[key] = value
    return args


def with_model_args(model, pairs: list[str] | None, resume: bool) -> str | dict:
    """The ``model`` setting with ``--model-arg`` flags merged into a user model's args (a
    ``FILE.py:Class`` string becomes the mapping); the flags are refused for anything else."""
    if not is_model_file(model):
        if pairs:
            raise PyvaeError(
                f"--model-arg is for a model class of your own (--model "
                f"FILE.py:Class); model {model!r} is built in: it takes --z-dim, "
                "--hidden, ..."
            )
        return model
    if pairs and resume:
        raise PyvaeError(
            "--model-arg cannot change the model of a resumed run; it goes on with "
            "the arguments it was trained with"
        )
    spec = model_file_spec(model)
    return {**spec, "args": {**spec["args"], **model_args(pairs or [])}}


def main(args) -> None:
    """Train a model by SVI: checkpoints, metrics, pictures and the test log-likelihood."""
    config = configure(args)
    tracker = tracking(config)  # before anything is written: no mlflow, no run folder
    user = user_model_class(config)
    semi = user is None and takes_unlabelled(MODELS[model_name(config.model)])
    if config.num_labels is not None and not semi and user is None:
        raise PyvaeError(
            "--num-labels is for the semi-supervised model m2 or a class of your own with an "
            f"optional label, model(xs, ys=None); model {model_name(config.model)!r} uses every "
            "label or none"
        )
    # under torchrun, one of several processes training together (rank 0 writes); else alone
    world, device = init(resolve_device(config.device))
    say = print if world.main else lambda *args, **kwargs: None
    likelihood = LIKELIHOODS.resolve(config.likelihood)
    train, test, valid = training_data(config, world, say, likelihood)
    metrics = {}
    if semi:
        train, test, valid, metrics = semi_supervised_data(config, train, test, valid)
    say(describe_data(config, train, test, valid))

    torch.manual_seed(config.seed)
    model = build(config, user, train, likelihood)
    if user is not None and config.num_labels is not None:
        train, test, valid = semi_supervised_user_data(model, config, train, test, valid)

    name = Path(config.dataset).stem if is_path(config.dataset) else config.dataset
    out = Path(world.broadcast(str(config.output_dir(name)) if world.main else None))
    board = None
    if config.tensorboard and world.main:
        board = TensorBoard(out / "tensorboard", *test_images(model, test))
    history = fit(
        model,
        train,
        test=test,
        valid=valid,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        lr_schedule=config.lr_schedule,
        patience=config.patience,
        valid_samples=config.valid_samples,
        elbo=config.elbo,
        num_particles=config.num_particles,
        beta=config.beta,
        kl_warmup_epochs=config.kl_warmup_epochs,
        labelled_share=config.labelled_share,
        metrics=metrics,
        clip_norm=config.clip_norm,
        device=device,
        seed=config.seed,
        out=out,
        out_files=None if config.resume else {"config.yaml": config.to_yaml()},
        resume=bool(config.resume),
        tensorboard=board,
        callbacks=[tracker] if tracker is not None else [],
        compile=config.compile,
    )
    shutdown()  # leave torchrun's process group: what follows is rank 0's alone
    if world.main:
        report(model, config, out, history, test, train.name, board, tracker)


def tracking(config: TrainConfig) -> MLflowCallback | None:
    """The experiment tracker --track asks for (None for none), its parameters the run's
    settings: into $MLFLOW_TRACKING_URI where it is set, else the run folder's mlruns/."""
    if config.track == "none":
        return None
    params = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
    return MLflowCallback(params, os.environ.get("MLFLOW_TRACKING_URI"))


def training_data(config, world, say, likelihood):
    """(train, test, valid or None) as ``config`` asks, binarized for ``likelihood``: the
    requested set, or the offline digits with a notice (``config.dataset`` then says digits)."""
    if is_path(config.dataset):  # the run's config.yaml must find it again from anywhere
        config.dataset = str(Path(config.dataset).expanduser().resolve())
    elif config.image_size is not None and config.dataset in SPLITS:
        raise PyvaeError(
            "--image-size resizes the images of a PATH data set or a torchvision one read image "
            f"by image (celeba, stl10, ...); {config.dataset!r} is built in"
        )
    with world.local_main_first():  # one download per machine
        train, test, notice = load_train_test(
            config.dataset,
            data_dir=config.data_dir,
            download=config.download,
            fallback=None if config.strict_data else "digits",
            **data_options(config.__dict__),
        )
    if notice:
        say(notice, file=sys.stderr)
        config.dataset = train.name
    with world.local_main_first():
        train, valid = validation_data(config, train, say)
    # before anything is written
    check(
        config.patience,
        config.lr_schedule,
        valid is not None,
        f"{train.name} has no valid split; hold out part of the training set with "
        "--valid-fraction F",
    )
    train, test, config.binarize = binarize_for(
        likelihood, train, test, config.binarize, config.seed
    )
    valid = evaluation_split(valid, config.binarize, config.seed) if valid is not None else None
    return train, test, valid


def validation_data(config, train, say):
    """(train, valid or None) as ``config`` asks (:func:`pyvae.data.validation_split`). A data
    set's own valid split that cannot be found is a notice, and training goes on without
    validation, unless patience or the plateau schedule needs it."""
    try:
        return validation_split(
            train,
            config.valid_fraction,
            config.seed,
            data_dir=config.data_dir,
            download=config.download,
        )
    except DataNotFound as e:
        if config.patience is not None or config.lr_schedule == "plateau":
            raise
        say(f"notice: {e}. Training without validation data.", file=sys.stderr)
        return train, None


def semi_supervised_data(config, train, test, valid):
    """(train, test, valid, metrics) for a model that takes unlabelled points: trained on
    --num-labels labels (or all), the test and valid sets scored unlabelled (log p(x), the
    classes summed) and the test set's classification accuracy a metric."""
    if config.num_labels is not None:
        train = semi_supervised(train, config.num_labels, config.seed)
    x_test, y_test = test.draw(), test.labels
    # read whole: its accuracy takes one tensor
    x_test = x_test[:] if isinstance(x_test, StreamedImages) else x_test
    metrics = {"test_accuracy": lambda model: model.accuracy(x_test, y_test)}
    if valid is not None:
        valid = (valid.draw(), torch.full((len(valid),), -1, dtype=torch.long))
    return train, (x_test, torch.full_like(y_test, -1)), valid, metrics


def describe_data(config, train, test, valid) -> str:
    """The line that says what training reads."""
    size = lambda data: len(data[0]) if isinstance(data, tuple) else len(data)  # noqa: E731
    held = ""
    if valid is not None:
        origin = (
            f"{config.valid_fraction:g} of train held out, seed {config.seed}"
            if config.valid_fraction
            else "the valid split"
        )
        held = f" / {size(valid)} valid ({origin})"
    streamed = isinstance(train.images, StreamedImages)
    return (
        f"data: {train.name}, {len(train)} train{held} / {size(test)} test images of "
        f"{train.image_shape}, binarize={config.binarize}"
        + (", streamed from disk (too large for memory)" if streamed else "")
    )


def build(config, user, train, likelihood):
    """The model to train: the resumed run's, the user's class, or a built-in one."""
    if config.resume:
        resumed = Path(config.resume) / "checkpoint.pt"
        return checkpoint_model(resumed, read(resumed))
    if user:
        return build_user_model(user, config, train)
    return build_model(config, train, likelihood)


def build_model(config, train, likelihood):
    """The model ``config.model`` names, sized for ``train``. vae, cvae and m2 take the flags'
    network settings (--z-dim, --hidden, --activation, --prior, ...); hvae keeps its IWAE-paper
    layers unless a YAML mapping (``model: {name: hvae, z_dims: [...], hidden: [[...], [...]]}``)
    says otherwise."""
    spec = dict(config.model) if isinstance(config.model, dict) else {"name": config.model}
    cls = MODELS[spec.pop("name")]
    allowed_args = check_settings(cls, spec, f"model {config.model!r}")
    flags = {
        "prior": config.prior,
        "likelihood": likelihood,
        "guide": config.guide,
        "net": config.net,
    }
    if cls is not MODELS.get("hvae"):
        flags.update(z_dim=config.z_dim, hidden=config.hidden, activation=config.activation)
    data = {"x_dim": train.x_dim, "image_shape": train.image_shape}
    if "num_classes" in allowed_args:
        if train.labels is None:
            raise PyvaeError(
                f"model {cls.__name__} needs labels; the {train.name} data set has none"
            )
        data["num_classes"] = int(train.labels.max()) + 1
    kwargs = {k: v for k, v in {**flags, **data}.items() if k in allowed_args}
    return cls(**{**kwargs, **spec})


def model_name(model) -> str:
    """A built-in model's name, or ``FILE.py:Class`` for a class of the user's own."""
    if is_model_file(model):
        spec = model_file_spec(model)
        return f"{spec['file']}:{spec['class']}"
    return model["name"] if isinstance(model, dict) else model


def user_model_class(config):
    """(class, record) of ``--model FILE.py:Class``, imported and checked before the data are
    read (a bad file, class or argument leaves no run folder), or None for a built-in model."""
    if not is_model_file(config.model):
        return None
    run = f"run {config.resume}" if config.resume else None
    return model_class(model_file_spec(config.model), run)


def build_user_model(user, config, train):
    """The user's class built for ``train`` (:func:`pyvae.runs.user_code.build_user_model`);
    ``config.model`` becomes its record for config.yaml: the absolute file, its sha256, the args."""
    cls, record = user
    data = {"x_dim": train.x_dim, "image_shape": list(train.image_shape)}
    if train.labels is not None:
        data["num_classes"] = int(train.labels.max()) + 1
    config.model = record
    return build_user(cls, record, data)


def semi_supervised_user_data(model, config, train, test, valid):
    """(train with --num-labels labels and -1 elsewhere, test and valid as images alone) for a
    class of the user's own that takes an optional label (``model(xs, ys=None)``): trained
    semi-supervised, scored by log p(x)."""
    if batch_slots(model) <= batch_arity(model):
        raise PyvaeError(
            "--num-labels needs a model that takes an optional label, model(xs, ys=None); "
            f"{type(model).__name__}.model takes {batch_arity(model)} tensor(s), none optional"
        )
    train = semi_supervised(train, config.num_labels, config.seed)
    return train, (test.draw(),), (valid.draw(),) if valid is not None else None


def test_images(model, test):
    """(the test images, their labels where the model needs them, else None)."""
    x_test = test[0] if isinstance(test, tuple) else test.draw()
    return x_test, getattr(test, "labels", None) if needs_labels(model) else None


def report(model, config, out, history, test, dataset, board, tracker) -> None:
    """Pictures and the test log-likelihood of the checkpoint evaluated (best.pt unless
    --eval-checkpoint last), handed to the tracker too, then the line that sums up the run."""
    chosen = checkpoint_file(out, None if config.eval_checkpoint == "best" else "last")
    payload = read(chosen)
    load_weights(model, payload["state_dict"], chosen)
    print(f"final model: {describe_checkpoint(chosen, payload)}")
    evaluated = history[payload["epoch"] - 1]
    x_test, labels = test_images(model, test)
    plots.samples(model, out / "samples.png")
    plots.reconstructions(model, x_test, out / "reconstructions.png", labels=labels)
    plots.elbo_curves(history, out / "elbo.png")
    if config.eval_samples:  # python -m pyvae evaluate for K = 5000
        result = test_log_likelihood(model, config, test, dataset)
        folder = out / f"eval-{dataset}-test-K{config.eval_samples}{last_suffix(chosen)}"
        result.write(folder)
        plots.evaluation(result, folder)
        if board is not None:
            board.evaluation(result.summary(), result.table(), evaluated["epoch"])
        if tracker is not None:
            tracker.log_metrics(
                {f"eval_{k}": v for k, v in result.summary().items()}, evaluated["epoch"]
            )
            tracker.log_files(folder)
    if tracker is not None:
        tracker.log_files(out)
    if board is not None:
        board.close()
    accuracy = evaluated.get("test_accuracy")
    bits = evaluated.get("test_elbo_bpd")
    print(
        f"test ELBO {evaluated['test_elbo']:.3f} nats per data point"
        + (f", {bits:.4f} bits/dim ({coding(model)[1]} levels)" if bits is not None else "")
        + f" (epoch {evaluated['epoch']})"
        + (f"; test accuracy {accuracy:.3f}" if accuracy is not None else "")
        + f"; outputs in {out}/"
    )


def test_log_likelihood(model, config, test, dataset: str):
    """log p(x) of --eval-points test points, evenly spread, by importance sampling with
    K = --eval-samples: x, or (x, y) for m2 (y = -1) and cvae."""
    x_test = test[0] if isinstance(test, tuple) else test.draw()
    points = spread(torch.arange(len(x_test)), config.eval_points)
    data = x_test[points]
    if (isinstance(test, tuple) and len(test) > 1) or needs_labels(model):
        data = (data, test[1][points] if isinstance(test, tuple) else test.labels[points])
    result = evaluate(
        model,
        data,
        config.eval_samples,
        dataset=dataset,
        split="test",
        progress=True,
        compile=config.compile,
    )
    print(result.table())
    return result
