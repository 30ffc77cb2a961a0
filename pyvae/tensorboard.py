"""TensorBoard event files for a training run (``--tensorboard``): ``tensorboard --logdir runs/``.

Written into ``RUN/tensorboard/`` by rank 0, all numbers in nats per data point:

* every ``every`` steps: ``loss/train`` (the minibatch's -ELBO estimate, beta-weighted as trained);
* every epoch: ``elbo/train``, ``elbo/test``, ``elbo/valid`` (and ``iwae/...``, ``log_px/valid``,
  any extra metric such as ``accuracy/test``), ``kl_weight`` (beta), ``lr``, and the pictures
  ``samples`` (decoded from the prior) and ``reconstructions`` (test images above their
  reconstructions), so the grids can be followed epoch by epoch;
* after training, the evaluation's ``eval/...`` numbers (log p(x), ELBO, their gap, bits/dim) and its
  table as text.

The folder is made at the first write, so a run refused before training leaves none. A resumed run
appends a new event file to the same folder, its steps and epochs continuing the old ones.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import plots
from .explore import prior_images

#: record keys and the tag they are shown under
TAGS = {"train_elbo": "elbo/train", "test_elbo": "elbo/test", "valid_elbo": "elbo/valid", "test_iwae": "iwae/test",
        "valid_iwae": "iwae/valid", "valid_log_px": "log_px/valid", "beta": "kl_weight", "lr": "lr", "seconds": "seconds"}


class TensorBoard:
    """Writes a run's numbers and pictures as TensorBoard events (see the module's docstring)."""

    def __init__(self, folder: str | Path, images: torch.Tensor, labels: torch.Tensor | None = None, every: int = 10) -> None:
        self.folder, self.images, self.labels, self.every = Path(folder), images, labels, every
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.folder))
        return self._writer

    def step(self, step: int, loss: torch.Tensor, num_data: int) -> None:
        """The minibatch loss (an estimate of -sum over the N points) every ``every`` steps, per point."""
        if step % self.every == 0:
            self.writer.add_scalar("loss/train", float(loss) / num_data, step)

    def epoch(self, record: dict, model: torch.nn.Module) -> None:
        epoch = record["epoch"]
        for key, value in record.items():
            if key != "epoch":
                self.writer.add_scalar(TAGS.get(key, f"{key.split('_', 1)[-1]}/{key.split('_', 1)[0]}"), value, epoch)
        shape, n = model.image_shape, min(8, self.images.shape[0])
        if shape is not None:
            was_training = model.training
            self.writer.add_image("samples", plots.grid(prior_images(model.eval(), 64), shape), epoch)
            pairs = plots.reconstruction_pairs(model, self.images, n, 2, self.labels)
            self.writer.add_image("reconstructions", plots.grid(pairs, shape, nrow=n), epoch)
            model.train(was_training)
        self.writer.flush()

    def evaluation(self, summary: dict, table: str, epoch: int) -> None:
        """The final evaluation's headline numbers (``eval.json``'s) and its table."""
        for key in ("log_px", "elbo", "gap", "bits_per_dim", "elbo_bits_per_dim"):
            if summary.get(key) is not None:
                self.writer.add_scalar(f"eval/{key}", summary[key], epoch)
        self.writer.add_text("eval", "    " + table.replace("\n", "\n    "), epoch)  # indented: shown as code
        self.writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
