"""The one exception type pyvae raises for bad input.

Every user-facing entry point turns a :class:`PyvaeError` into a one-line message
and exit code 2; anything else is a bug and keeps its traceback.
"""


class PyvaeError(ValueError):
    """Bad input from the user: the message names the value and what is allowed."""


class PyvaeWarning(UserWarning):
    """Something the user should know that does not stop the work; the CLI prints it as one
    ``warning: ...`` line, without Python's file and line prefix."""


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
