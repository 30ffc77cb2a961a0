"""Loaders parse their real formats: the files in $PYVAE_DATA when present, tiny generated ones
always."""

import gzip
import struct

import numpy as np
import pytest
import torch

from pyvae.data.datasets import (
    binarize,
    binarize_for,
    data_root,
    load_dataset,
    load_train_test,
    read_amat,
    read_idx,
)
from pyvae.errors import DataNotFound, PyvaeError
from pyvae.parts.likelihoods import Bernoulli
from tests.conftest import require_files


def write_idx(path, array, compress):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if compress else open)(path, "wb").write(data)


def fake_torchvision_root(root, folder, n=5, compress=True):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28))
    labels = rng.integers(0, 10, n)
    suffix = ".gz" if compress else ""
    for prefix in ("train", "t10k"):
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
    return images, labels


@pytest.mark.parametrize(
    "text", ["0 1 1\n1 0 1\n", "0 1 1 \r\n1 0 1 \r\n", "0  1\t1\n1 0 1", "\n0 1 1\n\n1 0 1\n\n"]
)
def test_amat_accepts_upstream_whitespace(tmp_path, text):
    path = tmp_path / "x.amat"
    path.write_text(text, newline="")
    assert read_amat(path, width=3).tolist() == [[0, 1, 1], [1, 0, 1]]


@pytest.mark.parametrize(
    "text, message",
    [
        ("0 1 1\n1 0 0.5\n", "line 2 holds a value other than 0 or 1"),
        ("0 1 1\n1 0 2\n", "line 2 holds a value other than 0 or 1"),
        ("0 1 10\n1 0 1\n", "line 1 holds a value other than 0 or 1"),
        ("0 1 1\n1 0\n", "expected 3 values per line; line 2 has 2"),
        ("", "expected 3 values per line"),
    ],
)
def test_amat_rejects_malformed_files(tmp_path, text, message):
    path = tmp_path / "x.amat"
    path.write_text(text)
    with pytest.raises(PyvaeError, match=message):
        read_amat(path, width=3)


def test_binarized_mnist_from_generated_files(tmp_path):
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    rows = np.random.default_rng(0).integers(0, 2, (3, 784))
    (folder / "binarized_mnist_valid.amat").write_text(
        "".join(" ".join(map(str, r)) + " \r\n" for r in rows)
    )
    data = load_dataset("binarized_mnist", "valid", data_dir=tmp_path, download=False)
    assert data.images.shape == (3, 784) and data.images.dtype == torch.float32
    assert torch.equal(data.images, torch.tensor(rows, dtype=torch.float32))
    assert data.image_shape == (1, 28, 28)


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_torchvision_layout_from_generated_files(tmp_path, name, folder, compress):
    images, labels = fake_torchvision_root(tmp_path, folder, compress=compress)
    data = load_dataset(name, "test", data_dir=tmp_path, download=False)
    assert data.images.shape == (5, 784)
    assert torch.allclose(
        data.images, torch.tensor(images.reshape(5, -1) / 255.0, dtype=torch.float32)
    )
    assert data.labels.tolist() == labels.tolist()
    assert 0 <= data.images.min() and data.images.max() <= 1


def test_idx_header_is_checked(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(struct.pack(">BBBB", 0, 0, 0x08, 2) + struct.pack(">2I", 3, 3) + bytes(5))
    with pytest.raises(PyvaeError, match=r"header says \(3, 3\) but holds 5 values"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd")
    with pytest.raises(PyvaeError, match="not an unsigned-byte IDX file"):
        read_idx(path)


def test_missing_data_names_what_was_looked_for(tmp_path):
    with pytest.raises(
        DataNotFound,
        match=r"binarized_mnist train split not found: looked for .*binarized_mnist_train.amat",
    ):
        load_dataset("binarized_mnist", "train", data_dir=tmp_path, download=False)
    with pytest.raises(DataNotFound, match=r"train-images-idx3-ubyte\[.gz\]"):
        load_dataset("fashion_mnist", "train", data_dir=tmp_path, download=False)
    with pytest.raises(PyvaeError, match="unknown dataset 'cifar'; choose from"):
        load_dataset("cifar", data_dir=tmp_path)
    with pytest.raises(PyvaeError, match="has no split 'valid'"):
        load_dataset("mnist", "valid", data_dir=tmp_path)


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PYVAE_DATA", str(tmp_path))
    assert str(data_root("elsewhere")) == "elsewhere"
    assert data_root() == tmp_path
    monkeypatch.delenv("PYVAE_DATA")
    assert str(data_root()) == "data"


def test_fallback_to_digits_says_why(tmp_path):
    train, test, notice = load_train_test("binarized_mnist", data_dir=tmp_path, download=False)
    assert train.name == "digits" and len(train) == 1437 and len(test) == 360
    assert "binarized_mnist train split not found" in notice and "--strict-data" in notice
    with pytest.raises(DataNotFound):
        load_train_test("binarized_mnist", data_dir=tmp_path, download=False, fallback=None)


def test_digits_are_scaled_and_split():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.images.shape == (1437, 64) and test.images.shape == (360, 64)
    assert train.images.min() == 0 and train.images.max() == 1
    assert train.labels.shape == (1437,) and set(test.labels.tolist()) == set(range(10))


def test_binarization_modes():
    gray = load_dataset("digits", "test")
    static = binarize(gray, "static", seed=1)
    assert static.is_binary() and torch.equal(
        static.images, binarize(gray, "static", seed=1).images
    )
    dynamic = binarize(gray, "dynamic")
    first, second = dynamic.draw(), dynamic.draw()
    assert set(first.unique().tolist()) <= {0.0, 1.0} and not torch.equal(first, second)
    # the fraction of ones matches the gray levels (a Bernoulli draw, not a threshold)
    assert abs(first.mean() - gray.images.mean()) < 0.01
    train, test, mode = binarize_for(Bernoulli(), gray, gray, "auto")
    assert mode == "dynamic" and train.dynamic and not test.dynamic and test.is_binary()
    with pytest.raises(PyvaeError, match="unknown binarize mode"):
        binarize(gray, "threshold")


# -- the real files, when $PYVAE_DATA has them --------------------------------------
@pytest.mark.parametrize(
    "split, n, mean", [("train", 50000, 0.1306), ("valid", 10000, 0.1311), ("test", 10000, 0.1325)]
)
def test_real_binarized_mnist(split, n, mean):
    root = require_files(f"binarized_mnist/binarized_mnist_{split}.amat")
    data = load_dataset("binarized_mnist", split, data_dir=root, download=False)
    assert data.images.shape == (n, 784)
    assert data.is_binary()
    assert data.images.mean().item() == pytest.approx(mean, abs=5e-5)


def test_real_binarized_mnist_test_labels_are_mnist_sorted():
    root = require_files(
        "binarized_mnist/binarized_mnist_test.amat", "MNIST/raw/t10k-images-idx3-ubyte.gz"
    )
    static = load_dataset("binarized_mnist", "test", data_dir=root, download=False)
    gray = load_dataset("mnist", "test", data_dir=root, download=False)
    order = torch.argsort(gray.labels, stable=True)
    assert torch.equal(static.labels, gray.labels[order])
    # the binarized images are draws from the sorted gray ones: far closer to them than to unsorted
    assert ((gray.images[order] - static.images) ** 2).sum(1).mean() < 20


@pytest.mark.parametrize(
    "name, folder, split, n",
    [
        ("mnist", "MNIST", "test", 10000),
        ("fashion_mnist", "FashionMNIST", "train", 60000),
        ("fashion_mnist", "FashionMNIST", "test", 10000),
    ],
)
def test_real_torchvision_files(name, folder, split, n):
    prefix = "train" if split == "train" else "t10k"
    root = require_files(
        f"{folder}/raw/{prefix}-images-idx3-ubyte.gz", f"{folder}/raw/{prefix}-labels-idx1-ubyte.gz"
    )
    data = load_dataset(name, split, data_dir=root, download=False)
    assert data.images.shape == (n, 784) and data.labels.shape == (n,)
    assert set(data.labels.unique().tolist()) == set(range(10))
    assert 0 <= data.images.min() and data.images.max() == 1
