"""Model files: round trip, metadata, and refusal of foreign or malicious files."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from napari_unet import NapariUnetError
from napari_unet.modelfile import check_modalities, load_model, make_metadata, save_model
from napari_unet.unet import UNet, UNetConfig


@pytest.fixture
def small():
    config = UNetConfig(base_channels=4, depth=2, padding="same", norm="batch")
    return UNet(config), make_metadata(config, training={"data": "unit test"})


def test_round_trip_keeps_weights_and_metadata(small, tmp_path):
    model, meta = small
    path = save_model(model, meta, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert loaded.metadata == meta
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_a_save_that_fails_midway_keeps_the_old_file_and_leaves_no_partial(small, tmp_path, monkeypatch):
    """Saves are atomic: a write that dies halfway (a full disk) leaves the model that was there
    byte for byte, says what went wrong, and leaves no temporary file behind."""
    import safetensors.torch

    model, meta = small
    path = save_model(model, meta, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def half_a_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_a_file)
    torch.manual_seed(1)
    other = UNet(UNetConfig(base_channels=4, depth=2, padding="same", norm="batch"))
    with pytest.raises(OSError, match="No space left on device"):
        save_model(other, meta, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    monkeypatch.undo()
    load_model(path)  # still a whole model


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('PWNED_MARKER', '/tmp/pwned')}",))


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Payload(), "metadata": {}}, f)
    with pytest.raises(NapariUnetError, match="refused"):
        load_model(path)
    assert not marker.exists()


def test_a_plain_data_pt_with_metadata_loads_and_one_without_is_refused(small, tmp_path):
    model, meta = small
    good = tmp_path / "good.pt"
    torch.save({"state_dict": model.state_dict(), "metadata": meta}, good)
    assert load_model(good).metadata["architecture"]["base_channels"] == 4
    foreign = tmp_path / "foreign.pt"
    torch.save(model.state_dict(), foreign)
    with pytest.raises(NapariUnetError, match="not a napari-unet model"):
        load_model(foreign)


def test_files_that_are_not_models_are_refused(small, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(NapariUnetError, match="not a safetensors model"):
        load_model(junk)
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(3)}, str(bare))
    with pytest.raises(NapariUnetError, match="no napari-unet metadata"):
        load_model(bare)
    with pytest.raises(NapariUnetError, match="no such model file"):
        load_model(tmp_path / "missing.safetensors")


def test_weights_that_do_not_fit_the_metadata_are_refused(small, tmp_path):
    model, meta = small
    meta = dict(meta, architecture=dict(meta["architecture"], base_channels=8))
    path = save_model(model, meta, tmp_path / "m.safetensors")
    with pytest.raises(NapariUnetError, match="do not fit"):
        load_model(path)


def test_wrong_modalities_are_refused(small):
    _, meta = small
    with pytest.raises(NapariUnetError, match="missing t1ce"):
        check_modalities(meta, ["t1", "t2", "flair"], "case X")


def test_missing_default_model_gives_a_clear_message(monkeypatch, tmp_path, capsys):
    from napari_unet import cli, modelfile

    monkeypatch.setattr(modelfile, "default_model_path", lambda: tmp_path / "default.safetensors")
    assert cli.main(["info"]) == 2
    assert "default model is not installed" in capsys.readouterr().err
