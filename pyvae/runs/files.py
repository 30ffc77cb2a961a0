"""Files a run writes: every one atomically, so that a crash never leaves half of one.

A file is written to a temporary file in the same folder, flushed, synced and renamed over the
old one: a reader sees the old file or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[object], None]) -> None:
    """Call ``write(file_object)`` on a temporary file and rename it to ``path`` when complete.

    The file gets the permissions ``open`` would give a new one, 0o666 & ~umask (``mkstemp``
    makes it 0o600, private to its owner)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, value) -> None:
    """``value`` as indented JSON at ``path``, written atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(value, indent=2).encode()))
