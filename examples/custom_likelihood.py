"""A likelihood of your own: grey levels as counts, x = k/16 with k ~ Binomial(16, p) per pixel.

    python examples/custom_likelihood.py --epochs 5
    python -m pyvae evaluate runs/custom_likelihood --parts examples/custom_likelihood.py

scikit-learn's 8x8 digits are such data: every pixel is a count 0..16, stored divided by 16.
A likelihood is a ``pyvae.parts.likelihoods.Likelihood`` (the contract is in docs/custom-models.md):
``forward(decoder_output)`` returns p(x|z), a distribution over x itself (on the data's scale,
event shape (x_dim,)) whose ``log_prob`` is a normalized density or mass and whose ``mean`` is
E[x|z], what the sample and reconstruction pictures show; ``check_support(x)`` refuses data it
cannot score; ``params_per_pixel`` and ``binary_data`` say what the decoder outputs and whether
grey data must be binarized first.
"""

import math
from pathlib import Path

import pyro.distributions as dist
import torch
import yaml
from torch.distributions import constraints

import pyvae
from pyvae.cli.console import Parser, run
from pyvae.data.datasets import load_train_test


# --- the likelihood -----------------------------------------------------------------------------
class Counts(dist.TorchDistribution):
    """x = k / n for k ~ ``base``, a distribution of counts 0..n:
    P(x) = P_base(n x), E[x] = E[k] / n."""

    arg_constraints = {}
    support = constraints.unit_interval

    def __init__(self, base: dist.Binomial, n: int):
        self.base, self.n = base, n
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return Counts(self.base.expand(batch_shape), self.n)

    def log_prob(self, x):  # mass on the grid 0, 1/n, ..., 1 and none elsewhere
        k = x * self.n
        on_grid = (k - k.round()).abs() < 1e-4
        return torch.where(on_grid, self.base.log_prob(k.round().clamp(0, self.n)), -math.inf)

    def sample(self, sample_shape=torch.Size()):
        return self.base.sample(sample_shape) / self.n

    @property
    def mean(self):  # on the data's scale: not the Binomial's n p
        return self.base.mean / self.n


class Binomial16(pyvae.parts.likelihoods.Likelihood):
    """x_i = k_i / 16, k_i ~ Binomial(16, sigmoid(l_i)) independently: one decoder output per
    pixel."""

    params_per_pixel = 1  # the logit l_i
    binary_data = False  # grey levels are scored as they are, not binarized
    levels = (
        17  # a mass over the 17 values 0, 1/16, ..., 1: log p(x) is a code length, so bits/dim too
    )

    def forward(self, logits):
        return Counts(dist.Binomial(16, logits=logits), 16).to_event(1)

    def check_support(self, x):
        k = x * 16
        if not bool(((k - k.round()).abs() < 1e-4).all() and (k >= 0).all() and (k <= 16).all()):
            raise pyvae.PyvaeError(
                f"Binomial16 needs pixels in {{0, 1/16, ..., 1}}; got values in "
                f"[{x.min().item():.4g}, {x.max().item():.4g}] that are not all multiples of 1/16"
            )


# --- train it, and leave a run folder the python -m pyvae commands can follow -------------------
def main(argv):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs", type=int, default=5, help="passes over the training set (default 5)"
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where to train (auto: CUDA when available)",
    )
    parser.add_argument(
        "--out",
        default="runs/custom_likelihood",
        help="the run folder (default runs/custom_likelihood)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out up to --epochs in all"
    )
    args = parser.parse_args(argv)

    train, test, _ = load_train_test("digits")
    torch.manual_seed(0)
    vae = pyvae.VAE(
        x_dim=train.x_dim,
        z_dim=4,
        hidden=(128,),
        likelihood=Binomial16(),
        image_shape=train.image_shape,
    )
    out = Path(args.out)
    pyvae.fit(
        vae,
        train,
        test=test,
        epochs=args.epochs,
        device=args.device,
        seed=0,
        out=out,
        resume=args.resume,
        out_files=None
        if args.resume
        else {"config.yaml": yaml.safe_dump({"dataset": "digits", "binarize": "none", "seed": 0})},
    )
    print(f"test ELBO: {pyvae.evaluate_elbo(vae, test, num_particles=10):.2f} nats per data point")
    print(f"run folder {out}/; next: python -m pyvae evaluate {out} --parts {__file__}")


if __name__ == "__main__":
    run(main)
