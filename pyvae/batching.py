"""Devices, and data sets served as the minibatches a model's programs take: ``(x,)`` or ``(x, y)``.

Used by training and by evaluation alike, so evaluation needs nothing from training.
"""

from __future__ import annotations

import torch
from torch.utils.data.distributed import DistributedSampler

from . import distributed
from .errors import PyvaeError
from .streaming import StreamedImages

DEVICES = ("auto", "cpu", "cuda")
#: points of a streamed set that :func:`check_data` checks
CHECKED_WHEN_STREAMED = 1024


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; asking for CUDA without one is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise PyvaeError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise PyvaeError(f"device {device!r} requested but CUDA is not available here; use --device cpu or auto")
    return torch.device(device)


def as_tensors(data) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(images (N, x_dim) float, labels (N,) int64 or None, dynamic) from a tensor, a tuple (x, y),
    an :class:`~pyvae.data.ImageSet` or any map-style Dataset of images or (image, label) pairs.
    Streamed images (:class:`~pyvae.streaming.StreamedImages`) stand for their tensor and stay on disk."""
    from .data import ImageSet

    labels, dynamic = None, False
    if isinstance(data, ImageSet):
        images, labels, dynamic = data.images, data.labels, data.dynamic
    elif isinstance(data, (torch.Tensor, StreamedImages)):
        images = data
    elif (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (torch.Tensor, StreamedImages))
          and isinstance(data[1], torch.Tensor)):
        images, labels = data
    elif isinstance(data, torch.utils.data.Dataset):
        items = [data[i] for i in range(len(data))]
        pairs = all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items)
        images = torch.stack([item[0] if pairs else item for item in items])
        labels = torch.as_tensor([int(item[1]) for item in items]) if pairs else None
    else:
        raise PyvaeError(f"data must be a tensor (N, x_dim), a tuple (x, y) or a Dataset; got {type(data).__name__}")
    if images.ndim != 2 or images.shape[0] == 0:
        raise PyvaeError(f"data must have shape (N, x_dim) with N > 0; got {tuple(images.shape)}")
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != (images.shape[0],) or labels.is_floating_point():
            raise PyvaeError(f"labels must be integers of shape ({images.shape[0]},), one per image; got {labels.dtype} {tuple(labels.shape)}")
        labels = labels.long()
    if isinstance(images, torch.Tensor) and not images.is_floating_point():
        images = images.float()
    return images, labels, dynamic


class Batches:
    """A data set held as tensors, on the device when it fits, served as tuples of ``arity`` tensors.

    ``arity`` 1 serves ``(x,)``; 2 serves ``(x, y)`` and needs labels. Holding the data on
    the device avoids a DataLoader round trip per step; a set too large for memory
    (:class:`~pyvae.streaming.StreamedImages`) is read by a DataLoader's workers instead, in the same
    minibatches. A ``dynamic`` set is binarized afresh, on the device, each time a minibatch is served.
    """

    def __init__(self, data, device: torch.device, arity: int = 1, what: str = "data") -> None:
        images, labels, self.dynamic = as_tensors(data)
        if arity not in (1, 2):
            raise PyvaeError(f"a model's batch is (x,) or (x, y); this model's takes {arity} tensors")
        if arity == 2 and labels is None:
            raise PyvaeError(f"the model takes labelled batches (x, y) but the {what} has no labels")
        self.device, self.arity = device, arity
        self.streamed = isinstance(images, StreamedImages)
        self.images = images if self.streamed else _place(images, device)
        self.labels = _place(labels, device) if arity == 2 else None

    def __len__(self) -> int:
        return self.images.shape[0]

    def in_order(self, batch_size: int):
        """Minibatches covering the data once, in order."""
        return self._each([slice(start, start + batch_size) for start in range(0, len(self), batch_size)])

    def sampler(self, seed: int, world: distributed.World) -> DistributedSampler:
        """This process's ``DistributedSampler``: its share of one permutation per epoch, drawn from
        (``seed``, epoch) alike in every process, so the shards are disjoint and equally long
        (padded by repeating points when the processes do not divide N); ``len`` is that length."""
        return DistributedSampler(range(len(self)), num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed)

    def shard(self, epoch: int, seed: int, world: distributed.World) -> torch.Tensor:
        """The indices this process trains on in ``epoch`` (see :meth:`sampler`)."""
        sampler = self.sampler(seed, world)
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler), device=self.images.device)

    def select(self, indices: torch.Tensor, batch_size: int, skip: int = 0):
        """Minibatches of the points at ``indices`` in that order, after ``skip`` minibatches."""
        return self._each([indices[start : start + batch_size] for start in range(skip * batch_size, len(indices), batch_size)])

    def first(self, n: int = 2) -> tuple:
        """The first ``n`` points as a batch (for tracing a program's structure)."""
        return self._serve(slice(0, n))

    def _each(self, chunks: list):
        """The minibatch of each chunk of indices; a streamed set's read ahead by the DataLoader's workers."""
        rows = self.images.stream(chunks) if self.streamed else (None for _ in chunks)
        for idx, x in zip(chunks, rows):
            yield self._serve(idx, x)

    def _serve(self, idx, x: torch.Tensor | None = None) -> tuple:
        x = (self.images[idx] if x is None else x).to(self.device, non_blocking=True)
        x = torch.bernoulli(x) if self.dynamic else x
        if self.labels is None:
            return (x,)
        return x, self.labels[idx].to(self.device, non_blocking=True)


def check_data(module: torch.nn.Module, batches: Batches, what: str) -> None:
    """The model's own ``check_batch`` on the whole set (one draw of a dynamic one), if it has one; on
    :data:`CHECKED_WHEN_STREAMED` points spread over a streamed set, which is not read whole before training."""
    from .data import spread

    check = getattr(module, "check_batch", None)
    if check is None:
        return
    x, labels = batches.images, batches.labels
    if batches.streamed:
        points = spread(torch.arange(len(batches)), CHECKED_WHEN_STREAMED)
        x, labels = x[points], labels[points.to(labels.device)] if labels is not None else None
    x = torch.bernoulli(x) if batches.dynamic else x
    try:
        check(x, labels) if batches.arity == 2 else check(x)
    except PyvaeError as e:
        raise PyvaeError(f"{what}: {e}") from None


def _place(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if t is None or device.type != "cuda" or t.is_cuda:  # pinning is for host memory bound for a GPU
        return t if t is None else t.to(device)
    free, _ = torch.cuda.mem_get_info(device)
    return t.to(device) if t.numel() * t.element_size() < free // 4 else t.pin_memory()
