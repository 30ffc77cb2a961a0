"""examples/mnist_svi.py end to end, and its configuration errors."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import yaml

from pyvae.cli.app import COMMANDS, run
from pyvae.cli.config import TrainConfig
from pyvae.cli.train import parse_args
from tests.conftest import ROOT

EXAMPLE = ROOT / "examples" / "mnist_svi.py"


def example_main():
    spec = importlib.util.spec_from_file_location("mnist_svi", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.train_main  # the example is a thin wrapper of python -m pyvae train


def test_example_runs_one_epoch_and_writes_every_output(tmp_path):
    out = tmp_path / "run"
    env = {
        **os.environ,
        "PYVAE_DATA": str(tmp_path / "empty"),
    }  # nothing there: the digits fallback
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--epochs",
            "1",
            "--no-download",
            "--z-dim",
            "4",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    # stderr is a pipe, not a terminal: no progress-bar frames, a line per epoch at most
    assert "\r" not in result.stderr + result.stdout
    assert (
        "binarized_mnist train split not found" in result.stderr
        and "Training on 'digits'" in result.stderr
    )
    assert "train ELBO" in result.stdout and "test ELBO" in result.stdout
    for name in (
        "checkpoint.pt",
        "metrics.jsonl",
        "samples.png",
        "reconstructions.png",
        "elbo.png",
        "config.yaml",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (
        record.keys() == {"epoch", "train_elbo", "beta", "test_elbo", "lr", "seconds"}
        and record["test_elbo"] < 0
    )
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["dataset"] == "digits" and saved["z_dim"] == 4 and saved["binarize"] == "dynamic"
    # config.yaml reruns the same configuration
    config, _ = parse_args(["--config", str(out / "config.yaml")])
    assert config.z_dim == 4 and config.dataset == "digits"


def errors_of(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(example_main(), argv)
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        (
            "epochs: 2\nlearning_rate: 0.1\n",
            "unknown config key 'learning_rate' in .*; allowed: dataset, ",
        ),
        ("epochs: two\n", "invalid value 'two' for 'epochs'; allowed: an integer >= 1"),
        ("epochs: 0\n", "invalid value 0 for 'epochs'; allowed: an integer >= 1"),
        ("elbo: renyi\n", "invalid value 'renyi' for 'elbo'; allowed: auto, trace, meanfield"),
        ("lr: -1\n", "invalid value -1 for 'lr'; allowed: a positive number"),
        (
            "hidden: [400, 0]\n",
            "invalid value \\[400, 0\\] for 'hidden'; allowed: a list of positive integers",
        ),
        ("- epochs\n", "must be a mapping"),
        ("epochs: [\n", "is not valid YAML"),
        ("beta: 0\n", "invalid value 0 for 'beta'; allowed: a positive number"),
        (
            "guide: {name: normal, min_scale: -1}\n",
            "normal guide min_scale must be a positive number; got -1",
        ),
    ],
)
def test_bad_config_is_a_one_line_error(tmp_path, capsys, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    code, err = errors_of(["--config", str(path)], capsys)
    assert code == 2
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
        (["--elbo", "renyi"], "argument --elbo: invalid choice: 'renyi'"),
        (["--batch-size", "0"], "invalid value 0 for 'batch_size'"),
        (["--config", "missing.yaml"], "cannot read config missing.yaml"),
        (["--resume", "nowhere"], "cannot resume nowhere: it needs config.yaml and checkpoint.pt"),
        (
            [
                "--dataset",
                "binarized_mnist",
                "--data-dir",
                "nowhere",
                "--no-download",
                "--strict-data",
            ],
            "binarized_mnist train split not found",
        ),
    ],
)
def test_bad_flags_are_a_one_line_error(capsys, argv, message):
    code, err = errors_of(argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_config_that_is_not_text_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bin.yaml"
    path.write_bytes(bytes(range(128, 256)))
    code, err = errors_of(["--config", str(path)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "is not UTF-8 text" in err


def test_unwritable_output_folder_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, err = errors_of(
        ["--dataset", "digits", "--epochs", "1", "--out", str(blocker / "run")], capsys
    )
    assert code == 2 and "cannot write to output folder" in err


def test_shipped_configs_are_valid():
    for path in (ROOT / "configs").glob("*.yaml"):
        config, _ = parse_args(["--config", str(path)])
        assert isinstance(config, TrainConfig)
    # configs/mnist.yaml spells out the defaults
    assert parse_args(["--config", str(ROOT / "configs" / "mnist.yaml")])[0] == TrainConfig()


def example_module(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_likelihood_is_a_normalized_mass_with_the_data_scale_mean():
    import torch

    example = example_module("custom_likelihood")
    logits = torch.randn(3, 5)
    p_x = example.Binomial16()(logits)
    levels = torch.arange(17.0) / 16
    mass = torch.stack([p_x.base_dist.log_prob(torch.full((3, 5), v)).exp() for v in levels]).sum(0)
    assert torch.allclose(mass, torch.ones(3, 5), atol=1e-5)
    assert torch.allclose(p_x.mean, torch.sigmoid(logits))  # E[x|z] on [0, 1], not 16 p
    assert torch.isneginf(
        p_x.base_dist.log_prob(torch.full((3, 5), 0.5 / 16))
    ).all()  # no mass off the grid
    with pytest.raises(pyvae_error(), match="multiples of 1/16"):
        example.Binomial16().check_support(torch.tensor([[0.5, 0.3]]))


def pyvae_error():
    from pyvae import PyvaeError

    return PyvaeError


@pytest.mark.parametrize(
    "name, extra",
    [("custom_prior", ["--dataset", "digits", "--no-download"]), ("custom_likelihood", [])],
)
def test_custom_part_examples_leave_run_folders_the_commands_follow(name, extra, tmp_path, capsys):
    evaluate_main = COMMANDS["evaluate"]

    example = example_module(name)
    out = tmp_path / "run"
    run(example.main, ["--epochs", "1", "--out", str(out), *extra])
    assert {"checkpoint.pt", "config.yaml", "metrics.jsonl"} <= {p.name for p in out.iterdir()}
    capsys.readouterr()
    with pytest.raises(
        SystemExit
    ) as exit_info:  # the custom part cannot be rebuilt without its file
        run(evaluate_main, [str(out), "--num-samples", "10", "--no-download"])
    err = capsys.readouterr().err
    assert (
        exit_info.value.code == 2 and "pass --parts FILE.py" in err and f"examples/{name}.py" in err
    )
    run(
        evaluate_main,
        [
            str(out),
            "--num-samples",
            "10",
            "--no-download",
            "--parts",
            example.__file__,
            "--out",
            str(tmp_path / "eval"),
        ],
    )
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert evaluated["log_px"] < 0
    if name == "custom_likelihood":  # levels = 17: a code length, so bits/dim too
        assert evaluated["bits_per_dim"] == pytest.approx(-evaluated["log_px"] / (64 * math.log(2)))
    run(
        example.main, ["--epochs", "2", "--out", str(out), "--resume", *extra]
    )  # the script resumes its own run
    assert [
        json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
    ] == [1, 2]


@pytest.mark.parametrize("name", ["custom_prior", "custom_likelihood", "custom_model"])
def test_the_examples_document_their_flags_and_take_debug(name, tmp_path, capsys):
    from pyvae import PyvaeError
    from tests.cli.test_cli_models import undocumented_flags

    example = example_module(name)
    with pytest.raises(SystemExit) as info:
        example.main(["--help"])
    assert (
        info.value.code == 0
        and "--debug" in (out := capsys.readouterr().out)
        and not undocumented_flags(out)
    )
    extra = ["--dataset", "digits"] if name != "custom_likelihood" else []
    with pytest.raises(PyvaeError, match="epochs"):  # --debug: the error itself, traceback and all
        run(example.main, ["--epochs", "0", "--debug", "--out", str(tmp_path / "run"), *extra])
    assert not (tmp_path / "run").exists()
