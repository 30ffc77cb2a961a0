"""A run's files: checkpoints, atomic writes, and the user's own code a run records.

* :mod:`pyvae.runs.checkpoint`: ``save`` and ``load`` (weights, class, constructor arguments).
* :mod:`pyvae.runs.files`: ``atomic_write`` and ``write_json``: never half a file.
* :mod:`pyvae.runs.user_code`: ``--parts FILE.py`` and ``--model FILE.py:Class``, imported
  again (and checked unchanged) by every command that follows the run.
"""

from pyvae.runs.checkpoint import load, read, save
from pyvae.runs.files import atomic_write, write_json
from pyvae.runs.user_code import USER_MODEL

__all__ = ["USER_MODEL", "atomic_write", "load", "read", "save", "write_json"]
