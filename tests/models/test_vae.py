"""The model and guide as Pyro programs: sites, shapes, plate scaling, ELBO estimators,
checkpoints."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import pyvae
from pyvae.runs.user_code import custom_parts, import_parts
from pyvae.train.objectives import make_elbo


def traces(vae, x, num_data=None):
    guide_trace = poutine.trace(vae.guide).get_trace(x, num_data)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x, num_data)
    return model_trace, guide_trace


def test_sites_shapes_and_events(binary_data):
    vae = pyvae.VAE(x_dim=16, z_dim=3, hidden=(8,))
    x = binary_data[:10]
    model_trace, guide_trace = traces(vae, x, num_data=64)
    z_guide, z_model, obs = guide_trace.nodes["z"], model_trace.nodes["z"], model_trace.nodes["x"]
    assert z_guide["value"].shape == (10, 3)
    assert z_guide["fn"].event_shape == (3,) and z_guide["fn"].batch_shape == (10,)
    assert z_model["fn"].event_shape == (3,) and z_model["fn"].batch_shape == (10,)
    assert obs["is_observed"] and obs["fn"].event_shape == (16,) and obs["fn"].batch_shape == (10,)
    assert torch.equal(obs["value"], x)
    for site in (z_guide, z_model, obs):
        (frame,) = site["cond_indep_stack"]
        assert (
            frame.name == "data" and frame.full_size == 64 and frame.size == 10 and frame.dim == -1
        )
        assert site["scale"] == pytest.approx(64 / 10)
    # the networks are registered with Pyro as modules
    params = [name for name, site in model_trace.nodes.items() if site["type"] == "param"]
    assert any("decoder" in p for p in params)
    params = [name for name, site in guide_trace.nodes.items() if site["type"] == "param"]
    assert any("encoder" in p for p in params)


def test_vectorized_particles_add_a_leading_dimension(binary_data):
    vae = pyvae.VAE(x_dim=16, z_dim=3, hidden=(8,))
    elbo = make_elbo("trace", num_particles=7, max_plate_nesting=1)
    model_trace, guide_trace = elbo._get_vectorized_trace(
        vae.model, vae.guide, (binary_data[:5], 64), {}
    )
    assert guide_trace.nodes["z"]["value"].shape == (7, 5, 3)
    assert model_trace.nodes["x"]["fn"].batch_shape == (7, 5)


def test_defaults_and_hidden_layers():
    vae = pyvae.VAE(x_dim=784, z_dim=50)
    linears = [m for m in vae.encoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 400), (400, 100)]
    linears = [m for m in vae.decoder if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(50, 400), (400, 784)]
    assert vae.image_shape == (1, 28, 28)
    linear = pyvae.VAE(x_dim=10, z_dim=2, hidden=())
    assert isinstance(linear.decoder, torch.nn.Sequential) and len(linear.decoder) == 1
    assert isinstance(linear.decoder[0], torch.nn.Linear)


def test_bad_constructor_arguments_are_clear_errors():
    with pytest.raises(pyvae.PyvaeError, match="z_dim must be a positive integer; got 0"):
        pyvae.VAE(x_dim=4, z_dim=0)
    with pytest.raises(pyvae.PyvaeError, match="unknown prior 'nope'; choose from"):
        pyvae.VAE(x_dim=4, z_dim=2, prior="nope")
    with pytest.raises(pyvae.PyvaeError, match="unknown activation"):
        pyvae.VAE(x_dim=4, z_dim=2, activation="sigmoidish")


def test_two_vaes_do_not_share_parameters_through_pyro(binary_data):
    """Pyro's global param store must not leak one VAE's weights into another's trace."""
    a = pyvae.VAE(x_dim=16, z_dim=2, hidden=(4,))
    b = pyvae.VAE(x_dim=16, z_dim=2, hidden=(4,))
    traces(a, binary_data[:4])
    _, guide_trace = traces(b, binary_data[:4])
    params = {site["value"] for site in guide_trace.nodes.values() if site["type"] == "param"}
    assert params <= set(b.parameters())


def elbo_estimates(vae, x, name, repeats=20, particles=500):
    """Mean and standard error of the loss over repeated many-particle estimates."""
    elbo = make_elbo(name, particles)
    values = torch.tensor([elbo.loss(vae.model, vae.guide, x) for _ in range(repeats)])
    return values.mean().item(), values.std().item() / repeats**0.5


def test_trace_and_meanfield_agree_in_expectation(binary_data):
    """Monte Carlo KL (Trace_ELBO) and analytic KL (TraceMeanField_ELBO) estimate the same ELBO."""
    vae = pyvae.VAE(x_dim=16, z_dim=3, hidden=(8,))
    x = binary_data[:8]
    mc, mc_se = elbo_estimates(vae, x, "trace")
    analytic, analytic_se = elbo_estimates(vae, x, "meanfield")
    assert abs(mc - analytic) < 4 * (mc_se**2 + analytic_se**2) ** 0.5
    # and both match the ELBO written out by hand with the same distribution objects
    q = vae.encode(x)
    z = q.rsample((20000,))
    by_hand = -(
        vae.decode(z).log_prob(x).mean(0) - torch.distributions.kl_divergence(q, vae.prior())
    ).sum()
    assert abs(analytic - by_hand.item()) < 4 * (analytic_se**2 + 0.05**2) ** 0.5


def test_plate_scaling_makes_minibatch_loss_unbiased(binary_data):
    vae = pyvae.VAE(x_dim=16, z_dim=3, hidden=(8,))
    x, n = binary_data, binary_data.shape[0]
    elbo = make_elbo("meanfield")
    # exact: declaring N points scales every minibatch term by N/M
    batch = x[:16]
    pyro.set_rng_seed(3)
    scaled = elbo.loss(vae.model, vae.guide, batch, n)
    pyro.set_rng_seed(3)
    plain = elbo.loss(vae.model, vae.guide, batch)
    assert scaled == pytest.approx(plain * n / 16, rel=1e-5)
    # statistical: averaged over minibatches, the estimate is the full-data loss
    big = make_elbo("meanfield", num_particles=400)
    full = torch.tensor([big.loss(vae.model, vae.guide, x, n) for _ in range(10)])
    minibatch = torch.tensor(
        [
            big.loss(vae.model, vae.guide, x[idx], n)
            for _ in range(10)
            for idx in torch.randperm(n).split(16)
        ]
    )
    # each full-data estimate averages 4 minibatch estimates worth of data points
    se = (full.var() / len(full) + minibatch.var() / len(minibatch)) ** 0.5
    assert abs(full.mean() - minibatch.mean()) < 4 * se + 1e-3 * abs(full.mean())


def test_save_and_load_round_trip_exactly(tmp_path, binary_data):
    vae = pyvae.VAE(x_dim=16, z_dim=3, hidden=(8, 6), activation="relu")
    pyvae.save(vae, tmp_path / "vae.pt")
    loaded = pyvae.load(tmp_path / "vae.pt")
    assert loaded.config == vae.config
    for (k1, v1), (k2, v2) in zip(
        vae.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)
    elbo = make_elbo("trace")
    pyro.set_rng_seed(5)
    before = elbo.loss(vae.model, vae.guide, binary_data)
    pyro.set_rng_seed(5)
    assert elbo.loss(loaded.model, loaded.guide, binary_data) == before
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


def test_custom_parts_must_be_passed_again_on_load(tmp_path):
    class ShiftedPrior(pyvae.parts.priors.Prior):
        def bind(self, vae):
            self.shift = torch.nn.Parameter(torch.zeros(vae.z_dim))

        def forward(self):
            return dist.Normal(self.shift, 1.0).to_event(1)

    vae = pyvae.VAE(x_dim=16, z_dim=3, prior=ShiftedPrior(), decoder=torch.nn.Linear(3, 16))
    pyvae.save(vae, tmp_path / "vae.pt")
    with pytest.raises(pyvae.PyvaeError, match="custom prior 'ShiftedPrior'; pass prior="):
        pyvae.load(tmp_path / "vae.pt")
    with pytest.raises(pyvae.PyvaeError, match="custom decoder; pass decoder="):
        pyvae.load(tmp_path / "vae.pt", prior=ShiftedPrior())
    loaded = pyvae.load(tmp_path / "vae.pt", prior=ShiftedPrior(), decoder=torch.nn.Linear(3, 16))
    assert torch.equal(loaded.decoder.weight, vae.decoder.weight)


def test_a_subclass_of_a_built_in_is_not_rebuilt_as_the_built_in(tmp_path):
    class WidePrior(pyvae.parts.priors.StandardNormal):
        def forward(self):
            return dist.Normal(self.loc, 3 * self.scale).to_event(1)

    vae = pyvae.VAE(x_dim=16, z_dim=3, prior=WidePrior())
    pyvae.save(vae, tmp_path / "vae.pt")
    with pytest.raises(pyvae.PyvaeError, match="custom prior 'WidePrior'; pass prior="):
        pyvae.load(tmp_path / "vae.pt")


def test_unreadable_checkpoints_are_clear_errors(tmp_path):
    vae = pyvae.VAE(x_dim=16, z_dim=3)
    pyvae.save(vae, tmp_path / "vae.pt")
    data = (tmp_path / "vae.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(pyvae.PyvaeError, match="cannot read checkpoint"):
        pyvae.load(tmp_path / "truncated.pt")
    torch.save(
        {"format": "pyvae-checkpoint", "format_version": 1, "config": {"x_dim": 3}},
        tmp_path / "partial.pt",
    )
    with pytest.raises(pyvae.PyvaeError, match="without a complete model description"):
        pyvae.load(tmp_path / "partial.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(pyvae.PyvaeError, match="not a pyvae checkpoint"):
        pyvae.load(tmp_path / "other.pt")
    with pytest.raises(pyvae.PyvaeError, match="no checkpoint at"):
        pyvae.load(tmp_path / "missing.pt")


def test_a_checkpoint_that_does_not_match_names_the_entries(tmp_path):
    pyvae.save(pyvae.VAE(x_dim=16, z_dim=2, hidden=(8,)), tmp_path / "one.pt")
    with pytest.raises(pyvae.PyvaeError) as info:  # one more hidden layer, and z_dim 3
        pyvae.load(tmp_path / "one.pt", model=pyvae.VAE(x_dim=16, z_dim=3, hidden=(8, 8)))
    message = str(info.value)
    assert "\n" not in message and "does not match the model" in message
    assert "missing decoder.4.bias, decoder.4.weight, encoder.4.bias, encoder.4.weight;" in message
    assert (
        "shapes differ (saved vs model): prior.loc (2,) vs (3,)" in message
        and "encoder.2.weight (4, 8) vs (8, 8)" in message
    )


PARTS_FILE = """
import torch
import pyro.distributions as dist
import pyvae
from shifts import SHIFT  # a module beside this file


class MyNormal(pyvae.parts.priors.Prior):
    name = "normal"  # a built-in's name: the recorded source still marks it as the user's

    @torch.no_grad()
    def describe(self):
        return "shifted"

    def forward(self):
        return dist.Normal(torch.full((self.z_dim,), SHIFT), 1.0).to_event(1)

    def bind(self, vae):
        self.z_dim = vae.z_dim


class MyBernoulli(pyvae.parts.likelihoods.Likelihood):
    name = "normal"  # the same name as the prior above: parts are looked up per kind
    binary_data = True

    def forward(self, logits):
        return dist.Bernoulli(logits=logits).to_event(1)
"""


def test_a_parts_file_rebuilds_its_parts_by_kind_even_under_built_in_names(tmp_path):
    (tmp_path / "shifts.py").write_text("SHIFT = 0.5\n")
    (tmp_path / "parts.py").write_text(PARTS_FILE)
    classes = {c.__name__: c for c in import_parts(tmp_path / "parts.py")}
    vae = pyvae.VAE(
        x_dim=16, z_dim=3, prior=classes["MyNormal"](), likelihood=classes["MyBernoulli"]()
    )
    spec = vae.config["prior"]
    # not torch's file
    assert (
        spec["name"] == "normal"
        and spec["source"] == f"{(tmp_path / 'parts.py').resolve()}:MyNormal"
    )
    pyvae.save(vae, tmp_path / "vae.pt")
    with pytest.raises(pyvae.PyvaeError, match="custom prior 'normal'; pass prior="):
        pyvae.load(tmp_path / "vae.pt")  # never silently the built-in N(0, I)
    parts = custom_parts(vae.config, tmp_path / "parts.py")
    assert (
        type(parts["prior"]).__name__ == "MyNormal"
        and type(parts["likelihood"]).__name__ == "MyBernoulli"
    )
    loaded = pyvae.load(tmp_path / "vae.pt", **parts)
    assert torch.allclose(loaded.prior().mean, torch.full((3,), 0.5))
    # parts kept in a neighbour
    (tmp_path / "reexport.py").write_text("from parts import MyNormal, MyBernoulli\n")
    assert set(custom_parts(vae.config, tmp_path / "reexport.py")) == {"prior", "likelihood"}
    with pytest.raises(pyvae.PyvaeError, match="defines no guide 'MyGuide'; its guides: none"):
        custom_parts(
            {"guide": {"name": "MyGuide", "source": "x.py:MyGuide"}}, tmp_path / "parts.py"
        )


def test_a_notebook_s_part_named_like_a_built_in_is_never_rebuilt_as_the_built_in(tmp_path):
    # defined in a function, as in a notebook: no file to record
    class Normal(pyvae.parts.priors.StandardNormal):
        name = "normal"

        def forward(self):
            return dist.Normal(self.loc + 1, self.scale).to_event(1)

    vae = pyvae.VAE(x_dim=16, z_dim=3, prior=Normal())
    assert vae.config["prior"]["source"].endswith("<locals>.Normal")
    pyvae.save(vae, tmp_path / "vae.pt")
    with pytest.raises(pyvae.PyvaeError, match="custom prior 'normal'; pass prior="):
        pyvae.load(tmp_path / "vae.pt")
