"""A run killed with SIGKILL mid-epoch and resumed ends where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import pyvae
from tests.conftest import ROOT

EXAMPLE = ROOT / "examples" / "mnist_svi.py"
ARGS = [
    "--dataset",
    "digits",
    "--z-dim",
    "4",
    "--hidden",
    "32",
    "--batch-size",
    "4",
    "--kl-warmup-epochs",
    "2",
    "--eval-samples",
    "0",
    "--no-download",
    "--seed",
    "3",
    "--valid-fraction",
    "0.1",
    "--lr-schedule",
    "cosine",
    "--patience",
    "5",
]


def example(out, *extra, wait=True):
    command = [sys.executable, str(EXAMPLE), *ARGS, "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def epochs_written(out):
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def same_run(a, b):
    for (name, p), q in zip(
        pyvae.load(a / "checkpoint.pt").state_dict().items(),
        pyvae.load(b / "checkpoint.pt").state_dict().values(),
        strict=True,
    ):
        assert torch.equal(p, q), name

    def strip(path):
        return [
            {k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in path.read_text().splitlines()
        ]

    assert strip(a / "metrics.jsonl") == strip(b / "metrics.jsonl")  # no repeated or torn lines
    for (name, p), q in zip(
        pyvae.load(a / "best.pt").state_dict().items(),
        pyvae.load(b / "best.pt").state_dict().values(),
        strict=True,
    ):
        assert torch.equal(p, q), name


def interrupt_during_epoch_2(out, sig):
    proc = example(out, "--epochs", "3", wait=False)
    deadline = time.time() + 240
    while epochs_written(out) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # into epoch 2 (an epoch of 360 steps takes about a second)
    proc.send_signal(sig)
    return proc.wait()


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted run every interrupted one must end up equal to."""
    out = tmp_path_factory.mktemp("full")
    assert example(out, "--epochs", "3").returncode == 0
    return out


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, full):

    killed = tmp_path / "killed"
    interrupt_during_epoch_2(killed, signal.SIGKILL)
    completed = epochs_written(killed)
    assert 1 <= completed < 3, "the kill should land before the run finishes"
    assert pyvae.load(killed / "checkpoint.pt")  # the last completed epoch's checkpoint is loadable

    result = example(killed, "--resume", str(killed))
    assert result.returncode == 0, result.stderr
    same_run(full, killed)


def test_sigint_and_sigterm_stop_with_a_checkpoint_that_resumes_mid_epoch(tmp_path, full):
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / sig.name
        code = interrupt_during_epoch_2(out, sig)
        assert code == 128 + sig, code
        state = torch.load(out / "checkpoint.pt", weights_only=True)
        assert (
            state["training"]["step_in_epoch"] >= 1 and state["epoch"] == 1
        )  # stopped inside epoch 2
        assert epochs_written(out) == 1
        result = example(out, "--resume", str(out))
        assert result.returncode == 0, result.stderr
        same_run(full, out)
