"""The exploration commands on tiny trained runs: each writes its picture and numbers."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import pyvae
from pyvae.cli.app import COMMANDS, main, run
from pyvae.data.datasets import binarize, load_dataset
from pyvae.infer.explore import anomaly_auc, linear_probe, manifold, slerp
from pyvae.viz import plots


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """z_dim = 2, so the manifold picture is made too."""
    out = tmp_path_factory.mktemp("digits_run")
    torch.manual_seed(0)
    train = binarize(load_dataset("digits", "train"), "static")
    vae = pyvae.VAE(x_dim=64, z_dim=2, hidden=(64,))
    pyvae.fit(vae, train, epochs=5, batch_size=64, lr=3e-3, device="cpu", out=out, progress=False)
    (out / "config.yaml").write_text("dataset: digits\nbinarize: dynamic\nseed: 0\n")
    return out


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def mnist_like_run(tmp_path_factory):
    """A run on small generated 28x28 sets in torchvision's layout: sparse "mnist", dense
    "fashion"."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for folder, density in (("MNIST", 0.1), ("FashionMNIST", 0.6)):
        for prefix in ("train", "t10k"):
            images = (rng.random((60, 28, 28)) < density) * 255
            write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte.gz", images)
            write_idx(
                root / folder / "raw" / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, 60)
            )
    out = tmp_path_factory.mktemp("mnist_run")
    train = binarize(load_dataset("mnist", "train", data_dir=root, download=False), "static")
    vae = pyvae.VAE(x_dim=784, z_dim=4, hidden=(32,))
    pyvae.fit(vae, train, epochs=3, batch_size=20, lr=1e-2, device="cpu", out=out, progress=False)
    (out / "config.yaml").write_text(
        f"dataset: mnist\ndata_dir: {root}\nbinarize: none\ndownload: false\nseed: 0\n"
    )
    return out


@pytest.mark.parametrize(
    "command, extra, files",
    [
        ("sample", ["--n", "16", "--temperature", "0.7"], ["samples.png"]),
        ("reconstruct", ["--n", "16"], ["reconstructions.png"]),
        (
            "interpolate",
            ["--pairs", "3", "--steps", "5"],
            ["interpolate_linear.png", "interpolate_spherical.png"],
        ),
        ("traverse", ["--dims", "2", "--steps", "5"], ["traverse.png", "manifold.png"]),
        ("embed", [], ["embedding.png", "embed.json"]),
    ],
)
def test_each_command_writes_its_picture(digits_run, tmp_path, capsys, command, extra, files):
    from pyvae.cli.app import COMMANDS

    run(COMMANDS[command], [str(digits_run), "--out", str(tmp_path), "--device", "cpu", *extra])
    for name in files:
        assert (tmp_path / name).stat().st_size > 0, name
    if command == "embed":
        result = json.loads((tmp_path / "embed.json").read_text())
        # two latent dimensions of an unsupervised model still separate the digits well above chance
        assert result["probe_accuracy"] > result["majority_baseline"] + 0.2
        assert 0.1 < result["kmeans_purity"] <= 1 and result["num_points"] == 360
        assert "linear probe accuracy" in capsys.readouterr().out


def test_anomaly_command(mnist_like_run, tmp_path, capsys):
    anomaly_main = COMMANDS["anomaly"]

    run(
        anomaly_main,
        [
            str(mnist_like_run),
            "--ood",
            "fashion_mnist",
            "--num-samples",
            "20",
            "--num-points",
            "40",
            "--out",
            str(tmp_path),
        ],
    )
    result = json.loads((tmp_path / "anomaly.json").read_text())
    assert result["roc_auc"] > 0.9 and result["log_px_in"] > result["log_px_ood"]
    assert (tmp_path / "anomaly_hist.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "ROC AUC" in out and "40 test images of each" in out and "K = 20" in out
    # both generated sets are 0/255 already: scored as stored, and the output says so
    assert result["binarization"] == {
        "mnist": "scored as stored (no binarization)",
        "fashion_mnist": "scored as stored (no binarization)",
    }
    assert "fashion_mnist: scored as stored" in out


def test_anomaly_says_the_run_s_own_set_alone_was_drawn_afresh(digits_run, tmp_path, capsys):
    anomaly_main = COMMANDS["anomaly"]

    rng = np.random.default_rng(
        1
    )  # grey 8x8 images: binarized for the Bernoulli likelihood, one fixed draw
    np.savez(
        tmp_path / "grey.npz",
        x_train=rng.random((30, 8, 8), dtype=np.float32),
        x_test=rng.random((30, 8, 8), dtype=np.float32),
    )
    run(
        anomaly_main,
        [
            str(digits_run),
            "--ood",
            str(tmp_path / "grey.npz"),
            "--num-samples",
            "5",
            "--num-points",
            "30",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    binarization = json.loads((tmp_path / "out" / "anomaly.json").read_text())["binarization"]
    assert binarization["digits"].endswith("(training drew afresh)")
    assert [how for name, how in binarization.items() if name != "digits"] == [
        "binarized by one fixed Bernoulli draw of its grey levels"
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sample", "RUN", "--n", "0"], "--n must be a positive integer; got 0"),
        (["sample", "RUN", "--temperature", "-1"], "--temperature must be a positive number"),
        (
            ["anomaly", "RUN", "--ood", "binarized_mnist", "--no-such-flag"],
            "unrecognized arguments",
        ),
        (
            [
                "anomaly",
                "RUN",
                "--ood",
                "fashion_mnist",
                "--data-dir",
                "TMP/nowhere",
                "--no-download",
            ],
            "fashion_mnist test split not found",
        ),
        (
            ["sample", "RUN", "--label", "3"],
            "--label is for models with labels (cvae, m2); VAE has none",
        ),
        (["embed", "nowhere"], "nowhere is neither a run folder"),
        (["explode"], "usage: python -m pyvae"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(digits_run, capsys, tmp_path, argv, message):
    argv = [str(digits_run) if a == "RUN" else a.replace("TMP", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "nowhere").exists()  # a failed load leaves no folders behind


def test_the_manifold_of_8x8_digits_is_at_least_600_pixels_wide(tmp_path):
    vae = pyvae.VAE(x_dim=64, z_dim=2, hidden=(8,))
    plots.save_grid(manifold(vae), vae.image_shape, tmp_path / "manifold.png", nrow=15)
    width, height = Image.open(tmp_path / "manifold.png").size
    assert width >= 600 and height >= 600 and width % 152 == 0  # 15 cells of 8 + 2 px, whole x


def test_slerp_keeps_the_ends_and_the_norm_of_unit_vectors():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert torch.allclose(path[0, 0], a[0], atol=1e-6) and torch.allclose(
        path[0, -1], b[0], atol=1e-6
    )
    assert torch.allclose(path.norm(dim=-1), torch.ones(1, 5), atol=1e-5)


def test_probe_and_auc_on_known_answers():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 100)
    z = np.eye(3)[labels] * 5 + rng.normal(size=(300, 3)) * 0.1
    result = linear_probe(z, labels)
    assert result["probe_accuracy"] == 1.0 and result["kmeans_purity"] == 1.0
    assert anomaly_auc(torch.tensor([0.0, -1.0]), torch.tensor([-5.0, -6.0])) == 1.0
    assert anomaly_auc(torch.tensor([-5.0, -6.0]), torch.tensor([0.0, -1.0])) == 0.0
