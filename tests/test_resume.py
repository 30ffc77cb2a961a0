"""A run killed with SIGKILL mid-epoch and resumed ends where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

import pyvae

from .conftest import ROOT

EXAMPLE = ROOT / "examples" / "mnist_svi.py"
ARGS = ["--dataset", "digits", "--z-dim", "4", "--hidden", "32", "--batch-size", "4", "--kl-warmup-epochs", "2",
        "--eval-samples", "0", "--no-download", "--seed", "3"]


def example(out, *extra, wait=True):
    command = [sys.executable, str(EXAMPLE), *ARGS, "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if wait:
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def epochs_written(out):
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    assert example(full, "--epochs", "3").returncode == 0

    killed = tmp_path / "killed"
    proc = example(killed, "--epochs", "3", wait=False)
    deadline = time.time() + 240
    while epochs_written(killed) < 1 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # into epoch 2 (an epoch of 360 steps takes about a second)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    completed = epochs_written(killed)
    assert 1 <= completed < 3, "the kill should land before the run finishes"
    assert pyvae.load(killed / "checkpoint.pt")  # the last completed epoch's checkpoint is loadable

    result = example(killed, "--resume", str(killed))
    assert result.returncode == 0, result.stderr
    a, b = pyvae.load(full / "checkpoint.pt"), pyvae.load(killed / "checkpoint.pt")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]  # noqa: E731
    assert strip(killed / "metrics.jsonl") == strip(full / "metrics.jsonl")  # no repeated or torn lines
