"""Do unlabelled data help? M2 on Fashion-MNIST with 1000 labels against the same classifier trained
on those labels alone.

    python benchmarks/m2_fashion.py --epochs 10 --num-labels 1000

Both classifiers are the same network, q(y|x): a 784-500-10 softplus MLP (M2's default,
Kingma et al. 2014). The baseline trains it by Adam on the cross-entropy of the labelled
points alone; M2 (``python -m pyvae train --model m2``'s model and objective, TraceEnum over
y for the 59,000 unlabelled points) trains it inside the generative model. The images are
binarized afresh every epoch for both (the Bernoulli likelihood's protocol). The script prints
the test accuracy after every epoch of each and the wall time, in one process.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from common import add_common_arguments, setup, sync

import pyvae
from pyvae.data import binarize_for, load_train_test, semi_supervised
from pyvae.parts.nets import mlp


def labelled_only(train, test, device, epochs, batch_size, lr, seed):
    """The classifier on the labelled points alone: cross-entropy, Adam; test accuracy per epoch."""
    torch.manual_seed(seed)
    keep = train.labels >= 0
    x, y = train.images[keep].to(device), train.labels[keep].to(device)
    net = mlp(x.shape[1], (500,), 10, "softplus").to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    x_test, y_test = test.images.to(device), test.labels.to(device)
    history = []
    for _ in range(epochs):
        for idx in torch.randperm(len(x), device=device).split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(net(torch.bernoulli(x[idx])), y[idx]).backward()
            optimizer.step()
        with torch.no_grad():
            history.append(
                float((net(torch.bernoulli(x_test)).argmax(-1) == y_test).float().mean())
            )
    return history


def arguments():
    parser = add_common_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument(
        "--epochs", type=int, default=10, help="M2 epochs over the 60,000 training images"
    )
    parser.add_argument(
        "--baseline-epochs", type=int, default=100, help="epochs over the labelled points alone"
    )
    parser.add_argument("--num-labels", type=int, default=1000)
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.1,
        help="M2's classification weight (x N); Kingma et al.: 0.1",
    )
    parser.add_argument(
        "--labelled-share",
        type=float,
        help="labelled part of every minibatch (default: their share of the data)",
    )
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main():
    args = arguments()
    device = setup(args)

    train, test, _ = load_train_test("fashion_mnist", data_dir=args.data_dir, download=False)
    train, test, _ = binarize_for(
        pyvae.parts.likelihoods.Bernoulli(), train, test, "dynamic", args.seed
    )
    train = semi_supervised(train, args.num_labels, args.seed)
    x_test, y_test = test.draw(), test.labels

    sync(device)
    start = time.perf_counter()
    baseline = (
        [float("nan")]
        if args.skip_baseline
        else labelled_only(train, test, device, args.baseline_epochs, 100, 1e-3, args.seed)
    )
    sync(device)
    baseline_seconds = time.perf_counter() - start

    torch.manual_seed(args.seed)
    model = pyvae.M2(x_dim=784, num_classes=10, alpha=args.alpha, image_shape=(1, 28, 28))
    start = time.perf_counter()
    history = pyvae.fit(
        model,
        train,
        test=(x_test, torch.full_like(y_test, -1)),
        epochs=args.epochs,
        elbo="enum",
        device=device,
        seed=args.seed,
        labelled_share=args.labelled_share,
        metrics={"test_accuracy": lambda m: m.accuracy(x_test.to(device), y_test)},
    )
    m2_seconds = time.perf_counter() - start

    print(
        f"\nFashion-MNIST, {args.num_labels} labels (class-balanced), the rest of the 60,000 "
        "unlabelled; test accuracy on 10,000 images"
    )
    print(
        "| classifier (784-500-10 softplus) | epochs | wall time | final test accuracy | best test "
        "accuracy |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| labelled points alone (cross-entropy) | {args.baseline_epochs} over {args.num_labels} "
        f"| {baseline_seconds:.0f} s | {baseline[-1]:.3f} | {max(baseline):.3f} |"
    )
    accuracy = [h["test_accuracy"] for h in history]
    share = "" if args.labelled_share is None else f", labelled share {args.labelled_share}"
    print(
        f"| M2 (unlabelled points too), alpha {args.alpha}{share} | {args.epochs} over 60,000 | "
        f"{m2_seconds:.0f} s | {accuracy[-1]:.3f} | {max(accuracy):.3f} |"
    )
    print("\nM2 per epoch: " + ", ".join(f"{a:.3f}" for a in accuracy))
    print(
        "M2 test ELBO per epoch (nats, images unlabelled): "
        + ", ".join(f"{h['test_elbo']:.1f}" for h in history)
    )


if __name__ == "__main__":
    main()
