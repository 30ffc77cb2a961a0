"""Pictures: image grids, training curves, k-hat and AIS plots, embeddings (matplotlib)."""

from pyvae.viz import plots

__all__ = ["plots"]
