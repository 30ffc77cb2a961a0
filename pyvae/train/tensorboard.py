"""TensorBoard event files for a training run (``--tensorboard``): ``tensorboard --logdir runs/``.

Written into ``RUN/tensorboard/`` by rank 0, all numbers in nats per data point:

* every ``every`` steps: ``loss/train`` (the minibatch's -ELBO estimate, beta-weighted as trained);
* every epoch: ``elbo/train``, ``elbo/test``, ``elbo/valid`` (and ``iwae/...``, ``log_px/valid``,
  any extra metric such as ``accuracy/test``), ``kl_weight`` (beta), ``lr``, ``kl/<site>`` (each
  latent site's E_q[log q - log p] on up to 500 test images, 8 draws each), and the pictures
  ``samples`` (decoded from the prior) and ``reconstructions`` (test images above their
  reconstructions), so the grids can be followed epoch by epoch; their draws come from a forked
  random stream, so a run with events trains exactly as one without;
* after training, the evaluation's ``eval/...`` numbers (log p(x), ELBO, their gap, bits/dim) and
  its table as text.

The folder is made at the first write, so a run refused before training leaves none. A resumed run
appends a new event file to the same folder, its steps and epochs continuing the old ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from pyvae.data.datasets import spread
from pyvae.infer.explore import prior_images
from pyvae.infer.importance import log_likelihood
from pyvae.program import batch_arity, fork_rng
from pyvae.train.callbacks import Callback
from pyvae.viz import plots

#: record keys and the tag they are shown under
TAGS = {
    "train_elbo": "elbo/train",
    "test_elbo": "elbo/test",
    "valid_elbo": "elbo/valid",
    "test_iwae": "iwae/test",
    "valid_iwae": "iwae/valid",
    "valid_log_px": "log_px/valid",
    "beta": "kl_weight",
    "lr": "lr",
    "seconds": "seconds",
}


class TensorBoard(Callback):
    """Writes a run's numbers and pictures as TensorBoard events (see the module's docstring); as
    a callback of ``fit`` (its ``tensorboard=``), on rank 0 after every step and epoch."""

    def __init__(
        self,
        folder: str | Path,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        every: int = 10,
    ) -> None:
        self.folder, self.images, self.labels, self.every = Path(folder), images, labels, every
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            self._writer = SummaryWriter(str(self.folder))
        return self._writer

    def on_step_end(self, run) -> None:
        if run.world.main:
            self.step(run.step, run.loss, run.num_data)

    def on_epoch_end(self, run, record: dict) -> None:
        if run.world.main:
            self.epoch(record, run.model)

    def step(self, step: int, loss: torch.Tensor, num_data: int) -> None:
        """The minibatch loss (an estimate of -sum over the N points) every ``every`` steps, per
        point."""
        if step % self.every == 0:
            self.writer.add_scalar("loss/train", float(loss) / num_data, step)

    def epoch(self, record: dict, model: torch.nn.Module) -> None:
        """The epoch's numbers, the KL of each latent site, and the picture grids; the draws these
        take come from a forked random stream, so a run with events trains exactly as one
        without."""
        device = next(model.parameters()).device
        with fork_rng(device):
            self._epoch(record, model)
        self.writer.flush()

    def _epoch(self, record: dict, model: torch.nn.Module) -> None:
        epoch = record["epoch"]
        for key, value in record.items():
            if key != "epoch":
                self.writer.add_scalar(
                    TAGS.get(key, f"{key.split('_', 1)[-1]}/{key.split('_', 1)[0]}"), value, epoch
                )
        for site, value in self.kl(model).items():
            self.writer.add_scalar(f"kl/{site}", value, epoch)
        shape, n = model.image_shape, min(8, self.images.shape[0])
        if shape is not None:
            self.writer.add_image("samples", plots.grid(prior_images(model, 64), shape), epoch)
            pairs = plots.reconstruction_pairs(model, self.images, n, 2, self.labels)
            self.writer.add_image("reconstructions", plots.grid(pairs, shape, nrow=n), epoch)

    def kl(self, model: torch.nn.Module) -> dict[str, float]:
        """{latent site: mean KL(q || p) term} on up to 500 test images ({} for a labelled model
        without labels)."""
        x = spread(self.images, 500)
        if batch_arity(model) == 2:
            if self.labels is None and not hasattr(model, "classify"):
                return {}
            y = (
                spread(self.labels, 500) if self.labels is not None else torch.full((len(x),), -1)
            )  # m2: unlabelled
            x = (x, y.to(x.device))
        ll = log_likelihood(model, x, num_samples=8)
        return {site: float(value.double().mean()) for site, value in ll.kl.items()}

    def evaluation(self, summary: dict, table: str, epoch: int) -> None:
        """The final evaluation's headline numbers (``eval.json``'s) and its table."""
        for key in ("log_px", "elbo", "gap", "bits_per_dim", "elbo_bits_per_dim"):
            if summary.get(key) is not None:
                self.writer.add_scalar(f"eval/{key}", summary[key], epoch)
        self.writer.add_text(
            "eval", "    " + table.replace("\n", "\n    "), epoch
        )  # indented: shown as code
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
