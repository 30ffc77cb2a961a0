"""The built-in models beside the VAE: hvae, cvae and m2, as Pyro programs read by pyvae.program."""

import json
import math
import warnings

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine

import pyvae
from pyvae import program
from pyvae.data.datasets import ImageSet, semi_supervised
from pyvae.models.cvae import CVAE
from pyvae.models.hvae import HVAE
from pyvae.models.m2 import M2

C = 3  # classes in the tiny labelled problems


@pytest.fixture
def labelled(binary_data):
    """(x, y): the 64 binary points of ``binary_data`` (16 pixels) with labels 0..C-1."""
    return binary_data, torch.arange(len(binary_data)) % C


def tiny(name):
    """A small instance of each model on 16 pixels."""
    if name == "hvae":
        return HVAE(16, z_dims=(4, 2), hidden=((8,), (6,)))
    if name == "cvae":
        return CVAE(16, C, z_dim=2, hidden=(8,))
    return M2(16, C, z_dim=2, hidden=(8,))


def batch_for(name, x, y):
    if name == "hvae":
        return (x,)
    if name == "m2":  # a mixed minibatch: every other point unlabelled
        return (x, torch.where(torch.arange(len(y)) % 2 == 0, -1, y))
    return (x, y)


# -- the programs' shapes -------------------------------------------------------------
EXPECTED_SITES = {
    # name: (latent sites in model order, enumerated guide sites, default latent site)
    "hvae": (["z2", "z1"], [], "z2"),
    "cvae": (["z"], [], "z"),
    "m2": (["y", "z"], ["y"], "z"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SITES))
def test_structure_and_log_weights(name, labelled):
    model, (x, y) = tiny(name), labelled
    batch = batch_for(name, x[:10], y[:10])
    shape = program.structure(model, batch)
    latent, enumerated, site = EXPECTED_SITES[name]
    assert (shape.latent_sites, shape.observed_sites, shape.enumerated_sites) == (
        latent,
        ["x"],
        enumerated,
    )
    assert shape.max_plate_nesting == 1 and model.latent_site == site
    w = program.log_weights(model, batch, 7, shape)
    strata = C if enumerated else 1
    assert w.log_w.shape == (strata, 7, 10) and w.log_q_enum.shape == (strata, 1, 10)
    assert bool(torch.isfinite(w.log_w).all())
    log_p = torch.logsumexp(w.per_point().flatten(1), dim=1) - math.log(7)
    assert log_p.shape == (10,) and bool(torch.isfinite(log_p).all())
    assert program.latent_means(model, batch, site, num_samples=4).shape == (10, 2)


@pytest.mark.parametrize("name", sorted(EXPECTED_SITES))
def test_config_rebuilds_the_same_model(name, labelled):
    """A checkpoint rebuilds a model as cls(**config minus "model"): same parameters, same
    log-weights."""
    model, (x, y) = tiny(name), labelled
    config = json.loads(json.dumps(model.config))
    assert config["model"] == name
    rebuilt = type(model)(**{k: v for k, v in config.items() if k != "model"})
    rebuilt.load_state_dict(model.state_dict())
    batch = batch_for(name, x[:5], y[:5])
    shape = program.structure(model, batch)
    weights = []
    for m in (model, rebuilt):
        pyro.set_rng_seed(3)
        weights.append(program.log_weights(m, batch, 4, shape).log_w)
    torch.testing.assert_close(weights[0], weights[1])


def test_hvae_default_is_the_iwae_architecture():
    hvae = HVAE(784)
    widths = [
        [(m.in_features, m.out_features) for m in net if isinstance(m, torch.nn.Linear)]
        for net in hvae.encoders
    ]
    assert widths == [[(784, 200), (200, 200), (200, 200)], [(100, 100), (100, 100), (100, 100)]]
    widths = [
        [(m.in_features, m.out_features) for m in net if isinstance(m, torch.nn.Linear)]
        for net in hvae.decoders
    ]
    assert widths == [[(100, 200), (200, 200), (200, 784)], [(50, 100), (100, 100), (100, 200)]]
    assert isinstance(hvae.encoders[0][1], torch.nn.Tanh) and hvae.image_shape == (1, 28, 28)


def test_hvae_with_three_layers_samples_top_down(binary_data):
    hvae = HVAE(16, z_dims=(5, 4, 3), hidden=((8,), (), (6, 6)))
    shape = program.structure(hvae, (binary_data[:4],))
    assert shape.latent_sites == ["z3", "z2", "z1"] and hvae.latent_site == "z3"
    assert program.generate(hvae, (binary_data[:4],)).shape == (4, 16)


def test_hvae_linear_gaussian_matches_the_closed_form_marginal():
    """z2 ~ N(0, I), z1 | z2 ~ N(A z2 + a, diag s1^2), x | z1 ~ N(B z1 + b, s^2 I): an HVAE with
    linear layers, a fixed sigma_1 and a Normal likelihood. Its marginal is
    N(x; B a + b, B (A A^T + diag s1^2) B^T + s^2 I); log p^ with K = 20,000 must match it within
    4 Monte Carlo standard errors (delta method on the mean weight), and those must be small.

    The guide is set to the exact conditional means E[z1 | x] and E[z2 | z1] (both linear) with
    standard deviations 1.3 times the posterior ones: a diagonal proposal a little broader than the
    posterior, so the weights are tame and the comparison sharp."""
    d_x, d1, d2, s = 3, 2, 2, 0.7
    hvae = HVAE(d_x, z_dims=(d1, d2), hidden=((), ()), likelihood={"name": "normal", "scale": s})
    top, bottom = hvae.decoders[1][0], hvae.decoders[0][0]
    with torch.no_grad():
        top.weight[d1:] = 0  # the raw scale of z1 no longer depends on z2: sigma_1 is a constant

    def f64(t):
        return t.detach().double()

    A, a = f64(top.weight[:d1]), f64(top.bias[:d1])
    S1 = torch.diag((F.softplus(f64(top.bias[d1:])) + 1e-4) ** 2)
    B, b = f64(bottom.weight), f64(bottom.bias)
    prior_z1 = A @ A.T + S1
    cov = B @ prior_z1 @ B.T + s**2 * torch.eye(d_x, dtype=torch.float64)
    marginal = torch.distributions.MultivariateNormal(B @ a + b, cov)

    # p(z1 | x) = N(P1 (prior_z1^-1 a + B^T (x - b) / s^2), P1) and
    # p(z2 | z1) = N(P2 A^T S1^-1 (z1 - a), P2)
    P1 = torch.linalg.inv(torch.linalg.inv(prior_z1) + B.T @ B / s**2)
    P2 = torch.linalg.inv(torch.eye(d2, dtype=torch.float64) + A.T @ torch.linalg.inv(S1) @ A)
    G2 = P2 @ A.T @ torch.linalg.inv(S1)
    offset = P1 @ (torch.linalg.solve(prior_z1, a) - B.T @ b / s**2)
    set_gaussian_layer(hvae.encoders[0][0], P1 @ B.T / s**2, offset, P1)
    set_gaussian_layer(hvae.encoders[1][0], G2, -G2 @ a, P2)

    x = marginal.sample((4,)).float()
    k = 20_000
    w = (
        program.log_weights(hvae, (x,), k, program.structure(hvae, (x,)))
        .per_point()
        .flatten(1)
        .double()
    )
    log_p = torch.logsumexp(w, 1) - math.log(k)
    scaled = (w - w.max(1, keepdim=True).values).exp()
    stderr = scaled.std(1) / (math.sqrt(k) * scaled.mean(1))
    exact = marginal.log_prob(x.double())
    assert bool((stderr < 0.02).all()), stderr
    assert bool(((log_p - exact).abs() < 4 * stderr + 1e-4).all()), (log_p, exact, stderr)


def set_gaussian_layer(linear, weight, bias, cov, widen=1.3):
    """Make a linear guide layer output mean weight @ input + bias and a constant standard deviation
    widen * sqrt(diag cov) (through DiagonalNormal's softplus(raw) + 1e-4)."""
    d = len(bias)
    raw = torch.log(torch.expm1(widen * cov.diagonal().sqrt() - 1e-4))
    with torch.no_grad():
        linear.weight[:d] = weight.float()
        linear.bias[:d] = bias.float()
        linear.weight[d:] = 0
        linear.bias[d:] = raw.float()


# -- M2: enumeration, log p(x) and the objective ---------------------------------------
def m2_problem(binary_data):
    m2 = M2(16, C, z_dim=2, hidden=(8,), alpha=0.5)
    x = binary_data[:6]
    y = torch.tensor([-1, 0, -1, 2, -1, 1])  # unlabelled and labelled points in one minibatch
    return m2, x, y


def test_m2_log_p_sums_the_classes_of_unlabelled_points_only(binary_data):
    """With the same draws z_ck ~ q(z | x, c) (same seed, same shapes), an unlabelled point's
    log p^(x) is logsumexp over c of the estimates log p^(x, c) of runs with every label fixed to
    c, and a labelled point's estimate is that of its own class: the other classes drop out. Each
    log-weight is also checked by hand against
    log p(c) + log p(z) + log p(x | z, c) - log q(z | x, c)."""
    m2, x, y = m2_problem(binary_data)
    k = 5
    shape = program.structure(m2, (x, y))

    def estimates(labels):
        pyro.set_rng_seed(11)
        w = program.log_weights(m2, (x, labels), k, shape)
        return w, torch.logsumexp(w.per_point().flatten(1), 1) - math.log(k)

    mixed, log_p = estimates(y)
    per_class = torch.stack([estimates(torch.full_like(y, c))[1] for c in range(C)], 1)  # (M, C)
    unlabelled = y < 0
    torch.testing.assert_close(log_p[unlabelled], torch.logsumexp(per_class[unlabelled], 1))
    torch.testing.assert_close(
        log_p[~unlabelled], per_class[~unlabelled].gather(1, y[~unlabelled, None]).squeeze(1)
    )
    # the labelled points' other strata are impossible under q, so -inf
    assert bool(
        torch.isinf(mixed.per_point()[~unlabelled]).sum() == (~unlabelled).sum() * (C - 1) * k
    )

    z = mixed.guide_trace.nodes["z"]["value"]  # (C, K, M, z_dim)
    c = torch.arange(C).reshape(C, 1, 1)
    by_hand = (
        m2.class_log_prior[c]
        + m2.prior().log_prob(z)
        + m2.decode(z, c).log_prob(x)
        - m2.encode(x, c).log_prob(z)
    )
    torch.testing.assert_close(mixed.log_w, by_hand.reshape(C, k, len(x)))


def test_m2_trace_enum_elbo_is_the_m2_bound(binary_data):
    """TraceEnum_ELBO on a mixed minibatch = - sum_unlabelled [sum_c q(c|x) L(x, c) + H(q(.|x))]
    - sum_labelled L(x, y) - the classification factor, exactly: each L(x, c) is a Trace_ELBO of the
    point with its label fixed to c and z replayed from the draws TraceEnum_ELBO made (same
    seed)."""
    m2, x, y = m2_problem(binary_data)
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
    pyro.set_rng_seed(5)
    loss = elbo.differentiable_loss(m2.model, m2.guide, x, y)
    pyro.set_rng_seed(5)
    without_factor = elbo.differentiable_loss(
        poutine.block(m2.model, hide=["classify"]), m2.guide, x, y
    )
    # the guide runs first and alone draws: the same z, one per class and point
    pyro.set_rng_seed(5)
    z = (
        poutine.trace(poutine.enum(m2.guide, first_available_dim=-2))
        .get_trace(x, y)
        .nodes["z"]["value"]
    )

    def bound(n, c):
        """L(x_n, c): minus Trace_ELBO's loss on point n labelled c, z replayed from z[c, n]."""
        xn, yn = x[n : n + 1], torch.tensor([c])
        trace = poutine.trace(m2.guide).get_trace(xn, yn)
        trace.nodes["z"]["value"] = z[c, n : n + 1]
        guide = poutine.replay(m2.guide, trace=trace)
        with warnings.catch_warnings():  # Trace_ELBO warns that "y" is marked for enumeration
            warnings.simplefilter("ignore")
            model = poutine.block(m2.model, hide=["classify"])
            return -pyro.infer.Trace_ELBO().differentiable_loss(model, guide, xn, yn)

    with torch.no_grad():
        log_q = torch.log_softmax(m2.classifier(x), -1)
    expected = 0.0
    for n in range(len(x)):
        if y[n] >= 0:
            expected = expected + bound(n, int(y[n]))
        else:
            expected = expected + sum(
                log_q[n, c].exp() * (bound(n, c) - log_q[n, c]) for c in range(C)
            )
    torch.testing.assert_close(-without_factor, expected)

    labelled = y >= 0
    factor = m2.alpha * len(y) / labelled.sum() * log_q[labelled].gather(1, y[labelled, None]).sum()
    torch.testing.assert_close(without_factor - loss, factor)


def test_m2_labelled_loss_reaches_the_classifier_only_through_the_factor(binary_data):
    """On labelled points the guide's y is a point mass: the ELBO part of the loss has zero gradient
    with respect to the classifier, which the classification factor alone trains."""
    m2, x, _ = m2_problem(binary_data)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
    weights = list(m2.classifier.parameters())
    without_factor = elbo.differentiable_loss(
        poutine.block(m2.model, hide=["classify"]), m2.guide, x, y
    )
    grads = torch.autograd.grad(without_factor, weights, allow_unused=True)
    assert all(g is None or bool((g == 0).all()) for g in grads)
    grads = torch.autograd.grad(elbo.differentiable_loss(m2.model, m2.guide, x, y), weights)
    assert all(bool(torch.isfinite(g).all()) for g in grads) and any(
        bool((g != 0).any()) for g in grads
    )
    # and an unlabelled point's ELBO does reach it (the bound sums over q(y|x))
    unlabelled = torch.full_like(y, -1)
    grads = torch.autograd.grad(
        elbo.differentiable_loss(m2.model, m2.guide, x, unlabelled), weights
    )
    assert any(bool((g != 0).any()) for g in grads)


def test_m2_classify_and_accuracy(labelled):
    m2, (x, y) = tiny("m2"), labelled
    predicted = m2.classify(x)
    assert predicted.shape == (64,) and predicted.dtype == torch.int64
    assert m2.accuracy(x, y) == pytest.approx(float((predicted == y).float().mean()))
    with pytest.raises(pyvae.PyvaeError, match="label -1 is outside"):
        m2.accuracy(x, torch.full_like(y, -1))


def test_generate_keeps_the_fixed_latents(labelled):
    """program.generate(fixed=...) holds those sites at the given values: M2's images for given
    labels and z are E[x | z, y] exactly (class-conditional samples)."""
    m2, (x, _) = tiny("m2"), labelled
    labels, z = torch.tensor([0, 1, 2, 0, 1, 2]), torch.randn(6, 2)
    images = program.generate(m2, (x[:6], torch.full((6,), -1)), fixed={"y": labels, "z": z})
    torch.testing.assert_close(images, m2.decode(z, labels).mean)


def test_m2_reconstruction_weights_the_classes_by_q(binary_data):
    """program.reconstruct of M2 = sum_c q(c | x) mean_k E[x | z_ck, c]: a labelled point is
    reconstructed from its own class only (same draws: same seed, same calls)."""
    m2, x, y = m2_problem(binary_data)
    pyro.set_rng_seed(2)
    images = program.reconstruct(m2, (x, y), num_samples=4)
    pyro.set_rng_seed(2)
    w = program.log_weights(m2, (x, y), 4, program.structure(m2, (x, y)))
    means = w.model_trace.nodes["x"]["fn"].mean  # (C, K, M, x_dim)
    expected = (w.log_q_enum.exp().unsqueeze(-1) * means).sum(0).mean(0)
    torch.testing.assert_close(images, expected)


# -- bad input ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, labels, message",
    [
        (
            "cvae",
            [0, 1, 3],
            r"label 3 is outside the classes of this cvae \(num_classes=3\): allowed 0..2",
        ),
        ("cvae", [0, -1, 2], r"label -1 is outside .* allowed 0..2"),
        ("m2", [0, -2, 2], r"label -2 is outside .* allowed -1 \(unlabelled\) or 0..2"),
        ("m2", [0, 1, 3], r"label 3 is outside the classes of this m2"),
    ],
)
def test_check_batch_refuses_labels_outside_the_classes(name, labels, message, binary_data):
    with pytest.raises(pyvae.PyvaeError, match=message):
        tiny(name).check_batch(binary_data[:3], torch.tensor(labels))


@pytest.mark.parametrize("name", sorted(EXPECTED_SITES))
def test_check_batch_refuses_bad_x(name, labelled):
    model, (x, y) = tiny(name), labelled
    model.check_batch(*batch_for(name, x, y))  # fine
    with pytest.raises(
        pyvae.PyvaeError, match=r"data has shape \(64, 15\); .* \(batch, x_dim=16\)"
    ):
        model.check_batch(*batch_for(name, x[:, :15], y))
    with pytest.raises(pyvae.PyvaeError, match="bernoulli needs 0/1 data"):
        model.check_batch(*batch_for(name, x * 0.5, y))


def test_check_batch_refuses_float_labels_and_wrong_lengths(binary_data):
    cvae = tiny("cvae")
    with pytest.raises(pyvae.PyvaeError, match="labels must be an integer tensor"):
        cvae.check_batch(binary_data[:3], torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(
        pyvae.PyvaeError, match=r"labels have shape \(2,\); cvae expects one per data point: \(3,\)"
    ):
        cvae.check_batch(binary_data[:3], torch.tensor([0, 1]))


def test_bad_constructor_arguments_are_clear_errors():
    with pytest.raises(pyvae.PyvaeError, match="hvae needs at least 2 stochastic layers"):
        HVAE(16, z_dims=(4,), hidden=((8,),))
    with pytest.raises(
        pyvae.PyvaeError, match="hidden needs one list of widths per stochastic layer"
    ):
        HVAE(16, z_dims=(4, 2), hidden=((8,),))
    with pytest.raises(
        pyvae.PyvaeError, match="prior 'vamp' needs the encoder .* hvae allows .*mog"
    ):
        HVAE(16, z_dims=(4, 2), hidden=((8,), (4,)), prior="vamp")
    with pytest.raises(pyvae.PyvaeError, match="prior 'vamp' .* cvae allows"):
        CVAE(16, 3, prior="vamp")
    with pytest.raises(pyvae.PyvaeError, match="num_classes must be a positive integer; got 0"):
        CVAE(16, 0)
    with pytest.raises(pyvae.PyvaeError, match="alpha must be a number >= 0"):
        M2(16, 3, alpha=-1.0)
    with pytest.raises(pyvae.PyvaeError, match=r"image_shape \(1, 3, 3\) does not hold x_dim=16"):
        CVAE(16, 3, image_shape=(1, 3, 3))


def test_swapped_prior_and_likelihood(labelled):
    x, y = labelled
    hvae = HVAE(
        16, z_dims=(4, 2), hidden=((8,), ()), prior="mog", likelihood="continuous_bernoulli"
    )
    cvae = CVAE(
        16, C, z_dim=2, hidden=(8,), prior="flow", likelihood={"name": "normal", "scale": 0.3}
    )
    for model, batch in ((hvae, (x[:5],)), (cvae, (x[:5], y[:5]))):
        w = program.log_weights(model, batch, 3, program.structure(model, batch))
        assert bool(torch.isfinite(w.log_w).all())


# -- semi-supervised labels -------------------------------------------------------------
def labelled_set(n_per_class=(5, 7, 9)):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    return ImageSet(torch.zeros(len(labels), 4), labels, (1, 2, 2), "toy", "train")


def test_semi_supervised_keeps_a_class_balanced_random_subset():
    data = labelled_set()
    kept = semi_supervised(data, 9, seed=1)
    assert kept.labels.shape == data.labels.shape and (kept.images is data.images)
    assert torch.bincount(kept.labels[kept.labels >= 0]).tolist() == [3, 3, 3]
    assert int((kept.labels == -1).sum()) == len(data) - 9
    keep = kept.labels >= 0
    assert torch.equal(kept.labels[keep], data.labels[keep])  # the labels kept are the true ones
    assert torch.equal(semi_supervised(data, 9, seed=1).labels, kept.labels)
    assert not torch.equal(semi_supervised(data, 9, seed=2).labels, kept.labels)
    assert data.labels.min() >= 0  # the input is not modified


@pytest.mark.parametrize(
    "num_labels, message",
    [
        (0, "num_labels must be a positive integer; got 0"),
        (2.0, "num_labels must be a positive integer; got 2.0"),
        (24, "num_labels=24 is more than the 21 labelled points of toy train"),
        (10, "num_labels=10 is not divisible by the 3 classes; use a multiple of 3"),
        (18, "class 0 has 5 points, fewer than the 6 per class that num_labels=18 asks for"),
    ],
)
def test_semi_supervised_errors(num_labels, message):
    with pytest.raises(pyvae.PyvaeError, match=message):
        semi_supervised(labelled_set(), num_labels)


def test_semi_supervised_needs_labels():
    data = ImageSet(torch.zeros(6, 4), None, (1, 2, 2), "toy", "train")
    with pytest.raises(pyvae.PyvaeError, match="toy train has no labels"):
        semi_supervised(data, 3)


# -- through the public API -----------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EXPECTED_SITES))
def test_fit_and_log_likelihood(name, labelled):
    """Two epochs on 64 points: a finite, improving ELBO; then a finite importance-sampled log
    p(x)."""
    model, (x, y) = tiny(name), labelled
    data = batch_for(name, x, y)
    data = data[0] if name == "hvae" else data
    history = pyvae.fit(
        model,
        data,
        epochs=2,
        batch_size=16,
        lr=0.02,
        elbo="enum" if name == "m2" else "trace",
        progress=False,
    )
    elbos = [h["train_elbo"] for h in history]
    assert all(math.isfinite(e) for e in elbos) and elbos[1] > elbos[0]
    result = pyvae.log_likelihood(model, data, num_samples=8)
    assert result.log_px.shape == (64,) and bool(torch.isfinite(result.log_px).all())
