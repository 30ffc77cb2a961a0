"""How every command-line entry point talks to the user: one-line errors, exit codes, output folders.

Bad input is one line on stderr and exit code 2; any other failure (a bug, an allocation
that does not fit) is one line too, with exit code 1. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import PyvaeError


def run(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Call ``main(argv)``: a :class:`PyvaeError` becomes ``error: ...`` and exit 2, any other
    exception one line and exit 1; ``--debug`` in ``argv`` re-raises instead (the traceback)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        main(argv)
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


def describe_failure(e: Exception) -> str:
    """One line for an exception nobody anticipated; an allocation failure says how much and what to lower."""
    text = " ".join(str(e).split())
    wanted = re.search(r"tried to allocate (\d+) bytes", text) or re.search(r"Tried to allocate ([\d.]+ [KMGT]i?B)", text)
    if isinstance(e, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text:
        size = wanted.group(1) if wanted else None
        size = f"{int(size) / 2**30:.1f} GiB" if size and size.isdigit() else size
        return (f"out of memory{f' allocating {size}' if size else ''} ({type(e).__name__}); "
                "lower --batch-size, --num-particles or --num-samples, or use a machine with more memory")
    first = text[:300] + ("..." if len(text) > 300 else "")
    return f"unexpected {type(e).__name__}: {first or 'no message'}"


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
