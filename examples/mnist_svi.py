"""Train a VAE on static binarized MNIST by SVI and write its pictures and metrics.

    python examples/mnist_svi.py                      # 10 epochs, defaults of configs/mnist.yaml
    python examples/mnist_svi.py --epochs 20    # the measured recipe: test log p(x) about -92.9
    python examples/mnist_svi.py --epochs 5 --elbo trace --device cuda
    python examples/mnist_svi.py --config configs/mnist_vampprior.yaml --z-dim 20
    python examples/mnist_svi.py --model hvae          # two stochastic layers (IWAE paper)
    python examples/mnist_svi.py --resume runs/binarized_mnist-20261121-101500   # where it stopped
    torchrun --nproc_per_node=4 examples/mnist_svi.py --epochs 20   # data-parallel on 4 GPUs

The same as ``python -m pyvae train``; the whole story (data, model, SVI, pictures,
importance-sampled test log-likelihood) is ``main`` in ``pyvae/cli/train.py``. The flags are
parsed before torch is imported, so ``--help`` answers at once.
ELBOs are printed in nats per data point: a lower bound on log p(x), higher is better
(negative for the default Bernoulli likelihood; the NLL is its negative).
"""

from pyvae.cli import Command, run

train_main = Command("train")  # usage lines name this script

if __name__ == "__main__":
    run(train_main)
