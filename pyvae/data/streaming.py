"""Data sets too large for memory: images read from disk on demand, a DataLoader's workers decoding
them.

A split whose pixels as float32 would take more than half the memory available
(:func:`fits_in_memory`) is held as a :class:`StreamedImages` instead of one tensor: row i is
``read(i)``, decoded when it is asked for. :class:`pyvae.data.batching.Batches` serves it through a
DataLoader whose worker processes decode the next minibatches while the model trains; everything
that fits stays one tensor (the fast path). Both paths decode with the same ``read``, so a streamed
set trains on exactly the numbers the same set held in memory would.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from pyvae.errors import PyvaeError

#: the share of the memory available now that one split may take as float32 before it is streamed
MEMORY_SHARE = 0.5
#: a set held in memory with more images than this is read by worker processes, not one by one
READ_IN_PARALLEL = 4096


def available_memory() -> int | None:
    """Bytes of memory available now (Linux's MemAvailable), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fits_in_memory(n: int, shape: tuple[int, ...]) -> bool:
    """Whether ``n`` images of ``shape`` as float32 take at most :data:`MEMORY_SHARE` of the memory
    available (always, where that cannot be read)."""
    have = available_memory()
    return not have or n * math.prod(shape) * 4 <= have * MEMORY_SHARE


def held_or_streamed(read: Callable[[int], torch.Tensor], n: int, shape: tuple[int, int, int]):
    """The ``n`` rows ``read(0..n-1)``: one (n, C*H*W) tensor when they fit in memory (read by the
    DataLoader's workers when there are more than :data:`READ_IN_PARALLEL`), else a
    :class:`StreamedImages` that reads them when asked."""
    streamed = StreamedImages(read, torch.arange(n), math.prod(shape))
    if not fits_in_memory(n, shape):
        return streamed
    if n <= READ_IN_PARALLEL:
        return torch.stack([read(i) for i in range(n)])
    return torch.cat(
        list(streamed.stream([slice(start, start + 1024) for start in range(0, n, 1024)]))
    )


class StreamedImages(torch.utils.data.Dataset):
    """Images kept on disk: row i is ``read(index[i])``, a float (x_dim,) tensor in [0, 1].

    Indexed like the (N, x_dim) tensor it stands for: an integer gives one row, a slice, mask, list
    or index tensor the rows stacked. With ``binarize_seed`` every row is one Bernoulli draw seeded
    by (seed, the row's index in the source), the static binarization of a set not held in memory:
    the same image at every read, in any subset.
    """

    def __init__(
        self,
        read: Callable[[int], torch.Tensor],
        index: torch.Tensor,
        x_dim: int,
        binarize_seed: int | None = None,
    ) -> None:
        self.read, self.index, self.x_dim, self.binarize_seed = read, index, x_dim, binarize_seed

    ndim, dtype, device = 2, torch.float32, torch.device("cpu")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.index), self.x_dim))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i) -> torch.Tensor:
        if isinstance(i, int):
            return self._row(i)
        rows = torch.arange(len(self))[i].reshape(-1).tolist()
        return torch.stack([self._row(r) for r in rows]) if rows else torch.zeros(0, self.x_dim)

    def _row(self, i: int) -> torch.Tensor:
        source = int(self.index[i])
        x = self.read(source)
        if self.binarize_seed is None:
            return x
        return torch.bernoulli(
            x, generator=torch.Generator().manual_seed((self.binarize_seed << 32) + source)
        )

    def subset(self, rows) -> StreamedImages:
        """The rows ``rows`` (a mask or indices), still on disk."""
        return StreamedImages(self.read, self.index[rows], self.x_dim, self.binarize_seed)

    def binarized(self, seed: int) -> StreamedImages:
        """These rows, each one fixed Bernoulli draw (see the class)."""
        return StreamedImages(self.read, self.index, self.x_dim, seed)

    def stream(self, chunks: Iterable) -> Iterable[torch.Tensor]:
        """The rows of each chunk (indices or a slice) as one (len(chunk), x_dim) tensor, decoded
        ahead by :func:`workers` processes."""
        every = torch.arange(len(self))
        batches = [every[chunk].reshape(-1).tolist() for chunk in chunks]
        # a generator of its own: the loader's draw of a worker seed leaves the global random stream
        # as it was, so a streamed set trains exactly as the same set held in memory (reading draws
        # nothing)
        loader = torch.utils.data.DataLoader(
            self,
            batch_sampler=batches,
            num_workers=workers(),
            collate_fn=torch.stack,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator(),
        )
        try:
            yield from loader
        except PyvaeError as e:  # raised in a worker: its message is the original's traceback
            raise PyvaeError(str(e).strip().splitlines()[-1].split("PyvaeError: ", 1)[-1]) from None


def workers() -> int:
    """Processes that decode images for a streamed set: the cores this process may use, one left for
    training, at most 8."""
    return (
        max(0, min(8, len(os.sched_getaffinity(0)) - 1)) if hasattr(os, "sched_getaffinity") else 2
    )


def rows(images, index):
    """``images[index]``: a tensor's rows, or a streamed set's rows still on disk."""
    return images.subset(index) if isinstance(images, StreamedImages) else images[index]
