"""The one exception type pyvae raises for bad input, and its warnings.

Every user-facing entry point turns a :class:`PyvaeError` into a one-line message
and exit code 2; anything else is a bug and keeps its traceback.
"""

import importlib.util
import os
import sys
import warnings


def _package_dir(name: str) -> str:
    try:
        spec = importlib.util.find_spec(name)
    except ValueError:  # imported without a spec (an embedded interpreter)
        spec = None
    return os.path.dirname(os.path.abspath(spec.origin)) if spec and spec.origin else name


#: where a warning's line is never shown: pyvae, and the libraries between its frames and the
#: user's (torch's ``no_grad`` decorator, Pyro's handlers)
_LIBRARIES = tuple(_package_dir(name) + os.sep for name in ("pyvae", "torch", "pyro"))


class PyvaeError(ValueError):
    """Bad input from the user: the message names the value and what is allowed."""


class PyvaeWarning(UserWarning):
    """Something the user should know that does not stop the work; the CLI prints it as one
    ``warning: ...`` line, without Python's file and line prefix."""


def warn(message: str) -> None:
    """A :class:`PyvaeWarning` shown at the first line outside pyvae (and torch and Pyro) that led
    here: the user's call, however deep inside pyvae the cause was found."""
    frame, level = sys._getframe(1), 2  # level 2: the caller of this function
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LIBRARIES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, PyvaeWarning, stacklevel=level)


class DataNotFound(PyvaeError):
    """A data set is neither on disk nor downloadable; the message says where we looked."""


def positive_int(name: str, value) -> int:
    """``value`` if it is an integer > 0; else a :class:`PyvaeError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PyvaeError(f"{name} must be a positive integer; got {value!r}")
    return value


def positive_number(name: str, value) -> float:
    """``value`` as a float if it is a finite number > 0; else a :class:`PyvaeError` naming
    ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value < float("inf")
    ):
        raise PyvaeError(f"{name} must be a positive number; got {value!r}")
    return float(value)
