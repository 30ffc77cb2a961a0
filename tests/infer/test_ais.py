"""Annealed importance sampling against closed forms: probabilistic PCA and a two-layer
linear-Gaussian hierarchy."""

import json
import math
import warnings

import arviz
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import pyvae
from pyvae.cli.app import main
from pyvae.infer.ais import ais_log_likelihood, reverse_ais, schedule
from tests.devices import DEVICES
from tests.infer.test_evaluate import exact_log_px, ppca, sample_data
from tests.program.test_program import TwoLayer

FAST = {"num_chains": 8, "leapfrog_steps": 5}


def errors(result, exact):
    return (result.log_px - exact).abs()


def test_agrees_with_probabilistic_pca_and_its_error_shrinks_with_t():
    vae = ppca(orthogonal=False)  # a random encoder: a poor proposal, so annealing has work to do
    x = sample_data(vae, 12)
    exact = exact_log_px(vae, x)
    coarse = ais_log_likelihood(vae, x, num_steps=5, **FAST)
    fine = ais_log_likelihood(vae, x, num_steps=300, **FAST)
    assert (errors(fine, exact) <= 4 * fine.stderr + 0.05).all(), errors(fine, exact).max()
    assert errors(fine, exact).mean() < errors(coarse, exact).mean() / 3
    # a stochastic lower bound: on average below the truth, never far above it
    assert (coarse.log_px - exact).mean() < 0
    # a step size near the edge of stability diverges now and then: rejected, counted, rare
    assert (
        fine.acceptance.min() > 0.3
        and fine.divergences.sum() < 0.01 * 300 * 8
        and fine.failed_chains.sum() == 0
    )
    ll = pyvae.log_likelihood(vae, x, num_samples=500)
    assert errors(fine, exact).mean() < errors(ll, exact).mean()  # better than IS with this guide


def test_an_ais_result_writes_its_summary_and_per_point_values(tmp_path):
    vae = ppca()
    result = ais_log_likelihood(vae, sample_data(vae, 5), num_steps=10, **FAST)
    assert result.write(tmp_path) == ["ais.json", "ais.nc"]
    saved = json.loads((tmp_path / "ais.json").read_text())
    assert saved == pytest.approx(result.summary()) and saved["num_points"] == 5
    assert saved["log_px"] == pytest.approx(float(result.log_px.double().mean()))
    per_point = arviz.from_netcdf(tmp_path / "ais.nc").ais
    assert per_point["log_weights"].shape == (5, 8)
    assert result.table().startswith("AIS on 5 points: T = 10, 8 chains, 5 leapfrog steps")


def test_the_prior_path_and_a_hierarchy_with_a_dependent_guide():
    torch.manual_seed(3)
    vae = ppca(orthogonal=False)
    x = sample_data(vae, 8)
    prior = ais_log_likelihood(vae, x, num_steps=300, start="prior", **FAST)
    assert (errors(prior, exact_log_px(vae, x)) <= 4 * prior.stderr + 0.05).all()
    model = TwoLayer()  # q(z1|x) q(z2|z1): the guide is run again at every step
    x = torch.randn(8, 5)
    result = ais_log_likelihood(model, x, num_steps=300, **FAST)
    exact = model.exact(x).detach()
    assert (errors(result, exact) <= 4 * result.stderr + 0.05).all(), errors(result, exact).max()


def test_reverse_ais_from_exact_draws_bounds_log_px_from_above():
    vae = ppca(orthogonal=False)
    torch.manual_seed(1)
    z = torch.randn(10, vae.z_dim)
    with torch.no_grad():
        x = vae.decoder(z) + 0.5 * torch.randn(10, vae.x_dim)
    exact = exact_log_px(vae, x)
    lower = ais_log_likelihood(vae, x, num_steps=20, **FAST)
    upper = reverse_ais(vae, x, {"z": z}, num_steps=20, **FAST)
    assert (lower.log_px - exact).mean() < 0 < (upper.log_px - exact).mean()
    close = reverse_ais(vae, x, {"z": z}, num_steps=300, **FAST)
    assert (close.log_px - exact).mean() < (upper.log_px - exact).mean()


def test_results_depend_on_the_point_not_on_its_chunk():
    vae = ppca(orthogonal=False)
    x = sample_data(vae, 10)
    whole = ais_log_likelihood(vae, x, num_steps=20, **FAST)
    chunked = ais_log_likelihood(vae, x, num_steps=20, batch_size=3, **FAST)
    assert torch.allclose(whole.log_px, chunked.log_px, atol=1e-4)
    alone = ais_log_likelihood(vae, x[4:7], num_steps=20, point_ids=torch.arange(4, 7), **FAST)
    assert torch.allclose(whole.log_px[4:7], alone.log_px, atol=1e-4)
    other_seed = ais_log_likelihood(vae, x, num_steps=20, seed=1, **FAST)
    assert not torch.allclose(whole.log_weights, other_seed.log_weights)


class Cliff(nn.Module):
    """z ~ N(0, 2^2); x ~ N(z, 1), but the likelihood is NaN where z > 3: chains that start there
    fail."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def model(self, x, num_data=None):
        with pyvae.program.data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(1), 2.0).to_event(1))
            loc = torch.where(z > 3, torch.full_like(z, math.nan), z)
            with pyro.validation_enabled(False):
                pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide(self, x, num_data=None):
        with pyvae.program.data_plate(x, num_data):
            pyro.sample("z", dist.Normal(torch.zeros(1), 2.0).to_event(1))


class Reads(nn.Module):
    """PPCA-like, but the model's Python reads the latents' values: a recorded graph would freeze
    what it read."""

    READS = {
        "a branch": lambda z: z if z.sum() > 0 else -z,
        "float()": lambda z: (
            z + 0.1 * float(z.detach().sum())
        ),  # (an .item() that only feeds tensor arithmetic is recorded)
        ".tolist()": lambda z: z + 0.1 * torch.tensor(z.sum(1).tolist())[:, None],
        ".numpy()": lambda z: z + 0.1 * torch.from_numpy(z.detach().numpy().copy()),
        "len() of a mask": lambda z: (
            z + 0.1 * len(z[z > 0])
        ),  # (a .shape that only feeds arithmetic is recorded)
    }

    def __init__(self, how="a branch"):
        super().__init__()
        self.w, self.read = nn.Parameter(torch.ones(2)), self.READS[how]

    def model(self, x, num_data=None):
        with pyvae.program.data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.read(z) * self.w, 1.0).to_event(1), obs=x)

    def guide(self, x, num_data=None):
        with pyvae.program.data_plate(x, num_data):
            pyro.sample("z", dist.Normal(x / 2, 0.8).to_event(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["guide", "prior", "dependent guide"])
def test_compiled_ais_gives_the_programs_numbers(case, device, recwarn, untuned):
    torch.manual_seed(4)
    if case == "dependent guide":
        model, x, start = TwoLayer(), torch.randn(6, 5), "guide"
        exact = model.exact(x).detach()
    else:
        model, start = ppca(orthogonal=False), case
        x = sample_data(model, 6)
        exact = exact_log_px(model, x)
    settings = dict(num_steps=200, start=start, device=device, **FAST)
    compiled = ais_log_likelihood(model, x, compile=True, **settings)
    as_written = ais_log_likelihood(model, x, **settings)
    assert not [w for w in recwarn if issubclass(w.category, pyvae.PyvaeWarning)]  # it did compile
    assert compiled.settings["compile"] and not as_written.settings["compile"]
    assert compiled.compiled.all() and not as_written.compiled.any()
    # the same chains to float rounding (fusion reorders sums), so the same estimate; on a GPU,
    # whose kernels round otherwise, an HMC acceptance may flip: the same estimate to its error
    apart = 1e-3 if device == "cpu" else 4 * compiled.stderr + 0.05
    assert ((compiled.log_px - as_written.log_px).abs() <= apart).all(), (
        (compiled.log_px - as_written.log_px).abs().max()
    )
    assert (errors(compiled, exact) <= 4 * compiled.stderr + 0.05).all()


def test_compiled_ais_runs_the_program_only_to_record_and_check_it(count_calls, recwarn, untuned):
    """Every leapfrog step, inside a trajectory (gradients alone) or at its end, calls a compiled
    graph."""
    calls = count_calls(pyvae.infer.ais.potential.Potential, "densities")
    model = ppca(orthogonal=False)
    result = ais_log_likelihood(model, sample_data(model, 4), num_steps=50, compile=True, **FAST)
    assert result.compiled.all() and not [
        w for w in recwarn if issubclass(w.category, pyvae.PyvaeWarning)
    ]
    assert len(calls) <= 4  # two recordings and one check, against 49 x 5 evaluations as written


def test_a_gradients_graph_that_cannot_compile_leaves_the_chains_as_written(monkeypatch, untuned):
    from pyvae.compiled import NotCompiled

    compile_function = pyvae.infer.ais.potential.compile_function

    def refuse_gradients(fn, *args, **kwargs):
        if fn.__name__ == "densities_gradients":
            raise NotCompiled("refused by the test")
        return compile_function(fn, *args, **kwargs)

    monkeypatch.setattr(pyvae.infer.ais.potential, "compile_function", refuse_gradients)
    model = ppca(orthogonal=False)
    x = sample_data(model, 4)
    with pytest.warns(
        pyvae.PyvaeWarning, match="AIS runs the program uncompiled: refused by the test"
    ) as warned:
        compiled = ais_log_likelihood(model, x, num_steps=10, compile=True, **FAST)
    assert warned[0].filename == __file__  # at the user's call, not inside pyvae
    as_written = ais_log_likelihood(model, x, num_steps=10, **FAST)
    assert torch.equal(compiled.log_weights, as_written.log_weights) and not compiled.compiled.any()


@pytest.mark.parametrize("how", list(Reads.READS))
def test_a_program_whose_python_reads_its_latents_runs_uncompiled_and_says_so(how):
    x = torch.randn(5, 2)
    with pytest.warns(
        pyvae.PyvaeWarning,
        match="AIS runs the program uncompiled: its Python reads the value of a tensor it computed",
    ):
        compiled = ais_log_likelihood(Reads(how), x, num_steps=10, compile=True, **FAST)
    as_written = ais_log_likelihood(Reads(how), x, num_steps=10, **FAST)
    assert torch.equal(compiled.log_weights, as_written.log_weights) and not compiled.compiled.any()


def pyvae_warnings(call):
    """(call(), the PyvaeWarnings it issued, repeats included)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = call()
    return value, [w for w in caught if issubclass(w.category, pyvae.PyvaeWarning)]


def test_a_program_that_cannot_compile_is_warned_about_once_per_evaluation():
    x = torch.randn(70, 2)  # two chunks of the evaluation grid, at T = 10 and 100
    result, said = pyvae_warnings(
        lambda: pyvae.evaluate(
            Reads(".tolist()"), x, num_samples=20, ais={"num_steps": 100, "compile": True, **FAST}
        )
    )
    assert len(said) == 1 and "uncompiled" in str(said[0].message)
    summary = result.summary()
    assert (
        summary["ais"]["compile"] and summary["ais"]["compiled_points"] == 0
    )  # asked for, and what happened
    assert "(compiled for 0 of 70 points)" in result.table()
    sandwich, said = pyvae_warnings(
        lambda: pyvae.infer.bdmc.bdmc(
            Reads(".tolist()"), (torch.zeros(6, 2),), num_steps=100, compile=True, **FAST
        )
    )
    assert len(said) == 1  # forward and reverse, T = 10 and 100
    assert sandwich.summary()["compiled_points"] == {"forward": 0, "reverse": 0}


def test_without_a_c_compiler_ais_runs_as_written_and_says_why():
    model = ppca(
        x_dim=7, orthogonal=False
    )  # a shape no other test compiles: no compiled graph to reuse
    x = sample_data(model, 3)
    no_compiler = torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/c++",)})
    with (
        no_compiler,
        pytest.warns(
            pyvae.PyvaeWarning,
            match=r"AIS runs the program uncompiled: torch.compile failed: .*C\+\+ compiler",
        ),
    ):
        compiled = ais_log_likelihood(model, x, num_steps=10, compile=True, **FAST)
    as_written = ais_log_likelihood(model, x, num_steps=10, **FAST)
    assert torch.equal(compiled.log_weights, as_written.log_weights) and not compiled.compiled.any()


def test_compile_function_reuses_one_compilation_for_the_same_code():
    from pyvae import compiled

    weight = torch.randn(3, 4)

    def energy(u, data):
        u = u.detach().requires_grad_(True)
        with torch.enable_grad():
            value = torch.nn.functional.softplus(u @ weight).sum(1) - (u * data).sum(1)
            return value.detach(), torch.autograd.grad(value.sum(), u)[0]

    u, ones, twos = torch.randn(5, 3), torch.ones(5, 3), torch.full((5, 3), 2.0)
    first = compiled.compile_function(lambda v: energy(v, ones), u)
    before = len(compiled._compiled)
    other = compiled.compile_function(
        lambda v: energy(v, twos), u
    )  # other data: an input of the same graph, not baked in
    assert len(compiled._compiled) == before
    for fn, data in ((first, ones), (other, twos)):
        for mine, theirs in zip(fn(u), energy(u, data), strict=True):
            assert torch.allclose(mine, theirs, atol=1e-5)


def test_compiled_graphs_on_a_cpu_compute_log1p_from_log_to_float_rounding():
    from pyvae import compiled

    x = torch.cat([torch.logspace(-40, 38, 20001), -torch.logspace(-40, 0, 10001)[:-1]])
    exact = torch.log1p(x.double())
    as_compiled = compiled.compile_function(
        lambda v: (compiled.log1p(v),), x
    )  # the compiler must not fold (1 + x) - 1 to x
    for mine in (compiled.log1p(x), as_compiled(x)[0]):
        assert (
            (mine.double() - exact).abs() <= 2 * torch.finfo(torch.float32).eps * exact.abs()
        ).all()
    specials = torch.tensor([0.0, -1.0, math.inf, -math.inf, math.nan, -2.0])
    assert torch.allclose(compiled.log1p(specials), torch.log1p(specials), equal_nan=True)
    weight, x01 = torch.randn(3, 6), (torch.rand(5, 6) < 0.4).float()

    def energy(
        u,
    ):  # softplus, the Bernoulli log-mass, logaddexp and log1p itself: values and gradients
        u = u.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = torch.nn.functional.softplus(u @ weight) - 1
            value = (
                dist.Bernoulli(logits=logits, validate_args=False).log_prob(x01).sum(1)
                + torch.logaddexp(u, -u).sum(1)
                + torch.log1p(u**2).sum(1)
            )
            return value.detach(), torch.autograd.grad(value.sum(), u)[0]

    u = torch.randn(5, 3)
    graph, _, _ = compiled.record(energy, u, decompositions=compiled.CPU_DECOMPOSITIONS)
    assert (
        "log1p" not in graph.code
        and "softplus.default" not in graph.code
        and "softplus_backward" in graph.code
    )  # the gradients' own formulas
    for mine, theirs in zip(compiled.compile_function(energy, u)(u), energy(u), strict=True):
        assert torch.allclose(mine, theirs, rtol=1e-5, atol=1e-5)


def test_compiled_ais_of_a_softplus_bernoulli_vae_gives_the_programs_numbers(recwarn):
    torch.manual_seed(5)
    model = pyvae.VAE(12, 3, hidden=(8,))
    x = (torch.rand(5, 12) < 0.4).float()
    compiled = ais_log_likelihood(model, x, num_steps=100, compile=True, **FAST)
    as_written = ais_log_likelihood(model, x, num_steps=100, **FAST)
    assert compiled.compiled.all() and not [
        w for w in recwarn if issubclass(w.category, pyvae.PyvaeWarning)
    ]
    assert torch.allclose(compiled.log_px, as_written.log_px, atol=1e-3), (
        (compiled.log_px - as_written.log_px).abs().max()
    )


def test_compiled_ais_follows_the_model_s_weights_when_they_change(recwarn, untuned):
    model = ppca(orthogonal=False)
    x = sample_data(model, 6)
    before = ais_log_likelihood(model, x, num_steps=20, compile=True, **FAST)
    with torch.no_grad():  # as a training step would: in place
        model.decoder[0].weight.mul_(1.5)
    after = ais_log_likelihood(model, x, num_steps=20, compile=True, **FAST)
    as_written = ais_log_likelihood(model, x, num_steps=20, **FAST)
    assert (
        not [w for w in recwarn if issubclass(w.category, pyvae.PyvaeWarning)]
        and after.compiled.all()
    )
    assert torch.allclose(after.log_px, as_written.log_px, atol=1e-3)
    assert (after.log_px - before.log_px).abs().min() > 0.01  # not the weights compiled in before


@pytest.mark.parametrize("compile", [False, True])
def test_failed_chains_are_reported_not_averaged_in(compile, recwarn, untuned):
    result = ais_log_likelihood(
        Cliff(), torch.zeros(6, 1), num_steps=10, num_chains=16, leapfrog_steps=3, compile=compile
    )
    assert not [
        w for w in recwarn if issubclass(w.category, pyvae.PyvaeWarning)
    ]  # NaN densities compile like any other
    assert result.failed_chains.sum() > 0 and torch.isfinite(result.log_px).all()
    finite = torch.isfinite(result.log_weights)
    expected = (
        torch.logsumexp(result.log_weights.masked_fill(~finite, -math.inf), 1) - finite.sum(1).log()
    )
    assert torch.allclose(result.log_px, expected)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_steps": 0}, "num_steps must be a positive integer; got 0"),
        ({"num_chains": -1}, "num_chains must be a positive integer; got -1"),
        ({"schedule": "cosine"}, "unknown AIS schedule 'cosine'; choose from sigmoid, linear"),
        ({"start": "posterior"}, "unknown AIS start 'posterior'; choose from guide, prior"),
        ({"compile": "yes"}, "compile must be True or False; got 'yes'"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    vae = ppca()
    with pytest.raises(pyvae.PyvaeError, match=message):
        ais_log_likelihood(vae, torch.zeros(2, 6), **{"num_steps": 5, **kwargs})


def test_a_model_with_discrete_latents_is_sent_to_importance_sampling():
    m2 = pyvae.M2(x_dim=16, num_classes=3, z_dim=2, hidden=(8,))
    x = (torch.rand(4, 16) > 0.5).float(), torch.full((4,), -1)
    with pytest.raises(
        pyvae.PyvaeError, match="site 'y' is discrete: score this model by importance sampling"
    ):
        ais_log_likelihood(m2, x, num_steps=5)


def test_the_sigmoid_schedule():
    b = schedule(100)
    assert b[0] == 0 and b[-1] == 1 and (b[1:] > b[:-1]).all()
    assert b[1] - b[0] < 1 / 100 and b[51] - b[50] > 1 / 100  # small steps at the ends


def test_the_evaluate_command_scores_by_ais_beside_is(run_folder, capsys, untuned):
    out = run_folder / "ais"
    main(
        [
            "evaluate",
            str(run_folder),
            "--method",
            "ais",
            "--num-steps",
            "100",
            "--num-chains",
            "4",
            "--leapfrog-steps",
            "3",
            "--num-samples",
            "200",
            "--num-points",
            "12",
            "--compile",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert "AIS with T = 100, 4 chains" in printed and "AIS by T   T=10:" in printed
    summary = json.loads((out / "eval.json").read_text())
    assert summary["method"] == "ais" and set(summary["ais"]["log_px_by_num_steps"]) == {
        "10",
        "100",
    }
    assert (
        summary["log_px"] == summary["ais"]["log_px_by_num_steps"]["100"]
        and summary["log_px"] > summary["elbo"]
    )
    assert (
        math.isfinite(summary["log_px_is"])
        and summary["ais"]["num_chains"] == 4
        and summary["ais"]["compile"]
    )
    data = arviz.from_netcdf(out / "eval.nc").importance_sampling
    assert data["ais_log_weights"].shape == (12, 4) and "log_px_is" in data
    assert (out / "ais.png").stat().st_size > 0


def test_the_evaluate_command_refuses_ais_it_cannot_run(tmp_path, capsys):
    from pyvae.data.datasets import load_dataset

    m2 = pyvae.M2(x_dim=64, num_classes=10, z_dim=2, hidden=(8,))
    pyvae.save(m2, tmp_path / "checkpoint.pt")
    (tmp_path / "config.yaml").write_text("dataset: digits\nbinarize: static\nseed: 0\n")
    load_dataset("digits", "test")
    for flags, message in [
        (["--method", "ais"], "site 'y' is discrete"),
        (["--method", "ais", "--num-steps", "0"], "--num-steps must be a positive integer; got 0"),
    ]:
        with pytest.raises(SystemExit) as info:
            main(["evaluate", str(tmp_path), "--num-points", "4", *flags])
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not any(p.is_dir() for p in tmp_path.iterdir())  # no half-made output folder
