"""The Correct panel through the real widget's buttons: fill between slices, remove small pieces,
keep the clicked piece, fill core holes; each one step of napari's undo, and reviewed slices kept."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import WAIT
from qtpy.QtCore import Qt
from test_widget import _widget_with_case

from napari_unet.labels import EDEMA, ENHANCING, NECROTIC


def _disk(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _as_proposal(widget, labels) -> None:
    """Labels in the layer as a proposal puts them: no slice edited, nothing in the undo history."""
    layer = widget.annotation_layer
    layer.data[:] = labels
    widget.session.track(layer.data)
    layer.refresh()


@pytest.fixture
def shown(make_napari_viewer, case_a, tmp_path, qtbot):
    viewer = make_napari_viewer(show=True)  # shown: keys and clicks reach the canvas
    widget = _widget_with_case(viewer, case_a, qtbot, tmp_path / "store")
    return viewer, widget


def _click(qtbot, button) -> None:
    qtbot.mouseClick(button, Qt.LeftButton)


def test_fill_between_fills_the_gap_as_one_undoable_step_and_keeps_reviewed_slices(shown, qtbot, wait_idle, press):
    viewer, widget = shown
    layer = widget.annotation_layer
    _, ny, nx = layer.data.shape
    _click(qtbot, widget.label_buttons[EDEMA])
    disk = _disk((ny, nx), (40, 40), 6)
    layer.data_setitem((np.full(disk.sum(), 20),) + np.nonzero(disk), EDEMA)
    widget.go_to_slice(22)
    _click(qtbot, widget.fill_between_btn)
    assert "paint the shape on two slices first" in widget.status.text()  # said, not raised
    assert widget.tasks.worker is None  # refused before any work began

    big = _disk((ny, nx), (50, 56), 12)
    layer.data_setitem((np.full(big.sum(), 28),) + np.nonzero(big), EDEMA)
    widget.go_to_slice(24)
    _click(qtbot, widget.reviewed_btn)
    qtbot.waitUntil(lambda: widget.session.edited == {20, 28}, timeout=WAIT)
    before = np.array(layer.data)

    widget.go_to_slice(22)  # inside the gap
    _click(qtbot, widget.fill_between_btn)
    assert widget.status.text().startswith("filling slices 21-27")  # on a worker: the GUI goes on
    wait_idle(widget)
    data = np.asarray(layer.data)
    areas = [(data[z] == EDEMA).sum() for z in (21, 22, 23, 25, 26, 27)]
    assert areas == sorted(areas) and disk.sum() < areas[0] and areas[-1] < big.sum()  # grows from one to the other
    assert not data[24].any()  # reviewed: left as it was
    np.testing.assert_array_equal(data[[*range(21), *range(28, len(data))]],
                                  before[[*range(21), *range(28, len(data))]])
    filled = {21, 22, 23, 25, 26, 27}
    assert widget.session.edited == {20, 28} | filled and widget.session.reviewed == {20, 24, 28} | filled
    assert widget.reviewed_list.count() == 9
    assert widget.status.text() == ("filled slices 21-23, 25-27 with edema (between 20 and 28); "
                                    "reviewed slice(s) 24 left as they were")

    press(viewer, "Z", modifier=Qt.ControlModifier)  # napari's undo: the whole fill in one step
    np.testing.assert_array_equal(layer.data, before)
    qtbot.waitUntil(lambda: widget.session.edited == {20, 28}, timeout=WAIT)
    assert widget.session.reviewed == {20, 24, 28}

    _click(qtbot, widget.change_reviewed_check)  # asked to: the reviewed slice is filled too
    _click(qtbot, widget.fill_between_btn)
    wait_idle(widget)
    assert (np.asarray(layer.data[24]) == EDEMA).sum() > disk.sum()
    assert widget.status.text() == "filled slices 21-27 with edema (between 20 and 28)"


def test_fill_between_needs_a_label_and_a_gap(shown, qtbot, wait_idle):
    viewer, widget = shown
    layer = widget.annotation_layer
    labels = np.zeros(layer.data.shape, np.uint8)
    labels[10:15, 30:40, 30:40] = NECROTIC
    _as_proposal(widget, labels)
    widget.go_to_slice(12)
    _click(qtbot, widget.label_buttons[0])  # the eraser
    _click(qtbot, widget.fill_between_btn)
    assert "choose the label to fill in the Paint row" in widget.status.text()
    _click(qtbot, widget.label_buttons[NECROTIC])
    _click(qtbot, widget.fill_between_btn)
    assert "on every slice from 10 to 14" in widget.status.text()
    wait_idle(widget)
    np.testing.assert_array_equal(layer.data, labels)


def test_remove_small_pieces_and_fill_core_holes_each_undo_in_one_step(shown, qtbot, wait_idle, press):
    viewer, widget = shown
    layer = widget.annotation_layer
    voxel_ml = widget.session.source.voxel_ml
    assert widget.min_piece_ml.value() == 0.5
    labels = np.zeros(layer.data.shape, np.uint8)
    labels[20:31, 30:60, 30:60] = EDEMA  # the tumour
    labels[40:43, 10:13, 10:13] = EDEMA  # a speck: 27 voxels
    labels[46, 80:85, 80:85] = EDEMA  # another, on a slice about to be reviewed
    labels[10:15, 70:80, 20:30] = ENHANCING  # a core with a hole of edema inside
    labels[11:14, 72:78, 22:28] = EDEMA
    assert 27 * voxel_ml < 0.5 and 25 * voxel_ml < 0.5 < 6 * 36 * voxel_ml  # (the hole, as a piece, is larger)
    _as_proposal(widget, labels)
    widget.go_to_slice(46)
    _click(qtbot, widget.reviewed_btn)

    _click(qtbot, widget.remove_pieces_btn)
    wait_idle(widget)
    data = np.array(layer.data)
    assert not data[40:43].any()  # the speck is gone
    np.testing.assert_array_equal(data[46], labels[46])  # the reviewed slice's is not
    assert (data != labels).sum() == 27
    assert widget.status.text() == f"removed 1 piece, {27 * voxel_ml:.2f} mL (each under 0.5 mL)"
    assert widget.session.edited == {40, 41, 42} and widget.session.reviewed == {40, 41, 42, 46}

    press(viewer, "Z", modifier=Qt.ControlModifier)
    np.testing.assert_array_equal(layer.data, labels)
    qtbot.waitUntil(lambda: widget.session.edited == set(), timeout=WAIT)
    assert widget.session.reviewed == {46}

    _click(qtbot, widget.fill_holes_btn)
    wait_idle(widget)
    data = np.array(layer.data)
    assert (data[11:14, 72:78, 22:28] == NECROTIC).all()
    assert (data != labels).sum() == 3 * 36
    assert widget.session.edited == {11, 12, 13}
    assert widget.status.text() == f"filled core holes: {108 * voxel_ml:.2f} mL made necrotic core on slices 11-13"
    press(viewer, "Z", modifier=Qt.ControlModifier)
    np.testing.assert_array_equal(layer.data, labels)


def test_keep_clicked_piece_keeps_the_piece_under_the_click(shown, qtbot, wait_idle, press):
    viewer, widget = shown
    layer = widget.annotation_layer
    nz, ny, nx = layer.data.shape
    labels = np.zeros(layer.data.shape, np.uint8)
    labels[25:36, ny // 2 - 15 : ny // 2 + 15, nx // 2 - 15 : nx // 2 + 15] = EDEMA  # under the canvas centre
    labels[25:28, 2:6, 2:6] = NECROTIC  # a false island
    labels[40, 2:6, 2:6] = EDEMA  # another, on a reviewed slice
    _as_proposal(widget, labels)
    widget.go_to_slice(40)
    _click(qtbot, widget.reviewed_btn)
    _click(qtbot, widget.label_buttons[ENHANCING])  # painting: the click must not paint
    widget.go_to_slice(30)

    _click(qtbot, widget.keep_piece_btn)
    assert widget.keep_piece_btn.isChecked() and "click the piece" in widget.status.text()
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.mouseClick(canvas, Qt.LeftButton, pos=canvas.rect().center())
    wait_idle(widget)
    qtbot.waitUntil(lambda: widget.status.text().startswith("kept"), timeout=WAIT)
    expected = labels.copy()
    expected[25:28, 2:6, 2:6] = 0
    np.testing.assert_array_equal(layer.data, expected)
    assert widget.status.text() == f"kept the clicked piece; removed 1 piece, {48 * widget.session.source.voxel_ml:.2f} mL"
    assert not widget.keep_piece_btn.isChecked() and layer.mode == "paint"
    assert widget.session.edited == {25, 26, 27}

    press(viewer, "Z", modifier=Qt.ControlModifier)
    np.testing.assert_array_equal(layer.data, labels)

    # Pressed twice: no longer waiting, and a click paints again.
    _click(qtbot, widget.keep_piece_btn)
    _click(qtbot, widget.keep_piece_btn)
    assert layer.mode == "paint" and widget.keep_piece_btn.text() == "Keep clicked piece"


def test_a_widget_closed_while_waiting_for_the_click_leaves_the_viewer_as_it_was(shown, qtbot):
    viewer, widget = shown
    layer = widget.annotation_layer
    _click(qtbot, widget.label_buttons[EDEMA])
    widget.go_to_slice(30)
    _click(qtbot, widget.keep_piece_btn)
    assert layer.mode == "pan_zoom"
    widget.close()
    before = np.array(layer.data)
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.mouseClick(canvas, Qt.LeftButton, pos=canvas.rect().center())
    qtbot.waitUntil(lambda: layer.mode == "paint", timeout=WAIT)
    np.testing.assert_array_equal(layer.data, before)  # nothing kept, nothing painted
    assert not [c for c in viewer.mouse_drag_callbacks if getattr(c, "__self__", None) is widget.correct_tools]


# --------------------------------------------------------------------------- click prompts


def _ball(shape, centre, radii) -> np.ndarray:
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return sum(((g - c) / r) ** 2 for g, c, r in zip((zz, yy, xx), centre, radii)) <= 1


def test_clicks_on_the_canvas_add_and_remove_in_3d_each_one_undo_step_and_keep_reviewed_slices(
        shown, qtbot, wait_idle, press):
    """K, then a left click with edema chosen fills a hole cut through the tumour on the clicked
    and neighbouring slices (the shipped network's evidence), a reviewed slice stays as it was; a
    right click takes the clicked region away; Ctrl-Z undoes one click whole."""
    viewer, widget = shown
    layer = widget.annotation_layer
    truth = np.array(viewer.layers[f"{widget.session.case_id} tumour"].data)
    z = int(np.argmax((truth == EDEMA).sum(axis=(1, 2))))
    ys, xs = np.nonzero(truth[z] == EDEMA)
    i = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    point = (z, int(ys[i]), int(xs[i]))
    hole = _ball(truth.shape, point, (2, 3, 3)) & (truth == EDEMA)
    proposal = truth.copy()
    proposal[hole] = 0
    _as_proposal(widget, proposal)
    widget.go_to_slice(z + 1)
    _click(qtbot, widget.reviewed_btn)
    widget.go_to_slice(z)
    viewer.camera.center = layer.data_to_world(point)[1:]  # the canvas's centre on the clicked voxel

    press(viewer, "K", modifier=Qt.NoModifier)
    assert widget.click_btn.isChecked() and layer.mode == "pan_zoom"
    wait_idle(widget)  # no proposal here: the network's evidence for the case is computed once, now
    assert not widget.session.click_evidence().missing() and widget.status.text().startswith("ready to click")
    _click(qtbot, widget.label_buttons[EDEMA])  # what the next clicks say; still clicking, not painting
    assert layer.mode == "pan_zoom" and layer.selected_label == EDEMA
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.mouseClick(canvas, Qt.LeftButton, pos=canvas.rect().center())
    qtbot.waitUntil(lambda: widget.status.text().startswith("edema click"), timeout=WAIT)
    wait_idle(widget)
    after_first = np.array(layer.data)
    assert after_first[point] == EDEMA
    back = (after_first == EDEMA) & hole
    assert {z - 1, z, z - 2} <= set(np.flatnonzero(back.any(axis=(1, 2))).tolist())  # in 3D
    np.testing.assert_array_equal(after_first[z + 1], proposal[z + 1])  # reviewed: kept
    assert back.sum() >= 0.6 * hole.sum()
    assert z in widget.session.edited and z - 1 in widget.session.edited  # taught like a stroke
    clicks = viewer.layers["clicks"]
    assert len(clicks.data) == 1 and viewer.layers.selection.active is layer  # Ctrl-Z stays on the labels

    # A right click on the same voxel: the slices the first click made are still open to clicks.
    qtbot.mouseClick(canvas, Qt.RightButton, pos=canvas.rect().center())
    qtbot.waitUntil(lambda: widget.status.text().startswith("background click"), timeout=WAIT)
    wait_idle(widget)
    assert layer.data[point] == 0
    assert len(clicks.data) == 2 and list(clicks.symbol[:2]) != [clicks.symbol[0]] * 2  # shown differently
    press(viewer, "Z", modifier=Qt.ControlModifier)
    np.testing.assert_array_equal(layer.data, after_first)  # the right click undone, whole
    press(viewer, "Z", modifier=Qt.ControlModifier)
    np.testing.assert_array_equal(layer.data, proposal)
    qtbot.waitUntil(lambda: widget.session.reviewed == {z + 1}, timeout=WAIT)  # undone: no longer reviewed

    # A false island in the other hemisphere, on three slices: one right click removes it whole.
    widget.go_to_slice(z - 2)
    island_at = (z - 2, point[1], truth.shape[2] - 1 - point[2])
    assert not truth[island_at]
    island = _ball(truth.shape, island_at, (1, 2, 2)) & (truth == 0)
    with_island = proposal.copy()
    with_island[island] = EDEMA
    _as_proposal(widget, with_island)
    viewer.camera.center = layer.data_to_world(island_at)[1:]
    qtbot.mouseClick(canvas, Qt.RightButton, pos=canvas.rect().center())
    qtbot.waitUntil(lambda: layer.data[island_at] == 0, timeout=WAIT)
    wait_idle(widget)
    np.testing.assert_array_equal(layer.data, proposal)  # the island gone on its three slices, nothing else
    assert set(np.flatnonzero(island.any(axis=(1, 2)))) == {z - 3, z - 2, z - 1}
    press(viewer, "Z", modifier=Qt.ControlModifier)
    np.testing.assert_array_equal(layer.data, with_island)

    # Back to painting with K; a click on a reviewed slice is refused with a message.
    press(viewer, "K", modifier=Qt.NoModifier)
    assert not widget.click_btn.isChecked() and layer.mode == "paint"
    widget.click_prompts.click((z + 1,) + point[1:], EDEMA)
    wait_idle(widget)
    assert f"slice {z + 1} is reviewed" in widget.status.text()
    np.testing.assert_array_equal(layer.data, with_island)
