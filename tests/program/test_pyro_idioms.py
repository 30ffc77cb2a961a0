"""Pyro code as Pyro's tutorials write it runs unchanged: minibatch-sized and implicitly sized data
plates, no ``num_data``, ``ys=None`` with one-hot labels and an auxiliary loss, float conditioning
inputs, ``pyro.deterministic``. Checked against the ``num_data`` form and closed-form marginals."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.nn import PyroModule, PyroSample
from torch import nn

import pyvae
from pyvae.data.batching import Call
from pyvae.train.loop import TrainingStopped
from pyvae.train.objectives import Objective
from tests.conftest import interrupted_at
from tests.train.test_compile import TutorialVAE

D, Z, C = 5, 2, 3


class Subsampled(nn.Module):
    """z ~ N(0, I), x | z ~ N(W z + b, 0.5^2): the plate sized by num_data, the minibatch as
    subsample."""

    def __init__(self):
        super().__init__()
        self.W, self.b = nn.Parameter(torch.randn(D, Z)), nn.Parameter(torch.randn(D))
        self.enc = nn.Linear(D, 2 * Z)

    def plate(self, x, num_data=None):
        return pyro.plate("data", size=num_data or len(x), subsample=torch.arange(len(x)))

    def model(self, x, num_data=None):
        with self.plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x), Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, 0.5).to_event(1), obs=x)

    def guide(self, x, num_data=None):
        loc, raw = self.enc(x).chunk(2, -1)
        with self.plate(x, num_data):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 0.05).to_event(1))


class MinibatchPlate(Subsampled):
    """The same program as Pyro's VAE tutorial writes it: model(x), plate sized by the minibatch."""

    def plate(self, x, num_data=None):
        return pyro.plate("data", x.shape[0])

    def model(self, x):
        super().model(x)

    def guide(self, x):
        super().guide(x)


class ImplicitPlate(MinibatchPlate):
    """pyro.plate("batch") with no size, named otherwise: its size comes from the sites inside
    it."""

    def plate(self, x, num_data=None):
        return pyro.plate("batch")


@pytest.mark.parametrize("form", [MinibatchPlate, ImplicitPlate])
def test_minibatch_and_implicit_plates_optimize_the_full_data_objective(form):
    torch.manual_seed(0)
    reference, other = Subsampled(), form()
    other.load_state_dict(reference.state_dict())
    x = torch.randn(8, D)
    grads = {}
    for model in (reference, other):
        pyro.set_rng_seed(3)
        loss = Objective(model, "trace").loss((x,), num_data=200)
        loss.backward()
        grads[type(model)] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    (a, ga), (b, gb) = grads.values()
    assert a == pytest.approx(b, rel=1e-5)  # the N/M scaling, whoever applies it
    assert all(torch.allclose(u, v, rtol=1e-4, atol=1e-5) for u, v in zip(ga, gb, strict=True))


@pytest.mark.parametrize("form", [Subsampled, MinibatchPlate, ImplicitPlate])
def test_the_reported_train_elbo_is_per_data_point_in_every_form(form):
    torch.manual_seed(1)
    x = torch.randn(300, D) * 2
    model = form()
    # a learning rate too small to move the weights: the epoch's average is the ELBO of these
    # weights
    history = pyvae.fit(
        model, x, epochs=1, batch_size=50, lr=1e-9, seed=0, progress=False, device="cpu"
    )
    pyro.set_rng_seed(0)
    independent = pyvae.log_likelihood(model, x, num_samples=20).elbo.mean().item()
    assert history[0]["train_elbo"] == pytest.approx(independent, abs=0.05 * abs(independent))


class Weighted(MinibatchPlate):
    """Pyro's weights of training inside the program: a KL annealing factor on the latent site, in
    model and guide (Pyro's DMM example), and the whole loss scaled by 1/N."""

    annealing, per_point = 0.2, 1 / 300

    def model(self, x):
        with poutine.scale(scale=self.per_point), pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=self.annealing):
                z = pyro.sample("z", dist.Normal(torch.zeros(len(x), Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, 0.5).to_event(1), obs=x)

    def guide(self, x):
        loc, raw = self.enc(x).chunk(2, -1)
        with poutine.scale(scale=self.per_point), pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=self.annealing):
                scale = nn.functional.softplus(raw) + 0.05
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def test_an_elbo_leaves_out_poutine_scale_and_keeps_a_subsampled_plates_n_over_m():
    """The N/M of a plate the program subsamples makes its terms an estimate of the whole sum: it
    stays; a poutine.scale weight is training's and goes."""

    def program():
        with pyro.plate("d", 10, subsample_size=5), poutine.scale(scale=0.2):
            pyro.sample("v", dist.Normal(0.0, 1.0))

    trace = poutine.trace(pyvae.program.Unscaled()(program)).get_trace()
    assert trace.nodes["v"]["scale"] == 2.0


@pytest.mark.parametrize("compile", ["off", "on"])
def test_the_elbo_of_a_program_weighted_by_poutine_scale_is_the_unweighted_densities(compile):
    """A program's poutine.scale weighs its sites in training, as SVI weighs them; the ELBO pyvae
    reports of it scores the densities as written, as log p(x) does: a bound on that log p(x)."""
    torch.manual_seed(1)
    x = torch.randn(300, D) * 2
    plain, weighted = MinibatchPlate(), Weighted()
    weighted.load_state_dict(plain.state_dict())
    elbos = {}
    for model in (plain, weighted):
        pyro.set_rng_seed(0)
        elbo = pyvae.evaluate_elbo(model, x, num_particles=4, batch_size=100, compile=compile)
        pyro.set_rng_seed(0)
        history = pyvae.fit(model, x, epochs=1, lr=1e-9, test=x, batch_size=100, progress=False)
        elbos[model] = elbo, history[0]["test_elbo"]
    assert elbos[weighted] == pytest.approx(elbos[plain], rel=1e-6)
    pyro.set_rng_seed(0)
    log_px = pyvae.log_likelihood(weighted, x, num_samples=50).log_px.mean().item()
    assert elbos[weighted][0] < log_px


class SemiSupervised(nn.Module):
    """Pyro's SS-VAE idiom, linear-Gaussian: y ~ Cat(1/C) (one-hot), z ~ N(0, I),
    x | y, z ~ N(W z + mu_y, 0.5^2); q(y | x) a softmax classifier, q(z | x, y) Gaussian.
    Called as model(xs, ys=None); the classifier is also trained by an auxiliary program."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(0.3 * torch.randn(D, Z))
        self.mu = nn.Parameter(0.1 * torch.randn(C, D))
        self.classifier = nn.Linear(D, C)
        self.enc = nn.Linear(D + C, 2 * Z)

    def model(self, xs, ys=None):
        pyro.module("ss", self)
        with pyro.plate("data"):
            prior = torch.full((xs.shape[0], C), 1.0 / C)
            ys = pyro.sample("y", dist.OneHotCategorical(prior), obs=ys)
            z = pyro.sample("z", dist.Normal(torch.zeros(xs.shape[0], Z), 1.0).to_event(1))
            loc = z @ self.W.T + ys @ self.mu
            pyro.sample("x", dist.Normal(loc, 0.5).to_event(1), obs=xs)

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                ys = pyro.sample("y", dist.OneHotCategorical(logits=self.classifier(xs)))
            lead = torch.broadcast_shapes(ys.shape[:-1], xs.shape[:-1])
            inputs = torch.cat([xs.expand(*lead, D), ys.expand(*lead, C)], -1)
            loc, raw = self.enc(inputs).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 0.05).to_event(1))

    def model_classify(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is not None:
                with pyro.poutine.scale(scale=10.0):
                    pyro.sample("y_aux", dist.OneHotCategorical(logits=self.classifier(xs)), obs=ys)

    def guide_classify(self, xs, ys=None):
        pass

    def exact(self, x):
        """log p(x) = logsumexp_y [log 1/C + log N(x; mu_y, W W^T + 0.25 I)]."""
        cov = self.W @ self.W.T + 0.25 * torch.eye(D)
        per_class = torch.stack(
            [torch.distributions.MultivariateNormal(m, cov).log_prob(x) for m in self.mu], -1
        )
        return torch.logsumexp(per_class, -1) - math.log(C)


def clusters(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0], [0, 0, 4.0, 0, 0]])
    y = torch.randint(C, (n,), generator=g)
    return centres[y] + 0.5 * torch.randn(
        n, D, generator=g
    ), y  # the model's noise: no misfit to exploit


def test_a_semi_supervised_program_learns_from_its_labels_and_auxiliary_loss():
    torch.manual_seed(2)
    x, y = clusters(600)
    labels = torch.full_like(y, -1)
    labels[:30] = y[:30]  # 30 labelled points of 600
    model = SemiSupervised()
    history = pyvae.fit(
        model,
        (x, labels),
        epochs=10,
        batch_size=60,
        lr=5e-2,
        seed=0,
        progress=False,
        device="cpu",
        auxiliary=[(model.model_classify, model.guide_classify)],
        labelled_share=0.25,
    )
    last = history[-1]
    assert {"train_elbo_labelled", "train_elbo_unlabelled"} <= set(last)
    x_test, y_test = clusters(300, seed=1)
    accuracy = (model.classifier(x_test).argmax(-1) == y_test).float().mean().item()
    assert accuracy > 0.9  # chance is 1/3: the labels were used


def exact_guide(model: SemiSupervised) -> SemiSupervised:
    """W with orthogonal columns, so that p(z | x, y) is diagonal, and q(z | x, y) set to it
    (widened)."""
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(D, Z))
        model.W.copy_(q * torch.tensor([0.8, 0.5]))
        precision = (model.W**2).sum(0) / 0.25 + 1
        gain = model.W.T / 0.25 / precision.unsqueeze(1)  # (Z, D): posterior mean gain (x - mu_y)
        model.enc.weight.copy_(
            torch.cat([torch.cat([gain, -gain @ model.mu.T], 1), torch.zeros(Z, D + C)])
        )
        std = 1.2 / precision.sqrt() - 0.05
        model.enc.bias.copy_(torch.cat([torch.zeros(Z), std + torch.log(-torch.expm1(-std))]))
    return model


def test_a_semi_supervised_program_s_log_px_is_the_exact_sum_over_classes():
    torch.manual_seed(3)
    model = exact_guide(SemiSupervised())
    x, _ = clusters(10)
    pyro.set_rng_seed(0)
    enumerated = pyro.infer.config_enumerate(model.guide, "parallel")
    model.guide = enumerated  # y summed exactly in the importance sampler
    ll = pyvae.log_likelihood(model, x, num_samples=3000)
    exact = model.exact(x).detach()
    assert ((ll.log_px - exact).abs() <= 4 * ll.stderr + 0.05).all(), ll.log_px - exact
    assert (ll.ess <= 3000 + 1e-3).all()  # the ESS of the K draws, never above K


class Conditional(nn.Module):
    """Pyro's CVAE idiom: a float input xs (-1 for hidden pixels), a target ys, boolean-mask
    indexing, and pyro.deterministic when ys is None."""

    def __init__(self):
        super().__init__()
        self.prior_net = nn.Linear(D, 2 * Z)
        self.dec = nn.Linear(Z + D, D)
        self.enc = nn.Linear(2 * D, 2 * Z)

    def model(self, xs, ys=None):
        pyro.module("cvae", self)
        with pyro.plate("data"):
            loc, raw = self.prior_net(xs).chunk(2, -1)
            z = pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 0.1).to_event(1))
            mean = self.dec(torch.cat([z, xs.expand(*z.shape[:-1], D)], -1))
            if ys is None:
                pyro.deterministic("y", mean)
            else:  # as Pyro's example: boolean-mask indexing, which particles cannot vectorize
                hidden = xs == -1
                loc = mean[hidden].view(xs.shape[0], -1)
                pyro.sample(
                    "y", dist.Normal(loc, 1.0).to_event(1), obs=ys[hidden].view(xs.shape[0], -1)
                )

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            inputs = torch.cat([xs, ys if ys is not None else torch.zeros_like(xs)], -1)
            loc, raw = self.enc(inputs).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 0.1).to_event(1))


class Vectorized(Conditional):
    """:class:`Conditional` with the two hidden pixels indexed by position, which particles
    broadcast over."""

    def model(self, xs, ys=None):
        with pyro.plate("data"):
            loc, raw = self.prior_net(xs).chunk(2, -1)
            z = pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 0.1).to_event(1))
            mean = self.dec(torch.cat([z, xs.expand(*z.shape[:-1], D)], -1))
            pyro.sample("y", dist.Normal(mean[..., :2], 1.0).to_event(1), obs=ys[..., :2])


def test_a_conditional_program_with_float_inputs_and_a_deterministic_site():
    torch.manual_seed(4)
    target = torch.randn(40, D)
    xs = target.clone()
    xs[:, :2] = -1.0  # two hidden pixels, their values the target
    model = Conditional()
    # particles drawn one at a time
    pyvae.fit(
        model,
        (xs, target),
        epochs=2,
        batch_size=20,
        seed=0,
        progress=False,
        device="cpu",
        elbo="iwae",
        num_particles=3,
    )
    pyro.set_rng_seed(0)
    with pytest.warns(pyvae.PyvaeWarning, match="drawn one at a time"):
        ll = pyvae.log_likelihood(model, (xs, target), num_samples=1000)
    # log p(y | x) against an independent estimator: the prior as proposal, by hand
    with torch.no_grad():
        loc, raw = model.prior_net(xs).chunk(2, -1)
        z = dist.Normal(loc, nn.functional.softplus(raw) + 0.1).sample((200000,))
        mean = model.dec(torch.cat([z, xs.expand(200000, *xs.shape)], -1))[..., :2]
        log_lik = dist.Normal(mean, 1.0).log_prob(target[:, :2]).sum(-1)
        independent = torch.logsumexp(log_lik, 0) - math.log(200000)
    # IS from a 2-epoch guide is heavy-tailed: checked on average
    difference = ll.log_px - independent
    assert difference.mean().abs() < 0.25, difference
    # the same program written so that particles vectorize: the same estimate to Monte Carlo error
    twin = Vectorized()
    twin.load_state_dict(model.state_dict())
    pyro.set_rng_seed(1)
    vectorized = pyvae.log_likelihood(twin, (xs, target), num_samples=1000)
    error = (ll.stderr**2 + vectorized.stderr**2).sqrt()
    assert ((ll.log_px - vectorized.log_px).abs() <= 4 * error + 0.05).all()
    # AIS runs its chains as rows of the batch, which masking does not mind: the twin's numbers
    ais = [
        pyvae.ais_log_likelihood(m, (xs, target), num_steps=20, num_chains=2) for m in (model, twin)
    ]
    assert torch.allclose(ais[0].log_px, ais[1].log_px, atol=1e-4)
    # with nothing observed the program has no log p: one line, never a 0
    with pytest.raises(pyvae.PyvaeError, match="observes nothing") as info:
        pyvae.log_likelihood(model, xs, num_samples=10)
    assert "\n" not in str(info.value)


def test_image_shaped_data_is_served_as_it_is():
    torch.manual_seed(5)

    class Images(MinibatchPlate):
        def model(self, x):
            super().model(x.reshape(-1, D))

        def guide(self, x):
            super().guide(x.reshape(-1, D))

    x = torch.randn(40, 1, D)  # (N, C, W): never refused for not being flat
    history = pyvae.fit(Images(), x, epochs=1, batch_size=20, seed=0, progress=False, device="cpu")
    assert math.isfinite(history[0]["train_elbo"])


def test_an_argument_the_program_does_not_take_is_a_one_line_error():
    class NoLabels(MinibatchPlate):
        def guide(self, x, y):
            super().guide(x)

    with pytest.raises(
        pyvae.PyvaeError,
        match=r"NoLabels.guide\(\) cannot be called .*missing a required argument: 'y'",
    ):
        pyvae.fit(
            NoLabels(), torch.randn(10, D), epochs=1, batch_size=5, progress=False, device="cpu"
        )


class PyroModuleVAE(PyroModule):
    """Networks written as PyroModules; optionally a Bayesian decoder weight (PyroSample)."""

    def __init__(self, bayesian=False):
        super().__init__()
        self.enc = PyroModule[nn.Linear](D, 2 * Z)
        self.dec = PyroModule[nn.Linear](Z, D)
        if bayesian:
            self.dec.weight = PyroSample(dist.Normal(0.0, 1.0).expand([D, Z]).to_event(2))

    def model(self, x):
        data = pyro.plate("data", x.shape[0])
        with data:
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], Z), 1.0).to_event(1))
        loc = self.dec(z)  # a PyroSample weight is drawn here, outside the plate, as Pyro's BNNs do
        with data:
            pyro.sample("x", dist.Normal(loc, 0.5).to_event(1), obs=x)

    def guide(self, x):
        loc, raw = self.enc(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 0.05).to_event(1))


def test_pyro_module_networks_train_and_a_pyro_sample_weight_is_refused():
    torch.manual_seed(6)
    x = torch.randn(60, D)
    model = PyroModuleVAE()
    before = model.dec.weight.detach().clone()
    pyvae.fit(model, x, epochs=2, batch_size=20, seed=0, progress=False, device="cpu")
    assert not torch.equal(before, model.dec.weight.detach())  # its parameters were trained
    assert torch.isfinite(pyvae.log_likelihood(model, x, num_samples=20).log_px).all()
    with pytest.raises(
        pyvae.PyvaeError, match="site 'dec.weight' is not inside a plate .*a global latent"
    ) as info:
        pyvae.fit(
            PyroModuleVAE(bayesian=True), x, epochs=1, batch_size=20, progress=False, device="cpu"
        )
    assert "\n" not in str(info.value)


def test_evaluation_encodes_labels_and_refuses_unlabelled_points_for_an_optional_label():
    torch.manual_seed(7)
    model = exact_guide(SemiSupervised())
    x, y = clusters(30)
    # integer labels, served one-hot to the program's OneHotCategorical label site: log p(x, y)
    # exactly
    ll = pyvae.log_likelihood(model, (x, y), num_samples=500)
    cov = model.W @ model.W.T + 0.25 * torch.eye(D)
    exact = torch.distributions.MultivariateNormal(model.mu[y], cov).log_prob(x) - math.log(C)
    assert ((ll.log_px - exact.detach()).abs() <= 4 * ll.stderr + 0.02).all()
    result = pyvae.evaluate(model, x, num_samples=50)
    assert result.summary()["num_points"] == 30
    mixed = y.clone()
    mixed[:5] = -1
    with pytest.raises(pyvae.PyvaeError, match="unlabelled points .*score them without labels"):
        pyvae.log_likelihood(model, (x, mixed), num_samples=10)


class SubsamplesItself(MinibatchPlate):
    """Pyro's SVI tutorial's subsampling inside the program: a random 4 of the points given."""

    def plate(self, x, num_data=None):
        return pyro.plate("data", len(x), subsample_size=min(4, len(x)))

    def model(self, x):
        with self.plate(x) as points:
            z = pyro.sample("z", dist.Normal(torch.zeros(len(points), Z), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, 0.5).to_event(1), obs=x[points])

    def guide(self, x):
        with self.plate(x) as points:
            loc, raw = self.enc(x[points]).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 0.05).to_event(1))


def test_a_nan_is_refused_and_named_not_scored():
    """NaN data in a program without checks of its own is named as Pyro's validation names it, as
    is a NaN weight; a NaN log p(x) that no validation sees (an infinite logit: inf - inf) names
    its point."""
    x = torch.randn(10, D)
    x[7, 1] = math.nan
    with pytest.raises(pyvae.PyvaeError, match=r"^data point 7: Expected parameter loc"):
        pyvae.log_likelihood(MinibatchPlate(), x, num_samples=5, batch_size=4)
    vae = pyvae.VAE(x_dim=D, z_dim=Z, hidden=())
    with torch.no_grad():
        vae.decoder[0].weight[0, 0] = math.nan
    with pytest.raises(pyvae.PyvaeError, match=r"^Expected parameter logits .* Real\(\)"):
        pyvae.log_likelihood(vae, torch.ones(4, D), num_samples=5)
    with torch.no_grad():
        vae.decoder[0].weight[0, 0], vae.decoder[0].bias[0] = 0.0, math.inf
    with pytest.raises(pyvae.PyvaeError, match=r"^log p\(x\) of data point 0 is NaN: the model's"):
        pyvae.log_likelihood(vae, torch.ones(4, D), num_samples=5)


def test_data_outside_a_user_programs_likelihood_is_a_one_line_error():
    """Grey pixels under a Bernoulli (Pyro's VAE tutorial's likelihood) in a program without
    checks of its own: every scored point is looked at once with Pyro's validation on (the first
    such point named by its index in the data, also where evaluate scores them in chunks),
    training's first step is validated; each says which site, in one line, never a number. A user
    who turned Pyro's validation off (placeholders under a mask) is not second-guessed."""
    x = torch.rand(130, 16, generator=torch.Generator().manual_seed(0)).round()
    x[100, 3] = 0.5
    support = r"site 'obs': Expected value argument .* within the support \(Boolean\(\)\)"
    with pytest.raises(pyvae.PyvaeError, match=rf"^data point 100: .*{support}"):
        pyvae.log_likelihood(TutorialVAE(), x, num_samples=5, batch_size=8)
    with pytest.raises(pyvae.PyvaeError, match=rf"^data point 100: .*{support}"):
        pyvae.evaluate(TutorialVAE(), x, num_samples=5)
    with pytest.raises(pyvae.PyvaeError, match=rf"^data point 0: .*{support}"):
        pyvae.ais_log_likelihood(TutorialVAE(), x[100:101], num_steps=2, num_chains=2)
    with pytest.raises(pyvae.PyvaeError, match=f"^Error while computing .*{support}"):
        pyvae.evaluate_elbo(TutorialVAE(), x)
    with pytest.raises(pyvae.PyvaeError, match=f"^the first training step: .*{support}"):
        pyvae.fit(TutorialVAE(), x[96:], epochs=1, progress=False)
    with pyro.validation_enabled(False):
        assert pyvae.log_likelihood(TutorialVAE(), x[96:], num_samples=5).log_px.isfinite().all()


def test_float64_data_are_served_in_the_networks_dtype():
    """Double-precision data (numpy's default) for a float32 network, as integer data are."""
    x = torch.rand(40, 16, generator=torch.Generator().manual_seed(0)).round()
    model = TutorialVAE()
    scores = []
    for data in (x, x.double()):
        pyro.set_rng_seed(0)
        scores.append(pyvae.log_likelihood(model, data, num_samples=5).log_px)
    assert torch.equal(*scores)
    pyvae.fit(model, x.double(), epochs=1, progress=False)


def test_a_program_that_subsamples_its_points_itself_is_refused_in_scoring_too():
    """It scores 4 random points of those it is given: no per-point log p(x)."""
    with pytest.raises(pyvae.PyvaeError, match="site 'z' scores 4 of the 10 terms of its plate"):
        pyvae.log_likelihood(SubsamplesItself(), torch.randn(10, D), num_samples=5)


class IntegerLabels(SemiSupervised):
    """The same program with a ``Categorical`` label site: labels as integers."""

    def model(self, xs, ys=None):
        with pyro.plate("data"):
            ys = pyro.sample("y", dist.Categorical(logits=torch.zeros(xs.shape[0], C)), obs=ys)
            z = pyro.sample("z", dist.Normal(torch.zeros(xs.shape[0], Z), 1.0).to_event(1))
            loc = z @ self.W.T + self.mu[ys]
            pyro.sample("x", dist.Normal(loc, 0.5).to_event(1), obs=xs)

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                ys = pyro.sample("y", dist.Categorical(logits=self.classifier(xs)))
            inputs = torch.cat([xs, nn.functional.one_hot(ys, C).to(xs.dtype)], -1)
            loc, raw = self.enc(inputs).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 0.05).to_event(1))


@pytest.mark.parametrize("program", [SemiSupervised, IntegerLabels])
@pytest.mark.parametrize("label", [3, -3])
def test_a_label_neither_a_class_nor_unlabelled_is_a_one_line_error(label, program):
    """A label past the classes of the label site (one-hot or integer), or a negative one other
    than -1 (unlabelled), is named, in training and in scoring, not encoded or taken as
    unlabelled."""
    x, y = clusters(40)
    y[20:] = -1
    y[5] = label
    message = rf"label {label} of point 5 is neither a class \(0"
    with pytest.raises(pyvae.PyvaeError, match=message):
        pyvae.fit(program(), (x, y), epochs=1, progress=False)
    with pytest.raises(pyvae.PyvaeError, match=message):
        pyvae.log_likelihood(program(), (x[:10], y[:10]), num_samples=10)


def test_a_semi_supervised_run_stopped_mid_epoch_resumes_exactly(tmp_path, monkeypatch):
    x, y = clusters(200)
    labels = torch.full_like(y, -1)
    labels[:20] = y[:20]
    settings = dict(
        epochs=2, batch_size=40, labelled_share=0.25, seed=1, device="cpu", progress=False
    )
    torch.manual_seed(0)
    whole = SemiSupervised()
    reference = pyvae.fit(whole, (x, labels), out=tmp_path / "whole", **settings)

    torch.manual_seed(0)
    model = SemiSupervised()
    # inside step 2 of epoch 2 (6 steps per epoch: 180 unlabelled, 30 a step), which is undone
    stopped = pytest.raises(TrainingStopped, match="stopped by SIGINT at epoch 2, step 1")
    with interrupted_at(monkeypatch, 8), stopped:
        pyvae.fit(model, (x, labels), out=tmp_path / "stopped", **settings)
    resumed = pyvae.fit(model, (x, labels), out=tmp_path / "stopped", resume=True, **settings)

    def strip(history):
        return [{k: v for k, v in h.items() if k != "seconds"} for h in history]

    assert strip(resumed) == strip(reference)
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), whole.parameters(), strict=True)
    )


class Mixture(nn.Module):
    """m2's form with no continuous latent, so every ELBO is exact (enumerated): y ~ Cat(1/C),
    x | y ~ N(mu_y, 1); labels required, -1 for unlabelled; the classification factor
    alpha (M / M_l) log q(y|x) on labelled points, as pyvae.M2 writes it."""

    def __init__(self, alpha=0.5):
        super().__init__()
        self.alpha = alpha
        self.mu = nn.Parameter(torch.randn(C, D))
        self.classifier = nn.Linear(D, C)

    def model(self, x, y, num_data=None):
        labelled = y >= 0
        with pyvae.program.data_plate(x, num_data):
            label = pyro.sample("y", dist.Categorical(logits=torch.zeros(C)))
            pyro.sample("x", dist.Normal(self.mu[label], 1.0).to_event(1), obs=x)
            log_q = dist.Categorical(logits=self.classifier(x)).log_prob(y.clamp(min=0))
            with pyro.poutine.mask(mask=labelled):
                pyro.factor("classify", self.alpha * len(y) / labelled.sum().clamp(min=1) * log_q)

    def guide(self, x, y, num_data=None):
        log_q = torch.log_softmax(self.classifier(x), -1)
        point = torch.full_like(log_q, -math.inf).scatter(-1, y.clamp(min=0).unsqueeze(-1), 0.0)
        logits = torch.where((y >= 0).unsqueeze(-1), point, log_q)
        with pyvae.program.data_plate(x, num_data):
            pyro.sample("y", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})


def test_split_calls_scale_each_group_and_keep_the_program_s_own_factor_scale():
    """sum_l L + sum_u U + alpha N mean_l log q, exactly, from a labelled and an unlabelled call."""
    torch.manual_seed(8)
    x, y = clusters(12)
    y[4:] = -1  # 4 labelled, 8 unlabelled of N = 12
    model, n = Mixture(), 12
    single = Objective(model, "enum")  # each point alone: a data set of one
    per_point = torch.stack([single.loss((x[i : i + 1], y[i : i + 1]), 1) for i in range(n)])
    objective = Objective(model, "enum")
    log_q = dist.Categorical(logits=model.classifier(x[:4])).log_prob(y[:4])
    elbo_terms = per_point.clone()
    elbo_terms[:4] += model.alpha * log_q  # the factor (a loss of -alpha log q) taken out
    lab, unl = [0, 2], [5, 6, 9]  # a step's M_l = 2 of 4 labelled and M_u = 3 of 8 unlabelled
    calls = [Call((x[lab], y[lab]), 4, n, "labelled"), Call((x[unl], y[unl]), 8, n, "unlabelled")]
    loss = objective(calls).sum()
    expected = (
        4 / 2 * elbo_terms[lab].sum()
        + 8 / 3 * elbo_terms[unl].sum()
        - model.alpha * n * log_q[[0, 2]].mean()
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_built_in_m2_trains_on_a_fixed_share_of_labelled_points():
    train, _ = clusters(300)
    labels = torch.full((300,), -1)
    labels[:15] = clusters(300)[1][:15]
    x = (train > 1.5).float()  # binary images for m2's Bernoulli
    m2 = pyvae.M2(x_dim=D, num_classes=C, z_dim=2, hidden=(8,))
    history = pyvae.fit(
        m2,
        (x, labels),
        epochs=1,
        batch_size=30,
        labelled_share=0.5,
        seed=0,
        progress=False,
        device="cpu",
    )
    assert {"train_elbo_labelled", "train_elbo_unlabelled"} <= set(history[0])


class TwoPlates(nn.Module):
    """Latents in a plate over the points ("rows", dim -1) inside another plate that happens to have
    as many elements ("heads", dim -2): only the module's data_plate tells them apart."""

    def __init__(self, plate=None):
        super().__init__()
        self.data_plate = plate
        self.enc = nn.Linear(D, 2)

    def model(self, x):
        with pyro.plate("heads", x.shape[0], dim=-2), pyro.plate("rows", x.shape[0], dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[:, 0])

    def guide(self, x):
        loc, raw = self.enc(x).unbind(-1)
        with pyro.plate("heads", x.shape[0], dim=-2), pyro.plate("rows", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 0.1))


def test_a_module_names_its_data_plate_where_two_could_be_it():
    x = torch.randn(3, D)
    assert pyvae.program.structure(TwoPlates(), (x,)).data_plate == "heads"  # the outermost
    assert pyvae.program.structure(TwoPlates("rows"), (x,)).data_plate == "rows"
    with pytest.raises(pyvae.PyvaeError, match="not inside the plate 'nope' .*data_plate") as info:
        pyvae.program.structure(TwoPlates("nope"), (x,))
    assert "\n" not in str(info.value)
