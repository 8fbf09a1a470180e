"""The annotation loop through the real dock widget, the real default model and napari's Labels API."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_unet._qt.widget import AnnotationWidget
from napari_unet.cases import read_case
from napari_unet.metrics import dice
from napari_unet.synth import BRATS_SHAPE

WAIT = 120_000  # ms; generous for a loaded 2-core CI machine


@pytest.fixture
def shifted_case(dataset_factory):
    """One full-size case of the other scanner's appearance, on disk."""
    return dataset_factory("brats2021", cases=1, seed=31, shape=BRATS_SHAPE, shift=1.0)[0]


@pytest.fixture
def annotator(make_napari_viewer, shifted_case, tmp_path, qtbot):
    viewer = make_napari_viewer()
    widget = AnnotationWidget(viewer)
    viewer.window.add_dock_widget(widget)
    widget.store_edit.setText(str(tmp_path / "store"))
    viewer.open(shifted_case, plugin="napari-unet")
    qtbot.waitUntil(lambda: widget.annotation_layer is not None, timeout=WAIT)
    return viewer, widget


def _truth(viewer) -> np.ndarray:
    """The segmentation that came with the case (hidden under the annotation)."""
    return np.array(viewer.layers["BraTS2021_00001 tumour"].data)


def _wait_idle(qtbot, widget):
    qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT)


def _unreviewed_wt_dice(labels, truth, reviewed) -> float:
    keep = np.setdiff1d(np.arange(len(truth)), sorted(reviewed))
    return dice(labels[keep] > 0, truth[keep] > 0)


def test_propose_correct_review_save_finetune_repropose(annotator, qtbot, tmp_path):
    viewer, widget = annotator
    truth = _truth(viewer)
    assert widget.session.case_id == "BraTS2021_00001"
    assert viewer.layers[-1] is widget.annotation_layer  # what is edited is on top
    assert not viewer.layers["BraTS2021_00001 tumour"].visible

    widget.propose()
    _wait_idle(qtbot, widget)
    layer = widget.annotation_layer
    first = np.array(layer.data)
    assert first.any() and dice(first > 0, truth > 0) > 0.3
    assert "uncertainty" in viewer.layers

    # Review next jumps to the most uncertain slice.
    z_next = widget.review_next()
    assert z_next is not None and widget.current_slice() == z_next

    # Paint corrections on two tumour slices through the Labels layer's own API.
    tumour_slices = np.flatnonzero((truth > 0).any(axis=(1, 2)))
    z1, z2 = int(tumour_slices[len(tumour_slices) // 3]), int(tumour_slices[2 * len(tumour_slices) // 3])
    for z in (z1, z2):
        widget.go_to_slice(z)
        y, x = np.argwhere(truth[z] == 3)[0]
        layer.brush_size = 3
        layer.paint((z, y, x), 3, refresh=True)  # a brush stroke of enhancing tumour
        wrong = np.nonzero(np.asarray(layer.data[z]) != truth[z])
        layer.data_setitem((np.full(len(wrong[0]), z),) + wrong, truth[z][wrong])  # the rest of the fix
    qtbot.waitUntil(lambda: {z1, z2} <= widget.session.edited, timeout=WAIT)

    # Mark another slice reviewed without editing it.
    z3 = int(tumour_slices[len(tumour_slices) // 2])
    widget.go_to_slice(z3)
    widget.toggle_reviewed()
    kept_z3 = np.array(layer.data[z3])
    assert widget.reviewed_list.count() == 3

    # Saved automatically: the store holds the case in its layout, with corrections.json.
    case_dir = tmp_path / "store" / "BraTS2021_00001"
    corrections = case_dir / "corrections.json"
    qtbot.waitUntil(lambda: corrections.exists() and len(json.loads(corrections.read_text())["reviewed_slices"]) == 3,
                    timeout=WAIT)
    record = json.loads(corrections.read_text())
    assert sorted(record["reviewed_slices"]) == sorted([z1, z2, z3])  # BraTS: display axis = file axis
    assert sorted(record["edited_slices"]) == sorted([z1, z2])
    stored = read_case(case_dir)
    np.testing.assert_array_equal(stored.labels[[z1, z2]], truth[[z1, z2]])
    assert sorted(p.name for p in case_dir.iterdir()) == sorted(
        ["corrections.json"] + [f"BraTS2021_00001_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")])

    # Fine-tune a few steps; the new model becomes current and re-proposes.
    widget.finetune(steps=8)
    qtbot.waitUntil(lambda: widget.model_path is not None, timeout=WAIT)
    _wait_idle(qtbot, widget)  # the re-proposal
    assert widget.model_path.exists() and widget.model_path.parent.name == "store-models"
    assert len(widget.loss_plot.values) >= 1
    after = np.array(layer.data)
    np.testing.assert_array_equal(after[[z1, z2]], truth[[z1, z2]])  # the user's labels stayed
    np.testing.assert_array_equal(after[z3], kept_z3)
    reviewed = {z1, z2, z3}
    assert _unreviewed_wt_dice(after, truth, reviewed) >= _unreviewed_wt_dice(first, truth, reviewed) - 0.01


def test_reopening_the_case_restores_corrections_and_review(annotator, make_napari_viewer, shifted_case, qtbot, tmp_path):
    viewer, widget = annotator
    widget.propose(current_slice=True)
    _wait_idle(qtbot, widget)
    z = widget.current_slice()
    widget.toggle_reviewed()
    widget.save().result()
    saved = np.array(widget.annotation_layer.data)

    viewer2 = make_napari_viewer()
    widget2 = AnnotationWidget(viewer2)
    widget2.store_edit.setText(str(tmp_path / "store"))
    viewer2.open(shifted_case, plugin="napari-unet")
    qtbot.waitUntil(lambda: widget2.annotation_layer is not None, timeout=WAIT)
    assert widget2.session.reviewed == {z}
    np.testing.assert_array_equal(widget2.annotation_layer.data, saved)


def test_current_slice_proposal_touches_only_that_slice(annotator, qtbot):
    viewer, widget = annotator
    z = int(np.argmax((_truth(viewer) > 0).sum(axis=(1, 2))))
    widget.go_to_slice(z)
    widget.propose(current_slice=True)
    _wait_idle(qtbot, widget)
    data = np.asarray(widget.annotation_layer.data)
    assert data[z].any() and not np.delete(data, z, axis=0).any()


def test_cancel_leaves_the_labels_as_they_were(annotator, qtbot):
    viewer, widget = annotator
    widget.propose()
    widget.cancel()
    _wait_idle(qtbot, widget)
    assert not np.asarray(widget.annotation_layer.data).any()
    assert "cancelled" in widget.status.text()


def test_a_bad_model_file_is_a_notification_not_a_crash(annotator, qtbot, tmp_path):
    viewer, widget = annotator
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    widget.set_model(bad)
    widget.propose()
    _wait_idle(qtbot, widget)
    assert "bad.safetensors" in widget.status.text() and "not a safetensors model" in widget.status.text()
