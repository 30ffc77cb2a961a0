"""--tensorboard: a run's numbers and pictures as TensorBoard events, continued by --resume."""

import json

import pytest

from pyvae.cli.app import main


def events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_events_hold_the_epochs_the_pictures_and_the_evaluation(tmp_path):
    out = tmp_path / "run"
    # no cosine: the run is resumed to more epochs below
    common = [
        "--dataset",
        "digits",
        "--batch-size",
        "64",
        "--z-dim",
        "4",
        "--eval-points",
        "40",
        "--eval-samples",
        "20",
        "--lr-schedule",
        "none",
    ]
    main(
        [
            "train",
            *common,
            "--epochs",
            "2",
            "--tensorboard",
            "--valid-fraction",
            "0.2",
            "--out",
            str(out),
        ]
    )
    board = events(out / "tensorboard")
    tags = board.Tags()
    assert {
        "elbo/train",
        "elbo/test",
        "elbo/valid",
        "kl_weight",
        "lr",
        "loss/train",
        "kl/z",
        "eval/log_px",
        "eval/gap",
    } <= set(tags["scalars"])
    assert {"samples", "reconstructions"} <= set(tags["images"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e.step, e.value) for e in board.Scalars("elbo/test")] == [
        (r["epoch"], pytest.approx(r["test_elbo"])) for r in records
    ]
    assert len(board.Images("samples")) == 2
    summary = json.loads(next(out.glob("eval-*/eval.json")).read_text())
    assert board.Scalars("eval/log_px")[0].value == pytest.approx(summary["log_px"])

    # the KL draws and pictures do not touch training's random stream: the same run without
    # events is identical
    main(
        [
            "train",
            *common,
            "--epochs",
            "2",
            "--valid-fraction",
            "0.2",
            "--out",
            str(tmp_path / "plain"),
        ]
    )
    plain = [
        json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["train_elbo"] for r in plain] == [r["train_elbo"] for r in records]

    main(["train", "--resume", str(out), "--epochs", "3"])  # the same stream goes on
    assert [e.step for e in events(out / "tensorboard").Scalars("elbo/train")] == [1, 2, 3]


def test_a_colour_8_bit_run_with_a_residual_net_reports_bits_per_dimension(tmp_path, capsys):
    import math

    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "colour.npz",
        x_train=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8),
        x_test=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
    )
    out = tmp_path / "run"
    main(
        [
            "train",
            "--dataset",
            str(tmp_path / "colour.npz"),
            "--net",
            "resnet",
            "--likelihood",
            "discretized_logistic",
            "--z-dim",
            "4",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--eval-points",
            "4",
            "--eval-samples",
            "5",
            "--tensorboard",
            "--out",
            str(out),
        ]
    )
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["test_elbo_bpd"] == pytest.approx(
        -record["test_elbo"] / (3 * 32 * 32 * math.log(2))
    )
    printed = capsys.readouterr().out
    assert (
        f"bits/dim (256 levels) train {record['train_elbo_bpd']:.4f}  "
        f"test {record['test_elbo_bpd']:.4f}" in printed
    )
    assert f"{record['test_elbo_bpd']:.4f} bits/dim (256 levels) (epoch 1)" in printed
    board = events(out / "tensorboard")
    assert {"elbo_bpd/train", "elbo_bpd/test", "eval/bits_per_dim"} <= set(board.Tags()["scalars"])
    summary = json.loads(next(out.glob("eval-*/eval.json")).read_text())
    assert board.Scalars("eval/bits_per_dim")[0].value == pytest.approx(summary["bits_per_dim"])
    assert (
        board.Images("samples")[0].width == 8 * 32 + 9 * 2
    )  # a grid of 8 x 8 colour images, 2-pixel gaps
