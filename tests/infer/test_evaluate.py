"""Importance-sampled log p(x) against exact answers: probabilistic PCA has a closed form."""

import json
import math

import arviz
import numpy as np
import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Importance

import pyvae
from pyvae.cli.app import COMMANDS, run
from pyvae.infer.diagnostics import active_units, evaluate, mutual_information
from pyvae.infer.importance import iwae_sizes, khat_threshold, log_likelihood
from pyvae.viz import plots

SIGMA = 0.5


def ppca(x_dim=6, z_dim=2, orthogonal=True, seed=0):
    """A linear-Gaussian VAE x = W z + b + sigma eps and its exact log p(x) = log N(x; b, W W^T +
    sigma^2 I)."""
    g = torch.Generator().manual_seed(seed)
    vae = pyvae.VAE(
        x_dim=x_dim, z_dim=z_dim, hidden=(), likelihood=pyvae.parts.likelihoods.Normal(scale=SIGMA)
    )
    w = torch.randn(x_dim, z_dim, generator=g)
    if (
        orthogonal
    ):  # W^T W diagonal: the exact posterior is a diagonal Normal the guide can represent
        w = torch.linalg.qr(w).Q * torch.tensor([2.0, 1.0])
    with torch.no_grad():
        vae.decoder[0].weight.copy_(w)
        vae.decoder[0].bias.copy_(torch.randn(x_dim, generator=g))
    return vae


def exact_log_px(vae, x):
    w, b = vae.decoder[0].weight.detach(), vae.decoder[0].bias.detach()
    cov = w @ w.T + SIGMA**2 * torch.eye(w.shape[0])
    return torch.distributions.MultivariateNormal(b, cov).log_prob(x)


def set_exact_posterior(vae):
    """Encoder weights that make q(z|x) the exact posterior N(S W^T (x - b) / s^2, S), S = (I + W^T
    W / s^2)^-1."""
    w, b = vae.decoder[0].weight.detach().double(), vae.decoder[0].bias.detach().double()
    cov = torch.linalg.inv(torch.eye(w.shape[1], dtype=torch.float64) + w.T @ w / SIGMA**2)
    assert torch.allclose(cov, torch.diag(torch.diag(cov)), atol=1e-5)
    gain = cov @ w.T / SIGMA**2
    raw_scale = torch.log(torch.expm1(torch.diag(cov).sqrt() - vae.posterior.min_scale))
    with torch.no_grad():
        vae.encoder[0].weight.copy_(torch.cat([gain, torch.zeros_like(gain)]))
        vae.encoder[0].bias.copy_(torch.cat([-gain @ b, raw_scale]))


def sample_data(vae, n, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        z = torch.randn(n, vae.z_dim)
        return vae.decoder(z) + SIGMA * torch.randn(n, vae.x_dim)


def test_exact_posterior_gives_constant_weights_and_the_exact_answer():
    vae = ppca()
    set_exact_posterior(vae)
    x = sample_data(vae, 20)
    for k in (1, 7, 500):
        ll = log_likelihood(vae, x, num_samples=k, keep_log_weights=True)
        assert torch.allclose(ll.log_px, exact_log_px(vae, x), atol=2e-4)
        assert torch.allclose(ll.elbo, ll.log_px, atol=2e-4)
        assert torch.allclose(ll.ess, torch.full_like(ll.ess, float(k)), rtol=1e-3)
        spread = ll.log_weights.max(1).values - ll.log_weights.min(1).values
        assert ll.log_weights.shape == (20, k) and float(spread.max()) < 1e-3
        if k >= 5:
            assert float(ll.stderr.max()) < 1e-3
        if k == 1:
            assert torch.isnan(ll.khat).all()  # too few draws to fit a tail
    assert float(ll.khat.max()) < 0.5


def test_trained_guide_agrees_with_the_closed_form():
    vae = ppca(orthogonal=False)
    x = sample_data(vae, 512)
    pyvae.fit(
        vae,
        x,
        epochs=30,
        batch_size=64,
        lr=1e-2,
        elbo="meanfield",
        device="cpu",
        seed=0,
        progress=False,
    )
    points = x[:50]
    pyro.set_rng_seed(
        0
    )  # deterministic whatever ran before: the delta-method error is itself noisy in the tails
    ll = log_likelihood(vae, points, num_samples=2000)
    exact = exact_log_px(vae, points)
    z_scores = (ll.log_px - exact.detach()) / ll.stderr.clamp(min=1e-6)
    assert float(z_scores.abs().max()) < 5, z_scores
    # the mean over points is inside a few of its standard errors (a slight low bias is allowed:
    # it is a lower bound)
    se = float(ll.stderr.pow(2).sum().sqrt() / 50)
    assert abs(float(ll.log_px.mean() - exact.mean())) < 4 * se + 1e-3
    assert float(ll.khat.median()) < khat_threshold(2000)
    assert float(ll.ess.mean()) > 500
    assert float((ll.log_px - ll.elbo).min()) >= 0


def test_wide_guide_still_agrees_and_its_low_ess_says_it_is_poor():
    vae = ppca(orthogonal=False)
    with (
        torch.no_grad()
    ):  # q(z|x) = N(0, 3^2 I) whatever x: covers the posterior, wastes most draws
        vae.encoder[0].weight.zero_()
        vae.encoder[0].bias.copy_(torch.tensor([0.0, 0.0, 3.0, 3.0]))
    x = sample_data(vae, 40)
    ll = log_likelihood(vae, x, num_samples=4000)
    z_scores = (ll.log_px - exact_log_px(vae, x)) / ll.stderr
    assert float(z_scores.abs().max()) < 5
    assert float(ll.ess.mean()) < 0.1 * 4000
    # at this K the weights' tail still spans orders of magnitude: k^ flags the estimate as fragile
    assert float(ll.khat.median()) > khat_threshold(4000)


def test_poor_guide_is_flagged_by_khat_and_ess():
    vae = ppca(orthogonal=False)
    with torch.no_grad():  # a guide far too narrow and centred wrongly
        vae.encoder[0].weight.zero_()
        vae.encoder[0].bias.copy_(torch.tensor([1.5, -1.0, -4.0, -4.0]))
    x = sample_data(vae, 40)
    ll = log_likelihood(vae, x, num_samples=2000)
    exact = exact_log_px(vae, x)
    assert float((ll.khat > khat_threshold(2000)).float().mean()) > 0.9
    assert float(ll.ess.median()) < 20
    # still a lower bound, far below the truth: the diagnostics are what says so
    assert float((ll.log_px - exact).mean()) < -1.0
    assert ll.khat_bands()["very bad"] + ll.khat_bands()["bad"] > 0.9


def test_a_headline_resting_on_bad_weights_says_so():
    vae = ppca(orthogonal=False)
    with torch.no_grad():  # the poor guide above: k^ > threshold on nearly every point
        vae.encoder[0].weight.zero_()
        vae.encoder[0].bias.copy_(torch.tensor([1.5, -1.0, -4.0, -4.0]))
    result = evaluate(vae, sample_data(vae, 40), num_samples=500, dataset="ppca", split="test")
    warning = result.summary()["warning"]
    assert (
        warning.startswith(f"Pareto k^ > {khat_threshold(500):.2f} on")
        and "not to be trusted" in warning
        and "--method ais" in warning
    )
    headline, flagged = result.table().splitlines()[1:3]
    assert headline.lstrip().startswith("log p(x)") and flagged.lstrip().startswith("WARNING")
    few = evaluate(
        vae, sample_data(vae, 40), num_samples=10, dataset="ppca", split="test"
    )  # k^ needs 21 draws
    assert (
        "cannot be estimated from 10 draws" in few.summary()["warning"] and "WARNING" in few.table()
    )
    assert (
        few.summary()["khat_bands"] is None
        and "Pareto k^  not estimated (K = 10 < 21)" in few.table()
    )


def test_a_stochastic_lower_bound_that_rises_with_k():
    vae = ppca(orthogonal=False)
    with torch.no_grad():
        vae.encoder[0].weight.mul_(0.3)
    x = sample_data(vae, 30)
    exact = exact_log_px(vae, x).mean()
    means = {}
    for k in (1, 10, 100):
        runs = torch.stack([log_likelihood(vae, x, num_samples=k).log_px.mean() for _ in range(30)])
        means[k] = (float(runs.mean()), float(runs.std() / math.sqrt(30)))
    assert means[1][0] < means[10][0] < means[100][0] < float(exact) + 3 * means[100][1]
    ll = log_likelihood(vae, x, num_samples=100)
    assert float(ll.elbo.mean()) < float(ll.log_px.mean())


def test_iwae_bounds_come_from_the_same_draws():
    vae = ppca(orthogonal=False)
    x = sample_data(vae, 10)
    ll = log_likelihood(vae, x, num_samples=50, keep_log_weights=True)
    assert sorted(ll.iwae) == iwae_sizes(50) == [1, 5, 10, 50]
    assert torch.allclose(ll.iwae[1], ll.elbo, atol=1e-5)
    assert torch.allclose(ll.iwae[50], ll.log_px, atol=1e-5)
    groups = ll.log_weights.reshape(10, 5, 10)
    assert torch.allclose(
        ll.iwae[10], (torch.logsumexp(groups, 2) - math.log(10)).mean(1), atol=1e-5
    )
    assert iwae_sizes(5000) == [1, 5, 10, 50, 100, 500, 1000, 5000]


def test_khat_is_arviz_psislw_and_chunking_does_not_change_results():
    vae = ppca(orthogonal=False)
    x = sample_data(vae, 12)
    pyro.set_rng_seed(4)
    ll = log_likelihood(vae, x, num_samples=300, keep_log_weights=True)
    _, khat = arviz.psislw(ll.log_weights.double().numpy())
    assert np.allclose(ll.khat.numpy(), khat, atol=1e-5)
    normalized = F.softmax(ll.log_weights.double(), dim=1)
    assert torch.allclose(ll.ess.double(), 1 / (normalized**2).sum(1), rtol=1e-4)
    # the same draws, chunked differently (one point and 7 samples at a time)
    pyro.set_rng_seed(4)
    import pyvae.infer.importance as ev

    budget = ev.CHUNK_ELEMENTS["cpu"]
    ev.CHUNK_ELEMENTS["cpu"] = (
        7 * ev._chunk_shape(vae, (x[:1],), pyvae.program.structure(vae, (x[:1],)))[1]
    )
    try:
        small = log_likelihood(vae, x, num_samples=300, batch_size=1, keep_log_weights=True)
    finally:
        ev.CHUNK_ELEMENTS["cpu"] = budget
    assert small.log_weights.shape == (12, 300)
    # different random streams, same estimator: agreement within Monte Carlo error
    assert float(((small.log_px - ll.log_px).abs() / (ll.stderr + small.stderr + 1e-3)).max()) < 5


def test_agrees_with_pyro_importance_on_one_data_point():
    vae = ppca(orthogonal=False)
    with torch.no_grad():
        vae.encoder[0].weight.mul_(0.5)
    x = sample_data(vae, 1)
    pyro.set_rng_seed(0)
    ours = log_likelihood(vae, x, num_samples=20000)
    pyro.set_rng_seed(1)
    # Pyro runs the program once per draw: fewer draws, and its standard error beside ours (about
    # 0.11 nats at 3000 draws: these weights are heavy-tailed); the two within three of them
    importance = Importance(vae.model, guide=vae.guide, num_samples=3000).run(x)
    theirs = float(importance.get_log_normalizer())
    weights = torch.stack(importance.log_weights).exp()
    theirs_stderr = float(weights.std() / weights.mean()) / math.sqrt(len(weights))
    stderr = math.hypot(float(ours.stderr[0]), theirs_stderr)
    assert abs(float(ours.log_px[0]) - theirs) < 3 * stderr
    assert (
        abs(float(ours.log_px[0]) - float(exact_log_px(vae, x)[0]))
        < 5 * float(ours.stderr[0]) + 1e-3
    )


def test_every_guide_and_prior_is_supported():
    x = torch.rand(6, 16).round()
    for guide in ("normal", "lowrank", "iaf"):
        for prior in ("normal", "mog", {"name": "vamp", "num_components": 5}, "flow", "student_t"):
            vae = pyvae.VAE(x_dim=16, z_dim=3, hidden=(8,), guide=guide, prior=prior)
            ll = log_likelihood(vae, x, num_samples=30)
            assert ll.log_px.shape == (6,) and torch.isfinite(ll.log_px).all()
            assert torch.isfinite(ll.khat).all() and (ll.ess <= 30 + 1e-3).all()


def test_bad_input_is_a_clear_error():
    vae = ppca()
    with pytest.raises(
        pyvae.PyvaeError, match="data has 5 features per point; the VAE expects x_dim=6"
    ):
        log_likelihood(vae, torch.zeros(3, 5))
    with pytest.raises(pyvae.PyvaeError, match="num_samples must be a positive integer; got 0"):
        log_likelihood(vae, torch.zeros(3, 6), num_samples=0)
    bernoulli = pyvae.VAE(x_dim=4, z_dim=2)
    with pytest.raises(pyvae.PyvaeError, match="bernoulli needs 0/1 data"):
        log_likelihood(bernoulli, torch.full((2, 4), 0.5))
    known = "choose from num_steps, num_chains, .*, adapt, compile$"
    with pytest.raises(pyvae.PyvaeError, match=f"unknown AIS setting 'num_stepz'; {known}"):
        pyvae.evaluate(ppca(), torch.zeros(2, 6), num_samples=5, ais={"num_stepz": 20})


def test_posterior_diagnostics():
    vae = ppca()
    set_exact_posterior(vae)
    x = sample_data(vae, 400)
    ll = log_likelihood(vae, x, num_samples=2000)
    kl = ll.kl_per_dim["z"].mean(0)
    q = vae.encode(x)
    total = torch.distributions.kl_divergence(q, vae.prior().expand([400])).mean()
    # Monte Carlo from the importance draws: within a few hundredths of the analytic KL
    assert kl.shape == (2,) and kl.sum().item() == pytest.approx(total.item(), abs=0.02)
    assert ll.kl["z"].mean().item() == pytest.approx(total.item(), abs=0.02)
    count, variance = active_units(q.mean.detach())
    assert count == 2 and (variance > 0.01).all()
    # a dimension the encoder ignores is inactive
    z_mean = torch.cat([q.mean.detach(), torch.full((400, 1), 0.3)], 1)
    assert active_units(z_mean)[0] == 2
    mi = mutual_information(vae, x, max_points=400)
    assert 0 < mi < math.log(400)
    # a guide that hardly depends on x: the one-draw estimate is noise about ~0, below 0 for seeds
    # 0, 2, 3 and 5 before the clamp; it is reported as 0, never negative
    with torch.no_grad():
        vae.encoder[0].weight.mul_(0.01)
    estimates = []
    for seed in range(6):
        pyro.set_rng_seed(seed)
        estimates.append(mutual_information(vae, x, max_points=400))
    assert min(estimates) >= 0 and estimates.count(0.0) >= 3 and max(estimates) < 0.1
    with torch.no_grad():  # a guide that ignores x carries no information
        vae.encoder[0].weight.zero_()
    assert 0 <= mutual_information(vae, x, max_points=400) < 1e-6
    # no factorized marginals: no per-dimension KL
    lowrank = log_likelihood(
        pyvae.VAE(x_dim=6, z_dim=2, guide="lowrank"), torch.rand(4, 6).round(), num_samples=10
    )
    assert "z" not in lowrank.kl_per_dim and "z" in lowrank.kl


def test_evaluation_report_and_files(tmp_path):
    vae = ppca()
    set_exact_posterior(vae)
    x = sample_data(vae, 30)
    result = evaluate(vae, x, num_samples=100, dataset="ppca", split="test")
    summary = result.summary()
    assert summary["log_px"] == pytest.approx(float(exact_log_px(vae, x).mean()), abs=1e-3)
    assert (
        summary["gap"] == pytest.approx(0, abs=1e-3)
        and summary["latent_sites"]["z"]["active_units"] == 2
    )
    assert "log p(x)" in result.table() and "Pareto k^" in result.table()
    assert summary["warning"] is None and "WARNING" not in result.table()
    assert result.write(tmp_path) == ["eval.json", "eval.nc"]
    assert plots.evaluation(result, tmp_path) == ["khat.png", "iwae_curve.png", "kl_per_dim.png"]
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["num_samples"] == 100 and saved["khat_bands"]["good"] == 1.0
    idata = arviz.from_netcdf(tmp_path / "eval.nc")
    assert np.allclose(idata.importance_sampling["log_px"].values, result.ll.log_px.numpy())
    for name in ("khat.png", "iwae_curve.png", "kl_per_dim.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_an_evaluation_without_a_dataset_name_has_a_header():
    vae = ppca()
    table = evaluate(vae, sample_data(vae, 12), num_samples=20).table()
    assert table.startswith("evaluation: 12 points, K = 20 importance samples")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from pyvae.data.datasets import binarize, load_dataset

    out = tmp_path_factory.mktemp("run")
    train = binarize(load_dataset("digits", "train"), "static")
    vae = pyvae.VAE(x_dim=64, z_dim=4, hidden=(32,))
    pyvae.fit(vae, train, epochs=2, batch_size=64, device="cpu", out=out, progress=False)
    (out / "config.yaml").write_text("dataset: digits\nbinarize: dynamic\nseed: 0\n")
    return out


def test_evaluate_command(trained_run, capsys):
    evaluate_main = COMMANDS["evaluate"]

    out = trained_run / "ev"
    run(
        evaluate_main,
        [
            str(trained_run),
            "--num-samples",
            "50",
            "--num-points",
            "40",
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
    )
    printed = capsys.readouterr().out
    assert "digits test: 40 points, K = 50" in printed and "log p(x)" in printed
    summary = json.loads((out / "eval.json").read_text())
    assert (
        summary["num_points"] == 40
        and summary["log_px"] < 0
        and summary["log_px"] >= summary["elbo"]
    )
    assert set(summary["khat_bands"]) == {"good", "ok", "bad", "very bad"}
    for name in ("eval.nc", "khat.png", "iwae_curve.png", "kl_per_dim.png"):
        assert (out / name).is_file()
    # without a best.pt the last epoch is the run's one checkpoint: its default folder has no -last
    run(
        evaluate_main,
        [str(trained_run), "--num-samples", "5", "--num-points", "4", "--checkpoint", "last"],
    )
    assert (trained_run / "eval-digits-test-K5" / "eval.json").is_file()


def test_evaluate_accepts_image_sets():
    from pyvae.data.datasets import binarize, load_dataset

    gray = load_dataset("digits", "test")
    vae = pyvae.VAE(x_dim=64, z_dim=2, hidden=(8,))
    result = evaluate(vae, binarize(gray, "dynamic"), num_samples=30)  # one draw of the dynamic set
    assert len(result.ll) == len(gray) and math.isfinite(result.summary()["log_px"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nowhere"], "nowhere is neither a run folder with checkpoint.pt nor a checkpoint file"),
        (["RUN", "--num-samples", "0"], "--num-samples must be a positive integer; got 0"),
        (["RUN", "--split", "valid"], "dataset 'digits' has no split 'valid'"),
        (["RUN", "--dataset", "cifar"], "unknown dataset 'cifar'"),
        (["RUN", "--broken-config"], "is not valid YAML"),
    ],
)
def test_evaluate_command_bad_input(trained_run, capsys, argv, message):
    evaluate_main = COMMANDS["evaluate"]

    if argv == ["RUN", "--broken-config"]:
        broken = trained_run.parent / "broken"
        broken.mkdir(exist_ok=True)
        (broken / "checkpoint.pt").write_bytes((trained_run / "checkpoint.pt").read_bytes())
        (broken / "config.yaml").write_text("dataset: [digits\n")
        argv = [str(broken)]
    argv = [str(trained_run) if a == "RUN" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        run(evaluate_main, argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_bits_per_dimension_for_8_bit_likelihoods(capsys):
    from pyvae.parts.likelihoods import bits_per_dim

    assert bits_per_dim(-64 * math.log(256), 64) == pytest.approx(
        8.0
    )  # a uniform mass over 8-bit pixels
    torch.manual_seed(0)
    x = torch.randint(0, 256, (12, 16)).float() / 255
    eight_bit = pyvae.VAE(x_dim=16, z_dim=2, hidden=(8,), likelihood="discretized_logistic")
    s = evaluate(eight_bit, x, num_samples=20).summary()
    assert (
        s["bits_per_dim"] == pytest.approx(-s["log_px"] / (16 * math.log(2)))
        and s["bits_per_dim_levels"] == 256
    )
    assert "bits/dim" in evaluate(eight_bit, x, num_samples=20).table()
    # every epoch's ELBOs and log p(x) too, saved and printed
    (record,) = pyvae.fit(
        eight_bit, x, test=x, valid=x[:6], valid_samples=10, epochs=1, batch_size=4, device="cpu"
    )
    for key in ("train_elbo", "test_elbo", "valid_elbo", "valid_log_px"):
        assert record[f"{key}_bpd"] == pytest.approx(-record[key] / (16 * math.log(2)))
    printed = capsys.readouterr().out
    bits = "  ".join(
        f"{label} {record[f'{key}_bpd']:.4f}"
        for key, label in [
            ("train_elbo", "train"),
            ("test_elbo", "test"),
            ("valid_elbo", "valid"),
            ("valid_log_px", "valid log p(x)"),
        ]
    )
    assert f"nats/point  bits/dim (256 levels) {bits}  lr" in printed, printed
    # a density on [0, 1] is not a code length, and binary images are not reported in bits: none
    assert (
        "bits_per_dim"
        not in evaluate(
            pyvae.VAE(x_dim=16, z_dim=2, hidden=(8,), likelihood="normal"), x, num_samples=20
        ).summary()
    )
    assert (
        "bits_per_dim"
        not in evaluate(
            pyvae.VAE(x_dim=16, z_dim=2, hidden=(8,)), x.round(), num_samples=20
        ).summary()
    )
