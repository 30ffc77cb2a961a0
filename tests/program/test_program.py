"""The Pyro program is what gets trained, scored and saved: user-written models through the public
API, checked against closed-form marginals of linear-Gaussian models."""

import importlib.util
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyvae
from pyvae import program
from pyvae.train.objectives import Objective

D, Z = 5, 2


def mvn_log_px(x, mean, cov):
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(x)


class LinearGaussian(nn.Module):
    """z ~ N(0, prior_scale^2 I), x | z ~ N(W z + b, 0.5^2 I), written as plain Pyro with a bare
    data plate; the guide is a linear-Gaussian encoder."""

    def __init__(self, prior_scale=3.0, nested=False):
        super().__init__()
        self.prior_scale, self.nested = prior_scale, nested
        self.W = nn.Parameter(torch.randn(D, Z))
        self.b = nn.Parameter(torch.randn(D))
        self.enc = nn.Linear(D, 2 * Z)

    def model(self, x, num_data=None):
        pyro.module("lg", self)
        with pyro.plate(
            "data",
            size=num_data or len(x),
            subsample=torch.arange(len(x)),
            dim=-2 if self.nested else -1,
        ):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), self.prior_scale).to_event(1))
            loc = z @ self.W.T + self.b
            if self.nested:  # the pixels as a plate nested in the data plate
                loc = loc.squeeze(-2)
                with pyro.plate("pixels", D, dim=-1):
                    pyro.sample("x", dist.Normal(loc, 0.5), obs=x)
            else:
                pyro.sample("x", dist.Normal(loc, 0.5).to_event(1), obs=x)

    def guide(self, x, num_data=None):
        loc, raw = self.enc(x).chunk(2, -1)
        with pyro.plate(
            "data",
            size=num_data or len(x),
            subsample=torch.arange(len(x)),
            dim=-2 if self.nested else -1,
        ):
            if self.nested:
                loc, raw = loc.unsqueeze(-2), raw.unsqueeze(-2)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 0.05).to_event(1))

    def exact(self, x):
        cov = self.prior_scale**2 * self.W @ self.W.T + 0.25 * torch.eye(D)
        return mvn_log_px(x, self.b, cov)


def exact_guide(model: LinearGaussian, widen: float = 1.2) -> None:
    """Give W orthogonal columns, so that the posterior is diagonal, and set the encoder to it,
    its standard deviations widened by ``widen`` (a good but not perfect proposal)."""
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(D, Z))
        model.W.copy_(q * torch.tensor([2.0, 0.7]))
        precision = (model.W**2).sum(0) / 0.25 + 1 / model.prior_scale**2  # diagonal
        gain = model.W.T / 0.25 / precision.unsqueeze(1)  # (Z, D): posterior mean = gain (x - b)
        model.enc.weight.copy_(torch.cat([gain, torch.zeros(Z, D)]))
        std = widen / precision.sqrt() - 0.05
        # softplus^-1
        model.enc.bias.copy_(torch.cat([-gain @ model.b, std + torch.log(-torch.expm1(-std))]))


def test_a_prior_written_in_model_code_is_what_gets_scored():
    torch.manual_seed(0)
    model = LinearGaussian(prior_scale=3.0)
    exact_guide(model)
    x = torch.randn(20, D) * 3
    pyro.set_rng_seed(1)
    ll = pyvae.log_likelihood(model, x, num_samples=4000)
    exact = model.exact(x).detach()
    # within Monte Carlo error of the closed form for *this* prior (N(0, 3^2 I))
    assert ((ll.log_px - exact).abs() <= 4 * ll.stderr + 0.02).all(), ll.log_px - exact
    # a model with the standard prior would be a different marginal: scored as written, not as a
    # template
    unit = LinearGaussian(prior_scale=1.0)
    unit.load_state_dict(model.state_dict())
    assert (unit.exact(x) - exact).abs().mean() > 0.5
    # the ELBO from the importance draws equals the program's own ELBO (Trace_ELBO)
    elbo = pyvae.evaluate_elbo(model, x, num_particles=2000)
    assert float(ll.elbo.mean()) == pytest.approx(elbo, abs=0.05)


def test_nested_plates_sum_to_the_same_per_point_weights():
    torch.manual_seed(1)
    flat, nested = LinearGaussian(), LinearGaussian(nested=True)
    exact_guide(flat)
    nested.load_state_dict(flat.state_dict())
    x = torch.randn(6, D)
    weights = {}
    for name, model in (("flat", flat), ("nested", nested)):
        shape = program.structure(model, (x,))
        pyro.set_rng_seed(3)
        weights[name] = program.log_weights(model, (x,), 11, shape).per_point()
    assert program.structure(nested, (x,)).max_plate_nesting == 2
    assert torch.allclose(weights["flat"], weights["nested"], atol=1e-5)
    pyro.set_rng_seed(4)
    ll = pyvae.log_likelihood(nested, x, num_samples=3000)
    assert ((ll.log_px - nested.exact(x).detach()).abs() <= 4 * ll.stderr + 0.05).all()
    # per-point diagnostics do not depend on where the data plate sits
    pyro.set_rng_seed(4)
    ll_flat = pyvae.log_likelihood(flat, x, num_samples=3000)
    assert torch.allclose(ll.kl["z"], ll_flat.kl["z"], atol=1e-4) and ll.kl["z"].std() > 0.01


class TwoLayer(nn.Module):
    """z2 ~ N(0, I2); z1 | z2 ~ N(A z2 + a, s1^2 I3); x | z1 ~ N(B z1 + c, s^2 I5): a hierarchy in
    plain Pyro.

    Marginal: x ~ N(B a + c, B (A A^T + s1^2 I) B^T + s^2 I). The guide is bottom-up:
    q(z1|x) q(z2|z1)."""

    def __init__(self):
        super().__init__()
        self.A, self.a = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.zeros(3))
        self.B, self.c = nn.Parameter(torch.randn(D, 3)), nn.Parameter(torch.zeros(D))
        self.log_s1, self.log_s = nn.Parameter(torch.tensor(-0.5)), nn.Parameter(torch.tensor(-0.5))
        self.q1, self.q2 = nn.Linear(D, 6), nn.Linear(3, 4)

    def model(self, x, num_data=None):
        with pyvae.program.data_plate(x, num_data):
            z2 = pyro.sample("z2", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            z1 = pyro.sample(
                "z1", dist.Normal(z2 @ self.A.T + self.a, self.log_s1.exp()).to_event(1)
            )
            pyro.sample(
                "x", dist.Normal(z1 @ self.B.T + self.c, self.log_s.exp()).to_event(1), obs=x
            )

    def guide(self, x, num_data=None):
        with pyvae.program.data_plate(x, num_data):
            loc, raw = self.q1(x).chunk(2, -1)
            z1 = pyro.sample("z1", dist.Normal(loc, nn.functional.softplus(raw) + 0.01).to_event(1))
            loc, raw = self.q2(z1).chunk(2, -1)
            pyro.sample("z2", dist.Normal(loc, nn.functional.softplus(raw) + 0.01).to_event(1))

    def exact(self, x):
        cov1 = self.A @ self.A.T + self.log_s1.exp() ** 2 * torch.eye(3)
        cov = self.B @ cov1 @ self.B.T + self.log_s.exp() ** 2 * torch.eye(D)
        return mvn_log_px(x, self.B @ self.a + self.c, cov)


def test_a_two_layer_hierarchy_fits_and_scores_its_closed_form():
    torch.manual_seed(2)
    truth = TwoLayer()
    with torch.no_grad():
        x = pyvae.program.generate(truth, (torch.zeros(300, D),))  # E[x | z]: add the noise by hand
        x = x + truth.log_s.exp() * torch.randn_like(x)
    model = TwoLayer()
    history = pyvae.fit(
        model, x, epochs=40, batch_size=50, lr=2e-2, device="cpu", seed=0, progress=False
    )
    assert history[-1]["train_elbo"] > history[0]["train_elbo"]
    pyro.set_rng_seed(5)
    ll = pyvae.log_likelihood(model, x[:30], num_samples=4000)
    exact = model.exact(x[:30]).detach()
    assert ((ll.log_px - exact).abs() <= 4 * ll.stderr + 0.05).all(), (
        (ll.log_px - exact).abs().max()
    )
    # diagnostics per latent site, from the same draws
    result = pyvae.evaluate(model, x[:30], num_samples=500)
    sites = result.summary()["latent_sites"]
    assert set(sites) == {"z1", "z2"} and sites["z1"]["dims"] == 3 and sites["z2"]["dims"] == 2
    assert result.site == "z2"  # the top of the hierarchy: the first latent the model samples
    assert all(s["kl"] > 0 for s in sites.values())


def test_save_and_load_a_users_class(tmp_path):
    torch.manual_seed(3)
    model = TwoLayer()
    pyvae.save(model, tmp_path / "m.pt")
    again = pyvae.load(tmp_path / "m.pt", model=TwoLayer())
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )
    with pytest.raises(
        pyvae.PyvaeError, match=r"holds a .*TwoLayer, not a built-in model; build one and pass it"
    ):
        pyvae.load(tmp_path / "m.pt")
    with pytest.raises(
        pyvae.PyvaeError, match=r"holds a .*TwoLayer; it cannot be loaded into a .*LinearGaussian"
    ):
        pyvae.load(tmp_path / "m.pt", model=LinearGaussian())

    # a subclass of a built-in comes back as itself, never as the parent
    class Wider(pyvae.VAE):
        pass

    pyvae.save(Wider(x_dim=4, z_dim=2), tmp_path / "w.pt")
    with pytest.raises(pyvae.PyvaeError, match="not a built-in model"):
        pyvae.load(tmp_path / "w.pt")
    with pytest.raises(
        pyvae.PyvaeError, match=r"shapes differ \(saved vs model\): prior.loc \(2,\) vs \(3,\)"
    ):
        pyvae.load(tmp_path / "w.pt", model=Wider(x_dim=4, z_dim=3))
    assert type(pyvae.load(tmp_path / "w.pt", model=Wider(x_dim=4, z_dim=2))) is Wider


class PlainParam(LinearGaussian):
    def model(self, x, num_data=None):
        # not a parameter of the module: fit would never train it
        shift = pyro.param("shift", torch.zeros(D))
        with pyro.plate("data", size=num_data or len(x), subsample=torch.arange(len(x))):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + shift, 0.5).to_event(1), obs=x)


class NoDataPlate(LinearGaussian):
    def model(self, x, num_data=None):
        z = pyro.sample("z", dist.Normal(torch.zeros(len(x), Z), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ self.W.T, 0.5).to_event(1), obs=x)


class GlobalLatent(LinearGaussian):
    def model(self, x, num_data=None):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", size=num_data or len(x), subsample=torch.arange(len(x))):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + shift, 0.5).to_event(1), obs=x)

    def guide(self, x, num_data=None):
        pyro.sample("shift", dist.Normal(0.0, 1.0))
        super().guide(x, num_data)


@pytest.mark.parametrize(
    "model, message",
    [
        (NoDataPlate(), "site 'z' is not inside a plate of size \\d, the batch's points"),
        (GlobalLatent(), "site 'shift' is not inside a plate of size \\d.*a global latent"),
        (PlainParam(), r"pyro.param\('shift'\) is not a parameter of the module"),
    ],
)
def test_a_model_outside_the_contract_is_a_one_line_error(model, message):
    x = torch.randn(8, D)
    for call in (
        lambda: pyvae.fit(model, x, epochs=1, batch_size=4, device="cpu", progress=False),
        lambda: pyvae.log_likelihood(model, x, 10),
    ):
        with pytest.raises(pyvae.PyvaeError, match=message) as info:
            call()
        assert "\n" not in str(info.value)


def test_training_and_scoring_leave_pyros_param_store_empty():
    pyro.clear_param_store()
    model = pyvae.VAE(x_dim=D, z_dim=Z, hidden=(8,), likelihood="normal")
    x = torch.rand(16, D)
    pyvae.fit(model, x, epochs=1, batch_size=8, device="cpu", progress=False)
    pyvae.log_likelihood(model, x, 10)
    pyvae.evaluate(model, x, 10)
    assert list(pyro.get_param_store().keys()) == []


def test_elbo_accepts_any_pyro_elbo_instance():
    torch.manual_seed(4)
    model = LinearGaussian()
    x = torch.randn(16, D)
    history = pyvae.fit(
        model,
        x,
        epochs=3,
        batch_size=8,
        elbo=pyro.infer.TraceGraph_ELBO(),
        device="cpu",
        progress=False,
    )
    assert all(math.isfinite(h["train_elbo"]) for h in history)
    graph = (
        Objective(model, pyro.infer.TraceGraph_ELBO(num_particles=2000, vectorize_particles=True))
        .loss((x,), 16)
        .item()
    )
    trace = Objective(model, "trace", num_particles=2000).loss((x,), 16).item()
    assert graph == pytest.approx(trace, rel=0.02)  # the same negative ELBO, not its negative
    with pytest.raises(
        pyvae.PyvaeError, match="unknown elbo 'renyi'; choose from trace, meanfield, iwae, enum"
    ):
        pyvae.fit(model, x, epochs=1, batch_size=8, elbo="renyi", device="cpu", progress=False)


def test_the_custom_model_example_runs(tmp_path, capsys):
    """examples/custom_model.py, a complete model of one's own, trains, evaluates, saves and
    reloads."""
    path = Path(__file__).resolve().parents[2] / "examples" / "custom_model.py"
    spec = importlib.util.spec_from_file_location("custom_model", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--epochs", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "site 'z2':" in out and "site 'z1':" in out and "saved and reloaded TwoLevelVAE" in out
    assert (tmp_path / "checkpoint.pt").is_file()


def test_the_elbo_leaves_out_training_only_factors():
    """m2's classification factor shapes training, not the model: its ELBO and log p(x, y) ignore
    alpha."""
    torch.manual_seed(5)
    x, y = torch.rand(12, 16).round(), torch.arange(12) % 3
    values = []
    for alpha in (0.0, 10.0):
        model = pyvae.M2(x_dim=16, num_classes=3, z_dim=2, hidden=(8,), alpha=alpha)
        model.load_state_dict(values[0][2]) if values else None
        pyro.set_rng_seed(6)
        elbo = pyvae.evaluate_elbo(model, (x, y), elbo="enum")
        pyro.set_rng_seed(6)
        values.append(
            (elbo, pyvae.log_likelihood(model, (x, y), 50).elbo.mean().item(), model.state_dict())
        )
    assert values[0][0] == pytest.approx(values[1][0], rel=1e-6)
    assert values[0][1] == pytest.approx(values[1][1], rel=1e-6)
    # one-draw ELBO against the 50-draw mean
    assert values[0][0] == pytest.approx(values[0][1], abs=1.0)
