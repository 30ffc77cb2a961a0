"""How every command-line entry point talks to the user: one-line errors, exit codes, output folders.

Bad input is one line on stderr and exit code 2 (a traceback with ``--debug``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import PyvaeError


def run(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Call ``main(argv)``; a :class:`PyvaeError` becomes ``error: ...`` and exit 2 (a traceback with ``--debug``)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
    except PyvaeError as e:
        if "--debug" in argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr)
        sys.exit(128 + getattr(e, "signum", 2))


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2."""

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
            raise PyvaeError(f"cannot write to output folder {out}: {existing} is not a writable folder")
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise PyvaeError(f"cannot write to output folder {out}: {e.strerror or e}") from e
    return out
