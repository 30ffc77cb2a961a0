"""A model of your own, written as plain Pyro: a VAE with two stochastic layers and a Laplace top
prior.

    python examples/custom_model.py --epochs 5

pyvae trains, scores, diagnoses and saves exactly this program: the contract is a
``torch.nn.Module`` with ``model(x, num_data=None)`` and ``guide(x, num_data=None)`` whose
per-data-point sites sit in a plate named "data" (``pyvae.program`` has the details).
"""

import pyro
import pyro.distributions as dist
import torch
from torch import nn

import pyvae
from pyvae.cli.console import Parser, run
from pyvae.data.datasets import binarize_for, load_train_test


class TwoLevelVAE(nn.Module):
    """z2 ~ Laplace(0, 1); z1 | z2 ~ N(mu(z2), sigma(z2)); x | z1 ~ Bernoulli(f(z1)).
    Guide: q(z1|x) q(z2|z1)."""

    def __init__(self, x_dim=64, z1=8, z2=2, hidden=64):
        super().__init__()
        self.z2 = z2
        self.top_down = nn.Sequential(
            nn.Linear(z2, hidden), nn.Softplus(), nn.Linear(hidden, 2 * z1)
        )
        self.decoder = nn.Sequential(nn.Linear(z1, hidden), nn.Softplus(), nn.Linear(hidden, x_dim))
        self.encoder1 = nn.Sequential(
            nn.Linear(x_dim, hidden), nn.Softplus(), nn.Linear(hidden, 2 * z1)
        )
        self.encoder2 = nn.Sequential(
            nn.Linear(z1, hidden), nn.Softplus(), nn.Linear(hidden, 2 * z2)
        )

    @staticmethod
    def normal(params):
        loc, raw_scale = params.chunk(2, dim=-1)
        return dist.Normal(loc, nn.functional.softplus(raw_scale) + 1e-4).to_event(1)

    def model(self, x, num_data=None):
        with pyro.plate(
            "data", size=num_data or len(x), subsample=torch.arange(len(x), device=x.device)
        ):
            z2 = pyro.sample("z2", dist.Laplace(x.new_zeros(self.z2), 1.0).to_event(1))
            z1 = pyro.sample("z1", self.normal(self.top_down(z2)))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z1)).to_event(1), obs=x)

    def guide(self, x, num_data=None):
        with pyro.plate(
            "data", size=num_data or len(x), subsample=torch.arange(len(x), device=x.device)
        ):
            z1 = pyro.sample("z1", self.normal(self.encoder1(x)))
            pyro.sample("z2", self.normal(self.encoder2(z1)))


def main(argv):
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs", type=int, default=5, help="passes over the training set (default 5)"
    )
    parser.add_argument(
        "--dataset", default="digits", help="digits ships with scikit-learn: no download"
    )
    parser.add_argument("--data-dir", help="data root (default $PYVAE_DATA, else ./data)")
    parser.add_argument("--out", default="runs/custom_model", help="where the checkpoint goes")
    args = parser.parse_args(argv)

    # data: ImageSets of flat images in [0, 1], binarized for the Bernoulli likelihood
    train, test, notice = load_train_test(args.dataset, data_dir=args.data_dir, fallback="digits")
    if notice:
        print(notice)
    train, test, _ = binarize_for(pyvae.parts.likelihoods.Bernoulli(), train, test)

    torch.manual_seed(0)
    model = TwoLevelVAE(x_dim=train.x_dim)
    pyvae.fit(model, train, test=test, epochs=args.epochs, batch_size=64, seed=0, beta=1.0)
    # importance-sampled log p(x) of this very program
    result = pyvae.evaluate(model, test, num_samples=500)
    print(result.table())

    path = f"{args.out}/checkpoint.pt"
    import pathlib

    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    pyvae.save(model, path)
    # your class: pass an instance to load into
    again = pyvae.load(path, model=TwoLevelVAE(x_dim=train.x_dim))
    print(f"saved and reloaded {type(again).__name__} from {path}")


if __name__ == "__main__":
    run(main)
