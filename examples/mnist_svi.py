"""Train a VAE on static binarized MNIST by SVI and write its pictures and metrics.

    python examples/mnist_svi.py                      # 10 epochs, defaults of configs/mnist.yaml
    python examples/mnist_svi.py --epochs 5 --elbo meanfield --device cuda
    python examples/mnist_svi.py --config configs/mnist_vampprior.yaml --z-dim 20
    python examples/mnist_svi.py --prior vamp --guide iaf --elbo iwae --num-particles 5
    python examples/mnist_svi.py --resume runs/binarized_mnist-20261121-101500 --epochs 20
    torchrun --nproc_per_node=4 examples/mnist_svi.py --epochs 20   # data-parallel on 4 GPUs

ELBOs are printed in nats per data point: a lower bound on log p(x), higher is better
(negative for the default Bernoulli likelihood; the NLL is its negative).
"""

import sys
from pathlib import Path

import torch

import pyvae
from pyvae import plots
from pyvae.cli import run
from pyvae.config import parse_args
from pyvae.data import binarize_for, load_train_test, spread
from pyvae.diagnostics import evaluate
from pyvae.distributed import init, shutdown
from pyvae.train import resolve_device


def main(argv):
    config, _ = parse_args(argv, description=__doc__.splitlines()[0])
    # under torchrun, one of several processes training together (rank 0 writes); else alone
    world, device = init(resolve_device(config.device))
    say = print if world.main else lambda *args, **kwargs: None

    # 1. data: the requested set, or the offline digits with a notice
    with world.local_main_first():  # one download per machine
        train, test, notice = load_train_test(
            config.dataset,
            data_dir=config.data_dir,
            download=config.download,
            fallback=None if config.strict_data else "digits",
        )
    if notice:
        say(notice, file=sys.stderr)
        config.dataset = train.name
    likelihood = pyvae.likelihoods.LIKELIHOODS.resolve(config.likelihood)
    train, test, config.binarize = binarize_for(likelihood, train, test, config.binarize, config.seed)
    say(f"data: {train.name}, {len(train)} train / {len(test)} test images of {train.image_shape}, binarize={config.binarize}")

    # 2. model: p(z) p(x|z) and q(z|x) as Pyro programs around two MLPs
    torch.manual_seed(config.seed)
    if config.resume:  # fit restores the optimizer, the step counter and the random generators too
        vae = pyvae.load(f"{config.resume}/checkpoint.pt")
    else:
        vae = pyvae.VAE(
            x_dim=train.x_dim,
            z_dim=config.z_dim,
            hidden=config.hidden,
            prior=config.prior,
            likelihood=likelihood,
            guide=config.guide,
            activation=config.activation,
            image_shape=train.image_shape,
            net=config.net,
        )

    # 3. inference: SVI on the ELBO, a checkpoint and a metrics line per epoch
    out = Path(world.broadcast(str(config.output_dir()) if world.main else None))
    if world.main and not config.resume:
        (out / "config.yaml").write_text(config.to_yaml())
    history = pyvae.fit(
        vae,
        train,
        test=test,
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        elbo=config.elbo,
        num_particles=config.num_particles,
        beta=config.beta,
        kl_warmup_epochs=config.kl_warmup_epochs,
        clip_norm=config.clip_norm,
        device=device,
        seed=config.seed,
        out=out,
        resume=bool(config.resume),
    )

    shutdown()  # leave torchrun's process group: what follows is rank 0's alone
    if not world.main:
        return

    # 4. pictures
    plots.samples(vae, out / "samples.png")
    plots.reconstructions(vae, test.draw(), out / "reconstructions.png")
    plots.elbo_curves(history, out / "elbo.png")

    # 5. the test log-likelihood by importance sampling (python -m pyvae evaluate for K = 5000)
    if config.eval_samples:
        x = spread(test.draw(), config.eval_points)
        result = evaluate(vae, x, config.eval_samples, dataset=test.name, split="test", progress=True)
        print(result.table())
        result.write(out / f"eval-{test.name}-test-K{config.eval_samples}")
    print(f"test ELBO {history[-1]['test_elbo']:.3f} nats per data point; outputs in {out}/")


if __name__ == "__main__":
    run(main)
