"""The command line: ``python -m pyvae COMMAND``, one module per command (``pyvae.cli.train``,
``pyvae.cli.evaluate``, ...), each a ``main(args)`` of the flags :mod:`pyvae.cli.flags` describes.

A script runs one as ``run(Command("train"))`` (:class:`pyvae.cli.app.Command`), which parses
its flags before importing the command's module.
"""

from pyvae.cli.app import Command, main, run

__all__ = ["Command", "main", "run"]
