import contextlib
import os
import signal
import time
from pathlib import Path

import pyro
import pytest
import torch
from torch._inductor import codecache

import pyvae
import pyvae.compiled
from pyvae.cli.app import main
from pyvae.data.datasets import binarize, load_dataset
from pyvae.train.objectives import Objective
from pyvae.train.run import Training
from pyvae.train.validation import Validation

ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path | None:
    """The data root named by $PYVAE_DATA, when it exists."""
    root = os.environ.get("PYVAE_DATA")
    return Path(root) if root and Path(root).is_dir() else None


def require_files(*relative: str) -> Path:
    """The data root, or skip the test naming the missing files."""
    root = shared_data()
    if root is None:
        pytest.skip("$PYVAE_DATA is not set to an existing folder; real data files not checked")
    missing = [r for r in relative if not (root / r).is_file()]
    if missing:
        pytest.skip(f"not in $PYVAE_DATA={root}: {', '.join(missing)}")
    return root


@pytest.fixture(autouse=True, scope="session")
def compiler_cache(tmp_path_factory):
    """Inductor's cache under pytest's folders, not the system's temporary one: its compiled
    code (``TORCHINDUCTOR_CACHE_DIR``) and its precompiled C++ headers, which it keeps in the
    system's temporary folder whatever that variable says."""
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("inductor"))
    headers = {"_HEADER_DIR": str(tmp_path_factory.mktemp("inductor-headers"))}
    headers["_HEADER_LOCK_DIR"] = os.path.join(headers["_HEADER_DIR"], "locks")
    with pytest.MonkeyPatch.context() as patch:
        for name, folder in headers.items():
            if hasattr(codecache, name):  # a private name of torch 2.x's inductor
                patch.setattr(codecache, name, folder)
        yield
    if before is None:
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


@pytest.fixture
def untuned(monkeypatch):
    """Inductor without max-autotune's timing of matrix-product kernels (which builds and times a
    kernel per choice): tests of what a recording computes compile in seconds. test_ais's
    softplus-Bernoulli VAE keeps it, for the path users run."""
    monkeypatch.setitem(pyvae.compiled.CPU_OPTIONS, "max_autotune", False)


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(owner, name)``: ``owner.name`` (a function or a method) made to note each
    call in the list it returns, for as long as the test runs."""

    def count(owner, name: str) -> list:
        calls, original = [], getattr(owner, name)

        def counted(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
        return calls

    return count


@pytest.fixture(autouse=True)
def seeded():
    pyro.set_rng_seed(0)
    # the suite runs in one process per core (pytest-xdist): two threads each would oversubscribe
    # the cores, and torch's waiting threads spin
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    torch.set_num_threads(1 if workers and int(workers) > 1 else min(2, torch.get_num_threads()))
    yield


@pytest.fixture
def binary_data():
    """A small binary data set with structure: two noisy prototypes."""
    g = torch.Generator().manual_seed(1)
    protos = (torch.rand(2, 16, generator=g) > 0.5).float()
    which = torch.randint(0, 2, (64,), generator=g)
    flips = (torch.rand(64, 16, generator=g) < 0.05).float()
    return (protos[which] + flips) % 2


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder of a small VAE trained 2 epochs on the static digits (config says evaluate them
    dynamically)."""
    out = tmp_path_factory.mktemp("run")
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(32,))
    pyvae.fit(
        vae,
        binarize(load_dataset("digits", "train"), "static"),
        epochs=2,
        batch_size=64,
        device="cpu",
        out=out,
        progress=False,
    )
    (out / "config.yaml").write_text("dataset: digits\nbinarize: dynamic\nseed: 0\n")
    return out


def exits_2(argv, capsys) -> str:
    """Run ``python -m pyvae ARGV``, which must refuse it: exit code 2 and one line on stderr."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


@contextlib.contextmanager
def interrupted_at(
    monkeypatch,
    call: int,
    signum: int = signal.SIGINT,
    during: str = "gradients",
    after: float = 0.0,
):
    """Within the block, the ``call``-th training step gets ``signum`` (as a user's Ctrl-C
    mid-epoch would arrive): while its loss and gradients are computed (``during="gradients"``,
    which undoes the step) or as its update is applied (``"update"``, which completes it); with
    ``during="validation"``, the ``call``-th epoch's scoring gets it. The call has run ``after``
    seconds when the signal comes."""
    owner, name = {
        "gradients": (Objective, "forward"),
        "update": (Training, "_update"),
        "validation": (Validation, "scores"),
    }[during]
    original, calls = getattr(owner, name), []

    def then_signal(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            time.sleep(after)
            os.kill(os.getpid(), signum)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, then_signal)
    try:
        yield
    finally:
        monkeypatch.setattr(owner, name, original)
