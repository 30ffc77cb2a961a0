"""The parts a model is built of: networks, priors p(z), likelihoods p(x|z) and guides q(z|x).

* :mod:`pyvae.parts.nets`: the encoder and decoder networks (MLPs, convolutional nets).
* :mod:`pyvae.parts.priors`: ``Normal``, ``VampPrior``, mixtures, ... each a Pyro sample site.
* :mod:`pyvae.parts.likelihoods`: ``Bernoulli``, ``Normal``, discretized logistics, ...
* :mod:`pyvae.parts.guides`: diagonal Normal, full-covariance, IAF flows.
* :mod:`pyvae.parts.component`: the shape they share (hyper-parameters first, ``bind`` once the
  dimensions are known) and the registries a checkpoint rebuilds them from.
"""

from pyvae.parts import guides, likelihoods, nets, priors
from pyvae.parts.component import Component

__all__ = ["Component", "guides", "likelihoods", "nets", "priors"]
