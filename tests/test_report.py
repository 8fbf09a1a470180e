"""`napari-unet report`: volumes, review state, model and Dice per case, as a table and a CSV."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from conftest import ALL_TISSUES_SEED, copied_cases

from napari_unet.cases import read_case
from napari_unet.cli import main
from napari_unet.metrics import dice
from napari_unet.predict import Prediction
from napari_unet.session import AnnotationSession

# BraTS 2021 file values of each tissue and region, written out here rather than taken from the code under test.
FILE_VALUES = {"necrotic_core_ml": [1], "edema_ml": [2], "enhancing_ml": [4],
               "WT_ml": [1, 2, 4], "TC_ml": [1, 4], "ET_ml": [4]}
REGION_VALUES = {"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]}
COLUMNS = ["case", "necrotic_core_ml", "edema_ml", "enhancing_ml", "WT_ml", "TC_ml", "ET_ml",
           "reviewed_slices", "done", "model", "dice_WT", "dice_TC", "dice_ET", "labels"]


@pytest.fixture
def dataset(dataset_factory, tmp_path):
    """Three small BraTS 2021 cases holding every tissue, in a folder of this test's own."""
    return copied_cases(dataset_factory("brats2021", cases=3, seed=ALL_TISSUES_SEED), tmp_path / "data")


def _tumour_slices(labels) -> np.ndarray:
    return np.flatnonzero((labels > 0).any(axis=(1, 2)))


@pytest.fixture
def store(dataset, tmp_path):
    """The first case in progress (4 slices reviewed, two tumour slices wiped: not the reference any
    more), the second done with its labels as they are; the third never opened."""
    store = tmp_path / "store"
    for path, done in zip(dataset[:2], (False, True)):
        case = read_case(path)
        session = AnnotationSession(case.source, case.images, store)
        labels = session.open_labels()
        computed = np.arange(labels.shape[0])
        session.merge_proposal(labels, Prediction(case.labels.copy(), None, computed, 0.0,
                                                  computed.astype(np.float32)))
        slices = _tumour_slices(case.labels)
        if done:
            session.set_done()
        else:
            labels[slices[len(slices) // 2]] = 0
            labels[slices[len(slices) // 2 + 1]] = 0
            session.collect_edits(labels)
            for z in slices[:4]:
                session.set_reviewed(z)
        session.save(session.snapshot(labels))
    return store


def _read_csv(path) -> tuple[list[str], dict[str, dict[str, str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], {r[0]: dict(zip(rows[0], r)) for r in rows[1:]}


def _counted_ml(seg_file) -> dict[str, float]:
    """Volumes counted independently: the file's own values and its header's voxel size."""
    img = nib.load(seg_file)
    values = np.asarray(img.dataobj)
    voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000
    return {column: int(np.isin(values, v).sum()) * voxel_ml for column, v in FILE_VALUES.items()}


def test_the_csv_has_one_row_per_store_case_with_its_volumes_and_review_state(store, dataset, tmp_path, capsys):
    # A record without volumes (saved by an older napari-unet or another tool): computed from the labels.
    record = store / dataset[1].name / "corrections.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "volumes_ml"}))
    out = tmp_path / "reports" / "report.csv"  # its folder made when written
    assert main(["report", str(store), "--csv", str(out)]) == 0
    header, rows = _read_csv(out)
    assert header == COLUMNS
    assert set(rows) == {dataset[0].name, dataset[1].name}  # the case never opened has no labels in the store
    progress, done = rows[dataset[0].name], rows[dataset[1].name]
    # 4 marked reviewed and the 2 edited ones (an edited slice has been looked at)
    assert (progress["reviewed_slices"], progress["done"], progress["model"]) == ("6", "false", "default")
    assert (done["done"], done["model"]) == ("true", "default")
    assert all(row[f"dice_{r}"] == "" for row in rows.values() for r in REGION_VALUES)  # no reference given
    for row in rows.values():
        counted = _counted_ml(row["labels"])
        assert counted["WT_ml"] > counted["TC_ml"] > counted["ET_ml"] > 0
        for column, ml in counted.items():
            assert float(row[column]) == pytest.approx(ml, abs=0.01), (row["case"], column)
    # The table says the same.
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:11] == ["case", "NCR", "mL", "ED", "mL", "ET", "mL", "WT", "mL", "TC", "mL"]
    line = next(t for t in table if t.startswith(dataset[0].name)).split()
    assert line[4] == f"{float(progress['WT_ml']):.2f}" and line[6:9] == ["6", "no", "default"]
    assert "2 case(s), 0 with a reference" in table


def test_dice_against_a_reference_is_metrics_dice_on_the_same_arrays(store, dataset, tmp_path):
    out = tmp_path / "report.csv"
    assert main(["report", str(store), "--reference", str(dataset[0].parent), "--csv", str(out)]) == 0
    _, rows = _read_csv(out)
    for path in dataset[:2]:
        row = rows[path.name]
        labels = np.asarray(nib.load(row["labels"]).dataobj)
        truth = np.asarray(nib.load(next(path.glob("*_seg.nii.gz"))).dataobj)
        for region, values in REGION_VALUES.items():
            expected = dice(np.isin(labels, values), np.isin(truth, values))
            assert float(row[f"dice_{region}"]) == pytest.approx(expected, abs=1e-4), (path.name, region)
    assert float(rows[dataset[1].name]["dice_WT"]) == 1.0  # done as proposed: the reference itself
    assert 0.5 < float(rows[dataset[0].name]["dice_WT"]) < 1.0  # two tumour slices wiped


def test_a_folder_of_predictions_reports_volumes_from_its_label_files(dataset, tmp_path, capsys):
    pred = tmp_path / "pred"
    assert main(["predict", str(dataset[0].parent), "--out", str(pred), "--device", "cpu"]) == 0
    capsys.readouterr()
    out = tmp_path / "report.csv"
    assert main(["report", str(pred), "--reference", str(dataset[0].parent), "--csv", str(out)]) == 0
    _, rows = _read_csv(out)
    assert sorted(rows) == sorted(p.name for p in dataset)
    for path in dataset:
        row = rows[path.name]
        assert row["labels"] == str(pred / f"{path.name}.nii.gz")
        assert (row["reviewed_slices"], row["done"], row["model"]) == ("", "", "")  # a prediction has no review
        for column, ml in _counted_ml(row["labels"]).items():
            assert float(row[column]) == pytest.approx(ml, abs=0.01), (path.name, column)
        labels = np.asarray(nib.load(row["labels"]).dataobj)
        truth = np.asarray(nib.load(next(path.glob("*_seg.nii.gz"))).dataobj)
        assert float(row["dice_WT"]) == pytest.approx(dice(np.isin(labels, [1, 2, 4]), truth > 0), abs=1e-4)
    table = capsys.readouterr().out
    assert f"{len(dataset)} case(s), {len(dataset)} with a reference" in table


def test_bad_input_is_a_clear_message_and_no_traceback(store, dataset, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"napari-unet report: error: {empty}: no BraTS cases found" in err and "Traceback" not in err

    # Cases, but no labels among them (images only): said, rather than an empty report.
    images_only = tmp_path / "images_only"
    copied_cases(dataset[2:], images_only)
    for seg in images_only.glob("*/*_seg.nii.gz"):
        seg.unlink()
    assert main(["report", str(images_only)]) == 2
    assert f"{images_only}: no label files found" in capsys.readouterr().err

    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "nothing: no such file or folder" in capsys.readouterr().err

    # A CSV path that cannot be written is refused before any case is read, and nothing is left.
    for bad, problem in ((tmp_path, "is a folder"), (store / "a_file" / "r.csv", "no permission to write")):
        (store / "a_file").write_text("")
        assert main(["report", str(store), "--csv", str(bad)]) == 2
        err = capsys.readouterr()
        assert problem in err.err and "Traceback" not in err.err and err.out == ""

    # A damaged label file is named.
    damaged = tmp_path / "pred"
    damaged.mkdir()
    (damaged / "case_1.nii.gz").write_bytes(b"not a NIfTI file")
    assert main(["report", str(damaged)]) == 2
    assert "case_1.nii.gz" in capsys.readouterr().err
