"""Data sets as flat float tensors in [0, 1].

=================  ==========================  =====================================================
name               splits                      source
=================  ==========================  =====================================================
binarized_mnist    train 50k, valid 10k, test  Larochelle & Murray's static binarization (``.amat``)
mnist              train 60k, test 10k         torchvision's ``MNIST/raw`` IDX files, grayscale
fashion_mnist      train 60k, test 10k         torchvision's ``FashionMNIST/raw`` IDX files
digits             train 1437, test 360        scikit-learn's 8x8 digits, always available offline
photos             train 416, test 104         32x32 colour patches of scikit-learn's two photos
cifar10, cifar100  train 50k, test 10k         ``cifar-10-batches-py``, ``cifar-100-python`` folders
svhn               train 73k, test 26k         torchvision's ``train_32x32.mat``, ``test_32x32.mat``
celeba, stl10 ...  its own, or test_fraction   any other ``torchvision.datasets`` image set, by name
PATH               train, test                 your folder, .npz or .npy (:mod:`pyvae.data.sources`)
=================  ==========================  =====================================================

The data root is ``data_dir``, else ``$PYVAE_DATA``, else ``./data``. Files found
there are used as they are; missing ones are downloaded and checked against
checksums. Grayscale sets can be binarized for a Bernoulli likelihood, once
(``static``) or with a fresh draw every epoch (``dynamic``, the IWAE paper's
protocol).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import inspect
import os
import shutil
import struct
import tempfile
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torchvision import datasets

from pyvae.data import sources
from pyvae.data.imageset import ImageSet, spread  # noqa: F401 - spread is imported from here
from pyvae.data.streaming import StreamedImages, held_or_streamed, rows
from pyvae.errors import DataNotFound, PyvaeError, positive_int

SPLITS = {
    "binarized_mnist": ("train", "valid", "test"),
    "mnist": ("train", "test"),
    "fashion_mnist": ("train", "test"),
    "digits": ("train", "test"),
    "photos": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "svhn": ("train", "test"),
}
#: colour data sets read through torchvision's own classes: (class name, its keyword for each split)
TORCHVISION_ARRAYS = {
    "cifar10": ("CIFAR10", {"train": {"train": True}, "test": {"train": False}}),
    "cifar100": ("CIFAR100", {"train": {"train": True}, "test": {"train": False}}),
    "svhn": ("SVHN", {"train": {"split": "train"}, "test": {"split": "test"}}),
}
BINARIZE_MODES = ("none", "static", "dynamic")

BINARIZED_MNIST_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
BINARIZED_MNIST_SHA256 = {
    "train": "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d",
    "valid": "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2",
    "test": "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c",
}
# The static test split is MNIST's test set stably sorted by label, so its labels are
# these class counts in order (checked against MNIST's labels in the tests).
BINARIZED_MNIST_TEST_CLASS_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """``data_dir``, else ``$PYVAE_DATA``, else ``./data``."""
    return Path(data_dir or os.environ.get("PYVAE_DATA") or "data")


def load_dataset(
    name: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    test_fraction: float = 0.1,
    image_size: int | None = None,
) -> ImageSet:
    """One split of a data set; raises :class:`DataNotFound` when it is neither on disk nor
    downloadable.

    ``name`` is a built-in data set or the path of your own (:func:`pyvae.data.sources.load_path`,
    which takes ``test_fraction`` and ``image_size``).
    """

    if name not in SPLITS:
        if sources.is_path(name):
            return sources.load_path(name, split, test_fraction, image_size)
        if torchvision_class(name) is None:
            raise PyvaeError(
                f"unknown dataset {name!r}; choose from {', '.join(SPLITS)}, a data set of "
                "torchvision.datasets by name, or give the path of an image folder, .npz or .npy"
            )
        if split not in ("train", "test"):
            raise PyvaeError(f"dataset {name!r} has the splits train and test; got {split!r}")
        return _torchvision_items(
            name, data_root(data_dir), split, download, test_fraction, image_size
        )
    if split not in SPLITS[name]:
        raise PyvaeError(
            f"dataset {name!r} has no split {split!r}; choose from {', '.join(SPLITS[name])}"
        )
    root = data_root(data_dir)
    if name == "binarized_mnist":
        return _binarized_mnist(root, split, download)
    if name == "digits":
        return _digits(split)
    if name == "photos":
        return sources.photo_patches(split)
    if name in TORCHVISION_ARRAYS:
        return _torchvision_arrays(name, root, split, download)
    return _torchvision_idx(name, root, split, download)


def binarize(data: ImageSet, mode: str, seed: int = 0) -> ImageSet:
    """``static``: one Bernoulli draw fixed by ``seed``; ``dynamic``: a fresh draw per read;
    ``none``: as is."""
    if mode not in BINARIZE_MODES:
        raise PyvaeError(f"unknown binarize mode {mode!r}; choose from {', '.join(BINARIZE_MODES)}")
    if mode == "none":
        return data
    if mode == "dynamic":
        return replace(data, dynamic=True)
    if isinstance(data.images, StreamedImages):
        return replace(data, images=data.images.binarized(seed), dynamic=False)
    generator = torch.Generator().manual_seed(seed)
    return replace(data, images=torch.bernoulli(data.images, generator=generator), dynamic=False)


# -- binarized MNIST -------------------------------------------------------------
def _binarized_mnist(root: Path, split: str, download: bool) -> ImageSet:
    folder = root / "binarized_mnist"
    path = folder / f"binarized_mnist_{split}.amat"
    if not path.is_file():
        if not download:
            raise DataNotFound(_missing("binarized_mnist", split, [path], "downloads are off"))
        try:
            with _removed_on_failure(folder):
                _download(BINARIZED_MNIST_URL + path.name, path, BINARIZED_MNIST_SHA256[split])
        except Exception as e:
            raise DataNotFound(
                _missing("binarized_mnist", split, [path], f"download failed: {_reason(e)}")
            ) from e
    images = torch.from_numpy(read_amat(path)).float()
    labels = None
    if split == "test" and len(images) == sum(BINARIZED_MNIST_TEST_CLASS_COUNTS):
        labels = torch.repeat_interleave(
            torch.arange(10), torch.tensor(BINARIZED_MNIST_TEST_CLASS_COUNTS)
        )
    return ImageSet(images, labels, (1, 28, 28), "binarized_mnist", split)


def read_amat(path: str | os.PathLike, width: int = 784) -> np.ndarray:
    """Parse a binarized-MNIST ``.amat`` file: one image per line, ``width`` values 0/1 separated by
    whitespace.

    Accepts any run of spaces/tabs, trailing spaces and ``\\r\\n`` line ends; any
    other token is an error naming its line.
    """
    buf = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)
    is_digit = (buf == ord("0")) | (buf == ord("1"))
    is_space = (buf == ord(" ")) | (buf == ord("\t")) | (buf == ord("\r")) | (buf == ord("\n"))
    newlines = np.flatnonzero(buf == ord("\n"))
    bad = ~(is_digit | is_space)
    bad[1:] |= is_digit[1:] & is_digit[:-1]  # a multi-character token such as "10"
    if bad.any():
        line = int(np.searchsorted(newlines, np.argmax(bad))) + 1
        raise PyvaeError(f"{path}: line {line} holds a value other than 0 or 1")
    starts = np.concatenate([[0], newlines + 1])
    starts = starts[starts < buf.size]
    per_line = (
        np.add.reduceat(is_digit, starts, dtype=np.int64) if starts.size else np.zeros(0, np.int64)
    )
    wrong = np.flatnonzero((per_line != width) & (per_line > 0))
    if wrong.size or not per_line.any():
        line = int(wrong[0]) + 1 if wrong.size else 1
        found = int(per_line[wrong[0]]) if wrong.size else 0
        raise PyvaeError(f"{path}: expected {width} values per line; line {line} has {found}")
    return (buf[is_digit] - ord("0")).reshape(-1, width)


# -- MNIST and Fashion-MNIST in torchvision's layout -------------------------------
def _torchvision_idx(name: str, root: Path, split: str, download: bool) -> ImageSet:
    folder = root / TORCHVISION_FOLDERS[name] / "raw"
    wanted = IDX_FILES[split]
    paths = [_existing(folder / f) for f in wanted]
    if None in paths:
        if not download:
            raise DataNotFound(
                _missing(name, split, [folder / f for f in wanted], "downloads are off")
            )
        try:
            with _removed_on_failure(folder):
                _torchvision_download(name, root, split)
        except Exception as e:
            raise DataNotFound(
                _missing(
                    name, split, [folder / f for f in wanted], f"download failed: {_reason(e)}"
                )
            ) from e
        paths = [_existing(folder / f) for f in wanted]
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise PyvaeError(f"{paths[0]} and {paths[1]} do not hold matching images and labels")
    n, h, w = images.shape
    x = torch.from_numpy(images.reshape(n, h * w).astype(np.float32) / 255.0)
    return ImageSet(x, torch.from_numpy(labels.astype(np.int64)), (1, h, w), name, split)


def _existing(path: Path) -> Path | None:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzip-compressed or not, into a uint8 array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise PyvaeError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise PyvaeError(f"{path}: header says {dims} but holds {body.size} values")
    return body.reshape(dims)


def _torchvision_download(name: str, root: Path, split: str) -> None:
    # torchvision checks the md5 of every file it fetches

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    cls(str(root), train=split == "train", download=True)


# -- CIFAR and SVHN through torchvision ------------------------------------------------
def _torchvision_arrays(name: str, root: Path, split: str, download: bool) -> ImageSet:
    """A torchvision data set held as one uint8 array (``data``: CIFAR's (N, H, W, C), SVHN's
    (N, C, H, W)) with integer labels (``targets`` or ``labels``): found under the data root, else
    downloaded (torchvision checks its md5), else a :class:`DataNotFound` naming where it looked."""

    class_name, splits = TORCHVISION_ARRAYS[name]
    found = _torchvision_instance(
        getattr(datasets, class_name), name, root, split, download, splits[split]
    )
    images = np.asarray(found.data)
    if images.ndim == 4 and images.shape[-1] == 3:  # CIFAR: channels last
        images = images.transpose(0, 3, 1, 2)
    # CIFAR's name, SVHN's
    labels = np.asarray(found.targets if hasattr(found, "targets") else found.labels)
    n, c, h, w = images.shape
    x = torch.from_numpy(
        np.ascontiguousarray(images).reshape(n, c * h * w).astype(np.float32) / 255.0
    )
    return ImageSet(x, torch.from_numpy(labels.astype(np.int64)), (c, h, w), name, split)


# -- any other torchvision data set, read image by image ------------------------------
#: names in torchvision.datasets that are not a data set of their own
NOT_TORCHVISION_SETS = (
    "VisionDataset",
    "ImageFolder",
    "DatasetFolder",
    "FakeData",
    "wrap_dataset_for_transforms_v2",
)


def torchvision_class(name: str):
    """torchvision's data set class called ``name``, case and underscores aside (``celeba``,
    ``stl10``, ``oxford_iiit_pet``), or None."""

    key = name.replace("_", "").lower()
    return next(
        (
            getattr(datasets, c)
            for c in datasets.__all__
            if c.lower() == key and c not in NOT_TORCHVISION_SETS
        ),
        None,
    )


def _torchvision_items(
    name: str, root: Path, split: str, download: bool, test_fraction: float, image_size: int | None
) -> ImageSet:
    """A torchvision data set of (PIL image, target) items, each read through the same
    :class:`~pyvae.data.sources.ImageReader` as an image folder's: held in memory when it fits, else
    streamed. Its own split where its class takes ``train`` or ``split`` (CelebA, STL10, ...), else
    the whole set split by ``test_fraction``; integer labels where it keeps them (``targets``,
    ``labels``)."""

    cls = torchvision_class(name)
    params = inspect.signature(cls).parameters
    own = (
        {"train": split == "train"}
        if "train" in params
        else {"split": split}
        if "split" in params
        else {}
    )
    found = _torchvision_instance(cls, name, root, split, download, own)
    first = found[0][0] if len(found) else None
    if not hasattr(first, "mode"):
        raise PyvaeError(
            f"{name} under {root}: its items are not (image, target) pairs of PIL images; pyvae "
            "reads image data sets"
        )
    grey = first.mode in sources.GREY_MODES
    shape = (1 if grey else 3, *((image_size, image_size) if image_size else first.size[::-1]))
    images = held_or_streamed(
        sources.ImageReader(found, grey, image_size, shape), len(found), shape
    )
    labels = _integer_labels(found)
    if not own:
        images, labels, shape = sources.split_by_fraction(
            images, shape, labels, split, test_fraction
        )
    return ImageSet(images, labels, shape, name, split)


def _integer_labels(found) -> torch.Tensor | None:
    """One class index per item, where the data set keeps them as a list (CelebA's targets are
    attributes: none)."""
    for attribute in ("targets", "labels", "_labels"):
        y = np.asarray(getattr(found, attribute, None))
        if (
            y.ndim == 1
            and len(y) == len(found)
            and np.issubdtype(y.dtype, np.integer)
            and (y >= 0).all()
        ):
            return torch.from_numpy(y.astype(np.int64))
    return None


def _torchvision_instance(cls, name: str, root: Path, split: str, download: bool, kwargs: dict):
    """``cls(root, **kwargs)`` found under the data root, else downloaded (torchvision checks its
    md5), else a :class:`DataNotFound` naming where it looked."""
    takes_download = "download" in inspect.signature(cls).parameters
    try:
        return _construct(
            cls, name, root, split, **kwargs, **({"download": False} if takes_download else {})
        )
    except (RuntimeError, FileNotFoundError) as e:  # torchvision: "Dataset not found or corrupted"
        if not download or not takes_download:
            raise DataNotFound(
                f"{name} {split} split not found under {root} (torchvision's {cls.__name__} "
                f"layout; {'downloads are off' if takes_download else 'it cannot be downloaded'}); "
                "put the files there, or point --data-dir / $PYVAE_DATA at a folder that has them"
            ) from e
    try:
        with _removed_on_failure(root):
            return _construct(cls, name, root, split, download=True, **kwargs)
    except PyvaeError:
        raise
    except Exception as e:
        raise DataNotFound(
            f"{name} {split} split not found under {root} and its download failed: {_reason(e)}"
        ) from e


def _construct(cls, name: str, root: Path, split: str, /, **kwargs):
    try:
        return cls(str(root), **kwargs)
    # torchvision: "Unknown value 'test' for argument split. Valid values are ..."
    except (ValueError, TypeError) as e:
        raise PyvaeError(
            f"{name}: torchvision's {cls.__name__} cannot give its {split!r} split: {_reason(e)}"
        ) from e


# -- scikit-learn digits ------------------------------------------------------------
def _digits(split: str) -> ImageSet:

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    n_train = int(0.8 * len(order))
    idx = order[:n_train] if split == "train" else order[n_train:]
    x = torch.from_numpy(digits.data[idx].astype(np.float32) / 16.0)
    return ImageSet(
        x, torch.from_numpy(digits.target[idx].astype(np.int64)), (1, 8, 8), "digits", split
    )


# -- helpers ------------------------------------------------------------------------
@contextlib.contextmanager
def _removed_on_failure(folder: Path):
    """Folders on the way to ``folder`` that a failed download created are removed again: a failed
    load leaves the data root as it found it."""
    first_new = None
    for candidate in reversed([folder, *folder.parents]):
        if not candidate.exists():
            first_new = candidate
            break
    try:
        yield
    except BaseException:
        if first_new is not None and first_new.exists():
            shutil.rmtree(first_new, ignore_errors=True)
        raise


def _download(url: str, path: Path, sha256: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, f)
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        if digest != sha256:
            raise PyvaeError(f"checksum mismatch for {url}: sha256 {digest}, expected {sha256}")
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _missing(name: str, split: str, paths: list[Path], why: str) -> str:
    looked = ", ".join(str(p) + ("[.gz]" if "ubyte" in p.name else "") for p in paths)
    return (
        f"{name} {split} split not found: looked for {looked} ({why}); "
        "put the files there, or point --data-dir / $PYVAE_DATA at a folder that has them"
    )


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def load_train_test(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    fallback: str | None = "digits",
    **options,
) -> tuple[ImageSet, ImageSet, str | None]:
    """(train, test, notice): the train and test splits of ``name`` (``options``: ``test_fraction``,
    ``image_size`` for a path, see :func:`load_dataset`).

    When they cannot be found or downloaded and ``fallback`` is set, the splits of
    ``fallback`` are returned instead with a ``notice`` that says what was looked
    for, where, and how to provide it; otherwise :class:`DataNotFound` is raised.
    """
    try:
        return (
            load_dataset(name, "train", data_dir=data_dir, download=download, **options),
            load_dataset(name, "test", data_dir=data_dir, download=download, **options),
            None,
        )
    except DataNotFound as e:
        if fallback is None or fallback == name:
            raise
        notice = (
            f"notice: {e}. Training on {fallback!r} instead "
            "(use --strict-data to make this an error)."
        )
        return load_dataset(fallback, "train"), load_dataset(fallback, "test"), notice


def resolve_binarize(likelihood, data: ImageSet, mode: str = "auto") -> str:
    """``mode``, with ``auto`` made concrete: ``dynamic`` when the likelihood needs 0/1
    data (``likelihood.binary_data``) and ``data`` is grayscale, else ``none``."""
    if mode != "auto":
        return mode
    return (
        "dynamic" if getattr(likelihood, "binary_data", False) and not data.is_binary() else "none"
    )


def evaluation_split(data: ImageSet, mode: str, seed: int = 0) -> ImageSet:
    """A held-out split binarized for evaluation: one fixed draw (seed + 1) where training draws
    afresh, so test numbers compare across epochs and runs."""
    return binarize(data, "static" if mode == "dynamic" else mode, seed + 1)


def binarize_for(
    likelihood, train: ImageSet, test: ImageSet, mode: str = "auto", seed: int = 0
) -> tuple[ImageSet, ImageSet, str]:
    """(train, test, mode used): both splits binarized as ``mode`` says (see
    :func:`resolve_binarize`)."""
    mode = resolve_binarize(likelihood, train, mode)
    return binarize(train, mode, seed), evaluation_split(test, mode, seed), mode


def hold_out(data: ImageSet, fraction: float, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """(rest, held): a random ``fraction`` of ``data`` (round(fraction * N) points, at least one,
    and at least one left) held out as a ``valid`` split, drawn from ``seed``; the two are disjoint
    and together are ``data``. Each keeps the order the points had in ``data``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise PyvaeError(f"valid_fraction must be a number in (0, 1); got {fraction!r}")
    n = len(data)
    if n < 2:
        raise PyvaeError(
            f"{data.name} {data.split} has {n} point; holding out a validation fraction needs at "
            "least 2"
        )
    held = min(max(1, round(fraction * n)), n - 1)
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:held]] = True

    def part(mask: torch.Tensor, split: str) -> ImageSet:
        labels = data.labels[mask] if data.labels is not None else None
        return replace(data, images=rows(data.images, mask), labels=labels, split=split)

    return part(~chosen, data.split), part(chosen, "valid")


def validation_split(
    train: ImageSet,
    fraction: float | None = None,
    seed: int = 0,
    *,
    data_dir=None,
    download: bool = True,
) -> tuple[ImageSet, ImageSet | None]:
    """(train, valid): with ``fraction``, a held-out part of ``train`` (:func:`hold_out`); else the
    data set's own ``valid`` split where it has one (binarized MNIST's 10,000 images), else None."""
    if fraction is not None:
        return hold_out(train, fraction, seed)
    if "valid" in SPLITS.get(train.name, ()):
        return train, load_dataset(train.name, "valid", data_dir=data_dir, download=download)
    return train, None


def semi_supervised(data: ImageSet, num_labels: int, seed: int = 0) -> ImageSet:
    """``data`` with ``num_labels`` labels kept, num_labels / C drawn at random (``seed``) from each
    of its C classes, and every other label set to -1 (unlabelled): Kingma et al. (2014)'s setting,
    e.g. 100 labels of MNIST = 10 per digit. Points already at -1 stay unlabelled."""
    if data.labels is None:
        raise PyvaeError(
            f"{data.name} {data.split} has no labels; semi_supervised needs labelled data"
        )
    positive_int("num_labels", num_labels)
    labels = data.labels
    available = int((labels >= 0).sum())
    classes = labels[labels >= 0].unique().tolist()
    if num_labels > available:
        raise PyvaeError(
            f"num_labels={num_labels} is more than the {available} labelled points of {data.name} "
            f"{data.split}"
        )
    if num_labels % len(classes):
        raise PyvaeError(
            f"num_labels={num_labels} is not divisible by the {len(classes)} classes; use a "
            f"multiple of {len(classes)}"
        )
    per_class = num_labels // len(classes)
    generator = torch.Generator().manual_seed(seed)
    kept = torch.full_like(labels, -1)
    for c in classes:
        members = (labels == c).nonzero().squeeze(1)
        if len(members) < per_class:
            raise PyvaeError(
                f"class {c} has {len(members)} points, fewer than the {per_class} per class "
                f"that num_labels={num_labels} asks for"
            )
        kept[members[torch.randperm(len(members), generator=generator)[:per_class]]] = c
    return replace(data, labels=kept)
