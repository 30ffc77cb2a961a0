"""Training by SVI: the loop, the objectives, minibatch serving, resume state and the protocol
(validation, early stopping, learning-rate schedules).

* :mod:`pyvae.train.loop`: ``fit`` and ``evaluate_elbo``.
* :mod:`pyvae.train.objectives`: the ELBO, mean-field ELBO, IWAE and enumerated ELBO as losses.
* :mod:`pyvae.train.protocol`: validation objective, early stopping, schedules.
* :mod:`pyvae.train.resume`: what a checkpoint holds so that a stopped run resumes exactly.
* :mod:`pyvae.train.tensorboard`: the TensorBoard log.
"""

from pyvae.train.loop import evaluate_elbo, fit

__all__ = ["evaluate_elbo", "fit"]
