"""mkdocs hook: ``<!-- flags: COMMAND -->`` in a page becomes that command's table of flags,
generated from its parser, so the docs list exactly the flags the command takes."""

import re

FLAGS = re.compile(r"<!-- flags: ([a-z_]+) -->")

try:
    from pyvae.cli.flags import markdown_table
except ImportError:  # pyvae.cli.flags is being written on another branch; drop this at merge
    markdown_table = None


def on_page_markdown(markdown, page, config, files):
    """Replace each flags marker by ``pyvae.cli.flags.markdown_table(command)``."""
    if markdown_table is None:
        return markdown
    return FLAGS.sub(lambda m: markdown_table(m.group(1)), markdown)
