"""``python -m pyvae train --model FILE.py:Class``: a model class of the user's own, trained and
followed by the other commands, which import the recorded file again and refuse it once changed."""

import hashlib
import json
import re

import pytest
import torch
import yaml

import pyvae
from pyvae.cli.app import main
from pyvae.cli.train import model_args, parse_args
from tests.conftest import exits_2

TINY = """
import pyro, pyro.distributions as dist, torch
from torch import nn


class TinyVAE(nn.Module):
    def __init__(self, x_dim=64, z_dim=2, hidden=16):
        super().__init__()
        self.z_dim = z_dim
        self.enc = nn.Sequential(nn.Linear(x_dim, hidden), nn.Softplus(),
                                 nn.Linear(hidden, 2 * z_dim))
        self.dec = nn.Sequential(nn.Linear(z_dim, hidden), nn.Softplus(), nn.Linear(hidden, x_dim))

    # as Pyro's VAE tutorial writes it: no num_data, the plate sized by the minibatch
    def model(self, x):
        pyro.module("dec", self.dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("enc", self.enc)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.enc(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))


class NoGuide(nn.Module):
    def model(self, x, num_data=None):
        pass


if __name__ == "__main__":
    raise SystemExit("the __main__ block of the model file ran")
"""

# --lr-schedule none: a cosine schedule is fixed to its epochs, and the run is resumed to more
COMMON = [
    "--dataset",
    "digits",
    "--no-download",
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--eval-samples",
    "0",
    "--lr-schedule",
    "none",
]


def model_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY)
    return path


def train(tmp_path, *flags):
    out = tmp_path / "run"
    model = f"{model_file(tmp_path)}:TinyVAE"
    main(["train", "--model", model, *COMMON, "--out", str(out), *flags])
    return out


def test_a_users_class_trains_and_every_command_follows_it(tmp_path, capsys):
    run = train(tmp_path, "--model-arg", "z_dim=3")
    file = model_file(tmp_path)
    record = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert record == {
        "file": str(file.resolve()),
        "class": "TinyVAE",
        "args": {"z_dim": 3},
        "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
    }
    payload = torch.load(run / "checkpoint.pt", weights_only=True)  # no code in it
    data = {"x_dim": 64, "image_shape": [1, 8, 8], "num_classes": 10}
    assert payload["user_model"] == {**record, "data": data}
    assert payload["state_dict"]["enc.2.weight"].shape == (6, 16)  # 2 * z_dim rows: the arg counted
    needs = r"holds TinyVAE from .*tiny.py, a class of your own: pyvae.load needs an instance"
    with pytest.raises(pyvae.PyvaeError, match=needs):
        pyvae.load(run / "checkpoint.pt")

    main(
        [
            "evaluate",
            str(run),
            "--num-samples",
            "50",
            "--num-points",
            "20",
            "--out",
            str(tmp_path / "e"),
        ]
    )
    summary = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert summary["num_points"] == 20 and summary["log_px"] < 0
    main(["sample", str(run), "--out", str(tmp_path / "s")])
    assert (tmp_path / "s" / "samples.png").is_file()
    assert "needs the vae model, not TinyVAE" in exits_2(["traverse", str(run)], capsys)

    main(["train", "--resume", str(run), "--epochs", "2"])
    records = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in records] == [1, 2]
    assert "--model-arg cannot change the model of a resumed run" in exits_2(
        ["train", "--resume", str(run), "--epochs", "3", "--model-arg", "z_dim=4"], capsys
    )


@pytest.mark.parametrize(
    "model, flags, message",
    [
        (
            "tiny.py:TinyVAE",
            ["--model-arg", "zdim=3"],
            r"unknown model argument 'zdim' for TinyVAE \(.*tiny.py\); "
            r"allowed: x_dim, z_dim, hidden",
        ),
        ("missing.py:TinyVAE", [], r"--model missing.py:TinyVAE: there is no file .*missing.py"),
        ("tiny.py:Missing", [], r"defines no class 'Missing'; its classes: TinyVAE, NoGuide"),
        ("tiny.py:NoGuide", [], r"NoGuide in .*tiny.py has no method guide"),
        ("tiny.txt:TinyVAE", [], r"tiny.txt is not a Python file"),
        ("tiny.py:TinyVAE", ["--model-arg", "z_dim"], r"--model-arg takes KEY=VALUE"),
        ("vae", ["--model-arg", "z_dim=3"], r"--model-arg is for a model class of your own"),
    ],
)
def test_a_bad_model_file_class_or_argument_is_one_line_and_no_run(
    tmp_path, capsys, monkeypatch, model, flags, message
):
    model_file(tmp_path)
    (tmp_path / "tiny.txt").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    err = exits_2(["train", "--model", model, *COMMON, "--out", str(out), *flags], capsys)
    assert re.search(message, err), err
    assert not out.exists()


def test_a_changed_or_missing_model_file_is_refused(tmp_path, capsys):
    run = train(tmp_path)
    file = model_file(tmp_path)
    with file.open("a") as f:
        f.write("# edited\n")
    for argv in (
        ["evaluate", str(run), "--num-samples", "5"],
        ["train", "--resume", str(run), "--epochs", "2"],
    ):
        err = exits_2(argv, capsys)
        assert f"the model file {file.resolve()} has changed since" in err and "sha256" in err, err
    file.unlink()
    err = exits_2(["sample", str(run)], capsys)
    checkpoint = run / "checkpoint.pt"
    missing = f"the model file {file.resolve()} that {checkpoint} was trained with is missing"
    assert missing in err, err


def test_model_args_are_yaml_values_and_yaml_configs_take_a_mapping(tmp_path):
    assert model_args(["a=3", "b=1e-3", "c=[64, 64]", "d=true", "e=text", "f=0.5", "a=4"]) == {
        "a": 4,
        "b": 0.001,
        "c": [64, 64],
        "d": True,
        "e": "text",
        "f": 0.5,
    }
    config_file = tmp_path / "config.yaml"
    config_file.write_text("model: {file: tiny.py, class: TinyVAE, args: {z_dim: 10}}\n")
    config, _ = parse_args(["--config", str(config_file), "--model-arg", "hidden=8"])
    args = {"z_dim": 10, "hidden": 8}
    assert config.model == {"file": "tiny.py", "class": "TinyVAE", "args": args}


SEMI = '''
import pyro, pyro.distributions as dist, torch
from torch import nn


class TinySSVAE(nn.Module):
    """Pyro's SS-VAE idiom: model(xs, ys=None), a one-hot label site, the guide's q(y|x) when ys
    is None."""

    def __init__(self, x_dim=64, num_classes=10, z_dim=2, hidden=16):
        super().__init__()
        self.c, self.z_dim = num_classes, z_dim
        self.classify = nn.Linear(x_dim, num_classes)
        self.enc = nn.Linear(x_dim + num_classes, 2 * z_dim)
        self.dec = nn.Sequential(
            nn.Linear(z_dim + num_classes, hidden), nn.Softplus(), nn.Linear(hidden, x_dim)
        )

    def model(self, xs, ys=None):
        pyro.module("ss", self)
        with pyro.plate("data"):
            m = xs.shape[0]
            ys = pyro.sample("y", dist.OneHotCategorical(logits=xs.new_zeros(m, self.c)), obs=ys)
            z = pyro.sample("z", dist.Normal(xs.new_zeros(m, self.z_dim), 1.0).to_event(1))
            lead = torch.broadcast_shapes(ys.shape[:-1], z.shape[:-1])
            zy = torch.cat([z.expand(*lead, self.z_dim), ys.expand(*lead, self.c)], -1)
            logits = self.dec(zy)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=xs)

    def guide(self, xs, ys=None):
        with pyro.plate("data"):
            if ys is None:
                ys = pyro.sample("y", dist.OneHotCategorical(logits=self.classify(xs)))
            lead = torch.broadcast_shapes(ys.shape[:-1], xs.shape[:-1])
            xy = torch.cat([xs.expand(*lead, xs.shape[-1]), ys.expand(*lead, self.c)], -1)
            loc, raw = self.enc(xy).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))
'''


def test_a_users_semi_supervised_class_trains_with_num_labels(tmp_path, capsys):
    path = tmp_path / "semi.py"
    path.write_text(SEMI)
    run = tmp_path / "run"
    main(
        ["train", "--model", f"{path}:TinySSVAE", "--num-labels", "100", *COMMON, "--out", str(run)]
    )
    out = capsys.readouterr().out
    assert "elbo auto: enum" in out and "labelled" in out  # y summed exactly; both groups' ELBOs
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_elbo_labelled", "train_elbo_unlabelled", "test_elbo"} <= set(record)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "train",
                "--model",
                f"{model_file(tmp_path)}:TinyVAE",
                "--num-labels",
                "100",
                *COMMON,
                "--out",
                str(tmp_path / "refused"),
            ]
        )
    assert exit_info.value.code == 2 and not (tmp_path / "refused").exists()
