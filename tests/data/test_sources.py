"""Your own data: image folders, .npz and .npy files, and the photos patches, through load_dataset
and the CLI."""

import json
import re

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image

import pyvae
import pyvae.data.streaming
from pyvae.cli.app import main
from pyvae.data.batching import Batches
from pyvae.data.datasets import load_dataset, load_train_test


def save_images(folder, n, size=(6, 5), mode="L", seed=0, bright=False):
    """n random images of ``size`` (width, height) in ``folder``; bright ones have a white top
    row."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = {"L": (), "RGB": (3,)}[mode]
    for i in range(n):
        pixels = rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8)
        if bright:
            pixels[0] = 255
        Image.fromarray(pixels, mode).save(folder / f"{i:03d}.png")


def test_an_image_folder_in_class_folders_gives_labels_and_a_seeded_split(tmp_path):
    save_images(tmp_path / "shapes" / "b_square", 12, bright=True)
    save_images(tmp_path / "shapes" / "a_circle", 8, seed=1)
    train, test, _ = load_train_test(str(tmp_path / "shapes"), test_fraction=0.25)
    assert (
        (len(train), len(test)) == (15, 5)
        and train.image_shape == (1, 5, 6)
        and train.name == "shapes"
    )
    # labels are the sorted class folders' indices; every image lands in exactly one split
    assert sorted(torch.cat([train.labels, test.labels]).tolist()) == [0] * 8 + [1] * 12
    assert torch.equal(
        train.images[train.labels == 1][:, :6], torch.ones(int((train.labels == 1).sum()), 6)
    )
    reread = Image.open(tmp_path / "shapes" / "a_circle" / "000.png")
    assert any(
        torch.allclose(row, torch.from_numpy(np.asarray(reread, dtype=np.float32) / 255).flatten())
        for row in torch.cat([train.images, test.images])
    )
    again = load_dataset(str(tmp_path / "shapes"), "test", test_fraction=0.25)
    assert torch.equal(again.images, test.images)  # what evaluate finds again


def test_train_and_test_folders_flat_colour_images_and_resizing(tmp_path):
    save_images(tmp_path / "d" / "train", 7, mode="RGB")
    save_images(tmp_path / "d" / "test", 3, mode="RGB", seed=2)
    train = load_dataset(str(tmp_path / "d"), "train")
    test = load_dataset(str(tmp_path / "d"), "test")
    assert (
        (len(train), len(test)) == (7, 3)
        and train.labels is None
        and train.image_shape == (3, 5, 6)
    )
    assert 0 <= float(train.images.min()) and float(train.images.max()) <= 1
    sized = load_dataset(str(tmp_path / "d"), "train", image_size=4)
    assert sized.image_shape == (3, 4, 4) and sized.x_dim == 48


def test_mixed_sizes_need_image_size_and_the_error_names_a_file(tmp_path):
    save_images(tmp_path / "mixed", 3)
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "mixed" / "odd.png")
    with pytest.raises(
        pyvae.PyvaeError, match=r"odd.png is 9x9 but .*000.png is 6x5: give --image-size"
    ):
        load_dataset(str(tmp_path / "mixed"), "train")
    assert load_dataset(str(tmp_path / "mixed"), "train", image_size=3).image_shape == (1, 3, 3)


def test_npz_and_npy_arrays_in_every_layout(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (10, 4, 5, 3), dtype=np.uint8)
    np.savez(
        tmp_path / "a.npz",
        x_train=nhwc,
        x_test=nhwc[:4],
        y_train=np.arange(10) % 3,
        y_test=np.arange(4) % 3,
    )
    train = load_dataset(str(tmp_path / "a.npz"), "train")
    assert train.image_shape == (3, 4, 5) and train.labels.tolist() == (np.arange(10) % 3).tolist()
    assert torch.allclose(
        train.images[0], torch.from_numpy(nhwc[0].transpose(2, 0, 1).reshape(-1) / 255.0).float()
    )
    floats = rng.random((20, 3, 4, 4)).astype(np.float32)  # NCHW floats in [0, 1], kept as they are
    np.save(tmp_path / "b.npy", floats)
    train, test, _ = load_train_test(str(tmp_path / "b.npy"), test_fraction=0.25)
    assert (
        (len(train), len(test)) == (15, 5)
        and test.labels is None
        and train.image_shape == (3, 4, 4)
    )
    assert sorted(torch.cat([train.images, test.images])[:, 0].tolist()) == sorted(
        floats[:, 0, 0, 0].tolist()
    )


def test_the_photos_are_colour_patches_offline():
    train, test, _ = load_train_test("photos")
    assert (len(train), len(test)) == (416, 104) and train.image_shape == (3, 32, 32)
    assert (
        float(train.images.std()) > 0.1
        and 0 <= float(train.images.min())
        and float(train.images.max()) <= 1
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: (p / "empty").mkdir(), r"no images in .*empty \(looked for .png"),
        (
            lambda p: (p / "bad").mkdir() or (p / "bad" / "x.png").write_bytes(b"not a png"),
            r"cannot read image .*bad/x.png",
        ),
        (
            lambda p: np.savez(p / "n.npz", x_test=np.zeros((2, 3, 3))),
            r"has no array 'x_train' \(it holds x_test\)",
        ),
        (
            lambda p: np.savez(
                p / "n.npz",
                x_train=np.zeros((3, 2, 2)),
                x_test=np.zeros((1, 2, 2)),
                y_train=np.zeros(2, int),
            ),
            r"y_train must hold 3 non-negative integer labels",
        ),
        (
            lambda p: np.save(p / "n.npy", np.full((4, 2, 2), 2.5)),
            r"float64 values in \[2.5, 2.5\]; floats must lie in \[0, 1\]",
        ),
    ],
)
def test_bad_data_is_a_one_line_error(make, message, tmp_path):
    make(tmp_path)
    path = next(p for p in tmp_path.iterdir())
    with pytest.raises(pyvae.PyvaeError, match=message):
        load_dataset(str(path), "train")


def test_a_labelled_folder_trains_a_conditional_model_and_bad_input_writes_nothing(
    tmp_path, capsys
):
    save_images(tmp_path / "shapes" / "a", 24, bright=True)
    save_images(tmp_path / "shapes" / "b", 24, seed=1)
    out = tmp_path / "run"
    common = [
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--eval-samples",
        "5",
        "--z-dim",
        "2",
        "--hidden",
        "8",
    ]
    main(
        [
            "train",
            "--dataset",
            str(tmp_path / "shapes"),
            "--model",
            "cvae",
            *common,
            "--out",
            str(out),
        ]
    )
    assert (out / "checkpoint.pt").is_file() and str(tmp_path / "shapes") in (
        out / "config.yaml"
    ).read_text()
    capsys.readouterr()
    for argv, message in [
        (
            ["--dataset", str(tmp_path / "nowhere")],
            "invalid value .*nowhere.* for 'dataset'; allowed: .*or the path of an existing image "
            "folder",
        ),
        (
            ["--dataset", str(tmp_path / "shapes"), "--image-size", "0"],
            "invalid value 0 for 'image_size'",
        ),
        (
            ["--dataset", "digits", "--image-size", "8"],
            "--image-size resizes the images of a PATH data set",
        ),
        (
            [
                "--dataset",
                "celeba",
                "--data-dir",
                str(tmp_path / "none"),
                "--no-download",
                "--strict-data",
            ],
            r"celeba train split not found under .*none \(torchvision's CelebA layout; downloads "
            r"are off\)",
        ),
        (
            ["--dataset", "no_such_set"],
            "invalid value 'no_such_set' for 'dataset'; allowed: .*a torchvision data set by name",
        ),
    ]:
        with pytest.raises(SystemExit) as info:
            main(["train", *argv, "--epochs", "1", "--out", str(tmp_path / "refused")])
        err = capsys.readouterr().err.strip()
        assert info.value.code == 2 and len(err.splitlines()) == 1
        assert re.search(message, err), err
        assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize("name, layout", [("cifar10", "NHWC"), ("svhn", "NCHW")])
def test_torchvision_colour_sets_by_name(name, layout, tmp_path, monkeypatch):
    """CIFAR and SVHN come through torchvision's own classes (stand-ins here: no files, no
    network)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(
        0, 256, (6, 32, 32, 3) if layout == "NHWC" else (6, 3, 32, 32), dtype=np.uint8
    )

    class StandIn:
        def __init__(self, root, download=False, **split):
            assert not download and root == str(tmp_path)
            self.data = pixels
            setattr(self, "targets" if layout == "NHWC" else "labels", list(range(6)))

    monkeypatch.setattr(torchvision.datasets, {"cifar10": "CIFAR10", "svhn": "SVHN"}[name], StandIn)
    data = load_dataset(name, "test", data_dir=tmp_path, download=False)
    assert data.image_shape == (3, 32, 32) and data.labels.tolist() == list(range(6))
    channels_first = pixels.transpose(0, 3, 1, 2) if layout == "NHWC" else pixels
    assert torch.allclose(
        data.images[1], torch.from_numpy(channels_first[1].reshape(-1) / 255.0).float()
    )


def test_a_torchvision_set_not_under_the_data_root_is_a_clear_notice(tmp_path):
    with pytest.raises(
        pyvae.DataNotFound, match=r"cifar10 train split not found under .*downloads are off"
    ):
        load_dataset("cifar10", "train", data_dir=tmp_path / "nothing", download=False)
    assert not (tmp_path / "nothing").exists()


def test_a_torchvision_set_by_name_read_image_by_image(tmp_path):
    """EuroSAT through torchvision's own class (an ImageFolder of RGB JPEGs under eurosat/2750):
    labels from its targets, no split of its own so split by test_fraction, --image-size applied."""
    for k, name in enumerate(["Forest", "River"]):
        save_images(tmp_path / "eurosat" / "2750" / name, 5 + k, size=(8, 6), mode="RGB", seed=k)
    train, test, _ = load_train_test(
        "eurosat", data_dir=tmp_path, download=False, test_fraction=0.25, image_size=4
    )
    assert (
        (len(train), len(test)) == (8, 3)
        and train.image_shape == (3, 4, 4)
        and train.name == "eurosat"
    )
    assert sorted(torch.cat([train.labels, test.labels]).tolist()) == [0] * 5 + [1] * 6
    assert torch.equal(
        load_dataset(
            "EuroSAT", "test", data_dir=tmp_path, download=False, test_fraction=0.25, image_size=4
        ).images,
        test.images,
    )
    with pytest.raises(
        pyvae.DataNotFound,
        match=r"celeba train split not found under .*CelebA layout; downloads are off",
    ):
        load_dataset("celeba", "train", data_dir=tmp_path / "nothing", download=False)
    assert not (tmp_path / "nothing").exists()


def test_a_torchvision_set_with_splits_of_its_own(tmp_path, monkeypatch):
    """A class taking ``split`` (CelebA's) is asked for train or test; attribute targets give no
    labels."""

    class StandIn(torch.utils.data.Dataset):
        def __init__(self, root, split="train", download=False):
            if split not in ("train", "valid", "test"):
                raise ValueError(f"Unknown value '{split}' for argument split")
            self.n = {"train": 5, "test": 2}[split]

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            return Image.fromarray(np.full((218, 178, 3), 10 * i, np.uint8)), torch.zeros(40)

    monkeypatch.setattr(torchvision.datasets, "CelebA", StandIn)
    test = load_dataset("celeba", "test", data_dir=tmp_path, download=False, image_size=8)
    assert len(test) == 2 and test.labels is None and test.image_shape == (3, 8, 8)
    assert torch.allclose(test.images[1], torch.full((192,), 10 / 255))


def test_a_set_too_large_for_memory_is_streamed_with_the_same_numbers(tmp_path, monkeypatch):
    save_images(tmp_path / "big" / "a", 6, mode="RGB", bright=True)
    save_images(tmp_path / "big" / "b", 4, mode="RGB", seed=1)
    held = load_train_test(str(tmp_path / "big"), test_fraction=0.3)[:2]
    # held, but read by the DataLoader's workers
    monkeypatch.setattr(pyvae.data.streaming, "READ_IN_PARALLEL", 2)
    assert torch.equal(
        load_train_test(str(tmp_path / "big"), test_fraction=0.3)[0].images, held[0].images
    )
    # bytes: 10 images of 3x5x6 floats need 3600
    monkeypatch.setattr(pyvae.data.streaming, "available_memory", lambda: 1000)
    streamed = load_train_test(str(tmp_path / "big"), test_fraction=0.3)[:2]
    for h, s in zip(held, streamed, strict=True):
        assert (
            isinstance(s.images, pyvae.data.streaming.StreamedImages)
            and s.images.shape == h.images.shape
        )
        assert torch.equal(s.images[:], h.images) and torch.equal(s.labels, h.labels)
    rest, valid = pyvae.data.datasets.hold_out(streamed[0], 0.3)
    assert torch.equal(valid.images[:], pyvae.data.datasets.hold_out(held[0], 0.3)[1].images)
    # a static binarization of a streamed set is one fixed draw per image, the same in any subset
    binary = pyvae.data.datasets.binarize(streamed[0], "static", seed=3)
    assert (
        torch.equal(binary.images[[2, 4]], binary.images.subset([2, 4])[:]) and binary.is_binary()
    )


def test_a_corrupt_image_in_a_streamed_set_is_one_line_naming_it(tmp_path, monkeypatch):
    save_images(tmp_path / "big", 8)
    whole = (tmp_path / "big" / "005.png").read_bytes()
    # its header is whole, its pixels not
    (tmp_path / "big" / "005.png").write_bytes(whole[: len(whole) // 2])
    monkeypatch.setattr(pyvae.data.streaming, "available_memory", lambda: 100)
    train = load_dataset(str(tmp_path / "big"), "train", test_fraction=0.25)
    with pytest.raises(pyvae.PyvaeError) as info:
        list(Batches(train, torch.device("cpu")).in_order(2))
    assert re.fullmatch(r"cannot read image .*big/005.png: OSError: .*", str(info.value))


def test_a_streamed_folder_trains_exactly_as_held_and_evaluate_finds_it_again(
    tmp_path, monkeypatch, capsys
):
    """The same colour folder held in memory and forced to stream (a DataLoader with workers): the
    same minibatches, so the same ELBOs to the last digit; then ``evaluate RUN`` reads it again."""
    save_images(tmp_path / "pics" / "a", 20, size=(6, 6), mode="RGB", bright=True)
    save_images(tmp_path / "pics" / "b", 20, size=(6, 6), mode="RGB", seed=1)
    flags = [
        "--dataset",
        str(tmp_path / "pics"),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--eval-samples",
        "4",
        "--z-dim",
        "2",
        "--hidden",
        "8",
        "--valid-fraction",
        "0.2",
        "--likelihood",
        "discretized_logistic",
        "--no-download",
    ]
    main(["train", *flags, "--out", str(tmp_path / "held")])
    # 40 images of 3x6x6 floats need 17,280 bytes
    monkeypatch.setattr(pyvae.data.streaming, "available_memory", lambda: 1000)
    capsys.readouterr()
    main(["train", *flags, "--out", str(tmp_path / "streamed")])
    assert "binarize=none, streamed from disk (too large for memory)" in capsys.readouterr().out
    held, streamed = (
        [
            {k: v for k, v in json.loads(line).items() if "time" not in k and "second" not in k}
            for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        ]
        for run in ("held", "streamed")
    )
    assert held == streamed and len(held) == 2
    main(
        ["evaluate", str(tmp_path / "streamed"), "--num-samples", "4", "--out", str(tmp_path / "e")]
    )
    # 0.1 of 40 held out as test
    assert json.loads((tmp_path / "e" / "eval.json").read_text())["num_points"] == 4
