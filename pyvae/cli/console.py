"""How every command-line entry point talks to the user: one-line errors, exit codes, output
folders.

Bad input is one line on stderr and exit code 2; any other failure (a bug, an allocation
that does not fit) is one line too, with exit code 1. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from pyvae.errors import PyvaeError, PyvaeWarning


def run(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Call ``main(argv)``: a :class:`PyvaeError` becomes ``error: ...`` and exit 2, any other
    exception one line and exit 1; ``--debug`` in ``argv`` re-raises instead (the traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        formatted = (
            warnings.formatwarning
        )  # only the wording: a handler recording warnings (pytest's) still gets them
        warnings.formatwarning = functools.partial(_format_warning, formatted=formatted)
        try:
            main(argv)
        finally:
            warnings.formatwarning = formatted
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr)
        sys.exit(128 + getattr(e, "signum", 2))
    except Exception as e:
        if "--debug" in argv:
            raise
        if isinstance(e, PyvaeError):
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(f"error: {describe_failure(e)} (run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)


def _format_warning(message, category, filename, lineno, line=None, *, formatted) -> str:
    """A :class:`PyvaeWarning` as one ``warning: ...`` line; any other warning as ``formatted``
    words it."""
    if issubclass(category, PyvaeWarning):
        return f"warning: {message}\n"
    return formatted(message, category, filename, lineno, line)


#: what allocation failures say: torch on Linux and Windows, CUDA, numpy
OUT_OF_MEMORY = re.compile(
    r"out of memory|can't allocate memory|not enough memory|Unable to allocate [\d.]+ [KMGT]i?B",
    re.I,
)


def describe_failure(e: Exception) -> str:
    """One line for an exception nobody anticipated; an allocation failure says how much and
    what to lower."""
    text = " ".join(str(e).split())
    if isinstance(e, MemoryError) or OUT_OF_MEMORY.search(text):
        wanted = re.search(r"tried to allocate (\d+) bytes", text) or re.search(
            r"(?:Tried to allocate|Unable to allocate) ([\d.]+ [KMGT]i?B)", text
        )
        size = wanted.group(1) if wanted else None
        size = (
            _bytes(int(size)) if size and size.isdigit() else size and size.replace(". ", " ")
        )  # numpy's "728. TiB"
        return (
            f"out of memory{f' allocating {size}' if size else ''} ({type(e).__name__}); "
            "lower --batch-size, --num-particles or --num-samples, or use a machine with more "
            "memory"
        )
    first = text[:300] + ("..." if len(text) > 300 else "")
    return f"unexpected {type(e).__name__}: {first or 'no message'}"


def _bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2, and every command takes
    ``--debug`` (read by :func:`run`: the traceback instead of one line)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            "--debug",
            action="store_true",
            help="show the traceback of an error instead of one line",
        )

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def writable_dir(path: str | Path, create: bool = True) -> Path:
    """``path`` as a folder we have just created or checked we can write in; else a clear error.

    With ``create=False`` nothing is made yet (no stray folder if the work fails): the folder,
    or the nearest folder above it that exists, must be writable.
    """
    out = Path(path)
    if not create:
        existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise PyvaeError(
                f"cannot write to output folder {out}: {existing} is not a writable folder"
            )
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise PyvaeError(f"cannot write to output folder {out}: {e.strerror or e}") from e
    return out
