"""Every prior, likelihood and guide: shapes, normalization, support errors, KL, and training."""

import math
import subprocess
import sys

import pyro
import pytest
import torch
from torch.distributions import kl_divergence

import pyvae
from pyvae.cli.app import main
from pyvae.data.datasets import binarize, load_dataset
from pyvae.parts.guides import GUIDES
from pyvae.parts.likelihoods import LIKELIHOODS, DiscretizedLogisticDistribution
from pyvae.parts.priors import PRIORS
from pyvae.train.objectives import Objective, make_elbo

PRIOR_NAMES = sorted(PRIORS)
LIKELIHOOD_NAMES = sorted(LIKELIHOODS)
GUIDE_NAMES = sorted(GUIDES)


def grid_2d(half_width, n):
    """Points and cell area of an n x n grid on [-half_width, half_width]^2."""
    axis = torch.linspace(-half_width, half_width, n)
    z = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    return z, (axis[1] - axis[0]) ** 2


# -- priors -------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRIOR_NAMES)
def test_prior_shapes_and_normalization(name):
    prior = {"name": "vamp", "num_components": 10} if name == "vamp" else name
    vae = pyvae.VAE(x_dim=16, z_dim=2, hidden=(8,), prior=prior)
    with torch.no_grad():
        p = vae.prior()
        assert p.event_shape == (2,) and p.batch_shape == ()
        z = p.sample((500,))
        assert z.shape == (500, 2) and p.log_prob(z).shape == (500,)
        # student_t's polynomial tails need the wide grid
        points, area = grid_2d(60.0 if name == "student_t" else 12.0, 1201)
        mass = (p.log_prob(points).exp().sum() * area).item()
    assert mass == pytest.approx(1.0, abs=0.01)


def test_prior_settings_and_errors():
    assert PRIORS.resolve({"name": "student_t", "df": 7}).df == 7
    # the components' form is written into every spec (checkpoints), so a run keeps its density
    assert pyvae.parts.priors.VampPrior(num_components=3).spec() == {
        "name": "vamp",
        "num_components": 3,
        "components": "guide",
    }
    with pytest.raises(pyvae.PyvaeError, match="student_t df must be a positive number; got -1"):
        pyvae.parts.priors.StudentT(df=-1)
    with pytest.raises(
        pyvae.PyvaeError,
        match="unknown setting 'components' for prior 'mog'; allowed: num_components",
    ):
        PRIORS.resolve({"name": "mog", "components": 3})
    with pytest.raises(pyvae.PyvaeError, match="flow prior needs z_dim >= 2"):
        pyvae.VAE(x_dim=4, z_dim=1, prior="flow")


def test_vamp_prior_is_the_mixture_of_the_guide_at_the_pseudo_inputs():
    vae = pyvae.VAE(
        x_dim=16, z_dim=3, hidden=(8,), prior=pyvae.parts.priors.VampPrior(num_components=4)
    )
    z = torch.randn(6, 3)
    q = vae.encode(vae.prior.pseudo_inputs.clamp(0, 1))
    expected = torch.logsumexp(q.log_prob(z.unsqueeze(1)), dim=1) - math.log(4)
    assert torch.allclose(vae.prior().log_prob(z), expected, atol=1e-5)


def test_vamp_with_base_components_is_the_mixture_of_the_guides_base_distribution():
    """Under an IAF guide: the diagonal Normal before the flow, at each pseudo-input."""
    prior = {"name": "vamp", "num_components": 4, "components": "base"}
    vae = pyvae.VAE(x_dim=16, z_dim=3, hidden=(8,), prior=prior, guide="iaf")
    z = torch.randn(6, 3)
    h = vae.encoder(vae.prior.pseudo_inputs.clamp(0, 1))
    loc, raw = h[:, :3], h[:, 3:6]
    scale = torch.nn.functional.softplus(raw) + vae.posterior.min_scale
    base = torch.distributions.Independent(torch.distributions.Normal(loc, scale), 1)
    expected = torch.logsumexp(base.log_prob(z.unsqueeze(1)), dim=1) - math.log(4)
    assert torch.allclose(vae.prior().log_prob(z), expected, atol=1e-5)
    with pytest.raises(pyvae.PyvaeError, match="vamp components must be one of guide, base"):
        pyvae.VAE(x_dim=16, z_dim=3, prior={"name": "vamp", "components": "flow"})


@pytest.mark.parametrize("guide", ["normal", "lowrank", "iaf"])
@pytest.mark.parametrize("pairs", [6, 45, 1000])
def test_the_vamp_density_in_chunks_is_the_same_sum_with_the_same_gradients(
    guide, pairs, monkeypatch
):
    torch.manual_seed(0)
    vae = pyvae.VAE(
        x_dim=16,
        z_dim=3,
        hidden=(8,),
        guide=guide,
        prior=pyvae.parts.priors.VampPrior(num_components=7),
    )
    z = torch.randn(5, 4, 3, requires_grad=True)
    wrt = [z, vae.prior.pseudo_inputs, *vae.encoder.parameters(), *vae.posterior.parameters()]
    q = vae.encode(vae.prior.pseudo_inputs.clamp(0, 1))
    whole = torch.logsumexp(q.log_prob(z.unsqueeze(-2).expand(5, 4, 7, 3)), dim=-1) - math.log(7)
    expected = torch.autograd.grad(whole.sum(), wrt)
    # 20 z rows x 7 components; a chunk of 6 pairs: 1 component x 6 rows (rows split 6, 6, 6, 2),
    # of 45: 2 components x all 20 rows (components split 2, 2, 2, 1), of 1000: one chunk, nothing
    # recomputed
    monkeypatch.setattr(pyvae.parts.priors, "_bytes_per_pair", lambda fn, h, z: 1)
    monkeypatch.setattr(pyvae.parts.priors, "VAMP_CHUNK_BYTES", {"cpu": pairs})
    chunked = vae.prior().log_prob(z)
    assert torch.allclose(chunked, whole, atol=1e-5)
    for a, b in zip(torch.autograd.grad(chunked.sum(), wrt), expected, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # under torch.autograd.grad alone (AIS asks for the gradient in z only), and without gradients
    assert torch.allclose(
        torch.autograd.grad(vae.prior().log_prob(z).sum(), z)[0], expected[0], atol=1e-5
    )
    with torch.no_grad():
        assert torch.allclose(vae.prior().log_prob(z), whole, atol=1e-5)


def test_learnable_priors_have_parameters_fixed_ones_do_not():
    for name in PRIOR_NAMES:
        params = list(pyvae.VAE(x_dim=16, z_dim=2, hidden=(8,), prior=name).prior.parameters())
        assert bool(params) == (name in {"learned_normal", "mog", "vamp", "flow"}), name


# -- likelihoods --------------------------------------------------------------------
def one_pixel(name, out):
    vae = pyvae.VAE(x_dim=1, z_dim=2, hidden=(4,), likelihood=name)
    return vae.likelihood, vae.likelihood(torch.tensor(out))


@pytest.mark.parametrize(
    "name, out",
    [
        ("bernoulli", [0.3]),
        ("continuous_bernoulli", [1.7]),
        # near lambda = 1/2, where the constant needs a Taylor series
        ("continuous_bernoulli", [0.001]),
        ("normal", [0.4]),
        ("normal_learned", [0.4]),
        ("laplace", [-0.2]),
        ("beta", [2.0, 3.0]),
        ("beta", [-5.0, 1.0]),  # a ~ 0.0077: nearly all mass at the ends, where squeezing matters
        ("beta", [-0.2, -0.3]),
        ("discretized_logistic", [0.3, -3.0]),
        ("discretized_logistic", [1.2, -6.0]),
    ],
)
def test_likelihood_is_normalized(name, out):
    likelihood, p = one_pixel(name, out)
    assert p.event_shape == (1,)
    with torch.no_grad():
        if name == "bernoulli":
            values = torch.tensor([[0.0], [1.0]])
            mass = p.log_prob(values).exp().sum()
        elif name == "discretized_logistic":
            values = torch.linspace(0, 1, 256).unsqueeze(-1)
            mass = p.log_prob(values).exp().sum()
        else:
            lo, hi = (0.0, 1.0) if name in {"continuous_bernoulli", "beta"} else (-20.0, 20.0)
            # end masses, plus the density between them on a grid fine at the ends
            if name == "beta":
                eps = likelihood.eps
                u = torch.linspace(-1, 1, 400001, dtype=torch.float64)
                values = (0.5 + (0.5 - eps) * torch.sign(u) * u.abs() ** 6).unsqueeze(-1)
                ends = p.log_prob(torch.tensor([[0.0], [1.0]])).exp().double().sum()
            else:
                values = torch.linspace(lo, hi, 400001, dtype=torch.float64).unsqueeze(-1)
                ends = 0.0
            density = p.log_prob(values.float()).exp().double()
            mass = torch.trapezoid(density, values.squeeze(-1)) + ends
    assert mass.item() == pytest.approx(1.0, abs=2e-3)


def test_discretized_logistic_mean_is_the_masses_weighted_sum():
    torch.manual_seed(0)
    loc, scale = (
        1.4 * torch.rand(5, 7, dtype=torch.float64) - 0.2,
        0.3 * torch.rand(5, 7, dtype=torch.float64) + 1e-3,
    )
    p = DiscretizedLogisticDistribution(loc, scale, num_levels=256)
    grid = torch.linspace(0, 1, 256, dtype=torch.float64).reshape(256, 1, 1)
    assert torch.allclose(p.mean, (p.log_prob(grid).exp() * grid).sum(0), atol=1e-10)


@pytest.mark.parametrize("name", LIKELIHOOD_NAMES)
def test_likelihood_shapes_and_mean(name):
    vae = pyvae.VAE(x_dim=16, z_dim=3, hidden=(8,), likelihood=name)
    out = vae.decoder(torch.randn(4, 5, 3))
    p = vae.likelihood(out)
    assert p.event_shape == (16,) and p.batch_shape == (4, 5)
    x = p.sample()
    assert x.shape == (4, 5, 16) and p.log_prob(x).shape == (4, 5)
    assert vae.likelihood.mean(out).shape == (4, 5, 16)
    assert vae.sample(3).shape == (3, 16)


def test_bernoulli_log_mass_and_gradient_are_torchs_with_and_without_autograd():
    torch.manual_seed(0)
    logits = (3 * torch.randn(4, 6, 10)).requires_grad_()
    x = (torch.rand(6, 10) > 0.5).float()  # broadcast against 4 particles
    exact = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    likelihood = LIKELIHOODS.resolve("bernoulli")
    trained = likelihood(logits).log_prob(x)  # the fused path autograd takes
    with torch.no_grad():
        scored = likelihood(logits).log_prob(x)  # the path importance sampling takes
    assert torch.allclose(trained, exact, atol=1e-5) and torch.allclose(scored, exact, atol=1e-5)
    (grad,) = torch.autograd.grad(trained.sum(), logits)
    assert torch.allclose(grad, x - torch.sigmoid(logits), atol=1e-6)


@pytest.mark.parametrize(
    "name, data, message",
    [
        (
            "bernoulli",
            [0.0, 0.5],
            r"bernoulli needs 0/1 data; got values in \[0, 0.5\] — use --binarize",
        ),
        (
            "continuous_bernoulli",
            [-0.5, 1.0],
            r"continuous_bernoulli needs data in \[0, 1\]; got values in \[-0.5, 1\]",
        ),
        ("beta", [0.0, 2.0], r"beta needs data in \[0, 1\]; got values in \[0, 2\]"),
        ("normal", [0.0, math.nan], "normal needs finite data"),
        ("normal_learned", [math.inf, 0.0], "normal_learned needs finite data"),
        ("laplace", [math.nan, 0.0], "laplace needs finite data"),
        (
            "discretized_logistic",
            [0.0, 0.3],
            r"discretized_logistic needs data on the grid k/255 .* off the grid",
        ),
        (
            "discretized_logistic",
            [0.0, 2.0],
            r"discretized_logistic needs data on the grid k/255 in \[0, 1\]; got values in \[0, "
            r"2\]",
        ),
    ],
)
def test_data_outside_support_is_a_clear_error(name, data, message):
    vae = pyvae.VAE(x_dim=2, z_dim=2, hidden=(4,), likelihood=name)
    with pytest.raises(pyvae.PyvaeError, match=message):
        pyvae.fit(
            vae, torch.tensor([data, data]), epochs=1, batch_size=1, device="cpu", progress=False
        )


def test_likelihood_settings():
    assert pyvae.parts.likelihoods.Normal(scale=0.5).scale == 0.5
    assert (
        LIKELIHOODS.resolve({"name": "normal_learned", "scale_from": "decoder"}).params_per_pixel
        == 2
    )
    with pytest.raises(pyvae.PyvaeError, match="scale_from must be 'pixel' or 'decoder'"):
        pyvae.parts.likelihoods.NormalLearnedScale(scale_from="both")


# -- guides -------------------------------------------------------------------------
@pytest.mark.parametrize("name", GUIDE_NAMES)
def test_guide_shapes_and_normalization(name):
    vae = pyvae.VAE(x_dim=16, z_dim=2, hidden=(8,), guide=name)
    x = torch.rand(5, 16).round()
    q = vae.encode(x)
    assert q.event_shape == (2,) and q.batch_shape == (5,)
    z = q.rsample((7,))
    assert z.shape == (7, 5, 2) and q.log_prob(z).shape == (7, 5)
    assert vae.latent_mean(x).shape == (5, 2) and vae.reconstruct(x).shape == (5, 16)
    with torch.no_grad():
        q1 = vae.encode(x[:1])
        points, area = grid_2d(10.0, 801)
        mass = (q1.log_prob(points.unsqueeze(1)).exp().sum() * area).item()
    assert mass == pytest.approx(1.0, abs=0.01)


def test_iaf_log_density_matches_change_of_variables():
    """log q of the guide's own sample = log N(z0) - log|det dz/dz0|, computed here by autograd."""
    vae = pyvae.VAE(x_dim=16, z_dim=3, hidden=(8,), guide=pyvae.parts.guides.IAF(num_flows=2))
    x = torch.rand(1, 16).round()
    q = vae.encode(x)
    z0 = q.base_dist.sample()
    z = push(q, z0)
    jacobian = torch.autograd.functional.jacobian(
        lambda u: push(q, u.unsqueeze(0)).squeeze(0), z0[0]
    )
    expected = q.base_dist.log_prob(z0) - torch.linalg.slogdet(jacobian).logabsdet
    assert torch.allclose(q.log_prob(z), expected, atol=1e-4)


def push(q, u):
    for t in q.transforms:
        u = t(u)
    return u


@pytest.mark.parametrize("guide", GUIDE_NAMES)
@pytest.mark.parametrize("prior", PRIOR_NAMES)
def test_analytic_kl_equals_monte_carlo_kl(guide, prior):
    vae = pyvae.VAE(x_dim=16, z_dim=3, hidden=(8,), guide=guide, prior=prior)
    x = torch.rand(4, 16).round()
    with torch.no_grad():
        q, p = vae.encode(x), vae.prior()
        try:
            analytic = kl_divergence(q, p.expand(q.batch_shape))
        except NotImplementedError:
            pytest.skip(
                f"no analytic KL for guide {guide} and prior {prior} (meanfield falls back to "
                "Monte Carlo)"
            )
        z = q.sample((20000,))
        terms = q.log_prob(z) - p.log_prob(z)
    se = terms.std(0) / math.sqrt(terms.shape[0])
    assert (analytic - terms.mean(0)).abs().max() < 4 * se.max() + 1e-4


def test_meanfield_without_analytic_kl_warns_and_falls_back(digits_small):
    vae = pyvae.VAE(x_dim=64, z_dim=2, hidden=(8,), prior="mog")
    with pytest.warns(
        UserWarning,
        match=r"no analytic KL for latent site z \(the guide's Normal against the prior's "
        r"MixtureSameFamily\); .* Monte Carlo",
    ):
        pyvae.fit(
            vae,
            digits_small,
            epochs=1,
            batch_size=64,
            elbo="meanfield",
            device="cpu",
            progress=False,
        )


@pytest.mark.parametrize(
    "build, chosen",
    [
        (
            lambda: pyvae.VAE(x_dim=64, z_dim=2, hidden=(8,)),
            "meanfield, the analytic KL of every latent site",
        ),
        (
            lambda: pyvae.VAE(x_dim=64, z_dim=2, hidden=(8,), prior="mog"),
            "trace, Monte Carlo KL: torch has no analytic KL for latent site z",
        ),
        (
            lambda: pyvae.HVAE(x_dim=64, z_dims=(4, 2), hidden=((8,), (8,))),
            "trace, Monte Carlo KL: an analytic KL needs a mean-field guide",
        ),
        (
            lambda: pyvae.VAE(x_dim=64, z_dim=2, hidden=(8,), guide="iaf"),
            "trace, Monte Carlo KL: torch has no analytic KL",
        ),
    ],
)
def test_elbo_auto_takes_the_analytic_kl_only_where_it_is_exact(
    digits_small, build, chosen, capsys
):
    torch.manual_seed(0)
    # elbo="auto", the default
    pyvae.fit(build(), digits_small, epochs=1, batch_size=64, device="cpu", progress=True)
    assert f"elbo auto: {chosen}" in capsys.readouterr().out


def test_meanfield_refuses_a_guide_whose_latents_depend_on_each_other(tmp_path, capsys):
    # hvae's guide is q(z1|x) q(z2|z1): analytic KLs are not its ELBO
    with pytest.raises(SystemExit) as info:
        main(
            [
                "train",
                "--dataset",
                "digits",
                "--no-download",
                "--model",
                "hvae",
                "--elbo",
                "meanfield",
                "--epochs",
                "1",
                "--eval-samples",
                "0",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "run"),
            ]
        )
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1
    assert (
        "elbo 'meanfield' needs a mean-field guide" in err
        and "draws z2 given z1" in err
        and "use elbo 'trace'" in err
    )
    assert not (tmp_path / "run").exists()


def test_the_cli_prints_the_meanfield_warning_as_one_line_of_words(tmp_path):
    argv = [
        "train",
        "--dataset",
        "digits",
        "--no-download",
        "--prior",
        "mog",
        "--elbo",
        "meanfield",
        "--epochs",
        "1",
        "--z-dim",
        "2",
        "--hidden",
        "8",
        "--eval-samples",
        "0",
        "--device",
        "cpu",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pyvae", *argv, "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "warning: elbo 'meanfield': torch has no analytic KL for latent site z (the guide's Normal"
        in done.stderr
    )
    assert "UserWarning" not in done.stderr and "PyvaeWarning" not in done.stderr
    # in process, a handler recording warnings still sees it
    with pytest.warns(pyvae.PyvaeWarning, match="no analytic KL"):
        main([*argv, "--out", str(tmp_path / "again")])


# -- every combination trains ---------------------------------------------------------
@pytest.fixture(scope="module")
def digits_small():
    return binarize(load_dataset("digits", "train"), "static").images[:256]


@pytest.fixture(scope="module")
def digits_gray():
    # 8-bit levels, so every likelihood (the discretized logistic too) accepts them
    return (load_dataset("digits", "train").images[:256] * 255).round() / 255


@pytest.mark.parametrize("guide", GUIDE_NAMES)
@pytest.mark.parametrize("prior", PRIOR_NAMES)
@pytest.mark.parametrize("likelihood", LIKELIHOOD_NAMES)
def test_every_combination_trains_to_a_finite_improving_loss(
    guide, prior, likelihood, digits_small, digits_gray
):
    data = digits_small if likelihood == "bernoulli" else digits_gray
    torch.manual_seed(0)
    vamp = {"name": "vamp", "num_components": 10}

    def build(prior):
        return pyvae.VAE(
            x_dim=64, z_dim=2, hidden=(32,), guide=guide, likelihood=likelihood, prior=prior
        )

    vae = build(vamp if prior == "vamp" else prior)
    if prior == "vamp" and guide == "iaf":  # the trap is refused; its fast formulation trains
        with pytest.raises(pyvae.PyvaeError, match="vamp prior under a flow guide inverts"):
            pyvae.fit(vae, data, epochs=1, progress=False)
        vae = build({**vamp, "components": "base"})
    before = pyvae.evaluate_elbo(vae, data, num_particles=4)
    history = pyvae.fit(
        vae, data, epochs=1, batch_size=16, lr=3e-3, device="cpu", seed=0, progress=False
    )
    after = pyvae.evaluate_elbo(vae, data, num_particles=4)
    assert math.isfinite(history[0]["train_elbo"]) and math.isfinite(after)
    assert after > before, (before, after)
    # every parameter gets a gradient from every objective: DistributedDataParallel requires it
    for name in ("trace", "meanfield", "iwae"):
        vae.zero_grad(set_to_none=True)
        Objective(vae, name, 2).loss((data[:8],), len(data)).backward()
        assert [n for n, p in vae.named_parameters() if p.grad is None] == [], name


def test_conv_net_on_28x28_images():
    vae = pyvae.VAE(x_dim=784, z_dim=5, net="conv", likelihood="normal_learned")
    x = torch.rand(3, 784)
    assert vae.encoder(x).shape == (3, 10)
    assert vae.decoder(torch.randn(2, 3, 5)).shape == (2, 3, 784)
    loss = make_elbo("trace", 2).differentiable_loss(vae.model, vae.guide, x)
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(pyvae.PyvaeError, match="net 'conv' needs images"):
        pyvae.VAE(x_dim=30, z_dim=2, net="conv", image_shape=(1, 5, 6))


def test_custom_networks_meet_the_documented_contract():
    encoder = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.ReLU(), torch.nn.Linear(12, 6))
    decoder = torch.nn.Linear(3, 16)
    vae = pyvae.VAE(x_dim=16, z_dim=3, encoder=encoder, decoder=decoder)
    assert vae.encoder is encoder and vae.config["encoder"] == "custom"
    loss = make_elbo("trace", 3).differentiable_loss(
        vae.model, vae.guide, torch.rand(4, 16).round()
    )
    assert torch.isfinite(loss)


# -- objectives ---------------------------------------------------------------------
def test_iwae_with_one_particle_is_the_elbo(digits_small):
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
    x = digits_small[:32]
    pyro.set_rng_seed(1)
    iwae = make_elbo("iwae", 1).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(1)
    elbo = make_elbo("trace", 1).loss(vae.model, vae.guide, x)
    assert iwae == pytest.approx(elbo, rel=1e-6)


def test_iwae_bound_grows_with_k(digits_small):
    torch.manual_seed(0)
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
    pyvae.fit(vae, digits_small, epochs=2, batch_size=32, device="cpu", progress=False)
    x = digits_small[:64]
    bounds = {}
    for k in (1, 5, 50):
        values = torch.tensor(
            [pyvae.evaluate_elbo(vae, x, elbo="iwae", num_particles=k) for _ in range(20)]
        )
        bounds[k] = (values.mean().item(), values.std().item() / math.sqrt(20))
    for small, large in ((1, 5), (5, 50)):
        gap = bounds[large][0] - bounds[small][0]
        assert gap > 3 * math.hypot(bounds[large][1], bounds[small][1]), bounds


def test_iwae_is_per_data_point_not_per_batch():
    """log-mean-exp over particles for each point, then the sum: not over the summed batch."""
    vae = pyvae.VAE(x_dim=16, z_dim=2, hidden=(8,))
    x = torch.rand(8, 16).round()
    elbo = make_elbo("iwae", 5, max_plate_nesting=1)
    model_trace, guide_trace = elbo._get_vectorized_trace(vae.model, vae.guide, (x,), {})
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    log_w = (
        model_trace.nodes["z"]["log_prob"]
        + model_trace.nodes["x"]["log_prob"]
        - guide_trace.nodes["z"]["log_prob"]
    )
    assert log_w.shape == (5, 8)
    per_point = (torch.logsumexp(log_w, 0) - math.log(5)).sum()
    pyro.set_rng_seed(2)
    model_trace, guide_trace = elbo._get_vectorized_trace(vae.model, vae.guide, (x,), {})
    pyro.set_rng_seed(2)
    loss = elbo.loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(2)
    model_trace, guide_trace = elbo._get_vectorized_trace(vae.model, vae.guide, (x,), {})
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    log_w = (
        model_trace.nodes["z"]["log_prob"]
        + model_trace.nodes["x"]["log_prob"]
        - guide_trace.nodes["z"]["log_prob"]
    )
    assert -loss == pytest.approx((torch.logsumexp(log_w, 0) - math.log(5)).sum().item(), rel=1e-5)
    assert -loss != pytest.approx((torch.logsumexp(log_w.sum(1), 0) - math.log(5)).item(), rel=1e-3)
    del per_point


def test_iwae_training_loss_is_the_minibatch_bound_scaled_outside_the_log_mean_exp(digits_small):
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
    x = digits_small[:32]
    pyro.set_rng_seed(6)
    minibatch_bound = -make_elbo("iwae", 5, max_plate_nesting=1).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(6)
    loss = Objective(vae, "iwae", 5).loss((x,), num_data=256)
    assert loss.item() == pytest.approx(-minibatch_bound * 256 / 32, rel=1e-5)
    # its gradient is Pyro's IWAE gradient (RenyiELBO's surrogate), scaled by N/M
    loss.backward()
    ours = [p.grad.clone() for p in vae.parameters()]
    vae.zero_grad()
    pyro.set_rng_seed(6)
    make_elbo("iwae", 5, max_plate_nesting=1).loss_and_grads(vae.model, vae.guide, x)
    for mine, pyros in zip(ours, (p.grad for p in vae.parameters()), strict=True):
        assert torch.allclose(mine, pyros * 256 / 32, rtol=1e-4, atol=1e-3)
    # Pyro's RenyiELBO given the subsampled plate would put N/M inside the log-mean-exp: not the
    # IWAE bound
    pyro.set_rng_seed(6)
    inside = make_elbo("iwae", 5, max_plate_nesting=1).loss(vae.model, vae.guide, x, 256)
    assert inside != pytest.approx(loss.item(), rel=1e-3)


def test_iwae_training_reports_its_bound(digits_small):
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
    (record,) = pyvae.fit(
        vae,
        digits_small,
        test=digits_small[:64],
        epochs=1,
        batch_size=32,
        elbo="iwae",
        num_particles=5,
        device="cpu",
        progress=False,
    )
    assert record["test_iwae"] > record["test_elbo"] - 1.0
    assert -200 < record["train_elbo"] < 0  # nats per point, not a sum over the data set
    with pytest.raises(
        pyvae.PyvaeError, match="beta and kl_warmup_epochs do not apply to elbo 'iwae'"
    ):
        pyvae.fit(vae, digits_small, epochs=1, elbo="iwae", beta=2.0, device="cpu", progress=False)


def test_beta_weights_exactly_the_kl_term(digits_small):
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
    x = digits_small[:16]
    # beta comes from the trainer's handler, not from the model
    objective = Objective(vae, "meanfield")
    losses = {}
    for beta in (1.0, 4.0):
        pyro.set_rng_seed(3)
        losses[beta] = objective.loss((x,), num_data=16, beta=beta).item()
    kl = kl_divergence(vae.encode(x), vae.prior().expand([16])).sum().item()
    assert losses[4.0] - losses[1.0] == pytest.approx(3 * kl, rel=1e-4)


def test_beta_on_named_sites_only(digits_small):
    """kl_sites limits the weight to the sites named; an unknown name is refused."""
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
    x = digits_small[:16]
    pyro.set_rng_seed(3)
    plain = Objective(vae, "meanfield").loss((x,), 16, 1.0).item()
    pyro.set_rng_seed(3)
    other = Objective(vae, "meanfield", kl_sites=["w"]).loss((x,), 16, 4.0).item()
    assert other == pytest.approx(plain, rel=1e-6)
    with pytest.raises(pyvae.PyvaeError, match="kl_sites names 'w', which is not a latent site"):
        pyvae.fit(
            vae, digits_small, epochs=1, beta=2.0, kl_sites=["w"], device="cpu", progress=False
        )


def test_kl_warmup_rises_linearly_to_beta(digits_small):
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(16,))
    history = pyvae.fit(
        vae,
        digits_small,
        epochs=3,
        batch_size=64,
        beta=2.0,
        kl_warmup_epochs=2,
        device="cpu",
        progress=False,
    )
    assert [h["beta"] for h in history] == [
        pytest.approx(1.0),
        pytest.approx(2.0),
        pytest.approx(2.0),
    ]


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_residual_nets_scale_with_the_image(shape):
    x_dim = math.prod(shape)
    vae = pyvae.VAE(
        x_dim=x_dim, z_dim=6, net="resnet", image_shape=shape, likelihood="discretized_logistic"
    )
    assert vae.encoder(torch.rand(3, x_dim)).shape == (3, 12)
    # a particle dimension may lead
    assert vae.decoder(torch.randn(2, 3, 6)).shape == (2, 3, 2 * x_dim)
    stages = pyvae.parts.nets.residual_stages(shape[1], shape[2])
    assert len(stages) == {28: 2, 32: 3, 64: 4}[shape[1]]


def test_a_residual_vae_learns_colour_photo_patches():
    torch.manual_seed(0)
    x = load_dataset("photos", "train").images[:128]
    vae = pyvae.VAE(
        x_dim=3072,
        z_dim=8,
        net="resnet",
        image_shape=(3, 32, 32),
        likelihood="discretized_logistic",
    )
    before = pyvae.evaluate_elbo(vae, x, num_particles=2)
    pyvae.fit(vae, x, epochs=4, batch_size=32, lr=1e-3, device="cpu", seed=0, progress=False)
    # nats per 3072-pixel patch (about 2000 here)
    assert pyvae.evaluate_elbo(vae, x, num_particles=2) > before + 500
    with pytest.raises(
        pyvae.PyvaeError, match="net 'resnet' needs images .* with even H and W above 4"
    ):
        pyvae.VAE(x_dim=27, z_dim=2, net="resnet", image_shape=(3, 3, 3))
