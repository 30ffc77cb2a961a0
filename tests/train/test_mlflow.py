"""fit(track="mlflow"): the run's settings, per-epoch numbers and files in an MLflow store, read
back with MLflow's own client; user callbacks; the one-line error without mlflow."""

import builtins

import pytest
import torch

import pyvae
from pyvae.cli import main
from pyvae.errors import PyvaeError
from pyvae.train import Callback, MLflowCallback


def small_run(out, **kwargs):
    torch.manual_seed(0)
    x = (torch.rand(96, 16) > 0.5).float()
    vae = pyvae.VAE(x_dim=16, z_dim=2, hidden=(8,))
    settings = dict(epochs=2, batch_size=32, device="cpu", seed=0, progress=False, out=out)
    return pyvae.fit(vae, x[:64], valid=x[64:], **{**settings, **kwargs})


def test_mlflow_holds_the_settings_the_epochs_and_the_files(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    out = tmp_path / "run"
    history = small_run(out, track="mlflow", out_files={"config.yaml": "epochs: 2\n"})
    client = mlflow.tracking.MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("pyvae").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["epochs"] == "2" and run.data.params["lr"] == "0.001"
    assert run.data.params["model"] == "VAE" and run.data.params["elbo"] == "auto"
    for key in ("train_elbo", "valid_elbo", "lr", "beta"):
        steps = client.get_metric_history(run.info.run_id, key)
        assert sorted((m.step, m.value) for m in steps) == [(h["epoch"], h[key]) for h in history]
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert files == {"config.yaml", "metrics.jsonl"}


def test_files_written_after_fit_join_the_run_in_a_store_of_ones_own(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    store = (tmp_path / "store").as_uri()
    tracker = MLflowCallback({"note": "mine"}, tracking_uri=store, experiment="digits")
    out = tmp_path / "run"
    small_run(out, callbacks=[tracker])
    (out / "eval.json").write_text('{"log_px": -9.5}')  # as the CLI's evaluation would
    tracker.log_files()
    tracker.log_metrics({"log_px": -9.5}, step=2)
    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"note": "mine"} and run.data.metrics["log_px"] == -9.5
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert files == {"eval.json", "metrics.jsonl"}
    assert not (out / "mlruns").exists()


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    out = tmp_path / "run"
    small_run(out, track="mlflow")
    small_run(out, track="mlflow", epochs=3, resume=True)
    client = mlflow.tracking.MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("pyvae").experiment_id])
    steps = client.get_metric_history(run.info.run_id, "train_elbo")
    assert sorted(m.step for m in steps) == [1, 2, 3]


def test_user_callbacks_see_every_step_and_epoch_and_can_stop(tmp_path):
    class Recorder(Callback):
        def __init__(self):
            self.calls = []

        def on_train_begin(self, run):
            self.calls.append("begin")

        def on_step_end(self, run):
            self.calls.append(run.step)

        def on_epoch_end(self, run, record):
            self.calls.append(f"epoch {record['epoch']}")
            run.stop = True

        def on_train_end(self, run, error):
            self.calls.append(f"end {error}")

    recorder = Recorder()
    history = small_run(None, callbacks=[recorder])
    assert len(history) == 1
    assert recorder.calls == ["begin", 1, 2, "epoch 1", "end None"]


def test_tracking_refuses_a_missing_package_and_unknown_trackers(tmp_path, monkeypatch):
    with pytest.raises(PyvaeError, match="unknown track 'wandb'; choose from None, mlflow"):
        small_run(tmp_path / "a", track="wandb")
    with pytest.raises(PyvaeError, match="callbacks must be pyvae.train.Callback"):
        small_run(tmp_path / "b", callbacks=[print])
    real_import = builtins.__import__

    def without_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_mlflow)
    with pytest.raises(PyvaeError, match=r'pip install "pyvae\[mlflow\]"'):
        small_run(tmp_path / "c", track="mlflow")
    assert not (tmp_path / "c").exists()  # refused before anything was written


def test_train_track_mlflow_logs_the_config_the_epochs_the_pictures_and_the_evaluation(
    tmp_path, monkeypatch
):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    argv = ["train", "--dataset", "digits", "--no-download", "--epochs", "1", "--z-dim", "2"]
    argv += ["--hidden", "16", "--eval-samples", "10", "--eval-points", "20", "--out", str(out)]
    main([*argv, "--track", "mlflow"])
    client = mlflow.tracking.MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("pyvae").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["dataset"] == "digits" and run.data.params["z_dim"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "train_elbo")) == 1
    assert any(key.startswith("eval_") for key in run.data.metrics)
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "metrics.jsonl", "samples.png", "elbo.png"} <= files
    assert any(f.endswith(".json") and f != "metrics.jsonl" for f in files), files
