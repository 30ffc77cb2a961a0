"""Devices, and data sets served as the minibatches a model's programs take: ``(x,)``, ``(x, y)``,
...

Used by training and by evaluation alike, so evaluation needs nothing from training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data.distributed import DistributedSampler

from pyvae import distributed
from pyvae.data.datasets import ImageSet, spread
from pyvae.data.streaming import StreamedImages
from pyvae.errors import PyvaeError, warn
from pyvae.program import batch_arity, batch_slots, label_site

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
        raise PyvaeError(
            f"device {device!r} requested but CUDA is not available here; use --device cpu or auto"
        )
    return torch.device(device)


def as_tensors(data) -> tuple[tuple, bool]:
    """((x, *others), dynamic) from a tensor, a tuple of tensors, an :class:`~pyvae.data.ImageSet`
    or any map-style Dataset whose items are tensors or tuples of them. x may have any shape (N,
    ...) (flat, (N, 28, 28), (N, C, H, W)); the other tensors (labels as integers, one-hot or with
    -1 for unlabelled points, float conditioning inputs, ...) hold one row per point of x and are
    served as they are. Streamed images (:class:`~pyvae.streaming.StreamedImages`) stand for their
    tensor and stay on disk."""

    dynamic = False
    if isinstance(data, ImageSet):
        tensors, dynamic = (
            (data.images,) + ((data.labels,) if data.labels is not None else ()),
            data.dynamic,
        )
    elif isinstance(data, (torch.Tensor, StreamedImages)):
        tensors = (data,)
    elif (
        isinstance(data, (tuple, list))
        and data
        and all(isinstance(t, (torch.Tensor, StreamedImages)) for t in data)
    ):
        tensors = tuple(data)
    elif isinstance(data, torch.utils.data.Dataset):
        tensors = _stacked([data[i] for i in range(len(data))])
    else:
        raise PyvaeError(
            "data must be a tensor (N, ...), a tuple of tensors (x, y, ...) or a Dataset; got "
            f"{type(data).__name__}"
        )
    x = tensors[0]
    if x.ndim < 1 or x.shape[0] == 0:
        raise PyvaeError(
            f"data must hold at least one point: shape (N, ...) with N > 0; got {tuple(x.shape)}"
        )
    for i, t in enumerate(tensors[1:], start=1):
        if t.ndim < 1 or t.shape[0] != x.shape[0]:
            raise PyvaeError(
                f"tensor {i} of the data has shape {tuple(t.shape)}; it needs one row per point of "
                f"x ({x.shape[0]})"
            )
    if isinstance(x, torch.Tensor) and not x.is_floating_point():
        x = x.float()
    return (x, *tensors[1:]), dynamic


def as_points(data) -> tuple:
    """``data`` (as :func:`as_tensors` takes it) as the tuple (x, *others) of its tensors, a
    dynamically binarized set drawn once: every point scored on one fixed image."""
    if isinstance(data, ImageSet) and data.dynamic:
        data = (data.draw(), data.labels) if data.labels is not None else data.draw()
    return as_tensors(data)[0]


def take(points: tuple, first: int, stop: int) -> tuple:
    """Points first..stop-1 of the tuple (x, *others) (:func:`as_points`)."""
    return tuple(t[first:stop] for t in points)


def _stacked(items: list) -> tuple:
    """A Dataset's items (tensors, numbers, or tuples of them) as one tensor per position."""
    if not all(isinstance(item, (tuple, list)) for item in items):
        return (torch.stack([torch.as_tensor(item) for item in items]),)
    if len({len(item) for item in items}) != 1:
        raise PyvaeError(
            "the Dataset's items hold different numbers of tensors; each must hold the same"
        )
    return tuple(
        torch.stack([torch.as_tensor(item[i]) for item in items]) for i in range(len(items[0]))
    )


def is_label(t: torch.Tensor) -> bool:
    """Whether a batch tensor holds class labels: integers, one per point (a float tensor never
    does)."""
    return (
        t.ndim == 1 and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool
    )


class Batches:
    """A data set held as tensors, on the device when it fits, served as the tuples the model's
    programs take: positionally, as many tensors as its signature accepts (``model(x)``: x alone,
    ``model(xs, ys=None)``: both; without a ``model``, all of them), in the shapes they have.

    Holding the data on the device avoids a DataLoader round trip per step; a set too large for
    memory (:class:`~pyvae.streaming.StreamedImages`) is read by a DataLoader's workers instead, in
    the same minibatches. A ``dynamic`` set is binarized afresh, on the device, each time a
    minibatch is served. Labels a program takes as an optional argument are encoded as its label
    site asks (:func:`label_encoder`), unless ``semi_supervised`` data are to be split by
    :func:`serving`.
    """

    def __init__(
        self,
        data,
        device: torch.device,
        model: torch.nn.Module | None = None,
        what: str = "data",
        semi_supervised: bool = False,
    ) -> None:
        tensors, self.dynamic = as_tensors(data)
        needed, slots = (
            (batch_arity(model), batch_slots(model)) if model is not None else (1, len(tensors))
        )
        if len(tensors) < needed:
            missing = "labelled batches (x, y)" if needed == 2 else f"batches of {needed} tensors"
            raise PyvaeError(
                f"{type(model).__name__}.model takes {missing} but the {what} "
                f"{'has no labels' if len(tensors) == 1 else f'holds {len(tensors)} tensor(s)'}"
            )
        tensors = tensors[: min(len(tensors), slots)]
        if model is not None:  # float64 data for a float32 network, as integers become floats
            tensors = _in_dtype_of(model, tensors)
        self.device, self.arity = device, len(tensors)
        self.streamed = isinstance(tensors[0], StreamedImages)
        self.images = tensors[0] if self.streamed else _place(tensors[0], device)
        self.others = tuple(_place(t, device) for t in tensors[1:])
        labels = optional_labels(model, self) if model is not None else None
        if labels is not None and not semi_supervised:  # scored as given: labelled points only
            encode = label_encoder(model, self)  # which checks the labels against the classes
            if bool((labels < 0).any()):
                raise PyvaeError(
                    f"the {what} holds unlabelled points (label -1) for {type(model).__name__}'s "
                    "optional label; score them without labels (x alone) and the labelled ones "
                    "apart"
                )
            self.others = (*self.others[:-1], encode(labels))

    def __len__(self) -> int:
        return self.images.shape[0]

    def in_order(self, batch_size: int):
        """Minibatches covering the data once, in order."""
        return self._each(
            [slice(start, start + batch_size) for start in range(0, len(self), batch_size)]
        )

    def sampler(self, seed: int, world: distributed.World) -> DistributedSampler:
        """This process's ``DistributedSampler``: its share of one permutation per epoch, drawn from
        (``seed``, epoch) alike in every process, so the shards are disjoint and equally long
        (padded by repeating points when the processes do not divide N); ``len`` is that length."""
        return DistributedSampler(
            range(len(self)), num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed
        )

    def shard(self, epoch: int, seed: int, world: distributed.World) -> torch.Tensor:
        """The indices this process trains on in ``epoch`` (see :meth:`sampler`)."""
        sampler = self.sampler(seed, world)
        sampler.set_epoch(epoch)
        return torch.tensor(list(sampler), device=self.images.device)

    def select(self, indices: torch.Tensor, batch_size: int, skip: int = 0):
        """Minibatches of the points at ``indices`` in that order, after ``skip`` minibatches."""
        return self._each(
            [
                indices[start : start + batch_size]
                for start in range(skip * batch_size, len(indices), batch_size)
            ]
        )

    def first(self, n: int = 2) -> tuple:
        """The first ``n`` points as a batch (for tracing a program's structure)."""
        return self._serve(slice(0, n))

    def _each(self, chunks: list):
        """The minibatch of each chunk of indices; a streamed set's read ahead by the DataLoader's
        workers."""
        rows = self.images.stream(chunks) if self.streamed else (None for _ in chunks)
        for idx, x in zip(chunks, rows, strict=True):
            yield self._serve(idx, x)

    def _serve(self, idx, x: torch.Tensor | None = None) -> tuple:
        x = (self.images[idx] if x is None else x).to(self.device, non_blocking=True)
        x = torch.bernoulli(x) if self.dynamic else x
        return (x, *(t[_on(idx, t)].to(self.device, non_blocking=True) for t in self.others))


def _on(idx, t: torch.Tensor):
    """Indices ``idx`` usable on ``t``: a streamed set's indices may live on another device."""
    return idx.to(t.device) if torch.is_tensor(idx) else idx


def fitting_batch_size(batch_size: int, n: int) -> int:
    """``batch_size``, or the training set's ``n`` points when that is smaller (saying so): a small
    folder of images still trains, one step per epoch."""
    if batch_size <= n:
        return batch_size
    warn(
        f"batch_size {batch_size} is larger than the training set ({n} points): training "
        f"with the whole set as the batch (batch_size {n})"
    )
    return n


def check_data(module: torch.nn.Module, batches: Batches, what: str) -> None:
    """The model's own ``check_batch`` on the whole set (one draw of a dynamic one), if it has one;
    on :data:`CHECKED_WHEN_STREAMED` points spread over a streamed set, which is not read whole
    before training."""

    check = getattr(module, "check_batch", None)
    if check is None:
        return
    x, others = batches.images, batches.others
    if batches.streamed:
        points = spread(torch.arange(len(batches)), CHECKED_WHEN_STREAMED)
        x, others = x[points], tuple(t[_on(points, t)] for t in others)
    x = torch.bernoulli(x) if batches.dynamic else x
    try:
        check(x, *others)
    except PyvaeError as e:
        raise PyvaeError(f"{what}: {e}") from None


def _in_dtype_of(model: torch.nn.Module, tensors: tuple) -> tuple:
    """The floating tensors of the data in the floating dtype of ``model``'s parameters."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return tuple(
        t.to(dtype)
        if dtype is not None and isinstance(t, torch.Tensor) and t.is_floating_point()
        else t
        for t in tensors
    )


def _place(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    # pinning is for host memory bound for a GPU
    if t is None or device.type != "cuda" or t.is_cuda:
        return t if t is None else t.to(device)
    free, _ = torch.cuda.mem_get_info(device)
    return t.to(device) if t.numel() * t.element_size() < free // 4 else t.pin_memory()


# -- how a training set is served: the calls of each step ---------------------------------------
@dataclass
class Call:
    """One call of the programs in a training step: ``args`` as the programs take them, whose M
    points stand for the ``group`` points of their kind (labelled, unlabelled, or all ``num_data``
    points of the data set): the objective scales the call's density terms by group / M."""

    args: tuple
    group: int
    num_data: int
    kind: str = "all"


#: the kinds of call a step makes, in the order of the objective's accumulators
KINDS = ("all", "labelled", "unlabelled")


class Whole:
    """Every step one call on a minibatch of the whole set (each process its shard of a
    permutation)."""

    def __init__(
        self, batches: Batches, batch_size: int, world: distributed.World, encode=None
    ) -> None:
        self.batches, self.batch_size, self.world, self.encode = batches, batch_size, world, encode
        self.sizes = {"all": len(batches)}

    def steps(self, seed: int) -> int:
        return math.ceil(len(self.batches.sampler(seed, self.world)) / self.batch_size)

    def probes(self) -> list[tuple]:
        """A small batch of each kind of call, for reading the program's structure."""
        return [self._encoded(self.batches.first())]

    def _encoded(self, batch: tuple) -> tuple:
        return batch if self.encode is None else (*batch[:-1], self.encode(batch[-1]))

    def epoch(self, epoch: int, seed: int, skip: int):
        """The steps of ``epoch`` after ``skip`` of them, each a list of :class:`Call`."""
        order = self.batches.shard(epoch, seed, self.world)
        for batch in self.batches.select(order, self.batch_size, skip):
            yield [Call(self._encoded(batch), len(self.batches), len(self.batches))]


class Split:
    """Semi-supervised data (labels with -1 for unlabelled points): every step holds a fixed share
    of labelled points, given to the programs as one call and the unlabelled points as another. A
    program with an optional label (``model(xs, ys=None)``) gets the labels in the encoding its
    label site asks for (``encode``) and the unlabelled points without them; one that requires the
    label (the built-in m2) gets both calls with the labels as they are (-1: unlabelled). An epoch
    is one pass over the unlabelled points; the labelled ones are dealt from a fresh permutation
    whenever they run out. Each call's terms are scaled to its own group, so the objective is the
    unbiased estimate of sum_labelled L(x, y) + sum_unlabelled U(x) whatever the share."""

    def __init__(
        self,
        batches: Batches,
        batch_size: int,
        world: distributed.World,
        share: float,
        encode=None,
    ) -> None:
        labels = batches.others[-1]
        self.batches, self.world, self.encode = batches, world, encode
        self.labelled = torch.nonzero(labels >= 0).reshape(-1).to(batches.images.device)
        self.unlabelled = torch.nonzero(labels < 0).reshape(-1).to(batches.images.device)
        if batch_size < 2:
            raise PyvaeError(
                f"batch_size {batch_size}: semi-supervised steps hold labelled and unlabelled "
                "points; use >= 2"
            )
        self.m_l = min(batch_size - 1, max(1, round(share * batch_size)))
        self.m_u = batch_size - self.m_l
        self.sizes = {"labelled": len(self.labelled), "unlabelled": len(self.unlabelled)}

    def probes(self) -> list[tuple]:
        """Two labelled points and two unlabelled ones, as the programs get them."""
        return self._calls(
            self.batches._serve(self.labelled[:2]), self.batches._serve(self.unlabelled[:2])
        )

    def _calls(self, labelled: tuple, unlabelled: tuple) -> tuple[tuple, tuple]:
        if self.encode is None:  # a required label: -1 marks the unlabelled points
            return labelled, unlabelled
        return (*labelled[:-1], self.encode(labelled[-1])), unlabelled[:-1]

    def steps(self, seed: int) -> int:
        return math.ceil(len(self._sampler(len(self.unlabelled), seed)) / self.m_u)

    def _sampler(self, n: int, seed: int) -> DistributedSampler:
        return DistributedSampler(
            range(n), num_replicas=self.world.size, rank=self.world.rank, shuffle=True, seed=seed
        )

    def _order(self, group: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
        sampler = self._sampler(len(group), seed)
        sampler.set_epoch(epoch)
        return group[torch.tensor(list(sampler), device=group.device)]

    def epoch(self, epoch: int, seed: int, skip: int):
        unlabelled = self._order(self.unlabelled, seed, epoch)
        steps = self.steps(seed)
        # enough labelled points for every step: permutations drawn from (seed, epoch, round)
        rounds = math.ceil(steps * self.m_l / max(1, len(self._sampler(len(self.labelled), seed))))
        labelled = torch.cat(
            [self._order(self.labelled, seed + 7919 * (r + 1), epoch) for r in range(rounds)]
        )
        n_l, n_u, n = len(self.labelled), len(self.unlabelled), len(self.batches)
        for step in range(skip, steps):
            u = next(
                self.batches.select(unlabelled[step * self.m_u : (step + 1) * self.m_u], self.m_u)
            )
            lab = next(
                self.batches.select(labelled[step * self.m_l : (step + 1) * self.m_l], self.m_l)
            )
            lab, u = self._calls(lab, u)
            yield [Call(lab, n_l, n, "labelled"), Call(u, n_u, n, "unlabelled")]


def serving(
    module: torch.nn.Module,
    batches: Batches,
    batch_size: int,
    world: distributed.World,
    labelled_share: float | None = None,
):
    """How ``batches`` are served to ``module`` in training: :class:`Split` when the data's last
    tensor is labels with -1 for unlabelled points (taken as an optional argument,
    ``model(xs, ys=None)``, or as a required one that the program reads, as the built-in m2 does),
    else :class:`Whole`. Optional labels go to the program in the encoding its label site asks for
    (:func:`label_encoder`); ``labelled_share`` is the labelled part of every minibatch (default:
    their share of the data, so each is used about once per epoch)."""
    labels = batches.others[-1] if batches.others and is_label(batches.others[-1]) else None
    if labels is not None:
        check_labels(labels)
    optional = optional_labels(module, batches) is not None
    if labels is None or bool((labels >= 0).all()) or not bool((labels >= 0).any()):
        if labelled_share is not None:
            raise PyvaeError(
                "labelled_share is for semi-supervised data: labels with -1 for unlabelled "
                "points, and some labelled"
            )
        if optional and not bool((labels >= 0).any()):
            raise PyvaeError(
                "the training data's labels are all -1 (unlabelled); pass the images alone"
            )
        return Whole(
            batches, batch_size, world, label_encoder(module, batches) if optional else None
        )
    share = int((labels >= 0).sum()) / len(labels) if labelled_share is None else labelled_share
    if not 0 < share < 1:
        raise PyvaeError(
            f"labelled_share must be a fraction strictly between 0 and 1; got {labelled_share!r}"
        )
    return Split(
        batches, batch_size, world, share, label_encoder(module, batches) if optional else None
    )


def optional_labels(module: torch.nn.Module, batches: Batches) -> torch.Tensor | None:
    """The labels a program takes as its optional last argument (``ys`` of ``model(xs, ys=None)``),
    when the data's last served tensor holds class labels; else None."""
    if (
        batches.others
        and is_label(batches.others[-1])
        and len(batches.others) >= batch_arity(module)
    ):
        return batches.others[-1]
    return None


def label_encoder(module: torch.nn.Module, batches: Batches):
    """The function that turns integer labels into what the program's label site takes: one-hot
    vectors for a ``OneHotCategorical``, the integers for a ``Categorical`` (read from a trace of
    the program called on two points without labels)."""
    _, classes, one_hot = label_site(module, batches.first(2)[:-1])
    check_labels(batches.others[-1], classes)
    if not one_hot:
        return lambda y: y
    return lambda y: torch.nn.functional.one_hot(y, classes).to(batches.images.dtype)


def check_labels(labels: torch.Tensor, classes: int | None = None) -> None:
    """Each label is a class (0 to ``classes`` - 1, where the label site says how many) or -1, an
    unlabelled point; a one-line error names the first that is neither."""
    bad = labels < -1 if classes is None else (labels < -1) | (labels >= classes)
    if bool(bad.any()):
        point = int(torch.nonzero(bad)[0])
        allowed = "0, 1, ..." if classes is None else f"0 to {classes - 1}"
        raise PyvaeError(
            f"label {int(labels[point])} of point {point} is neither a class ({allowed}) nor -1 "
            "(unlabelled)"
        )
