"""Cases with some modalities missing: a model trained with modality dropout reads, predicts and
fine-tunes on them; a model that needs all four refuses, naming what is missing."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from conftest import TRAIN_SHAPE

from napari_unet.cases import read_case
from napari_unet.cli import main
from napari_unet.metrics import dice
from napari_unet.modelfile import load_model
from napari_unet.predict import Predictor
from napari_unet.session import AnnotationSession


@pytest.fixture(scope="session")
def dropout_model(tmp_path_factory, dataset_factory):
    """A small U-Net trained with modality dropout on 8 cases (the real loop, about half a minute)."""
    from napari_unet.unet import UNetConfig
    from training.loop import Settings, train

    cases = dataset_factory("brats2021", cases=8, seed=11, shape=TRAIN_SHAPE)
    out = tmp_path_factory.mktemp("dropout_model") / "dropout.safetensors"
    train(cases[0].parent, out,
          settings=Settings(steps=300, batch_size=8, patch=64, lr=3e-3, seed=0, device="cpu", val_every=0,
                            modality_dropout=0.4),
          config=UNetConfig(base_channels=8, depth=3, padding="same", norm="batch"), val_fraction=0.0)
    return out


@pytest.fixture
def two_modality_case(dataset_factory, tmp_path):
    """A held-out case with only FLAIR and T1 (a common clinical protocol)."""
    src = dataset_factory("brats2021", cases=1, seed=12, shape=TRAIN_SHAPE)[0]
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    for m in ("t1ce", "t2"):
        next(dst.glob(f"*_{m}.nii.gz")).unlink()
    return dst


def test_the_model_file_says_what_it_needs(dropout_model, tiny_model, capsys):
    assert load_model(dropout_model).metadata["required_modalities"] == []
    assert load_model(tiny_model[0]).metadata["required_modalities"] == ["t1", "t1ce", "t2", "flair"]
    assert main(["info", str(dropout_model)]) == 0
    assert "required: any one" in capsys.readouterr().out


def test_a_dropout_model_proposes_on_two_modalities(dropout_model, two_modality_case):
    case = read_case(two_modality_case)
    assert sorted(case.images) == ["flair", "t1"]
    labels = Predictor(load_model(dropout_model), "cpu").predict_case(case).labels
    assert dice(labels > 0, case.labels > 0) > 0.5


def test_a_model_needing_all_four_refuses_naming_what_is_missing(tiny_model, two_modality_case, tmp_path, capsys):
    code = main(["predict", str(two_modality_case), "--out", str(tmp_path / "o"), "--model", str(tiny_model[0])])
    assert code == 2 and "missing t1ce, t2" in capsys.readouterr().err


def _annotate(case, model, store, pick):
    """Propose with `model`, correct the tumour slices `pick(tumour_slices)` chooses with the
    case's own labels, save: (session, the proposal, the stored case folder)."""
    session = AnnotationSession(case.source, case.images, store, model=model)
    labels = session.open_labels()
    prediction, _ = session.predict(device="cpu")
    session.merge_proposal(labels, prediction)
    picked = pick(np.flatnonzero((case.labels > 0).any(axis=(1, 2))))
    labels[picked] = case.labels[picked]
    session.collect_edits(labels)
    return session, prediction, session.save(session.snapshot(labels))


def test_session_and_finetune_work_on_a_two_modality_case(dropout_model, two_modality_case, tmp_path):
    case = read_case(two_modality_case)
    session, _, case_dir = _annotate(case, dropout_model, tmp_path / "store", lambda tumour: tumour[:4])
    assert sorted(p.name.split("_")[-1] for p in case_dir.glob("*.nii.gz")) == ["flair.nii.gz", "seg.nii.gz",
                                                                               "t1.nii.gz"]
    result = session.finetune(steps=3, device="cpu")
    assert result.path.exists() and session.model_path == result.path
    assert load_model(result.path).metadata["required_modalities"] == []


def test_training_data_must_have_every_modality_it_trains_on(dataset_factory, two_modality_case, tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    shutil.copytree(two_modality_case, root / two_modality_case.name)
    shutil.copytree(dataset_factory("brats2021", cases=1, seed=13, shape=TRAIN_SHAPE)[0], root / "BraTS2021_00002")
    assert main(["prepare", str(root), "--cache", str(tmp_path / "c"), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "skipped:" in err and "missing t1ce, t2" in err


def test_modality_dropout_keeps_a_channel_and_hides_only_optional_ones():
    import torch

    from training.data import drop_modalities

    x = torch.ones(500, 4, 2, 2)
    out = drop_modalities(x, 0.9, [0, 1, 2], torch.Generator().manual_seed(0))
    kept = out[:, :, 0, 0]
    assert (kept[:, 3] == 1).all()  # not droppable
    assert (kept[:, :3].sum(1) < 3).float().mean() > 0.9
    out = drop_modalities(x, 1.0, [0, 1, 2, 3], torch.Generator().manual_seed(0))
    assert (out[:, :, 0, 0].sum(1) == 1).all()  # everything droppable dropped: one comes back
    assert torch.equal(drop_modalities(x, 0.0, [0, 1], torch.Generator()), x)


def _hidden_channel_share(monkeypatch) -> list:
    """Records, for every training batch the network sees, the share of (sample, channel) pairs
    that are blank: how many modalities the fine-tune hid."""
    from napari_unet.unet import UNet

    shares, forward = [], UNet.forward

    def recording(self, x):
        if self.training:
            blank = x.detach().float().abs().amax(dim=(2, 3)) == 0
            shares.append(float(blank.float().mean()))
        return forward(self, x)

    monkeypatch.setattr(UNet, "forward", recording)
    return shares


def test_finetuning_on_a_four_modality_case_keeps_the_model_working_on_two(
        dropout_model, dataset_factory, two_modality_case, tmp_path, monkeypatch):
    """The fine-tune hides modalities as the base model's training did, so corrections made on a
    full case do not teach it to lean on T1ce and T2 that other cases lack."""
    full = read_case(dataset_factory("brats2021", cases=2, seed=14, shape=TRAIN_SHAPE)[1])
    session, _, _ = _annotate(full, dropout_model, tmp_path / "store", lambda tumour: tumour[::2][:8])
    hidden = _hidden_channel_share(monkeypatch)
    result = session.finetune(steps=40, device="cpu")
    assert load_model(result.path).metadata["training"]["modality_dropout"] == pytest.approx(0.4 / 3, abs=1e-3)
    # T1, T1ce and T2 are optional and each hidden with chance 0.4 / 3: a tenth of the channels.
    assert len(hidden) == 40 and 0.04 < np.mean(hidden) < 0.2, np.mean(hidden)

    # An explicit 0 is a choice, not "unset": the fine-tune then hides nothing.
    out = tmp_path / "no_dropout.safetensors"
    hidden.clear()
    assert main(["finetune", str(tmp_path / "store"), "--model", str(dropout_model), "--out", str(out),
                 "--steps", "2", "--device", "cpu", "--modality-dropout", "0"]) == 0
    assert load_model(out).metadata["training"]["modality_dropout"] == 0.0
    assert len(hidden) == 2 and max(hidden) == 0

    two = read_case(two_modality_case)
    before = Predictor(load_model(dropout_model), "cpu").predict_case(two).labels
    after = Predictor(load_model(result.path), "cpu").predict_case(two).labels
    assert dice(after > 0, two.labels > 0) > dice(before > 0, two.labels > 0) - 0.05


@pytest.mark.parametrize("kept", [("flair",), ("t1ce", "flair"), ("t1", "t2", "flair")])
def test_one_two_or_three_modalities_are_read_proposed_and_finetuned(dropout_model, dataset_factory, tmp_path, kept):
    src = dataset_factory("brats2021", cases=1, seed=12, shape=TRAIN_SHAPE)[0]
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    for m in {"t1", "t1ce", "t2", "flair"} - set(kept):
        next(dst.glob(f"*_{m}.nii.gz")).unlink()
    case = read_case(dst)
    assert sorted(case.images) == sorted(kept)
    session, prediction, _ = _annotate(case, dropout_model, tmp_path / "store", lambda tumour: tumour[:1])
    assert dice(prediction.labels > 0, case.labels > 0) > 0.2  # a tumour where the tumour is
    result = session.finetune(steps=2, device="cpu")
    assert result.path.exists() and load_model(result.path).metadata["required_modalities"] == []
