"""``python -m pyvae train --model hvae|cvae|m2`` end to end on the offline digits, and its bad
input."""

import json

import pytest

import pyvae
from pyvae.cli.app import main
from tests.conftest import exits_2

COMMON = [
    "--dataset",
    "digits",
    "--epochs",
    "2",
    "--batch-size",
    "64",
    "--eval-samples",
    "20",
    "--eval-points",
    "30",
]


def train(tmp_path, name, *flags):
    out = tmp_path / name
    main(["train", "--model", name, *COMMON, "--out", str(out), *flags])
    return out


@pytest.fixture(scope="module")
def m2_run(tmp_path_factory):
    return train(
        tmp_path_factory.mktemp("runs"),
        "m2",
        "--num-labels",
        "100",
        "--z-dim",
        "8",
        "--hidden",
        "64",
        "--epochs",
        "6",
    )


def test_m2_trains_on_few_labels_and_records_accuracy(m2_run, tmp_path, capsys):
    records = [json.loads(line) for line in (m2_run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(0 <= r["test_accuracy"] <= 1 for r in records)
    # ten classes, 100 labels: well above chance (0.1) after six epochs (0.59 after ten, seed 0)
    assert (
        records[-1]["test_accuracy"] > 0.25
        and records[-1]["test_accuracy"] > records[0]["test_accuracy"]
    )
    model = pyvae.load(m2_run / "checkpoint.pt")
    assert type(model) is pyvae.M2
    summary = json.loads(next(m2_run.glob("eval-*/eval.json")).read_text())
    assert summary["log_px"] < 0 and "z" in summary["latent_sites"]
    main(["sample", str(m2_run), "--label", "3", "--n", "16", "--out", str(tmp_path)])
    assert (tmp_path / "samples.png").is_file()
    assert "--label 12 is outside the classes 0..9" in exits_2(
        ["sample", str(m2_run), "--label", "12"], capsys
    )


def test_hvae_and_cvae_train_evaluate_and_explore(tmp_path):
    hvae = train(tmp_path, "hvae")
    assert type(pyvae.load(hvae / "checkpoint.pt")) is pyvae.HVAE
    summary = json.loads(next(hvae.glob("eval-*/eval.json")).read_text())
    assert set(summary["latent_sites"]) == {"z1", "z2"} and summary["latent_site"] == "z2"
    cvae = train(tmp_path, "cvae", "--z-dim", "4", "--hidden", "32")
    main(["sample", str(cvae), "--label", "7", "--out", str(tmp_path / "s")])
    main(["reconstruct", str(cvae), "--out", str(tmp_path / "r")])
    main(
        [
            "evaluate",
            str(cvae),
            "--num-samples",
            "10",
            "--num-points",
            "20",
            "--out",
            str(tmp_path / "e"),
        ]
    )
    assert (tmp_path / "s" / "samples.png").is_file() and (
        tmp_path / "r" / "reconstructions.png"
    ).is_file()
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["num_points"] == 20


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model", "m2", "--num-labels", "5000"], "num_labels"),
        (["--model", "m2", "--num-labels", "105"], "num_labels"),
        (
            ["--model", "vae", "--num-labels", "100"],
            "--num-labels is for the semi-supervised model m2",
        ),
        (["--model", "gan"], "argument --model: invalid choice: 'gan'"),
    ],
)
def test_bad_model_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    err = exits_2(["train", *COMMON, "--out", str(tmp_path / "run"), *flags], capsys)
    assert message in err, err


def test_label_for_a_model_without_labels(tmp_path, capsys):
    run = train(tmp_path, "vae", "--z-dim", "2", "--hidden", "16")
    assert "--label is for models with labels (cvae, m2); VAE has none" in exits_2(
        ["sample", str(run), "--label", "1"], capsys
    )


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]])
def test_help_lists_every_command_and_exits_0(argv, capsys):
    from pyvae.cli.app import COMMANDS

    main(argv)  # returns: exit status 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in COMMANDS)


@pytest.mark.parametrize(
    "command",
    [
        "train",
        "evaluate",
        "bdmc",
        "gap",
        "sample",
        "reconstruct",
        "interpolate",
        "traverse",
        "embed",
        "anomaly",
    ],
)
def test_every_flag_of_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert not undocumented_flags(capsys.readouterr().out)


def undocumented_flags(help_text: str) -> list[str]:
    lines = [line for line in help_text.split("options:")[1].splitlines() if line.strip()]
    return [
        line.strip()
        for line, after in zip(lines, lines[1:] + [""], strict=True)
        # an option's help is beside it (after two spaces) or on the more indented line below
        if line.startswith("  -")
        and "  " not in line.strip()
        and not (after.startswith("    ") and not after.lstrip().startswith("-"))
    ]


@pytest.mark.parametrize(
    "failure, expected",
    [
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                "can't allocate memory: "
                "you tried to allocate 123480309760 bytes. Error code 12"
            ),
            "error: out of memory allocating 115.0 GiB (RuntimeError); lower --batch-size",
        ),
        (
            RuntimeError(
                "DefaultCPUAllocator: not enough memory: you tried to allocate 1048576 bytes."
            ),  # Windows
            "error: out of memory allocating 1.0 MiB (RuntimeError)",
        ),
        (
            MemoryError(
                "Unable to allocate 7.45 GiB for an array with shape (1000000000,) "
                "and data type float64"
            ),  # numpy
            "error: out of memory allocating 7.45 GiB (MemoryError)",
        ),
        (
            MemoryError("Unable to allocate 728. TiB for an array with shape (10000000000000,)"),
            "error: out of memory allocating 728 TiB",
        ),
        (
            RuntimeError("unable to allocate a shared memory segment name"),
            "error: unexpected RuntimeError: unable to allocate",
        ),
        (
            ValueError("shapes (3,) and (4,)\ndo not match"),
            "error: unexpected ValueError: shapes (3,) and (4,) do not match",
        ),
    ],
)
def test_an_unexpected_failure_is_one_line_and_exit_1(failure, expected, capsys):
    from pyvae.cli.console import run

    def command(argv):
        raise failure

    with pytest.raises(SystemExit) as info:
        run(command, [])
    err = capsys.readouterr().err
    assert info.value.code == 1 and len(err.strip().splitlines()) == 1
    assert err.startswith(expected) and err.strip().endswith("(run with --debug for the traceback)")
    with pytest.raises(type(failure)):
        run(command, ["--debug"])


def test_training_into_a_folder_that_holds_a_run_exits_2_and_changes_nothing(tmp_path, capsys):
    out = train(tmp_path, "vae", "--epochs", "1", "--eval-samples", "0")
    files = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    argv = ["train", *COMMON, "--epochs", "1", "--eval-samples", "0", "--out", str(out)]
    assert "holds a run (metrics.jsonl): continue it with resume (--resume)" in exits_2(
        argv, capsys
    )
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == files
