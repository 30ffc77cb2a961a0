"""mkdocs hook: ``<!-- flags: COMMAND -->`` in a page becomes that command's table of flags,
generated from its parser, so the docs list exactly the flags the command takes."""

import re

from pyvae.cli.flags import markdown_table

FLAGS = re.compile(r"<!-- flags: ([a-z_]+) -->")


def on_page_markdown(markdown, page, config, files):
    """Replace each flags marker by ``pyvae.cli.flags.markdown_table(command)``."""
    return FLAGS.sub(lambda m: markdown_table(m.group(1)), markdown)
