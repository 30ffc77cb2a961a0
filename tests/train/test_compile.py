"""The compiled training step (pyvae.train.step): the same loss and gradients as the program run
as written, from the same noise, for every family of program; a program that cannot be recorded
trains as written and says why; compile on or off, a run trains to the same weights and scores the
same validation numbers, and a run stopped and resumed with compile on ends where an
uninterrupted one does."""

import re
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import pyvae
from pyvae.compiled import fingerprint, untouched
from pyvae.data.batching import Batches, Call
from pyvae.distributed import World
from pyvae.errors import PyvaeError
from pyvae.program import structure
from pyvae.train import run as run_module
from pyvae.train import step as step_module
from pyvae.train.objectives import Objective
from pyvae.train.step import Step
from pyvae.train.validation import BatchLosses, Validation
from tests.conftest import interrupted_at
from tests.devices import DEVICES

X_DIM = 16


class TutorialVAE(nn.Module):
    """As Pyro's tutorial writes a VAE: ``pyro.module``, a plate of the minibatch's size."""

    def __init__(self, z_dim: int = 2) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.encoder = nn.Sequential(nn.Linear(X_DIM, 8), nn.Softplus(), nn.Linear(8, 2 * z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim, 8), nn.Softplus(), nn.Linear(8, X_DIM))

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            loc = x.new_zeros(x.shape[0], self.z_dim)
            z = pyro.sample("latent", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("latent", dist.Normal(loc, nn.functional.softplus(raw)).to_event(1))


class Branching(TutorialVAE):
    """A guide whose Python reads a value it computed: it cannot be recorded."""

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            scale = nn.functional.softplus(raw) * (2.0 if loc.sum() > 0 else 1.0)
            pyro.sample("latent", dist.Normal(loc, scale).to_event(1))


class Dropped(TutorialVAE):
    """A decoder with dropout (noise of a fixed distribution, shaped like a computed tensor) and a
    parameter read transposed (its gradient comes out of the graph laid out unlike it)."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Sequential(
            nn.Linear(2, 8), nn.Softplus(), nn.Dropout(0.25), nn.Linear(8, X_DIM)
        )
        self.tied = nn.Parameter(torch.randn(X_DIM, 2) * 0.1)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            loc = x.new_zeros(x.shape[0], self.z_dim)
            z = pyro.sample("latent", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            logits = torch.einsum("bk,dk->bd", z, self.tied) + self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(logits=logits).to_event(1), obs=x)


class Normalized(TutorialVAE):
    """An encoder with batch normalization (each step updates its running statistics) and a
    weight-normalized layer (whose hook sets ``weight`` before every forward); a model that counts
    its calls in a plain tensor attribute, updated in place."""

    def __init__(self) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the older of torch's two weight norms
            normalized = nn.utils.weight_norm(nn.Linear(X_DIM, 8))
        self.encoder = nn.Sequential(normalized, nn.Softplus(), nn.BatchNorm1d(8), nn.Linear(8, 4))
        self.calls = torch.zeros(())

    def model(self, x):
        self.calls.add_(1)
        return super().model(x)


class Logging(TutorialVAE):
    """A guide that keeps a computed tensor on its module for a callback to log."""

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            self.last_loc_norm = loc.detach().norm()
            pyro.sample("latent", dist.Normal(loc, nn.functional.softplus(raw)).to_event(1))


def _points(n: int = 24) -> torch.Tensor:
    return torch.rand(n, X_DIM, generator=torch.Generator().manual_seed(1)).round()


def _labels(n: int = 24) -> torch.Tensor:
    return torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(2))


def _calls(name: str, device: str = "cpu") -> list[Call]:
    x, y = _points().to(device), _labels().to(device)
    if name == "m2":  # a labelled and an unlabelled call, as a semi-supervised step makes them
        unlabelled = torch.full((16,), -1, device=device)
        return [Call((x[:8], y[:8]), 80, 800, "labelled"), Call((x[8:], unlabelled), 720, 800)]
    return [Call((x, y) if name == "cvae" else (x,), 500, 500)]


FAMILIES = {
    "vae": (lambda: pyvae.VAE(X_DIM, 2, hidden=(8,)), "meanfield", 1),
    "vae mog prior, iaf guide": (
        lambda: pyvae.VAE(X_DIM, 2, hidden=(8,), prior="mog", guide="iaf"),
        "trace",
        1,
    ),
    "vae flow prior, lowrank guide, logistic likelihood": (
        lambda: pyvae.VAE(
            X_DIM, 2, hidden=(8,), prior="flow", guide="lowrank", likelihood="discretized_logistic"
        ),
        "trace",
        1,
    ),
    "vae vamp prior, iwae": (lambda: pyvae.VAE(X_DIM, 2, hidden=(8,), prior="vamp"), "iwae", 3),
    "hvae": (lambda: pyvae.HVAE(X_DIM, (3, 2), hidden=((8,), (8,))), "trace", 1),
    "cvae": (lambda: pyvae.CVAE(X_DIM, 3, 2, hidden=(8,)), "meanfield", 1),
    "m2 enumerated": (lambda: pyvae.M2(X_DIM, 3, 2, hidden=(8,)), "enum", 1),
    "user program": (TutorialVAE, "trace", 1),
    "user program with dropout, reading a parameter transposed": (Dropped, "trace", 1),
}


def _step(model, elbo: str, particles: int, calls: list[Call], beta_varies=False) -> Step:
    objective = Objective(model, elbo, particles)
    objective.enumerate = elbo == "enum"
    objective.fill_plate_nesting(structure(model, calls[0].args).max_plate_nesting)
    return Step(objective, objective, "on", beta_varies, say=print)


def _loss_and_grads(step: Step, model, calls, beta=1.0, seed=3):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = None
    losses = step(calls, beta, False, 10**6)
    return losses, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_compiled_step_gives_the_programs_loss_and_gradients(family, device, capsys):
    if device == "cuda" and "dropout" in family:
        pytest.skip("on a GPU dropout draws its noise in a fused kernel: the step runs as written")
    make, elbo, particles = FAMILIES[family]
    torch.manual_seed(0)
    model, calls = make().to(device), _calls(family.split()[0], device)
    step = _step(model, elbo, particles, calls)
    _loss_and_grads(step, model, calls)  # the first step settles the objective (its scaling)
    written, written_grads = _loss_and_grads(step, model, calls)  # the first time: as written
    assert not any(step.compiled.values())
    compiled, compiled_grads = _loss_and_grads(step, model, calls)  # recorded and compiled
    assert "compile on: the training step compiled in" in capsys.readouterr().out
    assert [c is not None for c in step.compiled.values()] == [True]
    torch.testing.assert_close(compiled, written, rtol=1e-5, atol=1e-5)
    for a, b, p in zip(compiled_grads, written_grads, model.parameters(), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * (1 + b.abs().max()))
            assert a.stride() == p.stride()  # as autograd lays it out: fused Adam needs that
    # other noise, another loss: the draws are inputs, not constants of the graph
    assert not torch.equal(_loss_and_grads(step, model, calls, seed=4)[0], compiled)
    kinds = []
    for _ in range(2):  # what the modules keep between steps (a flow's cache) is no new kind
        step.new_epoch()  # (a cache first filled after the recording may be, once)
        for _ in range(2):
            _loss_and_grads(step, model, calls)
        kinds.append(len(step.compiled))
    assert kinds[0] == kinds[1] <= 2


def test_compiling_leaves_the_models_state_as_the_steps_as_written_leave_it():
    """Recording runs the program once, and the compiled step's trial call runs a step: neither may
    count as a step for batch normalization's running statistics or the model's own counter."""
    states = []
    for mode in ("off", "on"):
        torch.manual_seed(0)
        model, calls = Normalized(), _calls("vae")
        step = _step(model, "meanfield", 1, calls)
        step.uncompiled = "compile is off" if mode == "off" else None
        losses = [_loss_and_grads(step, model, calls, seed=i)[0] for i in range(4)]
        state = {k: v.clone() for k, v in model.encoder[2].state_dict().items()}
        state["calls"] = model.calls.clone()
        states.append((torch.stack(losses), state))
    assert step.compiled and None not in step.compiled.values()
    # the hook's new weight in a step as written (a short batch) is no new kind for the next epoch
    _loss_and_grads(step, model, [Call((_points(8),), 500, 500)])
    step.new_epoch()
    for _ in range(2):
        _loss_and_grads(step, model, calls)
    assert len(step.compiled) == 1
    (written, written_state), (compiled, compiled_state) = states
    torch.testing.assert_close(compiled, written, rtol=1e-5, atol=1e-5)
    for name in ("num_batches_tracked", "calls"):
        assert compiled_state[name] == written_state[name]
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(compiled_state[name], written_state[name])


def test_a_model_that_ran_under_inference_mode_can_be_recorded():
    """Its caches (a flow's last scale) are inference tensors, which keep no version counter; a
    sparse buffer has no bytes to digest."""
    model = pyvae.VAE(X_DIM, 2, hidden=(8,), prior="flow")
    model.register_buffer("adjacency", torch.eye(3).to_sparse())
    with torch.inference_mode():
        model.model(_points(4))
    with untouched(model):
        model.model(_points(4))
    assert fingerprint([model.adjacency])[0][2] is None


def test_a_program_that_stores_a_tensor_on_its_module_trains_as_written(capsys):
    torch.manual_seed(0)
    model, calls = Logging(), _calls("vae")
    step = _step(model, "trace", 1, calls)
    for i in range(3):
        _loss_and_grads(step, model, calls, seed=i)
        torch.manual_seed(i)
        assert float(model.last_loc_norm) > 0  # a real tensor, this step's
    assert "trains as written: it stores a tensor it computed on its module (Logging.last_loc_" in (
        capsys.readouterr().out
    )


def test_the_kl_weight_of_a_warm_up_is_an_input_of_one_recording():
    torch.manual_seed(0)
    model, calls = pyvae.VAE(X_DIM, 2, hidden=(8,)), _calls("vae")
    step = _step(model, "meanfield", 1, calls, beta_varies=True)
    for beta in (0.1, 0.2, 0.3, 0.3):
        written = _loss_and_grads(step, model, calls, beta)[0]
    torch.testing.assert_close(_loss_and_grads(step, model, calls, 0.3)[0], written)
    assert len(step.compiled) == 1 and None not in step.compiled.values()
    assert not torch.allclose(_loss_and_grads(step, model, calls, 0.9)[0], written)


def test_a_step_is_recorded_again_when_its_shape_or_the_models_settings_change():
    torch.manual_seed(0)
    model = TutorialVAE()
    step = _step(model, "trace", 1, _calls("vae"))
    small = [Call((_points(8),), 500, 500)]
    for calls in (_calls("vae"), _calls("vae"), small, _calls("vae"), small):
        _loss_and_grads(step, model, calls)
    assert len(step.compiled) == 2 and None not in step.compiled.values()
    model.z_dim_note = 3  # a Python number the program could read
    for _ in range(2):
        _loss_and_grads(step, model, small)
    assert len(step.compiled) == 3


class Tempered(TutorialVAE):
    """A model whose code branches on a Python number, as a callback's annealing sets it."""

    temperature = 1.0

    def model(self, x):
        return super().model(x) if self.temperature > 0 else None


def test_a_setting_that_changes_says_what_each_change_costs(capsys):
    torch.manual_seed(0)
    model, calls = Tempered(), _calls("vae")
    model.temperature = 1.0
    step = _step(model, "trace", 1, calls)
    _loss_and_grads(step, model, calls)  # the first step settles the objective (its scaling)
    for temperature in (1.0, 1.0, 0.5, 0.5):
        model.temperature = temperature
        _loss_and_grads(step, model, calls)
    out = capsys.readouterr().out
    assert len(step.compiled) == 2 and None not in step.compiled.values()
    said = "the step was recorded again ("
    assert out.count(said) == 1 and "because Tempered.temperature changed; a number" in out


@pytest.mark.parametrize(
    "compiled_seconds, cost, kinds, notice",
    [
        (0.001, 5.0, [False, True, False, False, False, True], "each value lasted about 3 steps"),
        (0.001, 0.001, [False, True, True, True, True, True], None),
        (0.003, 0.001, [False, True, False, False, False, False], "steps were no faster"),
    ],
    ids=["compiling costs more than a value saves", "less", "compiled steps are slower"],
)
def test_auto_weighs_how_long_a_settings_kind_lives_against_its_compilation(
    compiled_seconds, cost, kinds, notice, monkeypatch, count_calls
):
    """Under auto, a setting changed every epoch makes a kind per epoch. Once a kind it made was
    compiled, the next is compiled only if a life as long as that one's repays compiling it
    (timed by a fake clock: 2 ms a step as written, ``compiled_seconds`` compiled, ``cost`` a
    compilation), even when no kind lived long enough to be judged; a value then held is compiled
    once it has lived twice as long as the values before it, and five steps more, unless
    compiled steps were slower."""
    ran_compiled = count_calls(Step, "_run")

    def seconds(started, result):  # a compilation, a compiled step, a step as written
        if result is None:
            return cost
        return compiled_seconds if ran_compiled and ran_compiled.pop() else 0.002

    monkeypatch.setattr(step_module, "_seconds", seconds)
    said = []
    torch.manual_seed(0)
    model, calls = Tempered(), _calls("vae")
    objective = Objective(model, "trace", 1)
    objective.fill_plate_nesting(structure(model, calls[0].args).max_plate_nesting)
    step = Step(objective, objective, "auto", False, say=said.append)
    step(calls, 1.0, True, 10**6)  # the validated first step
    compiled = []
    for temperature in (1.0, 0.5, 0.25, 0.125, 0.125, 0.125):  # epochs of 5 steps
        model.temperature = temperature
        step.new_epoch()
        for _ in range(5):
            step(calls, 1.0, False, 10**6)
        compiled.append(step.compiled.get(step._key(calls, 1.0)) is not None)
    # 1.0: its steps are timed as written; 0.5: compiled at its second step, it serves 3 more
    # (too few to judge); 0.25 and 0.125 are weighed against those 3; the held 0.125 has lived
    # 2 x 3 + 5 steps at the fourth step of its third epoch
    assert compiled == kinds
    notices = [s for s in said if "changed run as written" in s]
    assert [notice in s and "after Tempered.temperature" in s for s in notices] == (
        [True] if notice else []
    )


class Cooled(nn.Module):
    """Logits divided by a temperature kept in a buffer (a decoder's last layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("temperature", torch.tensor(1.0))

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits / self.temperature


def test_a_number_kept_in_a_buffer_and_changed_in_place_needs_no_new_recording():
    torch.manual_seed(0)
    model, calls = TutorialVAE(), _calls("vae")
    model.decoder.append(Cooled())
    step = _step(model, "trace", 1, calls)
    for _ in range(3):
        _loss_and_grads(step, model, calls)
    model.decoder[-1].temperature.fill_(0.5)
    compiled = _loss_and_grads(step, model, calls, seed=5)[0]
    assert len(step.compiled) == 1
    torch.testing.assert_close(compiled, _written(step, model, calls)[0])


class Masked(TutorialVAE):
    """A program that reads a plain tensor attribute (not a buffer)."""

    def model(self, x):
        return super().model(x * self.mask)


def _written(step: Step, model, calls, seed: int = 5):
    """The step's loss and gradients as written, from ``seed``."""
    uncompiled, step.uncompiled = step.uncompiled, "compile is off"
    try:
        return _loss_and_grads(step, model, calls, seed=seed)
    finally:
        step.uncompiled = uncompiled


def test_a_step_follows_parameters_frozen_or_replaced_and_attributes_replaced():
    """A callback that freezes the encoder or swaps a layer's weight mid-epoch: the next steps give
    the program's gradients; a plain tensor attribute replaced: from the next epoch on."""
    torch.manual_seed(0)
    model, calls = Masked(), _calls("vae")
    model.mask = torch.ones(X_DIM)
    step = _step(model, "trace", 1, calls)
    for _ in range(3):
        _loss_and_grads(step, model, calls)
    model.encoder[0].weight.requires_grad_(False)
    model.decoder[2].weight = nn.Parameter(torch.zeros(X_DIM, 8))
    for _ in range(2):  # as written, then recorded for the new parameters
        compiled, compiled_grads = _loss_and_grads(step, model, calls, seed=5)
    written, written_grads = _written(step, model, calls)
    assert len(step.compiled) == 2 and None not in step.compiled.values()
    torch.testing.assert_close(compiled, written, rtol=1e-5, atol=1e-5)
    assert model.encoder[0].weight.grad is None
    for a, b in zip(compiled_grads, written_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * (1 + b.abs().max()))
    model.mask = torch.zeros(X_DIM)  # the program's own attribute
    step.new_epoch()
    for _ in range(2):  # as written, recorded again
        compiled = _loss_and_grads(step, model, calls, seed=5)[0]
    torch.testing.assert_close(compiled, _written(step, model, calls)[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(compiled, written)


def test_a_program_that_cannot_be_recorded_trains_as_written_and_says_why(capsys):
    torch.manual_seed(0)
    held = _points(16)
    history = pyvae.fit(Branching(), _points(64), valid=held, epochs=2, batch_size=16, compile="on")
    out = capsys.readouterr().out
    assert "compile on: the program trains as written: its Python reads the value" in out
    assert "compile on: validation scores the program as written: its Python reads" in out
    assert all(torch.isfinite(torch.tensor(h["valid_elbo"])) for h in history)
    assert all(torch.isfinite(torch.tensor(h["train_elbo"])) for h in history)


VALIDATED = {
    # the ELBO and log p(x) by importance sampling, K = 20: two kinds of batch
    "vae, log p(x)": (lambda: pyvae.VAE(X_DIM, 2, hidden=(8,)), "trace", 20, 2),
    # TraceEnum_ELBO, which Pyro's loss reads by .item(): one kind
    "m2 enumerated": (lambda: pyvae.M2(X_DIM, 3, 2, hidden=(8,)), "enum", 0, 1),
}


def _validation(model, held, elbo: str, valid_samples: int, compile: str) -> Validation:
    data = Batches(held, torch.device("cpu"), model)
    settings = dict(elbo=elbo, num_particles=1, valid_samples=valid_samples, metrics=None)
    settings.update(compile=compile, epochs=1, progress=True)
    return Validation(model, data, data, World(), structure(model, data.first()), settings)


@pytest.mark.parametrize("family", list(VALIDATED))
def test_validation_scores_compiled_are_the_programs_scores(family, capsys):
    make, elbo, valid_samples, kinds = VALIDATED[family]
    torch.manual_seed(0)
    model = make()
    held = (_points(40), _labels(40)) if elbo == "enum" else _points(40)
    compiled, as_written = (_validation(model, held, elbo, valid_samples, c) for c in ("on", "off"))
    compiled.scores({})  # the first epoch: each kind's first batch runs as written
    records = []
    for validation in (as_written, compiled):
        torch.manual_seed(3)
        validation.scores(record := {})
        records.append(record)
    assert capsys.readouterr().out.count("compile on: a validation score (") == kinds
    scored = {"test_elbo", "valid_elbo", *(["valid_log_px"] if valid_samples else [])}
    assert set(records[0]) == scored
    for key, value in records[0].items():
        assert records[1][key] == pytest.approx(value, rel=1e-5, abs=1e-4), key


@pytest.mark.parametrize(
    "make, data, elbo, particles",
    [
        (lambda: pyvae.VAE(X_DIM, 2, hidden=(8,)), _points(64), "iwae", 3),
        (lambda: pyvae.M2(X_DIM, 3, 2, hidden=(8,)), (_points(64), _labels(64)), "enum", 1),
    ],
    ids=["vae iwae", "m2 enumerated"],
)
def test_evaluate_elbo_compiled_gives_the_programs_number(make, data, elbo, particles, count_calls):
    torch.manual_seed(0)
    model = make()
    recorded = count_calls(BatchLosses, "_record")
    scores = {}
    for mode in ("off", "on"):
        torch.manual_seed(3)  # four batches of 16: the first as written, the others compiled
        scores[mode] = pyvae.evaluate_elbo(
            model, data, elbo=elbo, num_particles=particles, batch_size=16, compile=mode
        )
    assert len(recorded) == 1
    assert scores["on"] == pytest.approx(scores["off"], rel=1e-6, abs=1e-5)


def test_evaluate_elbo_of_a_program_that_cannot_be_recorded_warns_its_caller_once():
    torch.manual_seed(0)
    model, x = Branching(), _points(64)
    with pytest.warns(pyvae.PyvaeWarning, match="evaluate_elbo runs the program uncompiled: its "):
        torch.manual_seed(3)
        compiled = pyvae.evaluate_elbo(model, x, batch_size=16, compile="on")
    with pytest.warns(pyvae.PyvaeWarning) as warned:
        pyvae.evaluate_elbo(model, x, batch_size=16, compile="on")
    assert [w.filename for w in warned] == [__file__]  # once, at the line that called it
    torch.manual_seed(3)
    assert compiled == pyvae.evaluate_elbo(model, x, batch_size=16, compile="off")


@pytest.mark.parametrize("device", DEVICES)
def test_compile_on_and_off_train_to_the_same_weights(device):
    x = _points(96)
    weights = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        model = pyvae.VAE(X_DIM, 2, hidden=(8,))
        settings = dict(epochs=3, batch_size=32, seed=1, kl_warmup_epochs=1, device=device)
        pyvae.fit(model, x, compile=mode, **settings)
        weights[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(weights["on"], weights["off"], rtol=1e-4, atol=1e-5)


class HostReads(TorchFunctionMode):
    """What waits for a GPU's queue: Python reading a tensor's value, a tensor made from Python's
    data (a blocking copy to the device), ``nonzero`` (its size is read)."""

    READS = {
        torch.Tensor.__bool__,
        torch.Tensor.__float__,
        torch.Tensor.__index__,
        torch.Tensor.__int__,
        torch.Tensor.item,
        torch.Tensor.numpy,
        torch.Tensor.tolist,
        torch.Tensor.nonzero,
        torch.nonzero,
        torch.tensor,
    }

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.reads, self.active = 0, [], False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        if func in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_steps_read_no_value_on_the_host(device, monkeypatch, capsys):
    """A GPU runs compiled steps back to back: the loop reads nothing of a step's values (a
    warm-up's KL weight is an input, the loss's and the clipped gradient's finiteness are read
    after the epoch, :class:`pyvae.train.run.Faults`). On a GPU, CUDA's own check of what waits
    for the device (``torch.cuda.set_sync_debug_mode``) watches too."""
    monkeypatch.setattr(run_module, "FAULT_CHECK_SECONDS", float("inf"))
    watched = HostReads()
    cuda = device == "cuda"

    class Watch(pyvae.train.Callback):
        def on_step_end(self, run):
            if run.step_in_epoch == 3:  # the first two run as written, the third compiles
                watched.__enter__()
                watched.active = True
                if cuda:
                    torch.cuda.set_sync_debug_mode("warn")
            elif run.step_in_epoch == 10:
                self.on_train_end(run, None)

        def on_train_end(self, run, error):
            if watched.active:
                watched.__exit__(None, None, None)
                watched.active = False
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")

    settings = dict(epochs=1, batch_size=32, kl_warmup_epochs=1, clip_norm=10.0, compile="on")
    model = pyvae.VAE(X_DIM, 2, hidden=(8,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyvae.fit(model, _points(320), callbacks=[Watch()], device=device, **settings)
    assert "compile on: the training step compiled in" in capsys.readouterr().out
    assert watched.calls > 0 and watched.reads == []  # seven compiled steps
    assert [str(w.message) for w in caught if "synchroniz" in str(w.message)] == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_graph_captures_the_compiled_step():
    """The compiled step is capturable: static shapes, no host synchronization, no allocation the
    graph cannot own. Replaying a CUDA graph of it gives the numbers of a call of it."""
    torch.manual_seed(0)
    model, calls = pyvae.VAE(X_DIM, 2, hidden=(8,)).cuda(), _calls("vae", "cuda")
    step = _step(model, "meanfield", 1, calls)
    for _ in range(3):  # the third step records and compiles
        _loss_and_grads(step, model, calls)
    (recorded,) = [r for r in step.compiled.values() if r is not None]
    compiled = recorded.compiled
    inputs = [*compiled.constants, *compiled.noise(), *step._inputs(calls, 1.0)]
    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.no_grad():  # as pyvae calls it (the graph holds its own gradients)
        expected = [t.clone() for t in compiled.compiled(*inputs)]
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the capture, as torch's recipe does
            for _ in range(2):
                compiled.compiled(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            captured = compiled.compiled(*inputs)
    graph.replay()
    torch.cuda.synchronize()
    assert len(captured) == len(expected) == 1 + sum(recorded.used)
    for a, b in zip(captured, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_a_short_run_on_auto_runs_as_written_and_says_so(capsys):
    pyvae.fit(pyvae.VAE(X_DIM, 2, hidden=(8,)), _points(64), epochs=1, batch_size=16)
    assert "compile auto: runs as written (its remaining" in capsys.readouterr().out


def test_auto_on_a_long_enough_run_compiles_and_says_which_step_it_kept(capsys, monkeypatch):
    monkeypatch.setattr(step_module, "AUTO_MIN_SECONDS", 0.0)  # any run is long enough
    # 16 steps: one validated, five timed as written, then six compiled before the choice
    pyvae.fit(pyvae.VAE(X_DIM, 2, hidden=(8,)), _points(256), epochs=1, batch_size=16)
    kept = re.search(
        r"compile auto: (the training step compiled in [0-9.]+ s runs in [0-9.]+ ms against "
        r"[0-9.]+ ms as written|runs as written: the compiled step took [0-9.]+ ms against)",
        capsys.readouterr().out,
    )
    assert kept is not None


def test_an_unknown_compile_setting_is_refused():
    with pytest.raises(PyvaeError, match="unknown compile 'yes'; choose from auto, on, off"):
        pyvae.fit(pyvae.VAE(X_DIM, 2), _points(8), epochs=1, compile="yes")
    with pytest.raises(PyvaeError, match="unknown compile 'yes'; choose from auto, on, off"):
        pyvae.evaluate_elbo(pyvae.VAE(X_DIM, 2), _points(8), compile="yes")


def test_a_run_stopped_and_resumed_with_compile_on_ends_as_an_uninterrupted_one(
    tmp_path, monkeypatch
):
    from pyvae.train.loop import TrainingStopped

    x = _points(96)  # batch 32: 3 steps per epoch
    settings = dict(epochs=3, batch_size=32, seed=5, kl_warmup_epochs=1, compile="on")
    torch.manual_seed(0)
    whole = pyvae.VAE(X_DIM, 2, hidden=(8,))
    pyvae.fit(whole, x, out=tmp_path / "whole", progress=False, **settings)
    torch.manual_seed(0)
    vae = pyvae.VAE(X_DIM, 2, hidden=(8,))
    stopped = pytest.raises(TrainingStopped, match="at epoch 2, step 2")
    with interrupted_at(monkeypatch, 5, during="update"), stopped:
        pyvae.fit(vae, x, out=tmp_path / "stopped", progress=False, **settings)
    pyvae.fit(vae, x, out=tmp_path / "stopped", resume=True, progress=False, **settings)
    for p, q in zip(vae.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
