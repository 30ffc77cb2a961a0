"""Data-parallel training: two processes started by torchrun, talking gloo over loopback."""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import pyvae
import pyvae.cli.app
from pyvae.data.batching import Batches
from pyvae.distributed import World
from tests.conftest import ROOT

WORKER = ROOT / "tests" / "train" / "ddp_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(script, *args) -> list[str]:
    """``torchrun`` of ``script`` with ``args`` in 2 processes on this machine, on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(script),
        *args,
    ]


def torchrun(out, script=WORKER, **options):
    command = torchrun_command(script, str(out), json.dumps(options))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def params(path):
    return torch.load(path, weights_only=True)


def metrics(run):
    return [
        {k: v for k, v in json.loads(line).items() if k != "seconds"}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def test_the_shards_of_an_epoch_are_disjoint_cover_the_data_and_change_with_the_epoch():
    batches = Batches(torch.zeros(101, 3), torch.device("cpu"))
    shards = [batches.shard(1, seed=7, world=World(rank, 3)) for rank in range(3)]
    assert [len(s) for s in shards] == [
        34,
        34,
        34,
    ]  # padded to equal length: every process takes the same steps
    together = torch.cat(shards)
    assert (
        set(together.tolist()) == set(range(101))
        and len(together) - len(set(together.tolist())) == 1
    )
    assert not torch.equal(shards[0], batches.shard(2, seed=7, world=World(0, 3)))
    assert torch.equal(shards[0], batches.shard(1, seed=7, world=World(0, 3)))


def test_two_processes_train_with_identical_parameters_and_only_rank_0_writes(tmp_path):
    result = torchrun(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [params(tmp_path / "ranks" / f"{r}.pt") for r in (0, 1)]
    written = params(tmp_path / "run" / "checkpoint.pt")
    for name in ranks[
        0
    ]:  # started from different weights; DistributedDataParallel aligned them and kept them so
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.equal(ranks[0][name], written["state_dict"][name]), name
    history = metrics(tmp_path / "run")
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]  # one line per epoch: only rank 0 wrote
    assert (
        history[-1]["train_elbo"] > history[0]["train_elbo"] + 1
        and history[-1]["test_elbo"] > history[0]["test_elbo"] + 1
    )
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint.prev.pt",
        "checkpoint.pt",
        "metrics.jsonl",
    ]
    assert len(written["training"]["rng"]) == 2  # each process's generators, for an exact resume


def test_a_signal_in_one_process_stops_both_and_resuming_matches_an_uninterrupted_run(tmp_path):
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert torchrun(whole).returncode == 0
    # SIGTERM reaches rank 1 alone, in epoch 2 (10 steps per epoch per process): both stop after
    # that step
    result = torchrun(stopped, sigterm_rank1_at_step=15)
    assert result.returncode != 0 and "stopped by SIGTERM at epoch 2, step 5" in result.stderr
    checkpoint = params(stopped / "run" / "checkpoint.pt")
    assert checkpoint["epoch"] == 1 and checkpoint["training"]["step_in_epoch"] == 5
    assert torch.equal(*[params(stopped / "ranks" / f"{r}.pt")["encoder.0.weight"] for r in (0, 1)])
    vae = pyvae.VAE(x_dim=32, z_dim=3, hidden=(24,))
    with pytest.raises(
        pyvae.PyvaeError, match="written mid-epoch by 2 training process.*resume it with 2, not 1"
    ):
        pyvae.fit(
            vae,
            torch.zeros(500, 32),
            epochs=4,
            batch_size=25,
            out=stopped / "run",
            resume=True,
            device="cpu",
            progress=False,
        )
    # SIGTERM to rank 1 while the last epoch is scored (nothing steps after it): both stop once
    # they have scored, the epoch's steps done and its record left for the resumed run to score
    result = torchrun(stopped, resume=True, sigterm_rank1_at_scoring=4)
    assert result.returncode != 0 and "stopped by SIGTERM at epoch 4, step 10" in result.stderr
    checkpoint = params(stopped / "run" / "checkpoint.pt")
    assert checkpoint["epoch"] == 3 and checkpoint["training"]["step_in_epoch"] == 10
    result = torchrun(stopped, resume=True)
    assert result.returncode == 0, result.stderr[-3000:]
    final, reference = (
        params(stopped / "run" / "checkpoint.pt")["state_dict"],
        params(whole / "run" / "checkpoint.pt")["state_dict"],
    )
    for name in final:
        assert torch.equal(final[name], reference[name]), name
    assert metrics(stopped / "run") == metrics(whole / "run")


def test_tensors_averaged_and_shared_among_processes_keep_their_layout(tmp_path):
    """What a compiled step does in DistributedDataParallel's stead: gradients averaged, buffers
    taken from rank 0, each of any dtype and strides."""
    result = torchrun(tmp_path, script=ROOT / "tests" / "train" / "world_worker.py")
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        ones, transposed, wide = got["averaged"]
        assert torch.equal(ones, torch.full((2, 3), 0.5))
        assert transposed.stride() == (1, 2)
        assert torch.equal(transposed, torch.arange(6.0).reshape(3, 2).t() + 0.5)
        assert wide.dtype == torch.float64 and torch.equal(wide, torch.full((4,), 1.0).double())
        zeros, transposed, wide, integer = got["shared"]
        assert torch.equal(zeros, torch.zeros(2, 3)) and transposed.stride() == (1, 2)
        assert torch.equal(transposed, torch.arange(6.0).reshape(3, 2).t())
        assert torch.equal(wide, torch.full((4,), 0.5).double()) and integer.item() == 7


def test_compiled_steps_under_torchrun_train_as_the_steps_as_written(tmp_path):
    """Each process's compiled step averages the gradients and takes rank 0's buffers itself
    (DistributedDataParallel does both for the steps as written: the first, validated, and none
    short here); under auto each step is timed by its slowest process, so both compile, keep or
    drop the compiled step alike. The encoder normalizes by batch: each process updates the
    running statistics it took from rank 0 with its own minibatch, as under DDP."""
    written, compiled, auto = tmp_path / "written", tmp_path / "compiled", tmp_path / "auto"
    assert torchrun(written, compile="off", grads_at_step=3, batchnorm=True).returncode == 0
    result = torchrun(compiled, compile="on", progress=True, grads_at_step=3, batchnorm=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compile on: the training step compiled in" in result.stdout
    for rank in (0, 1):
        # the third step is the first compiled: its gradients (tens, on the full data's
        # scale) are the mean, not the sum (Adam's update hardly tells them apart)
        grads = [params(run / "ranks" / f"{rank}.grads.pt") for run in (compiled, written)]
        for name, grad in grads[0].items():
            torch.testing.assert_close(grad, grads[1][name], rtol=1e-3, atol=1e-3)
        ends = [params(run / "ranks" / f"{rank}.pt") for run in (compiled, written)]
        for name, value in ends[0].items():
            torch.testing.assert_close(value, ends[1][name], rtol=1e-4, atol=1e-5)
    assert_same_parameters(compiled)
    for mine, theirs in zip(metrics(compiled / "run"), metrics(written / "run"), strict=True):
        assert mine == pytest.approx(theirs, rel=1e-5)
    # 10 steps an epoch: the first validated, five timed as written, then compiled and judged
    result = torchrun(auto, progress=True, auto_min_seconds=0.0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(
        r"compile auto: (the training step compiled in|runs as written: the compiled step)",
        result.stdout,
    )
    assert_same_parameters(auto)


def assert_same_parameters(out):
    """The processes' parameters are one, bit for bit (buffers of their own batches aside)."""
    ranks = [params(out / "ranks" / f"{r}.pt") for r in (0, 1)]
    for name, value in ranks[0].items():
        if "running_" not in name and "num_batches" not in name:
            assert torch.equal(value, ranks[1][name]), name


def test_the_example_under_torchrun_writes_one_run_folder(tmp_path):
    command = torchrun_command(
        ROOT / "examples" / "mnist_svi.py",
        "--epochs",
        "2",
        "--no-download",
        "--z-dim",
        "4",
        "--hidden",
        "32",
        "--eval-samples",
        "0",
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYVAE_DATA": str(tmp_path / "empty"),
    }  # the digits fallback
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "runs").iterdir()  # rank 0 named the folder and told rank 1
    assert (
        result.stdout.count("epoch   2/2  train ELBO") == 1
        and result.stderr.count("Training on 'digits'") == 1
    )
    assert {
        "checkpoint.pt",
        "metrics.jsonl",
        "config.yaml",
        "samples.png",
        "reconstructions.png",
        "elbo.png",
    } <= {p.name for p in run.iterdir()}
    assert len(metrics(run)) == 2


def test_processes_holding_different_data_sets_are_refused(tmp_path):
    result = torchrun(tmp_path, rank1_points=499)
    assert (
        result.returncode != 0
        and "the training processes hold different data sets, of shapes [(500, 32), (499, 32)]"
        in result.stderr
    )
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_evaluation_bdmc_and_gap_shared_among_processes_equal_one_process(tmp_path):
    from pyvae.data.datasets import binarize, load_dataset

    run = tmp_path / "run"
    vae = pyvae.VAE(x_dim=64, z_dim=3, hidden=(16,))
    pyvae.fit(
        vae,
        binarize(load_dataset("digits", "train"), "static"),
        epochs=1,
        batch_size=64,
        device="cpu",
        out=run,
        progress=False,
    )
    (run / "config.yaml").write_text("dataset: digits\nbinarize: static\nseed: 0\n")
    ais = ["--num-steps", "20", "--num-chains", "4", "--leapfrog-steps", "2"]
    commands = {
        "evaluate": [
            "--method",
            "ais",
            "--num-samples",
            "40",
            "--num-points",
            "70",
            *ais,
        ],  # two chunks of the grid of 64
        "bdmc": ["--num-points", "70", *ais],
        "gap": [
            "--num-points",
            "9",
            "--local-steps",
            "40",
            "--num-samples",
            "20",
            *ais,
        ],  # two chunks of 8
    }
    outputs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each torchrun process: the same arithmetic, bit for bit
    try:
        for name, flags in commands.items():
            outputs[name, 1] = tmp_path / f"{name}-1"
            pyvae.cli.app.main(
                [name, str(run), *flags, "--out", str(outputs[name, 1]), "--no-download"]
            )
    finally:
        torch.set_num_threads(threads)
    for name, flags in commands.items():
        outputs[name, 2] = tmp_path / f"{name}-2"
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            "-m",
            "pyvae",
            name,
            str(run),
            *flags,
            "--out",
            str(outputs[name, 2]),
            "--no-download",
        ]
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("wrote ") == 1  # rank 0 alone reports and writes
    import arviz

    for group, name in (("importance_sampling", "evaluate"), ("inference_gap", "gap")):
        one, two = (getattr(arviz.from_netcdf(outputs[name, p] / "eval.nc"), group) for p in (1, 2))
        for var in one.data_vars:
            assert np.array_equal(one[var].values, two[var].values), (name, var)
    one, two = (json.loads((outputs["bdmc", p] / "bdmc.json").read_text()) for p in (1, 2))
    assert one["per_point"] == two["per_point"] and len(one["per_point"]["lower"]) == 70
