"""Importance sampling compiled (pyvae.infer.importance.Scorer): from the same draws, the same
log-weights, log p(x), bounds and per-site statistics as the programs run as written; recorded
once per kind of chunk; a program that cannot be recorded is scored as written and says why."""

import gc
import weakref

import numpy as np
import pytest
import torch

import pyvae
import pyvae.compiled
import pyvae.infer.importance as importance
from pyvae.infer import diagnostics
from pyvae.infer.diagnostics import evaluate
from pyvae.infer.importance import log_likelihood
from tests.devices import DEVICES
from tests.train.test_compile import Branching, TutorialVAE

X_DIM = 16


# the recording and its numbers are what these tests check: compiled without max-autotune
pytestmark = pytest.mark.usefixtures("untuned")


def _points(n: int = 8) -> torch.Tensor:
    return torch.rand(n, X_DIM, generator=torch.Generator().manual_seed(1)).round()


MODELS = {
    "vae mog prior, iaf guide": lambda: pyvae.VAE(X_DIM, 2, hidden=(8,), prior="mog", guide="iaf"),
    "hvae": lambda: pyvae.HVAE(X_DIM, (3, 2), hidden=((8,), (8,))),
    "m2 enumerated": lambda: pyvae.M2(X_DIM, 3, 2, hidden=(8,)),
    "user program": TutorialVAE,
}


def _scored(model, x, compile: str, count_calls, device="cpu"):
    """log_likelihood in chunks of 2 points, seeded, and how often the programs were traced."""
    traced = count_calls(importance.program, "log_weights")
    torch.manual_seed(7)
    settings = dict(num_samples=40, batch_size=2, keep_log_weights=True, device=device)
    result = log_likelihood(model, x, compile=compile, **settings)
    return result, len(traced)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_importance_sampling_gives_the_programs_numbers(
    name, device, recwarn, count_calls
):
    torch.manual_seed(0)
    model, x = MODELS[name](), _points()
    x = (x, torch.tensor([0, -1, 2, -1, -1, 1, -1, -1])) if name.startswith("m2") else x
    written, traced_written = _scored(model, x, "off", count_calls, device)
    compiled, traced_compiled = _scored(model, x, "on", count_calls, device)
    assert not [w for w in recwarn if issubclass(w.category, pyvae.PyvaeWarning)]
    # one trace sizes the chunks; then four chunks: as written, four traces; compiled, the first
    # as written and one recording
    assert (traced_written, traced_compiled) == (5, 3)
    # a GPU's kernels reassociate sums more than the CPU's exact settings allow
    close = {} if device == "cpu" else {"rtol": 1e-4, "atol": 1e-4}
    for field in ("log_px", "stderr", "elbo", "ess", "log_weights"):
        torch.testing.assert_close(getattr(compiled, field), getattr(written, field), **close)
    for size, bound in written.iwae.items():
        torch.testing.assert_close(compiled.iwae[size], bound, **close)
    for field in ("latent_means", "kl", "kl_per_dim"):
        assert getattr(compiled, field).keys() == getattr(written, field).keys()
        for site, value in getattr(written, field).items():
            torch.testing.assert_close(getattr(compiled, field)[site], value, **close)


def test_evaluate_shares_its_compiled_chunks_across_its_calls(monkeypatch, count_calls):
    torch.manual_seed(0)
    model, x = pyvae.VAE(X_DIM, 2, hidden=(8,)), _points(8)
    compiled = count_calls(importance, "compile_function")
    monkeypatch.setattr(diagnostics, "GRID", {"cpu": 2})  # four calls of log_likelihood
    on = evaluate(model, x, num_samples=30, batch_size=2, compile="on").ll
    off = evaluate(model, x, num_samples=30, batch_size=2, compile="off").ll
    assert len(compiled) == 1
    torch.testing.assert_close(on.log_px, off.log_px)


def test_a_program_that_cannot_be_recorded_is_scored_as_written_and_says_why(count_calls):
    torch.manual_seed(0)
    model, x = Branching(), _points()
    written, _ = _scored(model, x, "off", count_calls)
    uncompiled = "importance sampling runs the program uncompiled"
    with pytest.warns(pyvae.PyvaeWarning, match=uncompiled) as warned:
        compiled, _ = _scored(model, x, "on", count_calls)
    assert warned[0].filename == __file__  # at the user's call, not inside pyvae
    torch.testing.assert_close(compiled.log_px, written.log_px)


def test_auto_compiles_only_large_estimates_and_unknown_settings_are_refused(count_calls):
    model, x = TutorialVAE(), _points()
    assert _scored(model, x, "auto", count_calls)[1] == 5  # 8 x 40 draws: as written
    with pytest.raises(pyvae.PyvaeError, match="unknown compile 'fast'; choose from auto, on"):
        log_likelihood(model, x, num_samples=4, compile="fast")


def test_a_compiled_function_serves_only_inputs_laid_out_as_it_was_compiled_for():
    """The compiled code has no guards: a recording of the same code for an input of the same
    shape but other strides is compiled for them (a transposed view of it is read right), and the
    callers' keys tell the layouts apart."""
    x = torch.arange(12.0).reshape(3, 4)
    column_major = x.t().contiguous().t()  # the same values and shape

    def transposed(v):
        return (v.t() * 1,)

    for given in (x, column_major):
        (out,) = pyvae.compiled.compile_function(transposed, given, autotune=False)(given)
        torch.testing.assert_close(out, x.t())
    assert pyvae.compiled.describe(x) != pyvae.compiled.describe(column_major)


def test_compiled_importance_sampling_follows_weights_changed_through_data(count_calls):
    """An EMA or ``vector_to_parameters`` writes through ``.data``, which keeps the tensors'
    versions: what the compiled chunks froze in is told apart by its bytes."""
    torch.manual_seed(0)
    model, x = TutorialVAE(), _points()
    with importance.scoring_session():
        _scored(model, x, "on", count_calls)
        with torch.no_grad():
            for p in model.parameters():
                p.data.mul_(0.5)
        compiled, _ = _scored(model, x, "on", count_calls)
    written, _ = _scored(model, x, "off", count_calls)
    torch.testing.assert_close(compiled.log_px, written.log_px)


def test_noise_a_recording_cannot_make_apart_is_refused():
    """Drawn in place into a view (its base's readers would keep the zeros), or from Python's or
    numpy's generators (frozen into constants): not compiled, and numpy's generator left as if
    nothing had been recorded."""
    x = torch.zeros(4, 3)

    def into_a_view(v):
        eps = torch.zeros(v.shape[0], 3)
        eps[:, 0].normal_()
        return (v + eps,)

    def from_numpy(v):
        return (v + float(np.random.normal()),)

    with pytest.raises(pyvae.compiled.NotCompiled, match="in place into a view of a tensor"):
        pyvae.compiled.compile_function(into_a_view, x, autotune=False)
    np.random.seed(0)
    first = np.random.normal()
    np.random.seed(0)
    with pytest.raises(pyvae.compiled.NotCompiled, match="Python's or numpy's random generator"):
        pyvae.compiled.compile_function(from_numpy, x, autotune=False)
    assert np.random.normal() == first


def test_compiled_functions_keep_only_the_weights_of_the_last_two_models_alive(monkeypatch):
    """Evaluating checkpoints one after another: each compilation froze its model's weights in
    (inductor's loaded code holds them too), and those of all but the last two models are let go;
    two graphs of one model that read different weights (importance sampling's, AIS's) are kept
    together."""
    monkeypatch.setattr(pyvae.compiled, "_compiled", type(pyvae.compiled._compiled)())
    x, alive = torch.ones(3, 4), []
    for seed in range(3):
        encoder, decoder = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(seed))

        def both(v, encoder=encoder, decoder=decoder):
            return (torch.sigmoid(v @ encoder.t() @ decoder.t()),)

        def decoding(v, decoder=decoder):
            return (torch.sigmoid(v @ decoder.t()),)

        pyvae.compiled.compile_function(both, x, frozen=[encoder, decoder])
        pyvae.compiled.compile_function(decoding, x, frozen=[decoder])
        alive.append(weakref.ref(decoder))
        del encoder, decoder, both, decoding
    gc.collect()
    assert [ref() is not None for ref in alive] == [False, True, True]
    assert len(pyvae.compiled._compiled) == 4
