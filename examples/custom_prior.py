"""A prior of your own in a few lines: a Gaussian mixture whose components sit on a circle.

    python examples/custom_prior.py --epochs 5
    python -m pyvae evaluate runs/custom_prior --parts examples/custom_prior.py  # and the rest

A prior is any ``pyvae.parts.priors.Prior``: ``bind`` makes its parameters once z_dim is
known, ``forward`` returns a Pyro distribution over z with event shape (z_dim,).
The model asks it for p(z) at every step, so nothing else changes. The run folder it writes
(checkpoint.pt, metrics.jsonl, config.yaml) is what ``python -m pyvae`` commands read; they
rebuild the ring from this file, named by ``--parts``.
"""

import math
from pathlib import Path

import pyro.distributions as dist
import torch
import yaml

import pyvae
from pyvae.cli.console import Parser, run
from pyvae.data.datasets import binarize_for, load_train_test


# --- the prior: 17 lines -------------------------------------------------------------
class RingPrior(pyvae.parts.priors.Prior):
    """p(z) = (1/K) sum_k N(z; r (cos 2pi k/K, sin 2pi k/K, 0, ...), s^2 I), radius r learned."""

    def __init__(self, num_components: int = 10, scale: float = 0.5):
        super().__init__(num_components=num_components, scale=scale)

    def bind(self, vae):
        self.log_radius = torch.nn.Parameter(torch.zeros(()))
        angles = (
            2
            * math.pi
            * torch.arange(self.hparams["num_components"])
            / self.hparams["num_components"]
        )
        directions = torch.zeros(len(angles), vae.z_dim)
        directions[:, 0], directions[:, 1] = angles.cos(), angles.sin()
        self.register_buffer("directions", directions)

    def forward(self):
        locs = self.log_radius.exp() * self.directions
        components = dist.Normal(locs, self.hparams["scale"]).to_event(1)
        return dist.MixtureSameFamily(
            dist.Categorical(logits=locs.new_zeros(len(locs))), components
        )


# --- train and evaluate it ---------------------------------------------------------------
def main(argv):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs", type=int, default=5, help="passes over the training set (default 5)"
    )
    parser.add_argument(
        "--dataset",
        default="binarized_mnist",
        help="data set name or PATH (default binarized_mnist)",
    )
    parser.add_argument("--data-dir", help="data root (default $PYVAE_DATA, else ./data)")
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where to train (auto: CUDA when available)",
    )
    parser.add_argument("--no-download", action="store_true", help="never fetch missing data files")
    parser.add_argument(
        "--out", default="runs/custom_prior", help="the run folder (default runs/custom_prior)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out up to --epochs in all"
    )
    args = parser.parse_args(argv)

    train, test, notice = load_train_test(
        args.dataset, data_dir=args.data_dir, download=not args.no_download
    )
    if notice:
        print(notice)
    train, test, binarized = binarize_for(pyvae.parts.likelihoods.Bernoulli(), train, test)
    torch.manual_seed(0)
    vae = pyvae.VAE(
        x_dim=train.x_dim, z_dim=2, hidden=(256,), prior=RingPrior(), image_shape=train.image_shape
    )
    # config.yaml says which data the python -m pyvae commands should find again; fit writes it with
    # the run folder once the input is checked
    where = {
        "dataset": train.name,
        "binarize": binarized,
        "seed": 0,
        **({"data_dir": args.data_dir} if args.data_dir else {}),
    }
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
        out_files=None if args.resume else {"config.yaml": yaml.safe_dump(where)},
    )
    print(f"learned ring radius: {vae.prior.log_radius.exp().item():.2f}")
    print(f"test ELBO: {pyvae.evaluate_elbo(vae, test, num_particles=10):.2f} nats per data point")
    print(f"run folder {out}/; next: python -m pyvae evaluate {out} --parts {__file__}")


if __name__ == "__main__":
    run(main)
