"""The command line's help: every flag described once, from one place, and answered without
importing torch (parsing runs before the chosen command's module is imported)."""

import subprocess
import sys

import pytest

from pyvae.cli import names
from pyvae.cli.flags import SPECS, markdown_table, parser
from tests.conftest import ROOT, exits_2

HEAVY = ("torch", "pyro", "arviz", "matplotlib")


def modules_loaded_by(code: str) -> set[str]:
    """The heavy top-level packages a fresh interpreter has imported after running ``code``."""
    probe = (
        "import sys\n"
        f"try:\n    {code}\nexcept SystemExit:\n    pass\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return set(eval(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], *([name, "--help"] for name in SPECS)])
def test_help_imports_no_torch(argv):
    assert modules_loaded_by(f"from pyvae.cli.app import main; main({argv!r})") == set()


def test_the_example_s_help_imports_no_torch():
    example = str(ROOT / "examples" / "mnist_svi.py")
    code = (
        "import runpy; sys.argv = ['mnist_svi.py', '--help']; "
        f"runpy.run_path({example!r}, run_name='__main__')"
    )
    assert modules_loaded_by(code) == set()


@pytest.mark.parametrize("command", SPECS)
def test_every_flag_is_described_with_at_most_one_default(command):
    for action in parser(command)._actions:
        assert action.help and action.help.strip(), action.option_strings
        assert action.help.count("default") <= 1, action.help


@pytest.mark.parametrize("flag, default", [("--num-samples", "5000"), ("--num-points", "all")])
def test_evaluate_says_its_defaults(flag, default):
    (action,) = [a for a in parser("evaluate")._actions if flag in a.option_strings]
    assert f"(default: {default})" in action.help


def test_resume_says_a_signal_s_checkpoint_resumes_inside_the_epoch():
    (action,) = [a for a in parser("train")._actions if "--resume" in a.option_strings]
    assert "inside the epoch" in action.help and "signal" in action.help


@pytest.mark.parametrize("command", SPECS)
def test_markdown_table_has_a_row_per_flag(command):
    table = markdown_table(command).splitlines()
    assert table[0] == "| flag | default | description |"
    flags = [f.name for f in SPECS[command].flags]
    assert [row.split("`")[1] for row in table[2:]] == flags
    assert all(row.count(" | ") == 2 for row in table[2:])


def test_the_train_table_reads_the_config_s_metadata():
    table = markdown_table("train")
    assert "| `--z-dim` | `50` | dimensions of the latent z" in table
    assert "| `--track` | `none` |" in table and "| `--out` |  | run folder" in table


def test_the_light_names_are_the_registries_names():
    from pyvae.compiled import COMPILE_CHOICES
    from pyvae.data.batching import DEVICES
    from pyvae.data.datasets import BINARIZE_MODES, SPLITS
    from pyvae.infer.ais import SCHEDULES as AIS_SCHEDULES
    from pyvae.infer.ais import STARTS
    from pyvae.models import MODELS
    from pyvae.parts.guides import GUIDES
    from pyvae.parts.likelihoods import LIKELIHOODS
    from pyvae.parts.nets import MLP_ACTIVATIONS, NETS
    from pyvae.parts.priors import PRIORS
    from pyvae.train.objectives import ELBO_CHOICES
    from pyvae.train.protocol import SCHEDULES

    assert names.PRIORS == tuple(sorted(PRIORS))
    assert names.LIKELIHOODS == tuple(sorted(LIKELIHOODS))
    assert names.GUIDES == tuple(sorted(GUIDES))
    assert names.NETS == tuple(NETS) and names.ACTIVATIONS == tuple(MLP_ACTIVATIONS)
    assert names.ELBOS == tuple(ELBO_CHOICES) and names.LR_SCHEDULES == tuple(SCHEDULES)
    assert names.DEVICES == tuple(DEVICES) and names.BINARIZE_MODES == tuple(BINARIZE_MODES)
    assert names.DATASETS == tuple(SPLITS) and names.MODELS == tuple(MODELS)
    assert names.AIS_SCHEDULES == tuple(AIS_SCHEDULES) and names.AIS_STARTS == tuple(STARTS)
    assert names.COMPILE == COMPILE_CHOICES


def test_track_is_a_choice(capsys):
    err = exits_2(["train", "--track", "wandb"], capsys)
    assert "argument --track: invalid choice: 'wandb'" in err
