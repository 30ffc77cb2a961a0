"""Training by SVI: the loop, the objectives, minibatch serving, resume state and the protocol
(validation, early stopping, learning-rate schedules).

* :mod:`pyvae.train.loop`: ``fit`` and ``evaluate_elbo``; the story of a run.
* :mod:`pyvae.train.run`: ``Training``, the state and loop of one run.
* :mod:`pyvae.train.step`: a step's loss and gradients, run as written or compiled.
* :mod:`pyvae.train.validation`: each epoch's ELBOs and validation log p(x), as written or compiled.
* :mod:`pyvae.train.callbacks`: what happens around the steps (checkpoints, early stopping, MLflow).
* :mod:`pyvae.train.objectives`: the ELBO, mean-field ELBO, IWAE and enumerated ELBO as losses.
* :mod:`pyvae.train.protocol`: validation objective, early stopping, schedules.
* :mod:`pyvae.train.resume`: what a checkpoint holds so that a stopped run resumes exactly.
* :mod:`pyvae.train.tensorboard`: the TensorBoard log.
"""

from pyvae.train.callbacks import (
    BestCheckpoint,
    Callback,
    Checkpoints,
    EarlyStopping,
    EpochLine,
    LRSchedule,
    MetricsFile,
    MLflowCallback,
    StopOnSignal,
    TrainingStopped,
)
from pyvae.train.loop import evaluate_elbo, fit
from pyvae.train.run import Training
from pyvae.train.tensorboard import TensorBoard

__all__ = [
    "BestCheckpoint",
    "Callback",
    "Checkpoints",
    "EarlyStopping",
    "EpochLine",
    "LRSchedule",
    "MLflowCallback",
    "MetricsFile",
    "StopOnSignal",
    "TensorBoard",
    "Training",
    "TrainingStopped",
    "evaluate_elbo",
    "fit",
]
