"""A run's files: written with the permissions a new file gets, read back with errors that say
what to do."""

import os
import stat
import warnings

import pytest
import torch

import pyvae
from pyvae.runs import atomic_write, read, save, write_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_get_the_permissions_of_the_umask_not_0600(tmp_path, umask_022):
    write_json(tmp_path / "eval.json", {"a": 1})
    atomic_write(tmp_path / "raw.bin", lambda f: f.write(b"x"))
    for name in ("eval.json", "raw.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    os.umask(0o077)
    write_json(tmp_path / "private.json", {})
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600


def test_a_truncated_checkpoint_says_so_in_one_line_and_offers_the_previous(tmp_path):
    vae = pyvae.VAE(x_dim=6, z_dim=2, hidden=(4,))
    path = tmp_path / "checkpoint.pt"
    save(vae, path)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(pyvae.PyvaeError) as alone:
        read(path)
    message = str(alone.value)
    assert "damaged (cut short" in message and "\n" not in message and "miniz" not in message
    assert "prev" not in message
    (tmp_path / "checkpoint.prev.pt").write_bytes(whole)
    with pytest.raises(pyvae.PyvaeError, match=r"checkpoint\.prev\.pt is beside it: use that"):
        pyvae.load(path)
    previous = pyvae.load(tmp_path / "checkpoint.prev.pt")
    assert all(
        torch.equal(a, b)
        for a, b in zip(previous.state_dict().values(), vae.state_dict().values(), strict=True)
    )


def test_a_training_set_smaller_than_the_batch_trains_as_one_batch(binary_data, tmp_path):
    vae = pyvae.VAE(x_dim=binary_data.shape[1], z_dim=2, hidden=(8,))
    few = binary_data[:20]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = pyvae.fit(vae, few, epochs=1, batch_size=128, device="cpu", progress=False)
    said = [w for w in caught if issubclass(w.category, pyvae.PyvaeWarning)]
    assert [w.filename for w in said] == [__file__]  # at the call of fit
    assert [str(w.message) for w in said] == [
        "batch_size 128 is larger than the training set (20 points): training with the whole "
        "set as the batch (batch_size 20)"
    ]
    assert len(history) == 1


def test_saving_into_a_missing_folder_is_a_one_line_error_and_writes_nothing(tmp_path):
    with pytest.raises(pyvae.PyvaeError, match="cannot save to .*a.pt: its folder .*nowhere does"):
        save(pyvae.VAE(x_dim=4, z_dim=2), tmp_path / "nowhere" / "a.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_and_changes_nothing(tmp_path):
    """Two runs' epochs in one metrics.jsonl, one's checkpoint over the other's: refused."""
    x = torch.rand(40, 4, generator=torch.Generator().manual_seed(0)).round()
    pyvae.fit(pyvae.VAE(x_dim=4, z_dim=2), x, epochs=1, out=tmp_path, progress=False)
    files = {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()}
    with pytest.raises(pyvae.PyvaeError, match="holds a run .*: continue it with resume"):
        pyvae.fit(pyvae.VAE(x_dim=4, z_dim=2), x, epochs=1, out=tmp_path, progress=False)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.is_file()} == files
