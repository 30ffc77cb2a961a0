"""The one exception type pyvae raises for bad input.

Every user-facing entry point turns a :class:`PyvaeError` into a one-line message
and exit code 2; anything else is a bug and keeps its traceback.
"""


class PyvaeError(ValueError):
    """Bad input from the user: the message names the value and what is allowed."""


class DataNotFound(PyvaeError):
    """A data set is neither on disk nor downloadable; the message says where we looked."""
