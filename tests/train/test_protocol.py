"""Training protocols: validation data, early stopping, best.pt, learning-rate schedules, gated
layers."""

import json
import math

import pytest
import torch

import pyvae
from pyvae.data.datasets import binarize, hold_out, load_dataset, validation_split
from pyvae.train.protocol import Schedule, iwae_factor
from tests.conftest import require_files


@pytest.fixture(scope="module")
def digits():
    """(train, valid, test): 1150 / 287 / 360 binary 8x8 digits, valid held out of train."""
    train, valid = hold_out(load_dataset("digits", "train"), 0.2, seed=0)
    return (
        binarize(train, "static"),
        binarize(valid, "static", 1),
        binarize(load_dataset("digits", "test"), "static", 1),
    )


def small_vae(**kwargs):
    torch.manual_seed(0)
    return pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,), **kwargs)


def strip(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def same_weights(a, b):
    return all(
        torch.equal(p.cpu(), q.cpu())
        for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


# -- validation data ---------------------------------------------------------------------
def test_hold_out_is_seeded_disjoint_and_complete():
    from dataclasses import replace

    data = load_dataset("digits", "train")
    tagged = replace(data, labels=torch.arange(len(data)))  # each point's label is its index
    rest, held = hold_out(tagged, 0.25, seed=3)
    assert (len(rest), len(held)) == (1078, 359) and held.split == "valid" and rest.split == "train"
    assert torch.equal(
        torch.cat([rest.labels, held.labels]).sort().values, torch.arange(len(data))
    )  # disjoint, complete
    assert torch.equal(rest.labels.sort().values, rest.labels) and torch.equal(
        held.images, data.images[held.labels]
    )
    assert torch.equal(hold_out(tagged, 0.25, seed=3)[1].labels, held.labels)
    assert not torch.equal(hold_out(tagged, 0.25, seed=4)[1].labels, held.labels)
    for bad in (0, 1, 1.5, -0.1, True, "half"):
        with pytest.raises(
            pyvae.PyvaeError, match=f"valid_fraction must be a number in \\(0, 1\\); got {bad!r}"
        ):
            hold_out(data, bad)


def test_binarized_mnist_validates_on_its_valid_split():
    root = require_files("binarized_mnist/binarized_mnist_valid.amat")
    train = load_dataset("binarized_mnist", "train", data_dir=root, download=False)
    same, valid = validation_split(train, None, data_dir=root, download=False)
    assert same is train and len(valid) == 10_000 and valid.split == "valid"
    rest, held = validation_split(train, 0.1, seed=0, data_dir=root, download=False)
    assert (len(rest), len(held)) == (
        45_000,
        5_000,
    )  # an explicit fraction holds out of train instead
    assert validation_split(load_dataset("digits", "train"))[1] is None  # digits has no valid split


# -- what fit records and keeps ----------------------------------------------------------
def test_validation_numbers_lr_and_best_checkpoint(tmp_path, digits):
    train, valid, test = digits
    vae = small_vae()
    history = pyvae.fit(
        vae,
        train,
        test=test,
        valid=valid,
        valid_samples=50,
        epochs=3,
        batch_size=128,
        lr=3e-3,
        device="cpu",
        seed=0,
        out=tmp_path,
        progress=False,
    )
    assert all(h.keys() >= {"valid_elbo", "valid_log_px", "lr", "test_elbo"} for h in history)
    assert all(h["lr"] == 3e-3 for h in history)
    # log (1/K) sum_k w_k bounds log p(x) more tightly than the ELBO (mean_k log w_k), so it is
    # higher
    assert all(h["valid_log_px"] > h["valid_elbo"] for h in history)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == history
    best = max(history, key=lambda h: (h["valid_log_px"], -h["epoch"]))
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert saved["epoch"] == best["epoch"] and saved["objective"] == {
        "valid_log_px": best["valid_log_px"]
    }
    if best["epoch"] == history[-1]["epoch"]:
        assert same_weights(pyvae.load(tmp_path / "best.pt"), vae)


def test_early_stopping_keeps_the_best_epoch(tmp_path, digits):
    """A learning rate far too high makes the validation ELBO wander; with patience 2 training stops
    2 epochs after its best, and best.pt holds that epoch's weights."""
    train, valid, _ = digits
    train = train.images[:400]
    history = pyvae.fit(
        small_vae(),
        train,
        valid=valid,
        epochs=40,
        patience=2,
        batch_size=100,
        lr=0.1,
        device="cpu",
        seed=1,
        out=tmp_path,
        progress=False,
    )
    scores = [h["valid_elbo"] for h in history]
    best = scores.index(max(scores)) + 1
    assert len(history) < 40 and len(history) - best == 2
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == best
    previous = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert previous["epoch"] == len(history)
    # best.pt holds the weights checkpoint.pt held after that epoch: retrain to it and compare
    again = small_vae()
    pyvae.fit(
        again,
        train,
        valid=valid,
        epochs=best,
        batch_size=100,
        lr=0.1,
        device="cpu",
        seed=1,
        progress=False,
    )
    assert same_weights(pyvae.load(tmp_path / "best.pt"), again)


# -- schedules ---------------------------------------------------------------------------
def test_iwae_stages_are_burda_et_al():
    stages = [round(math.log10(iwae_factor(k)) * -7) for k in range(3281)]
    assert [stages.count(i) for i in range(8)] == [1, 3, 9, 27, 81, 243, 729, 3280 - 1093 + 1]
    assert stages == sorted(stages) and iwae_factor(10_000) == 10 ** (-1)


@pytest.mark.parametrize("name", ["iwae", "cosine"])
def test_the_lr_of_each_epoch_follows_the_schedule(digits, name):
    train, _, _ = digits
    history = pyvae.fit(
        small_vae(),
        train,
        epochs=6,
        lr=1e-3,
        lr_schedule=name,
        batch_size=256,
        device="cpu",
        seed=0,
        progress=False,
    )
    expected = {
        "iwae": [1e-3 * 10 ** (-i / 7) for i in (0, 1, 1, 1, 2, 2)],
        "cosine": [1e-3 * (1 + math.cos(math.pi * e / 6)) / 2 for e in range(6)],
    }[name]
    assert [h["lr"] for h in history] == pytest.approx(expected, rel=1e-9)


def test_plateau_halves_the_rate_after_six_epochs_without_improvement():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule, rates = Schedule("plateau", optimizer, epochs=20), []
    for objective in [-90.0, -89.0] + [-89.5] * 7:
        rates.append(schedule.lr)
        optimizer.step()
        schedule.step(objective)
    assert rates == [1.0] * 8 + [0.5]


@pytest.mark.parametrize("name, patience", [("iwae", 2), ("plateau", 7)])
def test_a_run_continued_to_more_epochs_equals_one_run(tmp_path, digits, name, patience):
    """Schedule and early stopping resume exactly: 3 epochs, then resumed to 40, ends where one run
    to 40 ends (stopped early at the same epoch, with the same weights and best.pt)."""
    train, valid, _ = digits
    train = train.images[:400]
    settings = dict(
        valid=valid,
        patience=patience,
        lr_schedule=name,
        batch_size=100,
        lr=0.1,
        device="cpu",
        seed=1,
        progress=False,
    )
    whole = small_vae()
    reference = pyvae.fit(whole, train, epochs=40, out=tmp_path / "whole", **settings)
    assert len(reference) < 40  # it did stop early
    assert len({h["lr"] for h in reference[3:]}) > 1  # and the rate changed after the split
    vae = small_vae()
    pyvae.fit(vae, train, epochs=3, out=tmp_path / "split", **settings)
    resumed = pyvae.fit(vae, train, epochs=40, out=tmp_path / "split", resume=True, **settings)
    assert strip(resumed) == strip(reference) and same_weights(vae, whole)
    assert same_weights(
        pyvae.load(tmp_path / "split" / "best.pt"), pyvae.load(tmp_path / "whole" / "best.pt")
    )
    # resuming a run that stopped early trains no further
    again = pyvae.fit(vae, train, epochs=40, out=tmp_path / "split", resume=True, **settings)
    assert strip(again) == strip(reference) and same_weights(vae, whole)


# -- bad input ---------------------------------------------------------------------------
def test_protocol_settings_without_validation_data_are_refused(digits):
    train, valid, _ = digits
    cases = [
        (
            dict(patience=3),
            "patience 3 needs validation data and there is none: pass valid= to fit",
        ),
        (dict(lr_schedule="plateau"), "lr_schedule 'plateau' needs validation data"),
        (
            dict(lr_schedule="step", valid=valid),
            "unknown lr_schedule 'step'; choose from none, iwae, plateau, cosine",
        ),
        (dict(patience=0, valid=valid), "patience must be a positive integer; got 0"),
        (dict(valid_samples=-1, valid=valid), "valid_samples must be an integer >= 0; got -1"),
    ]
    for kwargs, message in cases:
        with pytest.raises(pyvae.PyvaeError, match=message):
            pyvae.fit(small_vae(), train, epochs=1, device="cpu", progress=False, **kwargs)


def test_resuming_with_another_schedule_is_refused_and_changes_nothing(tmp_path, digits):
    train, _, _ = digits
    vae = small_vae()
    pyvae.fit(
        vae,
        train,
        epochs=2,
        lr_schedule="cosine",
        batch_size=256,
        device="cpu",
        out=tmp_path,
        progress=False,
    )
    before = {name: (tmp_path / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}
    weights = [p.detach().clone() for p in vae.parameters()]
    for kwargs, message in [
        (
            dict(lr_schedule="iwae", epochs=3),
            "was trained with lr_schedule 'cosine'; resuming it with 'iwae' would change the "
            "schedule mid-run",
        ),
        (
            dict(lr_schedule="cosine", epochs=3),
            "anneals its cosine lr_schedule over 2 epochs; resuming it with epochs 3",
        ),
    ]:
        with pytest.raises(pyvae.PyvaeError, match=message):
            pyvae.fit(
                vae,
                train,
                batch_size=256,
                device="cpu",
                out=tmp_path,
                resume=True,
                progress=False,
                **kwargs,
            )
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert all(torch.equal(a, b) for a, b in zip(weights, vae.parameters(), strict=True))


# -- gated layers ------------------------------------------------------------------------
def test_gated_layers_compute_the_gate_and_save():
    from pyvae.parts.nets import GatedDense

    vae = pyvae.VAE(x_dim=16, z_dim=3, hidden=(8, 6), activation="gated")
    layers = list(vae.encoder)
    assert [type(layer).__name__ for layer in layers] == ["GatedDense", "GatedDense", "Linear"]
    gate = layers[0]
    x = torch.rand(5, 16)
    assert torch.allclose(
        gate(x),
        (x @ gate.h.weight.T + gate.h.bias) * torch.sigmoid(x @ gate.g.weight.T + gate.g.bias),
    )
    assert gate(torch.rand(7, 5, 16)).shape == (7, 5, 8)  # a particle dimension may lead
    assert isinstance(vae.decoder[0], GatedDense) and vae.decoder[-1].out_features == 16
    assert [
        type(layer).__name__
        for layer in pyvae.VAE(x_dim=16, z_dim=3, hidden=(), activation="gated").encoder
    ] == ["Linear"]
    with pytest.raises(pyvae.PyvaeError, match="activation 'gated' is for MLPs"):
        pyvae.VAE(x_dim=64, z_dim=3, net="conv", activation="gated")


def test_gated_model_saves_and_loads(tmp_path):
    vae = pyvae.VAE(x_dim=16, z_dim=3, hidden=(8, 6), activation="gated")
    pyvae.save(vae, tmp_path / "gated.pt")
    assert same_weights(pyvae.load(tmp_path / "gated.pt"), vae)


# -- the command line --------------------------------------------------------------------
TRAIN = [
    "train",
    "--dataset",
    "digits",
    "--no-download",
    "--z-dim",
    "4",
    "--batch-size",
    "256",
    "--lr",
    "1e-3",
    "--eval-samples",
    "20",
    "--eval-points",
    "20",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    """A run with every protocol flag: validation held out of train, patience, a schedule, gated
    2-layer nets."""
    from pyvae.cli.app import main

    out = tmp_path_factory.mktemp("protocol") / "run"
    main(
        [
            *TRAIN,
            "--epochs",
            "3",
            "--valid-fraction",
            "0.2",
            "--patience",
            "2",
            "--lr-schedule",
            "iwae",
            "--activation",
            "gated",
            "--hidden",
            "16",
            "16",
            "--valid-samples",
            "10",
            "--out",
            str(out),
        ]
    )
    return out


def test_train_flags_validate_schedule_and_evaluate_the_best(protocol_run, capsys):
    records = [
        json.loads(line) for line in (protocol_run / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["lr"] for r in records] == pytest.approx(
        [1e-3, 1e-3 * 10 ** (-1 / 7), 1e-3 * 10 ** (-1 / 7)]
    )
    assert all({"valid_elbo", "valid_log_px"} <= r.keys() for r in records)
    best = max(records, key=lambda r: (r["valid_log_px"], -r["epoch"]))
    assert torch.load(protocol_run / "best.pt", weights_only=True)["epoch"] == best["epoch"]
    model = pyvae.load(protocol_run / "best.pt")
    assert model.config["hidden"] == [16, 16] and model.config["activation"] == "gated"
    config = (protocol_run / "config.yaml").read_text()
    assert (
        "valid_fraction: 0.2" in config
        and "lr_schedule: iwae" in config
        and "patience: 2" in config
    )
    evaluated = json.loads(
        next(protocol_run.glob("eval-digits-test-K20")).joinpath("eval.json").read_text()
    )
    assert evaluated["num_points"] == 20


def test_explore_commands_say_which_checkpoint_and_take_the_last_on_request(
    protocol_run, tmp_path, capsys
):
    from pyvae.cli.app import main

    best = torch.load(protocol_run / "best.pt", weights_only=True)["epoch"]
    main(["sample", str(protocol_run), "--n", "4", "--out", str(tmp_path)])
    said = capsys.readouterr().out
    assert (
        f"checkpoint: {protocol_run / 'best.pt'} (epoch {best}: the best validation log p(x) (IS), "
        in said
    )
    main(["sample", str(protocol_run), "--n", "4", "--out", str(tmp_path), "--checkpoint", "last"])
    assert (
        f"checkpoint: {protocol_run / 'checkpoint.pt'} (epoch 3, the last)"
        in capsys.readouterr().out
    )


def test_train_can_evaluate_the_last_epoch(tmp_path, capsys):
    from pyvae.cli.app import main

    main(
        [
            *TRAIN,
            "--epochs",
            "2",
            "--valid-fraction",
            "0.2",
            "--eval-checkpoint",
            "last",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert (
        f"final model: {tmp_path / 'run' / 'checkpoint.pt'} (epoch 2, the last)"
        in capsys.readouterr().out
    )
    assert (tmp_path / "run" / "best.pt").is_file()
    assert (
        tmp_path / "run" / "eval-digits-test-K20-last" / "eval.json"
    ).is_file()  # not best.pt's folder


@pytest.mark.parametrize("how", [["--checkpoint", "last"], ["checkpoint.pt"]])
def test_the_last_epoch_s_evaluation_never_overwrites_the_best_s(protocol_run, how):
    from pyvae.cli.app import main

    target = protocol_run / how[0] if how[0].endswith(".pt") else protocol_run
    main(
        [
            "evaluate",
            str(target),
            "--num-samples",
            "5",
            "--num-points",
            "4",
            *(how if how[0].startswith("--") else []),
        ]
    )
    evaluated = json.loads((protocol_run / "eval-digits-test-K5-last" / "eval.json").read_text())
    assert evaluated["num_points"] == 4 and not (protocol_run / "eval-digits-test-K5").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--patience", "3"],
            "patience 3 needs validation data and there is none: digits has no valid split; "
            "hold out part of the training set with --valid-fraction F",
        ),
        (["--lr-schedule", "plateau"], "lr_schedule 'plateau' needs validation data"),
        (["--lr-schedule", "step"], "argument --lr-schedule: invalid choice: 'step'"),
        (
            ["--valid-fraction", "1.5"],
            "invalid value 1.5 for 'valid_fraction'; allowed: a number in (0, 1) or null",
        ),
        (
            ["--valid-fraction", "0"],
            "invalid value 0.0 for 'valid_fraction'; allowed: a number in (0, 1) or null",
        ),
        (
            ["--patience", "0", "--valid-fraction", "0.2"],
            "invalid value 0 for 'patience'; allowed: an integer >= 1 or null",
        ),
        (["--activation", "gated", "--net", "conv"], "activation 'gated' is for MLPs (net mlp)"),
    ],
)
def test_bad_protocol_flags_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, argv, message):
    from pyvae.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main([*TRAIN, "--epochs", "1", "--out", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_resume_with_another_schedule_and_missing_best_are_one_line_errors(
    protocol_run, tmp_path, capsys
):
    from pyvae.cli.app import main

    before = (protocol_run / "metrics.jsonl").read_text()
    for argv, message in [
        (
            ["train", "--resume", str(protocol_run), "--lr-schedule", "cosine"],
            "was trained with lr_schedule 'iwae'; resuming it with 'cosine'",
        ),
        (
            ["sample", str(tmp_path), "--checkpoint", "best"],
            "is neither a run folder with checkpoint.pt",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert (protocol_run / "metrics.jsonl").read_text() == before
    pyvae.fit(
        small_vae(),
        torch.bernoulli(torch.full((64, 64), 0.3)),
        epochs=1,
        batch_size=64,
        device="cpu",
        out=tmp_path,
        progress=False,
    )
    with pytest.raises(SystemExit):
        main(["sample", str(tmp_path), "--checkpoint", "best"])
    assert (
        "has no best.pt (it was trained without validation data); use --checkpoint last"
        in capsys.readouterr().err
    )


def test_the_quality_table_is_one_command(tmp_path):
    """benchmarks/quality.py trains a recipe by its protocol, scores its best checkpoint and
    tabulates it against the recipe's published number."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    recipe = tmp_path / "recipe_tiny.yaml"
    recipe.write_text(
        "# published log p(x): -20.5\ndataset: digits\nbinarize: static\nz_dim: 2\nhidden: [16]\n"
        "epochs: 3\nvalid_fraction: 0.2\npatience: 2\nbatch_size: 64\n"
    )
    out = tmp_path / "quality"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "quality.py"),
            str(recipe),
            "--epochs",
            "2",
            "--num-samples",
            "20",
            "--num-points",
            "40",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    (row,) = json.loads((out / "quality.json").read_text())
    assert row["published"] == -20.5 and row["difference"] == pytest.approx(row["log_px"] - (-20.5))
    assert (
        row["log_px"] > row["test_elbo"]
        and row["epochs"] == 2
        and row["evaluated"].startswith("best")
    )
    table = (out / "quality.md").read_text()
    assert "recipe_tiny" in table and table.count("\n|") >= 2  # header, rule and the recipe's row
    assert (out / "curves.png").stat().st_size > 0 and (out / "recipe_tiny" / "best.pt").is_file()
