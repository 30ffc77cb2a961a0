"""``python -m pyvae COMMAND``: parse the command's flags, then import its module and run it.

Parsing needs only :mod:`pyvae.cli.flags` (no torch), so ``--help`` answers at once; the chosen
command's module (``pyvae.cli.<command>``, whose ``main(args)`` does the work) is imported after.
Bad input is one line on stderr and exit code 2 (a traceback with ``--debug``).
"""

from __future__ import annotations

import importlib
import sys

from pyvae.cli.console import run
from pyvae.cli.flags import SPECS, parser


class Command:
    """``pyvae.cli.<name>`` as a callable of the command line's words (``argv``): what
    :func:`pyvae.cli.console.run` calls; ``prog`` names it in usage lines."""

    def __init__(self, name: str, prog: str | None = None) -> None:
        self.name, self.prog = name, prog
        self.__doc__ = SPECS[name].summary

    def __call__(self, argv: list[str]) -> None:
        args = parser(self.name, self.prog).parse_args(argv)
        importlib.import_module(f"pyvae.cli.{self.name}").main(args)


COMMANDS = {name: Command(name, f"python -m pyvae {name}") for name in SPECS}


def main(argv: list[str] | None = None) -> None:
    """Run the command ``argv[0]`` names with the rest of ``argv``; no command lists them."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m pyvae COMMAND [flags]   "
            "(python -m pyvae COMMAND --help for its flags)\n"
        )
        for name, spec in SPECS.items():
            print(f"  {name:<12}{spec.summary}")
        return
    if argv[0] not in COMMANDS:
        print(
            f"usage: python -m pyvae {{{','.join(COMMANDS)}}} ...; got {argv[0]!r}", file=sys.stderr
        )
        sys.exit(2)
    run(COMMANDS[argv[0]], argv[1:])


__all__ = ["COMMANDS", "Command", "main", "run"]
