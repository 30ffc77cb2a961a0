"""The command line: ``python -m pyvae COMMAND``, one module per command."""

from pyvae.cli.app import main

__all__ = ["main"]
