"""SVI training: the ELBO improves, outputs are written, runs are reproducible, bad input is
refused."""

import copy
import json
import os
import signal
import time

import pytest
import torch

import pyvae
from pyvae.data.datasets import binarize, load_dataset
from tests.conftest import interrupted_at
from tests.devices import DEVICES


@pytest.fixture(scope="module")
def digits():
    return binarize(load_dataset("digits", "train"), "static"), binarize(
        load_dataset("digits", "test"), "static", 1
    )


@pytest.mark.parametrize("elbo, particles", [("trace", 1), ("meanfield", 1), ("trace", 4)])
def test_elbo_improves_within_a_few_epochs(digits, elbo, particles):
    train, test = digits
    vae = pyvae.VAE(x_dim=64, z_dim=8, hidden=(64,))
    start = pyvae.evaluate_elbo(vae, test, elbo="meanfield")
    history = pyvae.fit(
        vae,
        train,
        test=test,
        epochs=4,
        batch_size=64,
        lr=3e-3,
        elbo=elbo,
        num_particles=particles,
        device="cpu",
        seed=0,
        progress=False,
    )
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert all(h.keys() >= {"train_elbo", "test_elbo", "seconds"} for h in history)
    assert history[-1]["test_elbo"] > history[0]["test_elbo"] > start
    assert start < -40 and history[-1]["test_elbo"] > -35  # nats per point on 64 binary pixels


def test_history_is_reproducible_with_a_seed(digits):
    train, test = digits
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
        runs.append(
            pyvae.fit(
                vae,
                train[:256],
                test=test,
                epochs=2,
                batch_size=64,
                device="cpu",
                seed=7,
                progress=False,
            )
        )
    strip = [[{k: v for k, v in h.items() if k != "seconds"} for h in run] for run in runs]
    assert strip[0] == strip[1]


def test_fit_accepts_datasets_and_dynamic_binarization(digits):
    gray = load_dataset("digits", "train")
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
    history = pyvae.fit(
        vae, binarize(gray, "dynamic"), epochs=1, batch_size=128, device="cpu", progress=False
    )
    assert history[0]["train_elbo"] < 0 and "test_elbo" not in history[0]
    tensors = torch.utils.data.TensorDataset(digits[0].images[:200], torch.zeros(200))
    history = pyvae.fit(vae, tensors, epochs=1, batch_size=50, device="cpu", progress=False)
    assert torch.isfinite(torch.tensor(history[0]["train_elbo"]))


def test_fit_writes_metrics_and_checkpoint(tmp_path, digits):
    train, test = digits
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
    history = pyvae.fit(
        vae, train, test=test, epochs=2, batch_size=256, device="cpu", out=tmp_path, progress=False
    )
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == history
    loaded = pyvae.load(tmp_path / "checkpoint.pt")
    for a, b in zip(vae.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b)


def test_bad_training_input_is_a_clear_error(digits):
    train, _ = digits
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
    gray = load_dataset("digits", "train")
    cases = [
        (dict(train=gray.images), "bernoulli needs 0/1 data; got values in \\[0, 1\\]"),
        (dict(train=train.images[:, :10]), "10 features per point; the VAE expects x_dim=64"),
        (dict(train=train.images, epochs=0), "epochs must be a positive integer; got 0"),
        (dict(train=train.images, lr=-1.0), "lr must be a positive number"),
        (dict(train=train.images, elbo="renyi"), "unknown elbo 'renyi'"),
        (dict(train=train.images, device="tpu"), "unknown device 'tpu'"),
        (dict(train=train.images[:0]), "N > 0"),
    ]
    for kwargs, message in cases:
        kwargs = {"epochs": 1, **kwargs}
        with pytest.raises(pyvae.PyvaeError, match=message):
            pyvae.fit(
                vae,
                kwargs.pop("train"),
                device=kwargs.pop("device", "cpu"),
                progress=False,
                **kwargs,
            )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(digits):
    vae = pyvae.VAE(x_dim=64, z_dim=4)
    with pytest.raises(pyvae.PyvaeError, match="CUDA is not available"):
        pyvae.fit(vae, digits[0], epochs=1, device="cuda", progress=False)


@pytest.mark.parametrize(
    "what, clip_norm, fused",
    [
        ("loss", None, True),
        ("gradient", None, True),
        ("gradient", 10.0, True),
        ("loss", None, False),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_numerical_fault_stops_with_epoch_step_and_last_good_checkpoint(
    tmp_path, digits, monkeypatch, what, clip_norm, fused, device
):
    from pyvae.train import run as run_module
    from pyvae.train.objectives import Objective

    train, _ = digits
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
    pyvae.fit(vae, train, epochs=2, batch_size=256, device=device, out=tmp_path, progress=False)
    previous = torch.load(tmp_path / "checkpoint.prev.pt", weights_only=True)
    assert (
        previous["epoch"] == 1
        and torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 2
    )

    # the third step of the first epoch diverges, as a diverging run's would: its loss turns
    # NaN, or its gradient (sqrt's at 0 times |w - w|'s), clipped or not, with a finite loss
    calls = {"n": 0}
    real = Objective.forward

    def diverging(self, *args, **kwargs):
        calls["n"] += 1
        loss = real(self, *args, **kwargs)
        if calls["n"] != 3:
            return loss
        w = next(self.parameters())
        return loss * float("nan") if what == "loss" else loss + (w - w.detach()).abs().sqrt()[0, 0]

    # fused Adam skips its updates on the device, and the host reads the faults only after the
    # epoch's six steps: the three after the fault leave the weights and Adam's state as the
    # fault found them; plain Adam cannot skip, so the fault is read before its update
    monkeypatch.setattr(run_module, "FAULT_CHECK_SECONDS", float("inf"))
    if not fused:
        monkeypatch.setattr(run_module, "make_adam", lambda p, lr: torch.optim.Adam(p, lr=lr))
    before = {}

    class Before(pyvae.train.Callback):
        def on_step_end(self, run):
            if run.step_in_epoch == 2:
                before["weights"] = copy.deepcopy(run.model.state_dict())
                before["adam"], before["run"] = copy.deepcopy(run.optimizer.state_dict()), run

    monkeypatch.setattr(Objective, "forward", diverging)
    settings = dict(epochs=1, batch_size=256, clip_norm=clip_norm, device=device, progress=False)
    with pytest.raises(
        pyvae.PyvaeError,
        match=rf"non-finite {what} at epoch 3, step 3; likely causes: "
        r".*last good checkpoint: .*checkpoint.pt",
    ):  # the run resumed for a third epoch
        resumed = {**settings, "epochs": 3, "resume": True}
        pyvae.fit(vae, train, out=tmp_path, callbacks=[Before()], **resumed)
    assert calls["n"] == before["run"].step_in_epoch == (6 if fused else 3)
    torch.testing.assert_close(vae.state_dict(), before["weights"], rtol=0, atol=0)
    adam = before["run"].optimizer.state_dict()["state"]
    torch.testing.assert_close(adam, before["adam"]["state"], rtol=0, atol=0)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 2  # untouched
    calls["n"] = 0
    with pytest.raises(pyvae.PyvaeError, match="last good checkpoint: none written yet"):
        pyvae.fit(vae, train, out=tmp_path / "fresh", **settings)


def test_an_error_before_a_fault_was_read_names_the_fault(digits, monkeypatch):
    from pyvae.train import run as run_module
    from pyvae.train.objectives import Objective

    calls, real = {"n": 0}, Objective.forward

    def diverging(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs) * (float("nan") if calls["n"] == 2 else 1.0)

    class Failing(pyvae.train.Callback):
        def on_step_end(self, run):
            if run.step_in_epoch == 4:
                raise RuntimeError("a callback's own error")

    monkeypatch.setattr(run_module, "FAULT_CHECK_SECONDS", float("inf"))
    monkeypatch.setattr(Objective, "forward", diverging)
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
    with pytest.raises(RuntimeError, match="a callback's own error") as raised:
        pyvae.fit(vae, digits[0], epochs=1, batch_size=256, callbacks=[Failing()], progress=False)
    assert raised.value.__notes__ == [
        "before it: non-finite loss at epoch 1, step 2; likely causes: a learning rate too high, "
        "a likelihood scale too small for the data, or exploding decoder outputs (try a lower "
        "--lr or --clip-norm); last good checkpoint: none written yet"
    ]


@pytest.mark.parametrize("prior", ["normal", "vamp"])
def test_a_model_with_batch_normalization_trains_and_its_statistics_count_the_steps(digits, prior):
    """pyvae looks at the program before training (its plates, its scaling, whether it vectorizes,
    whether a part refuses training), some looks on two points: batch normalization needs more than
    one, and a look is no step. The VampPrior runs the encoder too, on its pseudo-inputs: two
    batches a step."""
    normalized = torch.nn.Sequential(torch.nn.BatchNorm1d(64), torch.nn.Linear(64, 16))
    encoder = torch.nn.Sequential(normalized, torch.nn.Softplus(), torch.nn.Linear(16, 8))
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,), prior=prior, encoder=encoder)
    history = pyvae.fit(vae, digits[0], epochs=2, batch_size=256, device="cpu", progress=False)
    assert history[-1]["train_elbo"] > history[0]["train_elbo"]
    batches = {"normal": 1, "vamp": 2}[prior]
    # 1437 points: 6 steps an epoch
    assert normalized[0].num_batches_tracked.item() == 2 * 6 * batches


def test_nan_parameters_are_refused_before_training(digits):
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
    with torch.no_grad():
        vae.decoder[-1].weight[0, 0] = float("nan")
    with pytest.raises(
        pyvae.PyvaeError,
        match=r"parameter decoder.2.weight holds NaN or infinite values before training",
    ):
        pyvae.fit(vae, digits[0], epochs=1, device="cpu", progress=False)


def test_clip_norm_bounds_the_update(digits):
    """Adam is nearly scale-invariant, except for its eps (1e-8): gradients clipped to a norm of
    1e-12 barely move the parameters, unclipped ones move them by about lr per step. Fails if fit
    ignores clip_norm."""
    train, _ = digits
    moved = {}
    for clip in (None, 1e-12):
        torch.manual_seed(0)
        vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
        before = [p.detach().clone() for p in vae.parameters()]
        pyvae.fit(
            vae,
            train,
            epochs=1,
            batch_size=64,
            clip_norm=clip,
            device="cpu",
            seed=0,
            progress=False,
        )
        pairs = zip(before, vae.parameters(), strict=True)
        moved[clip] = max(float((a - b).abs().max()) for a, b in pairs)
    assert moved[None] > 1e-2 and moved[1e-12] < 1e-4, moved
    with pytest.raises(pyvae.PyvaeError, match="clip_norm must be a positive number; got 0"):
        pyvae.fit(vae, train, epochs=1, clip_norm=0, device="cpu", progress=False)


def test_resume_needs_a_run_written_by_fit(tmp_path, digits):
    train, _ = digits
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
    with pytest.raises(pyvae.PyvaeError, match="resume needs out"):
        pyvae.fit(vae, train, epochs=1, resume=True, device="cpu", progress=False)
    pyvae.save(vae, tmp_path / "checkpoint.pt")
    with pytest.raises(pyvae.PyvaeError, match="holds no training state to resume from"):
        pyvae.fit(vae, train, epochs=1, resume=True, out=tmp_path, device="cpu", progress=False)
    pyvae.fit(vae, train, epochs=1, batch_size=256, out=tmp_path, device="cpu", progress=False)
    other = pyvae.VAE(x_dim=64, z_dim=5, hidden=(16,))
    with pytest.raises(pyvae.PyvaeError, match="does not match this model and optimizer"):
        pyvae.fit(other, train, epochs=2, resume=True, out=tmp_path, device="cpu", progress=False)


def _whole_and_stopped(
    tmp_path, monkeypatch, train, settings, where, call, during="gradients", after=0.0
):
    """(the model trained uninterrupted in ``tmp_path/whole``, its history; the same model, from
    the same initial weights, in a run stopped by SIGINT at the ``call``-th ``during``, which
    must say it stopped at ``where``, in ``tmp_path/stopped``)."""
    from pyvae.train.loop import TrainingStopped

    torch.manual_seed(0)
    whole = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
    reference = pyvae.fit(whole, train, out=tmp_path / "whole", **settings)
    torch.manual_seed(0)
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
    stopped = pytest.raises(TrainingStopped, match=f"stopped by SIGINT at {where}")
    with interrupted_at(monkeypatch, call, during=during, after=after), stopped:
        pyvae.fit(vae, train, out=tmp_path / "stopped", **settings)
    return whole, reference, vae


def _resumed_exactly(tmp_path, train, settings, whole, reference, vae) -> None:
    """The stopped run, resumed, ends with the uninterrupted run's history (but the seconds) and
    weights."""
    resumed = pyvae.fit(vae, train, out=tmp_path / "stopped", resume=True, **settings)
    strip = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]  # noqa: E731
    assert strip(resumed) == strip(reference)
    for p, q in zip(vae.parameters(), whole.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("protocol", ["none", "cosine", "plateau"])
def test_a_stop_on_the_last_step_of_an_epoch_resumes_exactly(
    tmp_path, digits, monkeypatch, protocol
):
    """Also with a learning-rate schedule, validation data, early stopping and best.pt."""
    train, test = digits  # 1437 points, batch 256: 6 steps per epoch
    settings = dict(
        epochs=3, batch_size=256, kl_warmup_epochs=2, seed=5, device="cpu", progress=False
    )
    if protocol != "none":
        settings.update(lr_schedule=protocol, valid=test, valid_samples=10, patience=2)
    # the last step of epoch 2, the signal arriving as its update is applied
    stop = ("epoch 2, step 6", 12, "update")
    runs = _whole_and_stopped(tmp_path, monkeypatch, train, settings, *stop)
    _resumed_exactly(tmp_path, train, settings, *runs)
    if protocol != "none":
        assert (
            torch.load(tmp_path / "stopped" / "best.pt", weights_only=True)["epoch"]
            == torch.load(tmp_path / "whole" / "best.pt", weights_only=True)["epoch"]
        )


def test_a_mid_epoch_checkpoint_of_an_older_pyvae_resumes(tmp_path, digits, monkeypatch):
    """Before issue 28 a stop mid-epoch saved the epoch's objective as one number."""
    train, _ = digits
    settings = dict(epochs=2, batch_size=256, seed=5, device="cpu", progress=False)
    # step 3 of epoch 2, undone
    _, reference, vae = _whole_and_stopped(tmp_path, monkeypatch, train, settings, "epoch 2", 9)
    path = tmp_path / "stopped" / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    training = payload["training"]
    training["partial_total"] = [rows[0][0] for rows in training["partial_total"]]  # the old form
    torch.save(payload, path)
    resumed = pyvae.fit(vae, train, out=tmp_path / "stopped", resume=True, **settings)
    assert resumed[-1]["train_elbo"] == pytest.approx(reference[-1]["train_elbo"], rel=1e-6)


@pytest.mark.parametrize(
    "call, where",
    [(12, "epoch 2, step 5"), (7, "epoch 2, before its first step"), (1, "epoch 1, before")],
)
def test_a_signal_inside_a_step_undoes_it_and_the_run_resumes_exactly(
    tmp_path, monkeypatch, call, where
):
    """The signal arrives while a step computes its gradients (the last of epoch 2, the first of
    epoch 2, the very first): the step is undone (its minibatch, dynamically binarized, is drawn
    again on resume from the same generators) and the resumed run ends with the uninterrupted
    run's weights and history."""
    train = binarize(load_dataset("digits", "train"), "dynamic")  # 6 steps of 256 per epoch
    settings = dict(
        epochs=3, batch_size=256, kl_warmup_epochs=2, seed=5, device="cpu", progress=False
    )
    runs = _whole_and_stopped(tmp_path, monkeypatch, train, settings, where, call)
    _resumed_exactly(tmp_path, train, settings, *runs)


def test_a_signal_while_an_epoch_is_scored_stops_at_once_and_the_run_resumes_exactly(
    tmp_path, monkeypatch, digits
):
    """The signal arrives while epoch 2's validation log p(x) is estimated (1 s into it): the run
    stops there, as after the epoch's last step (the second of scoring it did not count in the
    epoch's seconds, which the resumed run's scoring will), and the resumed run scores epoch 2
    with the same draws."""
    train, test = digits  # 6 steps of 256 per epoch
    settings = dict(epochs=3, batch_size=256, seed=5, valid=test, valid_samples=10, progress=False)
    stop = ("epoch 2, step 6", 2, "validation", 1.0)
    runs = _whole_and_stopped(tmp_path, monkeypatch, train, settings, *stop)
    checkpoint = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert len(checkpoint["history"]) == 1
    assert checkpoint["training"]["partial_seconds"] < 1.0
    _resumed_exactly(tmp_path, train, settings, *runs)


class Slow(pyvae.VAE):
    """A VAE whose guide, in training step ``signal_in``, gets SIGINT and then keeps computing
    for up to 20 s: a step of minutes, as a large VampPrior under a flow guide can take."""

    def __init__(self, signal_in: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.signal_in, self.steps_done, self.finished = signal_in, 0, False

    def guide(self, x, num_data=None):
        if self.training and self.steps_done + 1 == self.signal_in:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(2000):
                time.sleep(0.01)
            self.finished = True
        return super().guide(x, num_data)


class CountSteps(pyvae.train.Callback):
    def __init__(self, model: Slow) -> None:
        self.model = model

    def on_step_end(self, run) -> None:
        self.model.steps_done = run.step


def test_a_signal_stops_a_long_step_at_once_with_a_checkpoint(tmp_path):
    from pyvae.train.loop import TrainingStopped

    x = (torch.rand(64, 16, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    vae = Slow(signal_in=3, x_dim=16, z_dim=2, hidden=(8,))
    settings = dict(epochs=2, batch_size=16, seed=0, device="cpu", progress=False)
    with pytest.raises(TrainingStopped, match="at epoch 1, step 2; checkpoint written"):
        pyvae.fit(vae, x, out=tmp_path / "run", callbacks=[CountSteps(vae)], **settings)
    assert not vae.finished  # the long step was left at the signal, not run to its end
    payload = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert payload["training"]["step"] == 2
