"""The command line: ``python -m pyvae evaluate RUN``, and how every entry point reports bad input.

Bad input is one line on stderr and exit code 2 (a traceback with ``--debug``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pyvae.cli.console import Parser, run, writable_dir
from pyvae.data.datasets import SPLITS
from pyvae.data.sources import is_path
from pyvae.errors import PyvaeError


def load_run(path: str | Path, which: str | None = None, parts: str | None = None):
    """(vae, config dict or None, the checkpoint file loaded) from a run folder or a checkpoint file.

    In a run folder ``which`` picks ``best`` (``best.pt``, the epoch with the best validation
    objective) or ``last`` (``checkpoint.pt``); None takes best.pt when there is one. Which file
    was loaded is said on stdout (by rank 0 under torchrun).
    """
    import os

    from pyvae.cli.config import read_yaml
    from pyvae.runs import read

    checkpoint = checkpoint_file(Path(path), which)
    config_path = checkpoint.parent / "config.yaml"
    config = read_yaml(config_path, "run config") if config_path.is_file() else None
    if config is not None and not isinstance(config, dict):
        raise PyvaeError(
            f"run config {config_path} must be a mapping of keys to values; got {type(config).__name__}"
        )
    payload = read(checkpoint)
    model = checkpoint_model(checkpoint, payload, parts)
    if os.environ.get("RANK", "0") == "0":
        print(f"checkpoint: {describe_checkpoint(checkpoint, payload)}")
    return model, config, checkpoint


def checkpoint_model(checkpoint: Path, payload: dict, parts: str | None = None):
    """The model of a checkpoint file (``payload``: its contents, read): a class of the user's own
    is imported again from the file it recorded, which must be there and unchanged; a built-in
    model is rebuilt from the checkpoint, with its custom parts from ``parts`` (--parts FILE.py)."""
    from pyvae.runs import load
    from pyvae.runs.user_code import custom_parts, rebuild_user_model

    record = payload.get("user_model")
    if isinstance(record, dict):
        return load(checkpoint, model=rebuild_user_model(record, str(checkpoint)))
    return load(checkpoint, **custom_parts(payload.get("config") or {}, parts, str(checkpoint)))


CHECKPOINTS = ("best", "last")


def checkpoint_file(path: Path, which: str | None = None) -> Path:
    """The checkpoint file of a run folder ``path`` (see :func:`load_run`), or ``path`` itself when it is a file."""
    if which not in (None, *CHECKPOINTS):
        raise PyvaeError(f"unknown checkpoint {which!r}; choose from {', '.join(CHECKPOINTS)}")
    if not path.is_dir():
        if not path.is_file():
            raise PyvaeError(
                f"{path} is neither a run folder with checkpoint.pt nor a checkpoint file"
            )
        if which is not None:
            raise PyvaeError(
                f"--checkpoint {which} picks a file of a run folder; {path} is a checkpoint file already"
            )
        return path
    best, last = path / "best.pt", path / "checkpoint.pt"
    if not last.is_file():
        raise PyvaeError(f"{path} is neither a run folder with checkpoint.pt nor a checkpoint file")
    if which == "best" and not best.is_file():
        raise PyvaeError(
            f"{path} has no best.pt (it was trained without validation data); use --checkpoint last"
        )
    return best if which != "last" and best.is_file() else last


def describe_checkpoint(path: Path, payload: dict | None = None) -> str:
    """``RUN/best.pt (epoch 37 of 50: the best validation ELBO, -88.123)`` or ``RUN/checkpoint.pt (epoch 50, the last)``;
    ``payload``: the checkpoint already read, if the caller has it."""
    from pyvae.runs import read
    from pyvae.train.protocol import LABELS

    payload = payload if payload is not None else read(path)
    epoch, history = payload.get("epoch"), payload.get("history")
    objective = payload.get("objective")
    if isinstance(objective, dict) and len(objective) == 1:
        ((key, value),) = objective.items()
        return f"{path} (epoch {epoch}: the best validation {LABELS.get(key, key)}, {value:.3f})"
    if epoch is not None and history is not None:
        return f"{path} (epoch {epoch}, the last)"
    return str(path)


def evaluation_data(
    vae,
    config: dict | None,
    dataset: str | None,
    split: str,
    data_dir: str | None,
    download: bool = True,
):
    """The split a run is evaluated on, binarized as it was trained (one fixed draw where training drew afresh)."""
    return binarized_evaluation_data(vae, config, dataset, split, data_dir, download)[0]


def binarized_evaluation_data(vae, config, dataset, split, data_dir, download=True):
    """(:func:`evaluation_data`, how it was binarized: ``static``, ``none`` or ``dynamic``, the last
    evaluated as one fixed draw)."""
    from pyvae.data.datasets import evaluation_split, load_dataset, resolve_binarize

    config = config or {}
    dataset = dataset or config.get("dataset")
    if dataset is None:
        raise PyvaeError(
            "no config.yaml beside the checkpoint says which data set it was trained on; pass --dataset"
        )
    download = download and config.get("download", True)
    data = load_dataset(
        dataset,
        split,
        data_dir=data_dir or config.get("data_dir"),
        download=download,
        **(data_options(config) if dataset == config.get("dataset") else {}),
    )
    # another data set than the run's is binarized as the likelihood needs, not as the run's was
    mode = config.get("binarize", "auto") if dataset == config.get("dataset") else "auto"
    mode = resolve_binarize(likelihood_of(vae, config), data, mode)
    return evaluation_split(data, mode, config.get("seed", 0)), mode


def likelihood_of(vae, config: dict):
    """The model's likelihood; for a class of the user's own without one, the run's --likelihood
    (bernoulli by default), which decided how its data were binarized."""
    from pyvae.parts.likelihoods import LIKELIHOODS

    if hasattr(vae, "likelihood"):
        return vae.likelihood
    return LIKELIHOODS.resolve(config.get("likelihood", "bernoulli"))


def data_options(config: dict) -> dict:
    """How a PATH data set is split and sized, as a run's configuration recorded it."""
    return {
        "test_fraction": config.get("test_fraction", 0.1),
        "image_size": config.get("image_size"),
    }


def scored(model, data):
    """What a model is scored on: x alone, or (x, y) for a labelled model; m2 scores the images as
    unlabelled (log p(x), the classes summed exactly), cvae needs the labels (log p(x | y))."""
    if needs_labels(model):
        if data.labels is None:
            raise PyvaeError(
                f"{type(model).__name__} scores labelled images; the {data.name} {data.split} split has no labels"
            )
        return data.images, data.labels
    return unlabelled(model, data.images)


def needs_labels(model) -> bool:
    """A model whose batches are (x, y) and that has no classifier of its own to sum y with (cvae)."""
    from pyvae.program import batch_arity

    return batch_arity(model) == 2 and not hasattr(model, "classify")


def unlabelled(model, x):
    """Images as a model scores them without labels: x, or (x, -1) for m2, which sums the classes;
    a model that needs labels cannot."""
    import torch

    from pyvae.program import batch_arity

    if batch_arity(model) == 1:
        return x
    if needs_labels(model):
        raise PyvaeError(
            f"{type(model).__name__} scores labelled images only; anomaly scores need p(x) without labels"
        )
    return x, torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)


def build_model(config, train, likelihood):
    """The model ``config.model`` names, sized for ``train``. vae, cvae and m2 take the flags' network
    settings (--z-dim, --hidden, --activation, --prior, ...); hvae keeps its IWAE-paper layers unless
    a YAML mapping (``model: {name: hvae, z_dims: [...], hidden: [[...], [...]]}``) says otherwise."""
    import inspect

    from pyvae.models import MODELS

    spec = dict(config.model) if isinstance(config.model, dict) else {"name": config.model}
    cls = MODELS[spec.pop("name")]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise PyvaeError(
            f"unknown setting {unknown[0]!r} for model {config.model!r}; allowed: {', '.join(sorted(allowed))}"
        )
    flags = {
        "prior": config.prior,
        "likelihood": likelihood,
        "guide": config.guide,
        "net": config.net,
    }
    if cls is not MODELS.get("hvae"):
        flags.update(z_dim=config.z_dim, hidden=config.hidden, activation=config.activation)
    data = {"x_dim": train.x_dim, "image_shape": train.image_shape}
    if "num_classes" in allowed:
        if train.labels is None:
            raise PyvaeError(
                f"model {cls.__name__} needs labels; the {train.name} data set has none"
            )
        data["num_classes"] = int(train.labels.max()) + 1
    kwargs = {k: v for k, v in {**flags, **data}.items() if k in allowed}
    return cls(**{**kwargs, **spec})


def model_name(model) -> str:
    """A built-in model's name, or ``FILE.py:Class`` for a class of the user's own."""
    from pyvae.runs.user_code import is_model_file, model_file_spec

    if is_model_file(model):
        spec = model_file_spec(model)
        return f"{spec['file']}:{spec['class']}"
    return model["name"] if isinstance(model, dict) else model


def user_model_class(config):
    """(class, record) of ``--model FILE.py:Class``, imported and checked before the data are read
    (a bad file, class or argument leaves no run folder), or None for a built-in model."""
    from pyvae.runs.user_code import is_model_file, model_class, model_file_spec

    if not is_model_file(config.model):
        return None
    run = f"run {config.resume}" if config.resume else None
    return model_class(model_file_spec(config.model), run)


def build_user_model(user, config, train):
    """The user's class built for ``train`` (:func:`pyvae.components.build_user_model`);
    ``config.model`` becomes its record for config.yaml: the absolute file, its sha256, the args."""
    from pyvae.runs.user_code import build_user_model as build

    cls, record = user
    data = {"x_dim": train.x_dim, "image_shape": list(train.image_shape)}
    if train.labels is not None:
        data["num_classes"] = int(train.labels.max()) + 1
    config.model = record
    return build(cls, record, data)


def semi_supervised_user_data(model, config, train, test, valid):
    """(train with --num-labels labels and -1 elsewhere, test and valid as images alone) for a class of
    the user's own that takes an optional label (``model(xs, ys=None)``): trained semi-supervised,
    scored by log p(x)."""
    from pyvae.data.datasets import semi_supervised
    from pyvae.program import batch_arity, batch_slots

    if batch_slots(model) <= batch_arity(model):
        raise PyvaeError(
            f"--num-labels needs a model that takes an optional label, model(xs, ys=None); "
            f"{type(model).__name__}.model takes {batch_arity(model)} tensor(s), none optional"
        )
    train = semi_supervised(train, config.num_labels, config.seed)
    return train, (test.draw(),), (valid.draw(),) if valid is not None else None


def train_main(argv: list[str]) -> None:
    """Train a model by SVI: checkpoints, metrics, pictures and the test log-likelihood."""
    import torch

    from pyvae.cli.config import parse_args
    from pyvae.data.batching import resolve_device
    from pyvae.data.datasets import (
        binarize_for,
        evaluation_split,
        load_train_test,
        semi_supervised,
        spread,
    )
    from pyvae.data.streaming import StreamedImages
    from pyvae.distributed import init, shutdown
    from pyvae.infer.diagnostics import evaluate
    from pyvae.parts import likelihoods
    from pyvae.parts.likelihoods import coding
    from pyvae.runs.checkpoint import load_weights, read
    from pyvae.train.loop import fit
    from pyvae.train.protocol import check
    from pyvae.train.tensorboard import TensorBoard
    from pyvae.viz import plots

    prog = (
        "python -m pyvae train" if sys.argv[0].endswith("__main__.py") else None
    )  # else the example's name
    config, _ = parse_args(
        argv,
        description="Train a VAE by SVI and write its pictures, metrics and test log-likelihood.",
        prog=prog,
    )
    name = model_name(config.model)
    user = user_model_class(config)
    if config.num_labels is not None and name != "m2" and user is None:
        raise PyvaeError(
            f"--num-labels is for the semi-supervised model m2 or a class of your own with an optional "
            f"label, model(xs, ys=None); model {name!r} uses every label or none"
        )
    # under torchrun, one of several processes training together (rank 0 writes); else alone
    world, device = init(resolve_device(config.device))
    say = print if world.main else lambda *args, **kwargs: None

    # 1. data: the requested set, or the offline digits with a notice
    if is_path(config.dataset):  # the run's config.yaml must find it again from anywhere
        config.dataset = str(Path(config.dataset).expanduser().resolve())
    elif config.image_size is not None and config.dataset in SPLITS:
        raise PyvaeError(
            f"--image-size resizes the images of a PATH data set or a torchvision one read image by image "
            f"(celeba, stl10, ...); {config.dataset!r} is built in"
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
        f"{train.name} has no valid split; hold out part of the training set with --valid-fraction F",
    )
    likelihood = likelihoods.LIKELIHOODS.resolve(config.likelihood)
    train, test, config.binarize = binarize_for(
        likelihood, train, test, config.binarize, config.seed
    )
    valid = evaluation_split(valid, config.binarize, config.seed) if valid is not None else None
    metrics = {}
    if name == "m2":
        # train on num_labels labels (or all); score the test set as unlabelled: log p(x), and its accuracy
        if config.num_labels is not None:
            train = semi_supervised(train, config.num_labels, config.seed)
        x_test, y_test = test.draw(), test.labels
        x_test = (
            x_test[:] if isinstance(x_test, StreamedImages) else x_test
        )  # read whole: its accuracy takes one tensor
        metrics["test_accuracy"] = lambda model: model.accuracy(x_test, y_test)
        test = (x_test, torch.full_like(y_test, -1))
        valid = (
            (valid.draw(), torch.full((len(valid),), -1, dtype=torch.long))
            if valid is not None
            else None
        )
    held = (
        f" / {len(valid[0]) if name == 'm2' else len(valid)} valid ({valid_origin(config)})"
        if valid is not None
        else ""
    )
    streamed = (
        ", streamed from disk (too large for memory)"
        if isinstance(train.images, StreamedImages)
        else ""
    )
    say(
        f"data: {train.name}, {len(train)} train{held} / {len(x_test) if name == 'm2' else len(test)} test images of {train.image_shape}, "
        f"binarize={config.binarize}{streamed}"
    )

    # 2. model: Pyro programs around neural networks
    torch.manual_seed(config.seed)
    if config.resume:
        resumed = Path(config.resume) / "checkpoint.pt"
        model = checkpoint_model(resumed, read(resumed))
    elif user:
        model = build_user_model(user, config, train)
    else:
        model = build_model(config, train, likelihood)
    if user is not None and config.num_labels is not None:
        train, test, valid = semi_supervised_user_data(model, config, train, test, valid)

    # 3. inference: SVI on the ELBO, a checkpoint and a metrics line per epoch
    out = Path(world.broadcast(str(config.output_dir()) if world.main else None))
    board = None
    if config.tensorboard and world.main:
        x_test = test[0] if isinstance(test, tuple) else test.draw()
        labels = getattr(test, "labels", None) if needs_labels(model) else None
        board = TensorBoard(out / "tensorboard", x_test, labels)
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
    )
    shutdown()  # leave torchrun's process group: what follows is rank 0's alone
    if not world.main:
        return

    # 4. pictures, of the checkpoint evaluated: best.pt unless --eval-checkpoint last
    chosen = checkpoint_file(out, None if config.eval_checkpoint == "best" else "last")
    payload = read(chosen)
    load_weights(model, payload["state_dict"], chosen)
    print(f"final model: {describe_checkpoint(chosen, payload)}")
    evaluated = history[payload["epoch"] - 1]
    x_test = test[0] if isinstance(test, tuple) else test.draw()
    plots.samples(model, out / "samples.png")
    labels = getattr(test, "labels", None) if needs_labels(model) else None
    plots.reconstructions(model, x_test, out / "reconstructions.png", labels=labels)
    plots.elbo_curves(history, out / "elbo.png")

    # 5. the test log-likelihood by importance sampling (python -m pyvae evaluate for K = 5000)
    if config.eval_samples:
        points = spread(torch.arange(len(x_test)), config.eval_points)
        data = x_test[points]
        if (isinstance(test, tuple) and len(test) > 1) or needs_labels(
            model
        ):  # m2's (x, -1), cvae's (x, y)
            data = (data, test[1][points] if isinstance(test, tuple) else test.labels[points])
        result = evaluate(
            model, data, config.eval_samples, dataset=train.name, split="test", progress=True
        )
        print(result.table())
        result.write(out / f"eval-{train.name}-test-K{config.eval_samples}{last_suffix(chosen)}")
        if board is not None:
            board.evaluation(result.summary(), result.table(), evaluated["epoch"])
    if board is not None:
        board.close()
    accuracy = (
        f"; test accuracy {evaluated['test_accuracy']:.3f}" if "test_accuracy" in evaluated else ""
    )
    bits = (
        f", {evaluated['test_elbo_bpd']:.4f} bits/dim ({coding(model)[1]} levels)"
        if "test_elbo_bpd" in evaluated
        else ""
    )
    print(
        f"test ELBO {evaluated['test_elbo']:.3f} nats per data point{bits} (epoch {evaluated['epoch']}){accuracy}; outputs in {out}/"
    )


def validation_data(config, train, say):
    """(train, valid or None) as ``config`` asks (:func:`pyvae.data.validation_split`). A data set's own
    valid split that cannot be found is a notice, and training goes on without validation, unless
    patience or the plateau schedule needs it."""
    from pyvae.data.datasets import validation_split
    from pyvae.errors import DataNotFound

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


def valid_origin(config) -> str:
    return (
        f"{config.valid_fraction:g} of train held out, seed {config.seed}"
        if config.valid_fraction
        else "the valid split"
    )


def evaluate_main(argv: list[str]) -> None:
    """log p(x) by importance sampling or AIS, and guide diagnostics of a trained run."""
    import pyro

    from pyvae import distributed
    from pyvae.infer.diagnostics import evaluate

    parser = run_parser(
        "evaluate",
        "log p(x) by importance sampling (or AIS) and guide diagnostics of a trained run.",
        "RUN/eval-<dataset>-<split>-K<K>, with AIS RUN/eval-<dataset>-<split>-ais-T<T>-C<C>",
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=["train", "valid", "test"],
        help="which split to score (default test)",
    )
    parser.add_argument(
        "--num-samples", type=int, default=5000, help="K importance samples per point"
    )
    parser.add_argument(
        "--batch-size", type=int, help="data points per chunk (default: chosen to bound memory)"
    )
    parser.add_argument(
        "--num-points", type=int, help="evaluate this many points, evenly spread over the split"
    )
    parser.add_argument(
        "--site", help="the latent site the plots show (default: the model's top-level latent)"
    )
    parser.add_argument(
        "--method",
        default="is",
        choices=["is", "ais"],
        help="is: importance sampling with the guide; "
        "ais: annealed importance sampling (HMC), IS kept beside it (default is)",
    )
    ais_flags(parser)
    args = parser.parse_args(argv)
    check_positive(args, "num_samples", "batch_size", "num_points", optional=True)
    ais = ais_settings(args) if args.method == "ais" else None

    world, device, vae, checkpoint, data, x = scored_run(args, args.split, args.num_points)
    name = f"ais-T{args.num_steps}-C{args.num_chains}" if ais else f"K{args.num_samples}"
    out = writable_dir(
        args.out
        or checkpoint.parent / f"eval-{data.name}-{args.split}-{name}{last_suffix(checkpoint)}",
        create=False,
    )

    pyro.set_rng_seed(args.seed)
    result = evaluate(
        vae,
        x,
        args.num_samples,
        args.batch_size,
        site=args.site,
        device=device,
        dataset=data.name,
        split=args.split,
        progress=world.main,
        seed=args.seed,
        ais=ais,
        world=world,
    )
    if world.main:
        print(result.table())
        result.write(out)
        written = ["eval.json", "eval.nc", "khat.png", "iwae_curve.png"] + (
            ["kl_per_dim.png"] if result.kl_per_dim is not None else []
        )
        print(f"wrote {out}/" + ", ".join(written + (["ais.png"] if ais else [])))
    distributed.shutdown()


def bdmc_main(argv: list[str]) -> None:
    """BDMC: forward and reverse AIS on data simulated from the model, a sandwich around log p(x)."""

    from pyvae import distributed
    from pyvae.infer.bdmc import bdmc
    from pyvae.runs import write_json
    from pyvae.viz import plots

    parser = run_parser(
        "bdmc",
        "Bidirectional Monte Carlo: how far AIS at T steps can be from log p(x).",
        "RUN/bdmc-T<T>-C<C>",
    )
    parser.add_argument(
        "--num-points", type=int, default=20, help="points simulated from the model (default 20)"
    )
    ais_flags(parser)
    args = parser.parse_args(argv)
    check_positive(args, "num_points")
    ais = ais_settings(args)
    world, _, vae, checkpoint, _, template = scored_run(args, "test", args.num_points)
    out = writable_dir(
        args.out
        or checkpoint.parent
        / f"bdmc-T{args.num_steps}-C{args.num_chains}{last_suffix(checkpoint)}",
        create=False,
    )
    result = bdmc(
        vae,
        template if isinstance(template, tuple) else (template,),
        seed=args.seed,
        world=world,
        **ais,
    )
    if world.main:
        print(result.table())
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "bdmc.json", result.summary())
        plots.bdmc(result.summary(), out / "bdmc.png")
        print(f"wrote {out}/bdmc.json, bdmc.png")
    distributed.shutdown()


def gap_main(argv: list[str]) -> None:
    """The inference gap split into approximation and amortization gaps (AIS and per-point guides)."""

    from pyvae import distributed
    from pyvae.infer.gap import inference_gap
    from pyvae.runs import write_json

    parser = run_parser(
        "gap",
        "The inference gap log p(x) - ELBO split into approximation and amortization gaps.",
        "RUN/gap-T<T>",
    )
    parser.add_argument(
        "--num-points", type=int, default=20, help="test points, evenly spread (default 20)"
    )
    parser.add_argument(
        "--num-samples", type=int, default=1000, help="draws for each ELBO (default 1000)"
    )
    parser.add_argument(
        "--local-steps",
        type=int,
        default=2000,
        help="at most this many Adam steps per point's guide (default 2000)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="Adam learning rate of the per-point guides (default 1e-3)",
    )
    ais_flags(parser)
    args = parser.parse_args(argv)
    check_positive(args, "num_points", "num_samples", "local_steps")
    ais = ais_settings(args)
    world, _, vae, checkpoint, _, x = scored_run(args, "test", args.num_points)
    out = writable_dir(
        args.out or checkpoint.parent / f"gap-T{args.num_steps}{last_suffix(checkpoint)}",
        create=False,
    )
    result = inference_gap(
        vae,
        x,
        ais=ais,
        num_samples=args.num_samples,
        local_steps=args.local_steps,
        lr=args.lr,
        seed=args.seed,
        world=world,
    )
    if world.main:
        print(result.table())
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "gap.json", result.summary())
        result.to_netcdf(out / "eval.nc")
        print(f"wrote {out}/gap.json, eval.nc")
    distributed.shutdown()


def scored_run(args, split: str, num_points: int | None):
    """What evaluate, bdmc and gap start from: (world, device, the run's model on it, its checkpoint file,
    the data set, its ``num_points`` scored points evenly spread, on the device: x or (x, y))."""
    from pyvae import distributed
    from pyvae.data.batching import resolve_device
    from pyvae.data.datasets import spread

    world, device = distributed.init(resolve_device(args.device))
    vae, config, checkpoint = load_run(args.run, args.checkpoint, args.parts)
    vae.to(device)
    data = evaluation_data(vae, config, args.dataset, split, args.data_dir, not args.no_download)
    x = scored(vae, data)
    x = (
        tuple(spread(t, num_points).to(device) for t in x)
        if isinstance(x, tuple)
        else spread(x, num_points).to(device)
    )
    return world, device, vae, checkpoint, data, x


def last_suffix(checkpoint: Path) -> str:
    """``-last`` in the default output folder's name when the last epoch's checkpoint of a run that keeps
    a best.pt too was loaded (``--checkpoint last``, RUN/checkpoint.pt, ``--eval-checkpoint last``),
    so that it does not overwrite the evaluation of best.pt."""
    return (
        "-last"
        if checkpoint.name == "checkpoint.pt" and (checkpoint.parent / "best.pt").is_file()
        else ""
    )


def ais_flags(parser) -> None:
    """The flags of annealed importance sampling, shared by evaluate, bdmc and gap."""
    from pyvae.infer.ais import SCHEDULES, STARTS

    parser.add_argument(
        "--num-steps",
        type=int,
        default=1000,
        help="T, intermediate distributions of AIS (default 1000)",
    )
    parser.add_argument(
        "--num-chains", type=int, default=16, help="AIS chains per point (default 16)"
    )
    parser.add_argument(
        "--leapfrog-steps",
        type=int,
        default=10,
        help="HMC leapfrog steps per AIS transition (default 10)",
    )
    parser.add_argument(
        "--schedule",
        default="sigmoid",
        choices=SCHEDULES,
        help="the annealing schedule (default sigmoid)",
    )
    parser.add_argument(
        "--ais-start",
        default="guide",
        choices=STARTS,
        help="where the path starts: q(z|x) or the prior (default guide)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="record the densities and their gradients once as a graph (and "
        "the gradients alone as a second) and compile them (torch.compile): about 2.5-3x faster per "
        "step on a CPU, after about 30-45 s of compiling",
    )


def ais_settings(args) -> dict:
    """The keyword arguments of :func:`pyvae.ais.ais_log_likelihood` the flags ask for."""
    check_positive(args, "num_steps", "num_chains", "leapfrog_steps")
    return {
        "num_steps": args.num_steps,
        "num_chains": args.num_chains,
        "leapfrog_steps": args.leapfrog_steps,
        "schedule": args.schedule,
        "start": args.ais_start,
        "compile": args.compile,
    }


def run_parser(command: str, description: str, default_out: str = "RUN/explore") -> Parser:
    """The arguments every ``python -m pyvae`` command on a trained run shares."""
    parser = Parser(prog=f"python -m pyvae {command}", description=description)
    parser.add_argument(
        "run", help="run folder (with checkpoint.pt and config.yaml) or checkpoint file"
    )
    parser.add_argument("--dataset", help="data set (default: the run's)")
    parser.add_argument(
        "--data-dir", help="data root (default: the run's, else $PYVAE_DATA, else ./data)"
    )
    parser.add_argument("--no-download", action="store_true", help="never fetch missing data files")
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where to compute (auto: CUDA when available)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the random draws (default 0)")
    parser.add_argument("--out", help=f"output folder (default {default_out})")
    parser.add_argument(
        "--checkpoint",
        choices=CHECKPOINTS,
        help="in a run folder: best.pt, the best validation epoch, or "
        "checkpoint.pt, the last (default: best.pt when there is one)",
    )
    parser.add_argument(
        "--parts",
        metavar="FILE.py",
        help="the Python file defining the run's custom prior, likelihood "
        "or guide (imported; its __main__ block is not run)",
    )
    return parser


def check_positive(args, *names: str, optional: bool = False) -> None:
    """Each named flag must be a positive integer (or, with ``optional``, not given)."""
    for name in names:
        value = getattr(args, name)
        if (value is None and not optional) or (value is not None and value < 1):
            raise PyvaeError(f"--{name.replace('_', '-')} must be a positive integer; got {value}")


def explore_setup(args, *positive: str):
    """(vae on its device, config, output folder) for an exploration command; checks positive flags."""
    import pyro

    from pyvae.train.loop import resolve_device

    check_positive(args, *positive)
    vae, config, checkpoint = load_run(args.run, args.checkpoint, args.parts)
    vae.to(resolve_device(args.device)).eval()
    pyro.set_rng_seed(args.seed)
    return (
        vae,
        config,
        writable_dir(args.out or checkpoint.parent / f"explore{last_suffix(checkpoint)}"),
    )


def held_out_images(vae, config, args, n=None, dataset=None):
    """(the test split of ``dataset`` (default: the run's) as the run was evaluated, n of its images evenly
    spread on the model's device, how it was binarized: see :func:`binarized_evaluation_data`)."""
    from pyvae.data.datasets import spread

    data, mode = binarized_evaluation_data(
        vae, config, dataset or args.dataset, "test", args.data_dir, not args.no_download
    )
    device = next(vae.parameters()).device
    return data, spread(data.images, n).to(device), mode


def sample_main(argv: list[str]) -> None:
    """Images decoded from latents drawn from the prior (--label for cvae, m2)."""
    from pyvae.viz import plots

    parser = run_parser("sample", "Images decoded from latents drawn from the prior.")
    parser.add_argument("--n", type=int, default=64, help="how many images (default 64)")
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="scale of z about the prior mean (vae)"
    )
    parser.add_argument(
        "--label", type=int, help="class to draw (cvae, m2); default: the classes in turn"
    )
    args = parser.parse_args(argv)
    vae, _, out = explore_setup(args, "n")
    if not args.temperature > 0:
        raise PyvaeError(f"--temperature must be a positive number; got {args.temperature}")
    plots.samples(vae, out / "samples.png", args.n, args.label, args.temperature)
    print(f"wrote {out}/samples.png")


def reconstruct_main(argv: list[str]) -> None:
    """Test images, each row above its reconstructions."""
    from pyvae.viz import plots

    parser = run_parser("reconstruct", "Test images, each row above its reconstructions.")
    parser.add_argument("--n", type=int, default=32, help="images (rows of 8)")
    args = parser.parse_args(argv)
    vae, config, out = explore_setup(args, "n")
    data, x, _ = held_out_images(vae, config, args)
    labels = data.labels if needs_labels(vae) else None
    plots.reconstructions(
        vae, x, out / "reconstructions.png", per_row=8, rows=max(1, args.n // 8), labels=labels
    )
    print(f"wrote {out}/reconstructions.png")


def interpolate_main(argv: list[str]) -> None:
    """Decoded paths between test images, linear and spherical in z (vae)."""
    from pyvae.infer.explore import interpolations, require_vae
    from pyvae.viz import plots

    parser = run_parser(
        "interpolate", "Decoded paths between test images, linear and spherical in z."
    )
    parser.add_argument(
        "--pairs", type=int, default=8, help="pairs of test images, one row each (default 8)"
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="images along each path, ends included (default 10)"
    )
    args = parser.parse_args(argv)
    vae, config, out = explore_setup(args, "pairs", "steps")
    require_vae(vae, "interpolate")
    _, x, _ = held_out_images(vae, config, args, 2 * args.pairs)
    x_from, x_to = x[0::2], x[1::2]
    for kind in ("linear", "spherical"):
        images = interpolations(vae, x_from, x_to, args.steps, spherical=kind == "spherical")
        plots.save_grid(images, vae.image_shape, out / f"interpolate_{kind}.png", nrow=args.steps)
    print(f"wrote {out}/interpolate_linear.png, interpolate_spherical.png")


def traverse_main(argv: list[str]) -> None:
    """Each latent dimension swept over the prior's quantiles, by KL (vae)."""
    import torch

    from pyvae.infer.explore import manifold, require_vae, traversal
    from pyvae.infer.importance import log_likelihood
    from pyvae.viz import plots

    parser = run_parser(
        "traverse", "Each latent dimension swept over the prior's quantiles, by KL."
    )
    parser.add_argument(
        "--dims", type=int, default=10, help="how many dimensions, largest KL first"
    )
    parser.add_argument(
        "--steps", type=int, default=9, help="quantiles of the prior per dimension (default 9)"
    )
    args = parser.parse_args(argv)
    vae, config, out = explore_setup(args, "dims", "steps")
    require_vae(vae, "traverse")
    _, x, _ = held_out_images(vae, config, args, 1000)
    per_dim = log_likelihood(vae, x, num_samples=20).kl_per_dim.get("z")
    kl = per_dim.mean(0) if per_dim is not None else None
    if kl is None:  # no factorized marginals: rank by how much the latent means vary instead
        kl = vae.latent_mean(x).var(0).cpu()
    order = torch.argsort(kl, descending=True)[: args.dims].tolist()
    plots.save_grid(
        traversal(vae, order, args.steps), vae.image_shape, out / "traverse.png", nrow=args.steps
    )
    print(f"wrote {out}/traverse.png (rows: dimensions {order})")
    if vae.z_dim == 2:
        plots.save_grid(manifold(vae), vae.image_shape, out / "manifold.png", nrow=15)
        print(f"wrote {out}/manifold.png")


def embed_main(argv: list[str]) -> None:
    """Latent means of the test set: a scatter, a linear probe, k-means purity."""

    from dataclasses import replace

    import torch

    from pyvae.infer.explore import embedding_2d, linear_probe
    from pyvae.models import VAE
    from pyvae.program import latent_means, structure
    from pyvae.runs import write_json
    from pyvae.viz import plots

    parser = run_parser(
        "embed", "Latent means of the test set: a scatter, a linear probe, k-means purity."
    )
    parser.add_argument("--num-points", type=int, help="test images, evenly spread (default all)")
    args = parser.parse_args(argv)
    vae, config, out = explore_setup(args)
    data, _, _ = held_out_images(vae, config, args)
    if data.labels is None:
        raise PyvaeError(
            f"the {data.name} test split has no labels; pass --dataset with a labelled set"
        )
    from pyvae.data.datasets import spread

    x, labels = spread(data.images, args.num_points), spread(data.labels, args.num_points)
    device = next(vae.parameters()).device
    if isinstance(vae, VAE):
        z = vae.latent_mean(x.to(device)).cpu().numpy()
    else:  # the guide's mean of the model's latent site, m2's images unlabelled
        batch = scored(vae, replace(data, images=x, labels=labels))
        batch = (
            tuple(t.to(device) for t in batch) if isinstance(batch, tuple) else (batch.to(device),)
        )
        site = getattr(vae, "latent_site", None)
        if site is None:  # a class of the user's own: its first latent site, evaluate's default too
            site = structure(vae, tuple(t[:2] for t in batch)).latent_sites[0]
        z = (
            torch.cat(
                [
                    latent_means(vae, tuple(t[i : i + 500] for t in batch), site)
                    for i in range(0, len(x), 500)
                ]
            )
            .cpu()
            .numpy()
        )
    result = linear_probe(z, labels.numpy(), seed=args.seed)
    points, axis_name = embedding_2d(z)
    plots.embedding(points, labels.numpy(), axis_name, out / "embedding.png")
    write_json(out / "embed.json", {"dataset": data.name, **result})
    print(
        f"{data.name} test, {result['num_points']} points: linear probe accuracy {result['probe_accuracy']:.3f} "
        f"(majority class {result['majority_baseline']:.3f}); k-means purity {result['kmeans_purity']:.3f}"
    )
    print(f"wrote {out}/embedding.png, embed.json")


BINARIZED = {
    "none": "scored as stored (no binarization)",
    "static": "binarized by one fixed Bernoulli draw of its grey levels",
    "dynamic": "binarized by one fixed Bernoulli draw of its grey levels (training drew afresh)",
}


def anomaly_main(argv: list[str]) -> None:
    """log p(x) as an anomaly score: ROC AUC of test images against another set."""

    from pyvae.infer.explore import anomaly_auc
    from pyvae.infer.importance import log_likelihood
    from pyvae.runs import write_json
    from pyvae.viz import plots

    parser = run_parser(
        "anomaly", "log p(x) as an anomaly score: ROC AUC of test images against another set."
    )
    parser.add_argument(
        "--ood", required=True, help="the out-of-distribution data set, e.g. fashion_mnist"
    )
    parser.add_argument(
        "--num-samples", type=int, default=100, help="K importance samples per image"
    )
    parser.add_argument(
        "--num-points", type=int, default=1000, help="images of each set, evenly spread"
    )
    args = parser.parse_args(argv)
    vae, config, out = explore_setup(args, "num_samples", "num_points")
    data, x_in, mode_in = held_out_images(vae, config, args, args.num_points)
    ood, x_ood, mode_ood = held_out_images(vae, config, args, args.num_points, dataset=args.ood)
    if x_ood.shape[1] != vae.x_dim:
        raise PyvaeError(
            f"{args.ood} images have {x_ood.shape[1]} pixels; the model expects {vae.x_dim}"
        )
    ll_in = log_likelihood(vae, unlabelled(vae, x_in), args.num_samples).log_px
    ll_ood = log_likelihood(vae, unlabelled(vae, x_ood), args.num_samples).log_px
    auc = anomaly_auc(ll_in, ll_ood)
    result = {
        "in_distribution": data.name,
        "out_of_distribution": ood.name,
        "num_points": len(x_in),
        "num_samples": args.num_samples,
        # only the run's own set was drawn afresh in training; another set is one fixed draw, nothing more
        "binarization": {
            data.name: BINARIZED[mode_in],
            ood.name: BINARIZED["static" if mode_ood == "dynamic" else mode_ood],
        },
        "roc_auc": auc,
        "log_px_in": float(ll_in.mean()),
        "log_px_ood": float(ll_ood.mean()),
    }
    plots.anomaly_histogram(
        ll_in, ll_ood, (data.name, ood.name), auc, args.num_samples, out / "anomaly_hist.png"
    )
    write_json(out / "anomaly.json", result)
    print(f"ROC AUC of -log p(x), {data.name} (in) vs {ood.name} (out): {auc:.3f}")
    print(
        f"  {len(x_in)} test images of each, evenly spread; log p(x) by importance sampling, K = {args.num_samples}"
    )
    for name, how in result["binarization"].items():
        print(f"  {name}: {how}")
    print(f"  mean log p(x): in {result['log_px_in']:.2f}, out {result['log_px_ood']:.2f} nats")
    if auc < 0.5:
        print(
            "  caveat: the out-of-distribution images got *higher* likelihood on average. This is a known "
            "failure of likelihood-based detection (Nalisnick et al. 2019): simple images score high under "
            "any density model, whatever it was trained on."
        )
    print(f"wrote {out}/anomaly_hist.png, anomaly.json")


def _side(n: int) -> int:
    return max(1, round(n**0.5))


COMMANDS = {
    "train": train_main,
    "evaluate": evaluate_main,
    "bdmc": bdmc_main,
    "gap": gap_main,
    "sample": sample_main,
    "reconstruct": reconstruct_main,
    "interpolate": interpolate_main,
    "traverse": traverse_main,
    "embed": embed_main,
    "anomaly": anomaly_main,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m pyvae COMMAND [flags]   (python -m pyvae COMMAND --help for its flags)\n"
        )
        for name, command in COMMANDS.items():
            print(
                f"  {name:<12}{(command.__doc__ or '').strip().splitlines()[0] if command.__doc__ else ''}"
            )
        return
    if argv[0] not in COMMANDS:
        print(
            f"usage: python -m pyvae {{{','.join(COMMANDS)}}} ...; got {argv[0]!r}", file=sys.stderr
        )
        sys.exit(2)
    run(COMMANDS[argv[0]], argv[1:])
