"""A dataset as a worklist: listing without reading images, status, done, volumes, next case."""

from __future__ import annotations

import json
import shutil
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import TRAIN_SHAPE, copied_cases

from napari_unet import NapariUnetError
from napari_unet import store as store_format
from napari_unet.cases import MODALITIES, read_case
from napari_unet.cli import main
from napari_unet.dataset import (
    DONE, IN_PROGRESS, NOT_STARTED, UNREADABLE, CaseEntry, list_dataset, next_case, score_cases,
)
from napari_unet.predict import Prediction
from napari_unet.preprocess import Normalisation
from napari_unet.session import AnnotationSession

MEDIUM = TRAIN_SHAPE  # the tiny model's training grid: where it sees the tumour


@pytest.fixture
def dataset(dataset_factory, tmp_path):
    """Three small cases in a folder of this test's own (a store beside them is written there)."""
    root = tmp_path / "data"
    copied_cases(dataset_factory("brats2021", cases=3), root)
    return root


def _open(path, store) -> tuple[AnnotationSession, np.ndarray]:
    case = read_case(path)
    session = AnnotationSession(case.source, case.images, store)
    return session, session.open_labels()


def _propose(session, labels, proposal) -> None:
    """A whole-volume proposal, as the model's (the session records the model that made it)."""
    computed = np.arange(labels.shape[0])
    session.merge_proposal(labels, Prediction(proposal, None, computed, 0.0, computed.astype(np.float32)))


def _tumour_slices(labels) -> np.ndarray:
    return np.flatnonzero((labels > 0).any(axis=(1, 2)))


def _by_id(entries) -> dict[str, CaseEntry]:
    return {e.case_id: e for e in entries}


def test_status_follows_the_saves_of_the_session_in_the_default_store(dataset):
    first, second, third = sorted(dataset.iterdir())
    entries = list_dataset(dataset)
    assert [e.status for e in entries] == [NOT_STARTED] * 3 and [e.path for e in entries] == [first, second, third]

    # The widget's default store, beside the cases: listed from there, and never taken for a case.
    store = store_format.default_store(second)
    session, labels = _open(second, store)
    truth = read_case(second).labels
    _propose(session, labels, truth)
    z1, z2, z3 = _tumour_slices(truth)[:3]
    labels[z1] = 0
    labels[z2] = 0
    session.collect_edits(labels)
    session.set_reviewed(z3)
    session.save(session.snapshot(labels))

    session, labels = _open(third, store)
    session.set_done()
    session.save(session.snapshot(labels))

    entries = _by_id(list_dataset(dataset))
    assert len(entries) == 3 and store.is_dir()
    assert entries[first.name].status == NOT_STARTED and entries[first.name].reviewed == 0
    assert entries[second.name].status == IN_PROGRESS and entries[second.name].reviewed == 3
    assert entries[second.name].model == store_format.SHIPPED_MODEL_NAME
    assert entries[third.name].status == DONE and entries[third.name].done
    assert all(e.store == store for e in entries.values())
    # Another store knows none of it.
    assert {e.status for e in list_dataset(dataset, dataset.parent / "other")} == {NOT_STARTED}


# File values of each tissue, written out here rather than taken from the code under test.
FILE_VALUES = {"brats2021": {"necrotic core": [1], "edema": [2], "enhancing tumour": [4]},
               "msd": {"necrotic core": [2], "edema": [1], "enhancing tumour": [3]}}


@pytest.mark.parametrize("layout", ["brats2021", "msd"])
def test_volumes_in_ml_are_the_voxel_count_times_the_voxel_volume(dataset_factory, layout, tmp_path):
    from conftest import ALL_TISSUES_SEED

    made = dataset_factory(layout, cases=1, seed=ALL_TISSUES_SEED)[0]
    root = tmp_path / "data"
    shutil.copytree(made.parent.parent if layout == "msd" else made.parent, root)
    path = list_dataset(root)[0].path
    session, labels = _open(path, tmp_path / "store")
    labels[:] = read_case(path).labels
    saved = session.save(session.snapshot(labels))

    # Counted independently: the file's own values and its header's voxel size.
    seg = nib.load(saved if layout == "msd" else next(saved.glob("*_seg.nii.gz")))
    values = np.asarray(seg.dataobj)
    zooms = seg.header.get_zooms()[:3]
    assert len(set(np.round(zooms, 3))) > 1  # a grid that is not isotropic: every axis counts
    voxel_ml = float(np.prod(zooms)) / 1000
    tissue = FILE_VALUES[layout]
    count = {name: int(np.isin(values, v).sum()) for name, v in tissue.items()}
    assert all(count.values())
    count |= {"WT": sum(count.values()), "TC": count["necrotic core"] + count["enhancing tumour"],
              "ET": count["enhancing tumour"]}
    entry = list_dataset(root, tmp_path / "store")[0]
    assert entry.status == IN_PROGRESS and set(entry.volumes_ml) == set(count)
    for name, n in count.items():
        assert entry.volumes_ml[name] == pytest.approx(n * voxel_ml, abs=0.01), name

    # A record saved before volumes were recorded still lists, its volumes unknown.
    record_path = store_format.case_location_of(tmp_path / "store", entry.layout, entry.case_id)[2]
    record = json.loads(record_path.read_text())
    del record["volumes_ml"]
    record_path.write_text(json.dumps(record))
    entry = list_dataset(root, tmp_path / "store")[0]
    assert entry.status == IN_PROGRESS and entry.volumes_ml is None
    session, _ = _open(path, tmp_path / "store")  # and the case still opens with its review
    assert session.reviewed == set()


def test_done_teaches_the_whole_case_and_pressing_again_undoes_it(dataset, tmp_path):
    from training.data import load_store

    path, store = sorted(dataset.iterdir())[0], tmp_path / "store"
    session, labels = _open(path, store)
    labels[:] = read_case(path).labels
    z1, z2 = _tumour_slices(labels)[[0, 2]]
    session.set_reviewed(z1)
    session.set_reviewed(z2)
    assert session.toggle_done() is True
    case_dir = session.save(session.snapshot(labels))
    assert json.loads((case_dir / store_format.CORRECTIONS_FILE).read_text())["done"] is True

    # Every brain slice teaches, as for a case without corrections.json.
    taught = load_store(store, MODALITIES, Normalisation())[0]
    assert taught.provenance["slices"] == "all"
    (case_dir / store_format.CORRECTIONS_FILE).rename(tmp_path / "moved.json")
    whole = load_store(store, MODALITIES, Normalisation())[0]
    (tmp_path / "moved.json").rename(case_dir / store_format.CORRECTIONS_FILE)
    np.testing.assert_array_equal(taught.trusted, whole.trusted)
    assert len(taught.trusted) > 2
    # No proposal touches a done case, and its labels keep the model that made them.
    before = labels.copy()
    _propose(session, labels, np.zeros_like(labels))
    np.testing.assert_array_equal(labels, before)
    assert session.next_to_review() is None

    # Reopened, it is done; pressed again, the slices reviewed one by one are what teach.
    session, labels = _open(path, store)
    assert session.done and session.reviewed == {z1, z2}
    assert session.toggle_done() is False
    session.save(session.snapshot(labels))
    taught = load_store(store, MODALITIES, Normalisation())[0]
    assert len(taught.provenance["slices"]) == 2
    entry = list_dataset(dataset, store)[0]
    assert entry.status == IN_PROGRESS and entry.reviewed == 2


def test_listing_reads_no_image(dataset, tmp_path, monkeypatch):
    for path in sorted(dataset.iterdir())[:2]:
        session, labels = _open(path, tmp_path / "store")
        session.set_reviewed(3)
        session.save(session.snapshot(labels))

    def no_image(*args, **kwargs):
        raise AssertionError("listing opened an image")

    monkeypatch.setattr(nib, "load", no_image)
    entries = list_dataset(dataset, tmp_path / "store")
    assert [e.status for e in entries] == [IN_PROGRESS, IN_PROGRESS, NOT_STARTED]


def test_five_hundred_cases_list_in_under_two_seconds(tmp_path):
    # Empty files: any attempt to read one would fail, so this lists from names and records alone.
    root, store = tmp_path / "data", tmp_path / "store"
    record = json.dumps({"reviewed_slices": [1, 2], "done": False, "model": "default",
                         "volumes_ml": {k: 1.0 for k in ("necrotic core", "edema", "enhancing tumour", "WT", "TC", "ET")}})
    for i in range(500):
        case_id = f"BraTS2021_{i:05d}"
        (root / case_id).mkdir(parents=True)
        for suffix in ("t1", "t1ce", "t2", "flair"):
            (root / case_id / f"{case_id}_{suffix}.nii.gz").touch()
        if i % 2:
            (store / case_id).mkdir(parents=True)
            (store / case_id / f"{case_id}_seg.nii.gz").touch()
            (store / case_id / store_format.CORRECTIONS_FILE).write_text(record)
    start = time.perf_counter()
    entries = list_dataset(root, store)
    seconds = time.perf_counter() - start
    assert len(entries) == 500 and sum(e.status == IN_PROGRESS for e in entries) == 250
    assert seconds < 2.0, f"{seconds:.2f} s"


def test_a_case_that_cannot_be_listed_says_why_and_the_others_list(dataset, tmp_path, monkeypatch):
    import napari_unet.dataset

    first, second, _ = sorted(dataset.iterdir())
    session, labels = _open(first, tmp_path / "store")
    case_dir = session.save(session.snapshot(labels))
    record = case_dir / store_format.CORRECTIONS_FILE
    record.write_text(json.dumps({"reviewed_slices": [1], "done": "yes"}))
    found = napari_unet.dataset.find_cases(dataset)
    shutil.rmtree(second)  # removed between finding the cases and reading their state
    monkeypatch.setattr(napari_unet.dataset, "find_cases", lambda root: found)

    entries = list_dataset(dataset, tmp_path / "store")
    assert [e.status for e in entries] == [UNREADABLE, UNREADABLE, NOT_STARTED]
    assert str(record) in entries[0].error and "'done'" in entries[0].error
    assert entries[1].case_id == second.name and "no such file or folder" in entries[1].error
    with pytest.raises(NapariUnetError, match="'done'"):  # opening the case refuses it the same way
        _open(first, tmp_path / "store")


def _entries(*statuses) -> list[CaseEntry]:
    return [CaseEntry(f"case{i}", None, None, s) for i, s in enumerate(statuses)]


def test_next_case_in_order():
    entries = _entries(DONE, NOT_STARTED, IN_PROGRESS, NOT_STARTED, DONE)
    assert next_case(entries, "order").case_id == "case1"
    assert next_case(entries, "order", current="case1").case_id == "case3"
    assert next_case(entries, "order", current="case3").case_id == "case1"  # round the end
    assert next_case(entries, "order", current="unknown").case_id == "case1"
    entries = _entries(DONE, IN_PROGRESS, DONE, IN_PROGRESS)
    assert next_case(entries, "order", current="case1").case_id == "case3"  # none left to start
    assert next_case(entries, "order", current="case3").case_id == "case1"
    assert next_case(_entries(DONE, DONE), "order") is None
    # "uncertainty" without scores goes in order; with scores, the least sure case not started.
    entries = _entries(NOT_STARTED, NOT_STARTED, IN_PROGRESS, NOT_STARTED)
    assert next_case(entries, "uncertainty").case_id == "case0"
    scores = {"case0": 0.2, "case1": 0.1, "case2": 0.9, "case3": 0.5}
    assert next_case(entries, "uncertainty", scores=scores).case_id == "case3"
    assert next_case(entries, "uncertainty", current="case3", scores=scores).case_id == "case0"
    with pytest.raises(NapariUnetError, match="unknown order"):
        next_case(entries, "random")


@pytest.fixture
def blank_flair_dataset(dataset_factory, tmp_path):
    """Four cases of the tiny model's look; the third's FLAIR is blank (a failed export)."""
    root = tmp_path / "data"
    paths = copied_cases(dataset_factory("brats2021", cases=4, seed=5, shape=MEDIUM), root)
    flair = paths[2] / f"{paths[2].name}_flair.nii.gz"
    img = nib.load(flair)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.int16), img.affine, img.header), flair)
    return root, paths


def test_uncertainty_puts_the_case_with_a_blank_image_first_and_caches_per_model(
        blank_flair_dataset, tiny_model, tmp_path, monkeypatch):
    root, paths = blank_flair_dataset
    model, store = tiny_model[0], tmp_path / "store"
    session, labels = _open(paths[3], store)  # started: not scored
    session.set_reviewed(20)
    session.save(session.snapshot(labels))

    entries = list_dataset(root, store)
    scores = score_cases(entries, model, device="cpu")
    assert set(scores) == {p.name for p in paths[:3]}
    blank = paths[2].name
    assert scores[blank] > max(s for k, s in scores.items() if k != blank) + 0.05, scores
    assert next_case(entries, "uncertainty", scores=scores).case_id == blank
    assert next_case(entries, "order").case_id == paths[0].name

    # Cached in the store by the model file's hash: asked again, no model runs...
    cached = json.loads((store / store_format.SCORES_FILE).read_text())
    assert list(cached["models"]) == [store_format.file_sha256(model)]

    import napari_unet.predict

    def no_model(*args, **kwargs):
        raise RuntimeError("the model ran")

    monkeypatch.setattr(napari_unet.predict.Predictor, "__init__", no_model)
    assert score_cases(entries, model, device="cpu") == scores
    # ...but another model file (a fine-tune, here the shipped one) has no scores yet.
    with pytest.raises(RuntimeError, match="the model ran"):
        score_cases(entries, None, device="cpu")


def test_the_cases_command_prints_the_list(dataset, tmp_path, capsys):
    first, second, third = sorted(dataset.iterdir())
    store = tmp_path / "store"
    session, labels = _open(second, store)
    truth = read_case(second).labels
    _propose(session, labels, truth)
    for z in _tumour_slices(truth)[:4]:
        session.set_reviewed(z)
    session.save(session.snapshot(labels))
    session, labels = _open(third, store)
    session.toggle_done()
    session.save(session.snapshot(labels))

    assert main(["cases", str(dataset), "--store", str(store), "--next", "order", "--after", first.name]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["case", "status", "reviewed", "NCR", "mL", "ED", "mL", "ET", "mL", "WT", "mL",
                              "TC", "mL", "model"]
    rows = {line.split()[0]: line for line in out[1:4]}
    assert rows[first.name].split()[1:] == ["not", "started", *["-"] * 7]
    volumes = list_dataset(dataset, store)[1].volumes_ml
    expected = [f"{volumes[k]:.2f}" for k in ("necrotic core", "edema", "enhancing tumour", "WT", "TC")]
    assert rows[second.name].split()[1:] == ["in", "progress", "4", *expected, "default"]
    assert rows[third.name].split()[1:4] == ["done", "all", "0.00"]
    assert "3 case(s): 1 done, 1 in progress, 1 not started" in out
    assert out[-1].startswith(f"next: {second.name} (in progress)")  # none left to start after the first

    assert main(["cases", str(tmp_path / "nothing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
