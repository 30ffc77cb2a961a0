"""Built-in models, each a Pyro ``model``/``guide`` pair on a ``torch.nn.Module`` (the contract is
in :mod:`pyvae.program`), chosen by ``--model``:

=====  =========================================================================
vae    p(z) p(x|z), q(z|x): priors, likelihoods, guide families and nets swappable
hvae   L stochastic layers, top-down p(z_L) ... p(z_1|z_2) p(x|z_1), bottom-up guide
cvae   p(z) p(x|z, y), q(z|x, y): a class-conditional VAE for labelled data
m2     Kingma et al. (2014): y ~ Cat, z ~ N(0, I), x ~ p(x|y, z); q(y|x) q(z|x, y)
=====  =========================================================================
"""

from pyvae.models.cvae import CVAE
from pyvae.models.hvae import HVAE
from pyvae.models.m2 import M2
from pyvae.models.vae import VAE

MODELS = {"vae": VAE, "hvae": HVAE, "cvae": CVAE, "m2": M2}

__all__ = ["MODELS", "VAE", "HVAE", "CVAE", "M2"]
