"""BDMC and the inference-gap decomposition against probabilistic PCA's closed form."""

import json

import pytest
import torch

import pyvae
from pyvae.cli.app import main
from pyvae.infer.bdmc import bdmc, simulate
from pyvae.infer.explore import prior_images, reconstructions
from pyvae.infer.gap import inference_gap
from tests.infer.test_evaluate import exact_log_px, ppca

FAST = {"num_chains": 8, "leapfrog_steps": 5}


def test_simulated_data_come_from_the_model():
    vae = ppca()
    (x,), latents = simulate(vae, (torch.zeros(4000, 6),), seed=0)
    w, b = vae.decoder[0].weight.detach(), vae.decoder[0].bias.detach()
    assert latents["z"].shape == (4000, 2) and torch.allclose(
        latents["z"].std(0), torch.ones(2), atol=0.05
    )
    assert torch.allclose(x.mean(0), b, atol=0.1) and torch.allclose(
        torch.cov(x.T), w @ w.T + 0.25 * torch.eye(6), atol=0.25
    )
    again, _ = simulate(vae, (torch.zeros(4000, 6),), seed=0)
    assert torch.equal(x, again[0])


def test_bdmc_sandwiches_the_exact_log_likelihood_and_closes_with_t():
    vae = ppca(orthogonal=False)  # a random encoder: the forward path starts far from the posterior
    result = bdmc(vae, (torch.zeros(10, 6),), num_steps=300, **FAST)
    (x,), _ = simulate(vae, (torch.zeros(10, 6),), seed=0)
    exact = exact_log_px(vae, x).mean()
    s = result.summary()
    assert set(s["by_num_steps"]) == {"30", "300"}
    coarse, fine = s["by_num_steps"]["30"], s["by_num_steps"]["300"]
    assert coarse["lower"] < exact < coarse["upper"]
    assert (
        0 <= fine["gap"] < coarse["gap"] / 2 and fine["lower"] - 0.05 < exact < fine["upper"] + 0.05
    )
    assert len(s["per_point"]["lower"]) == 10


def test_the_gap_splits_into_approximation_and_amortization(tmp_path):
    # W with orthogonal columns: the exact posterior is a diagonal Normal, a member of the guide's
    # family, so the best guide for each point is exact (approximation gap 0) and the random
    # encoder's whole gap is amortization
    vae = ppca(orthogonal=True)
    (x,), _ = simulate(vae, (torch.zeros(3, 6),), seed=0)
    result = inference_gap(
        vae, x, ais={"num_steps": 200, **FAST}, num_samples=2000, local_steps=3000, lr=2e-2
    )
    s = result.summary()
    exact = exact_log_px(vae, x)
    assert torch.allclose(result.elbo_local, exact, atol=0.05), result.elbo_local - exact
    assert abs(s["approximation_gap"]) < 0.1 and s["amortization_gap"] > 1
    assert s["inference_gap"] == pytest.approx(
        s["approximation_gap"] + s["amortization_gap"], abs=1e-6
    )
    assert (result.elbo_amortized < result.elbo_local).all()
    # an approximation gap of ~0 (or below): the table says it cannot be told from noise
    table = result.table()
    assert "within noise: the approximation gap" in table and "amortization gap 1" not in table
    assert "within noise: the amortization gap" not in table
    assert s["notes"] and s["approximation_gap_stderr"] > 0
    assert result.write(tmp_path) == ["gap.json", "eval.nc"]
    assert json.loads((tmp_path / "gap.json").read_text())["notes"] == s["notes"]


def test_bdmc_and_the_gap_of_an_8_bit_likelihood_also_in_bits_per_dimension():
    import math

    import pyvae

    torch.manual_seed(0)
    vae = pyvae.VAE(x_dim=16, z_dim=2, hidden=(8,), likelihood="discretized_logistic")
    in_bits = lambda nats: pytest.approx(-nats / (16 * math.log(2)))  # noqa: E731
    s = bdmc(vae, (torch.zeros(4, 16),), num_steps=20, ladder=False, **FAST).summary()
    assert s["bits_per_dim"] == {"lower": in_bits(s["lower"]), "upper": in_bits(s["upper"])}
    assert (
        "bits/dim (256 levels)"
        in bdmc(vae, (torch.zeros(4, 16),), num_steps=20, ladder=False, **FAST).table()
    )
    x = torch.randint(0, 256, (2, 16)).float() / 255
    result = inference_gap(vae, x, ais={"num_steps": 20, **FAST}, num_samples=50, local_steps=20)
    s = result.summary()
    assert s["bits_per_dim"] == {
        k: in_bits(s[k]) for k in ("log_px", "elbo_local", "elbo_amortized")
    }
    assert s["bits_per_dim_levels"] == 256 and "bits/dim (256 levels)  log p(x)" in result.table()
    assert (
        "bits_per_dim"
        not in bdmc(ppca(), (torch.zeros(2, 6),), num_steps=10, ladder=False, **FAST).summary()
    )  # a density


def test_the_bdmc_and_gap_commands(run_folder, capsys):
    main(
        [
            "bdmc",
            str(run_folder),
            "--num-points",
            "6",
            "--num-steps",
            "100",
            "--num-chains",
            "4",
            "--leapfrog-steps",
            "3",
        ]
    )
    printed = capsys.readouterr().out
    assert "BDMC on 6 points simulated from the model" in printed and "T=100" in printed
    summary = json.loads((run_folder / "bdmc-T100-C4" / "bdmc.json").read_text())
    assert summary["upper"] >= summary["lower"] - 0.5 and summary["gap"] == pytest.approx(
        summary["upper"] - summary["lower"]
    )
    assert (run_folder / "bdmc-T100-C4" / "bdmc.png").stat().st_size > 0
    main(
        [
            "gap",
            str(run_folder),
            "--num-points",
            "2",
            "--num-steps",
            "50",
            "--num-chains",
            "4",
            "--local-steps",
            "400",
            "--num-samples",
            "200",
            "--out",
            str(run_folder / "gap"),
        ]
    )
    assert "approximation gap" in capsys.readouterr().out
    summary = json.loads((run_folder / "gap" / "gap.json").read_text())
    assert summary["num_points"] == 2 and summary["amortization_gap"] > -0.5
    assert (run_folder / "gap" / "eval.nc").stat().st_size > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bdmc", "RUN", "--num-steps", "0"], "--num-steps must be a positive integer; got 0"),
        (["gap", "RUN", "--num-chains", "0"], "--num-chains must be a positive integer; got 0"),
        (
            ["bdmc", "nowhere"],
            "nowhere is neither a run folder with checkpoint.pt nor a checkpoint file",
        ),
        (["gap", "RUN", "--local-steps", "-3"], "--local-steps must be a positive integer; got -3"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(run_folder, tmp_path, capsys, argv, message):
    argv = [str(run_folder) if a == "RUN" else a for a in argv]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


#: every way of scoring or looking at a trained model, on a model ``m`` and its points ``x``
EVALUATIONS = {
    "log_likelihood": lambda m, x: pyvae.log_likelihood(m, x, num_samples=10),
    "evaluate": lambda m, x: pyvae.evaluate(m, x, num_samples=10),
    "evaluate_elbo": lambda m, x: pyvae.evaluate_elbo(m, x),
    "ais": lambda m, x: pyvae.ais_log_likelihood(m, x, num_steps=10, **FAST),
    "bdmc": lambda m, x: bdmc(m, (x,), num_steps=10, ladder=False, **FAST),
    "gap": lambda m, x: inference_gap(
        m, x, ais={"num_steps": 10, **FAST}, num_samples=20, local_steps=5
    ),
    "reconstructions": lambda m, x: reconstructions(m, x),
    "prior_images": lambda m, x: prior_images(m, 4),
}


@pytest.mark.parametrize("name", list(EVALUATIONS))
def test_an_evaluation_runs_in_evaluation_mode_and_leaves_the_model_as_it_was(name):
    """A network that normalizes by batch is evaluated with its running statistics, which no
    evaluation updates (and a look at one point works); afterwards each submodule is in the mode
    it was in: a model scored mid-training goes on training."""
    torch.manual_seed(0)
    normalized = torch.nn.Sequential(torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 4))
    vae = pyvae.VAE(x_dim=6, z_dim=2, hidden=(8,), likelihood="normal", encoder=normalized)
    vae.train()
    vae.decoder.eval()  # a part its user froze
    modes = {part: module.training for part, module in vae.named_modules()}
    before = [b.clone() for b in normalized.buffers()]
    EVALUATIONS[name](vae, torch.randn(4, 6))
    assert {part: module.training for part, module in vae.named_modules()} == modes
    assert all(torch.equal(b, a) for b, a in zip(before, normalized.buffers(), strict=True))
