"""Your own data: image folders and array files as :class:`pyvae.data.ImageSet` splits.

``--dataset PATH`` (or ``load_dataset(PATH, split)``) where PATH is

=======================  ========================================================================
PATH                     what it holds
=======================  ========================================================================
``DIR/train``, ``test``  two folders laid out as below, one per split
``DIR/<class>/*.png``    torchvision's ``ImageFolder`` layout: labels from the sorted class folders
``DIR/*.png``            a flat folder of images, no labels
``FILE.npz``             ``x_train``, ``x_test`` and optionally ``y_train``, ``y_test``
``FILE.npy``             one array of images, no labels
=======================  ========================================================================

A source without its own test split is split by ``test_fraction`` (a seeded permutation, so the
evaluation commands find the same test points). Images are grey or colour, 8-bit (scaled by
1/255) or float in [0, 1]; arrays are (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3},
or (N, D). ``image_size`` S resizes each image's shorter side to S and crops the centre S x S;
without it, images of different sizes are an error naming one of them. An image folder too large for
memory is streamed from disk (:mod:`pyvae.data.streaming`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.datasets import load_sample_images

from pyvae.data.imageset import ImageSet
from pyvae.data.streaming import held_or_streamed, rows
from pyvae.errors import PyvaeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def is_path(name: str) -> bool:
    """Whether ``--dataset`` names a file or folder rather than a built-in data set."""
    return (
        Path(name).suffix in (".npz", ".npy") or "/" in name or "\\" in name or Path(name).exists()
    )


def load_path(
    path: str | Path,
    split: str,
    test_fraction: float = 0.1,
    image_size: int | None = None,
    seed: int = 0,
):
    """The ``split`` ("train" or "test") of the data at ``path`` as an ImageSet named after it."""

    path = Path(path).expanduser()
    if split not in ("train", "test"):
        raise PyvaeError(
            f"{path} has the splits train and test; got {split!r} (hold out validation data with "
            "--valid-fraction)"
        )
    if not path.exists():
        raise PyvaeError(
            f"no data set at {path}: give a built-in name, an image folder, an .npz or an .npy file"
        )
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise PyvaeError(f"image_size must be a positive integer; got {image_size!r}")
    if path.suffix == ".npz":
        images, labels, shape = _npz(path, split)
    elif path.suffix == ".npy":
        images, labels, shape = split_by_fraction(
            *_array(np.load(path), path), None, split, test_fraction, seed
        )
    elif path.is_dir():
        images, labels, shape = _folder(path, split, test_fraction, image_size, seed)
    else:
        raise PyvaeError(f"{path} is not an image folder, an .npz or an .npy file")
    return ImageSet(images, labels, shape, path.stem if path.is_file() else path.name, split)


# -- arrays -------------------------------------------------------------------------
def _npz(path: Path, split: str):
    with np.load(path) as arrays:
        for key in ("x_train", "x_test"):
            if key not in arrays:
                raise PyvaeError(
                    f"{path} has no array {key!r} (it holds "
                    f"{', '.join(arrays.files) or 'nothing'}); an .npz data set needs x_train and "
                    "x_test, and may have y_train and y_test"
                )
        images, shape = _array(arrays[f"x_{split}"], path, f"x_{split}")
        labels = (
            _labels(arrays[f"y_{split}"], len(images), path, f"y_{split}")
            if f"y_{split}" in arrays
            else None
        )
    return images, labels, shape


def _array(
    x: np.ndarray, path: Path, what: str = "the array"
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(N, C*H*W) floats in [0, 1] and (C, H, W) from an array of images in any usual layout."""
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 2:
        side = math.isqrt(x.shape[1])
        x = (
            x.reshape(len(x), 1, side, side)
            if side * side == x.shape[1]
            else x.reshape(len(x), 1, 1, x.shape[1])
        )
    if x.ndim != 4 or x.shape[1] not in (1, 3) or len(x) == 0:
        raise PyvaeError(
            f"{path}: {what} has shape {tuple(x.shape)}; expected (N, H, W), (N, H, W, C), (N, C, "
            "H, W) with C = 1 or 3, or (N, D), and N > 0"
        )
    return _unit_floats(x, f"{path}: {what}").reshape(len(x), -1), tuple(
        int(d) for d in x.shape[1:]
    )


def _unit_floats(x: np.ndarray, what: str) -> torch.Tensor:
    """8-bit integers scaled by 1/255, booleans as 0/1, floats in [0, 1] kept."""
    if x.dtype == np.bool_:
        return torch.from_numpy(x.astype(np.float32))
    if np.issubdtype(x.dtype, np.integer):
        if x.min() < 0 or x.max() > 255:
            raise PyvaeError(
                f"{what} holds integers in [{x.min()}, {x.max()}]; 8-bit images hold 0..255"
            )
        return torch.from_numpy(x.astype(np.float32) / 255.0)
    if (
        not np.issubdtype(x.dtype, np.floating)
        or not np.isfinite(x).all()
        or x.min() < 0
        or x.max() > 1
    ):
        low, high = (
            (float(x.min()), float(x.max()))
            if np.issubdtype(x.dtype, np.number)
            else (math.nan, math.nan)
        )
        raise PyvaeError(
            f"{what} holds {x.dtype} values in [{low:.4g}, {high:.4g}]; floats must lie in [0, 1] "
            "(or give 8-bit integers)"
        )
    return torch.from_numpy(x.astype(np.float32))


def _labels(y: np.ndarray, n: int, path: Path, what: str) -> torch.Tensor:
    if (
        y.ndim != 1
        or len(y) != n
        or not np.issubdtype(y.dtype, np.integer)
        or (len(y) and y.min() < 0)
    ):
        raise PyvaeError(
            f"{path}: {what} must hold {n} non-negative integer labels, one per image; "
            f"got shape {tuple(y.shape)} of {y.dtype}"
        )
    return torch.from_numpy(y.astype(np.int64))


def split_by_fraction(images, shape, labels, split: str, test_fraction: float, seed: int = 0):
    """The train or test part of a source without its own test split: a seeded permutation."""
    if not 0 < test_fraction < 1:
        raise PyvaeError(f"test_fraction must lie in (0, 1); got {test_fraction!r}")
    n = len(images)
    if n < 2:
        raise PyvaeError(f"a data set split into train and test needs at least 2 images; got {n}")
    n_test = min(n - 1, max(1, round(test_fraction * n)))
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    index = order[n_test:].sort().values if split == "train" else order[:n_test].sort().values
    return rows(images, index), labels[index] if labels is not None else None, shape


# -- image folders -----------------------------------------------------------------------
def _folder(root: Path, split: str, test_fraction: float, image_size: int | None, seed: int):
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes = _classes(root / "train")
        files, labels = _listing(root / split, classes)
        images, shape = _read_images(files, image_size)
        return images, labels, shape
    files, labels = _listing(root, _classes(root))
    images, shape = _read_images(files, image_size)
    return split_by_fraction(images, shape, labels, split, test_fraction, seed)


def _classes(folder: Path) -> list[str]:
    """The class folders of an ImageFolder layout (sorted, as torchvision's), or [] for a flat
    folder."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _listing(folder: Path, classes: list[str]) -> tuple[list[Path], torch.Tensor | None]:
    """Image files of ``folder`` in a fixed order, and their labels (the index of their class
    folder)."""
    if not folder.is_dir():
        raise PyvaeError(f"{folder} is not a folder")
    if classes:
        found = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise PyvaeError(
                f"{folder / unknown[0]} is a class the train folder does not have "
                f"({', '.join(classes)})"
            )
        pairs = [(f, k) for k, c in enumerate(classes) for f in _images_in(folder / c)]
    else:
        pairs = [(f, -1) for f in _images_in(folder)]
    if not pairs:
        raise PyvaeError(
            f"no images in {folder} (looked for {', '.join(IMAGE_SUFFIXES)} files"
            f"{' in its class folders' if classes else ''})"
        )
    files = [f for f, _ in pairs]
    return files, torch.tensor([k for _, k in pairs]) if classes else None


def _images_in(folder: Path) -> list[Path]:
    return (
        sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if folder.is_dir()
        else []
    )


GREY_MODES = ("1", "L", "I;16", "I")


def _read_images(files: list[Path], image_size: int | None):
    """(N, C*H*W) in [0, 1], held or streamed (:func:`pyvae.data.streaming.held_or_streamed`), and
    (C, H, W): grey when every image is grey, else colour (RGB). Every file's header is read first,
    so a file that is not an image, or sizes that differ without ``image_size``, are found before
    any pixel is."""

    modes, sizes = [], []
    for f in files:
        try:
            with Image.open(f) as image:
                modes.append(image.mode)
                sizes.append(image.size)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise _unreadable(f, e) from e
        if image_size is None and sizes[-1] != sizes[0]:
            raise PyvaeError(
                f"{f} is {sizes[-1][0]}x{sizes[-1][1]} but {files[0]} is "
                f"{sizes[0][0]}x{sizes[0][1]}: give --image-size S to resize and crop every image "
                "to S x S"
            )
    grey = all(mode in GREY_MODES for mode in modes)
    w, h = (image_size, image_size) if image_size else sizes[0]
    shape = (1 if grey else 3, h, w)
    return held_or_streamed(ImageReader(files, grey, image_size, shape), len(files), shape), shape


def _unreadable(what, e: BaseException) -> PyvaeError:
    return PyvaeError(
        f"cannot read image {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    )


class ImageReader:
    """Image i of ``source`` (a list of files, or a torchvision data set of (PIL image, target)
    items) as a float (C*H*W,) tensor in [0, 1]: grey or RGB, resized and cropped to ``image_size``
    when given, and checked to have ``shape``. One function for the images held in memory and those
    streamed."""

    def __init__(
        self, source, grey: bool, image_size: int | None, shape: tuple[int, int, int]
    ) -> None:
        self.source, self.grey, self.image_size, self.shape = source, grey, image_size, shape

    def __call__(self, i: int) -> torch.Tensor:

        item = self.source[i]
        what = item if isinstance(item, Path) else f"{i} of {type(self.source).__name__}"
        try:
            if isinstance(item, Path):
                with Image.open(item) as image:
                    x = _pixels(image, self.grey, self.image_size)
            else:
                x = _pixels(item[0], self.grey, self.image_size)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise _unreadable(what, e) from e
        if x.shape != self.shape:
            raise PyvaeError(
                f"image {what} is {x.shape[2]}x{x.shape[1]} but the first is "
                f"{self.shape[2]}x{self.shape[1]}: give --image-size S to resize and crop every "
                "image to S x S"
            )
        return torch.from_numpy(x.reshape(-1))


def _pixels(image, grey: bool, image_size: int | None) -> np.ndarray:
    """One image as a (C, H, W) float32 array in [0, 1], resized and cropped when asked."""

    # 16-bit grey keeps its depth: as 32-bit integers, scaled by 1/65535
    deep = grey and image.mode in ("I;16", "I")
    image = image.convert("I" if deep else "L" if grey else "RGB")
    if image_size is not None:
        w, h = image.size
        ratio = image_size / min(w, h)
        image = image.resize(
            (max(image_size, round(w * ratio)), max(image_size, round(h * ratio))), Image.BILINEAR
        )
        w, h = image.size
        left, top = (w - image_size) // 2, (h - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    x, scale = np.asarray(image, dtype=np.float32), 65535.0 if deep else 255.0
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    return x / scale


# -- a real colour data set that ships with scikit-learn ---------------------------------
def photo_patches(split: str, size: int = 32, seed: int = 0):
    """``photos``: the two colour photographs scikit-learn ships (a Chinese temple, a flower), cut
    into non-overlapping ``size`` x ``size`` patches (520 at 32), 8-bit RGB scaled to [0, 1]; a
    seeded 80/20 split into train and test. Offline, for tests and demos of natural images."""

    patches = []
    for image in load_sample_images().images:  # (427, 640, 3) uint8
        h, w = (image.shape[0] // size) * size, (image.shape[1] // size) * size
        grid = image[:h, :w].reshape(h // size, size, w // size, size, 3).transpose(0, 2, 4, 1, 3)
        patches.append(grid.reshape(-1, 3, size, size))
    x = torch.from_numpy(np.concatenate(patches).astype(np.float32) / 255.0).reshape(
        -1, 3 * size * size
    )
    images, _, shape = split_by_fraction(x, (3, size, size), None, split, 0.2, seed)
    return ImageSet(images, None, shape, "photos", split)
