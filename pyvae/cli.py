"""How every command-line entry point reports bad input: one line on stderr, exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
