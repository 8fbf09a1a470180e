"""The "Correct" panel: fill between slices, remove small pieces, keep the clicked piece, fill
holes in the core (the Qt-free tools of `napari_unet.edits`), and click prompts (`_qt.clicks`).

Each tool runs on a copy of the labels through the widget's TaskRunner (the first fill imports
ITK, about 15 s cold, and a 240x240x155 case's pieces take a moment to label), and its result
goes into the annotation layer with one `data_setitem`: one entry in the layer's own undo
history, so napari's Ctrl-Z brings the labels back in one step, and the layer's paint event lets
the session count the changed slices as edited (and so reviewed), like a brush stroke.
Reviewed slices are passed as `protect` unless "also change reviewed slices" is ticked.
"""

from __future__ import annotations

import sys

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QCheckBox, QDoubleSpinBox, QGroupBox, QHBoxLayout, QPushButton, QVBoxLayout

from napari_unet import NapariUnetError
from napari_unet import edits
from napari_unet._qt.clicks import click_row
from napari_unet.labels import ENHANCING, LABEL_NAMES

DEFAULT_MIN_ML = 0.5


def slice_ranges(slices) -> str:
    """31, 32, 33, 35 -> "31-33, 35"."""
    runs: list[list[int]] = []
    for z in sorted(slices):
        if runs and z == runs[-1][1] + 1:
            runs[-1][1] = z
        else:
            runs.append([z, z])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def correct_panel(w) -> QGroupBox:
    """Fill between, Fill core holes, Keep clicked piece; Remove pieces < N mL and whether the
    tools may change reviewed slices. Three rows that fit a 400-pixel dock: every row taken here is
    one reviewed slice fewer in view."""
    tools = w.correct_tools = CorrectTools(w)
    box = QGroupBox("Correct")
    col = QVBoxLayout(box)
    w.fill_between_btn = QPushButton("Fill between")
    w.fill_between_btn.setToolTip("paint the label chosen above on two slices, then fill the unpainted "
                                  "slices between them (the gap nearest the slice on screen)")
    w.fill_between_btn.clicked.connect(lambda: tools.fill_between())
    w.fill_holes_btn = QPushButton("Fill core holes")
    w.fill_holes_btn.setToolTip("holes inside the tumour core become necrotic core")
    w.fill_holes_btn.clicked.connect(lambda: tools.fill_core_holes())
    w.keep_piece_btn = QPushButton("Keep clicked piece")
    w.keep_piece_btn.setCheckable(True)  # pressed: the next click on the canvas picks the piece
    w.keep_piece_btn.setToolTip("press, then click the tumour to keep: every other piece is removed "
                                "(press again to cancel)")
    w.keep_piece_btn.toggled.connect(tools.arm_keep_piece)
    row = QHBoxLayout()
    for button in (w.fill_between_btn, w.fill_holes_btn, w.keep_piece_btn):
        row.addWidget(button)
    col.addLayout(row)

    col.addLayout(click_row(w))

    w.remove_pieces_btn = QPushButton("Remove pieces <")
    w.remove_pieces_btn.setToolTip("remove every connected piece of tumour smaller than this")
    w.remove_pieces_btn.clicked.connect(lambda: tools.remove_small_pieces())
    w.min_piece_ml = QDoubleSpinBox()
    w.min_piece_ml.setRange(0.01, 100.0)
    w.min_piece_ml.setDecimals(2)
    w.min_piece_ml.setSingleStep(0.1)
    w.min_piece_ml.setSuffix(" mL")
    w.min_piece_ml.setValue(DEFAULT_MIN_ML)
    w.min_piece_ml.setMaximumWidth(w.min_piece_ml.minimumSizeHint().width())  # room for "100.00 mL", no more
    w.change_reviewed_check = QCheckBox("reviewed too")
    w.change_reviewed_check.setToolTip("also change reviewed slices (off: these tools leave every slice "
                                       "you reviewed as it is)")
    row = QHBoxLayout()
    row.addWidget(w.remove_pieces_btn)
    row.addWidget(w.min_piece_ml)
    row.addWidget(w.change_reviewed_check, 1)
    col.addLayout(row)
    return box


class CorrectTools:
    """The panel's reactions, on AnnotationWidget `w` (its session, annotation layer, tasks and
    status line)."""

    def __init__(self, w):
        self.w = w
        self._armed = None  # (layer, its mode before) while Keep clicked piece waits for a click

    # ------------------------------------------------------------------ the tools
    def fill_between(self):
        target = self._target()
        if target is None:
            return None
        session, layer, labels, _, protect = target
        label = int(layer.selected_label)
        if str(layer.mode) == "erase" or not 0 < label <= ENHANCING:
            self.w._error("fill between: choose the label to fill in the Paint row (1, 2 or 3)")
            return None
        try:
            lo, hi = edits.gap_to_fill(edits.painted_slices(labels, label), self.w.current_slice())
        except NapariUnetError as err:
            self.w._error(str(err))
            return None

        def work():
            edit = edits.fill_between(labels, lo, hi, label, protect=protect)
            text = f"filled slices {slice_ranges(edit.changed)} with {LABEL_NAMES[label]} (between {lo} and {hi})"
            held = sorted(set(range(lo + 1, hi)) & protect)
            if held:
                text += f"; reviewed slice(s) {slice_ranges(held)} left as they were"
            return edit, text

        cold = "itk" not in sys.modules
        what = f"filling slices {lo + 1}-{hi - 1}" + (" (loading ITK the first time, about 15 s)" if cold else "")
        return self._run(session, layer, labels, work, what, napari_bar=cold)

    def remove_small_pieces(self):
        target = self._target()
        if target is None:
            return None
        session, layer, labels, voxel_ml, protect = target
        min_ml = self.w.min_piece_ml.value()

        def work():
            edit = edits.remove_small_pieces(labels, voxel_ml, min_ml, protect=protect)
            return edit, f"removed {_removed(labels, edit, voxel_ml)} (each under {min_ml:g} mL)"

        return self._run(session, layer, labels, work, f"removing pieces under {min_ml:g} mL")

    def fill_core_holes(self):
        target = self._target()
        if target is None:
            return None
        session, layer, labels, voxel_ml, protect = target

        def work():
            edit = edits.fill_core_holes(labels, protect=protect)
            n = int((edit.labels != labels).sum())
            return edit, (f"filled core holes: {n * voxel_ml:.2f} mL made necrotic core "
                          f"on slices {slice_ranges(edit.changed)}")

        return self._run(session, layer, labels, work, "filling core holes")

    def keep_piece_at(self, point):
        """Keep only the piece of tumour at `point` (z, y, x in the layer's voxels)."""
        target = self._target()
        if target is None:
            return None
        session, layer, labels, voxel_ml, protect = target

        def work():
            edit = edits.keep_pieces_at(labels, [point], protect=protect)
            return edit, f"kept the clicked piece; removed {_removed(labels, edit, voxel_ml)}"

        return self._run(session, layer, labels, work, "keeping the clicked piece")

    # ------------------------------------------------------------------ Keep clicked piece: the click
    def arm_keep_piece(self, on: bool) -> None:
        """Pressed: the next left click on the canvas picks the piece to keep. The annotation layer
        pans meanwhile, so that click does not also paint; its mode comes back afterwards."""
        viewer = self.w.viewer
        if on and self._armed is None:
            layer = self.w.annotation_layer
            if layer is None or self.w.session is None:
                self.w._error("open a case first")
                self.w.keep_piece_btn.setChecked(False)
                return
            if viewer.dims.ndisplay != 2:
                self.w._error("keep clicked piece: switch to the 2D view, so a click names one voxel")
                self.w.keep_piece_btn.setChecked(False)
                return
            if self.w.click_btn.isChecked():  # one kind of click at a time
                self.w.click_btn.setChecked(False)
            self._armed = (layer, layer.mode)
            layer.mode = "pan_zoom"
            viewer.mouse_drag_callbacks.append(self._on_click)
            self.w._message("click the piece of tumour to keep (press Keep clicked piece again to cancel)")
        elif not on and self._armed is not None:
            layer, mode = self._armed
            self._armed = None
            _forget(viewer.mouse_drag_callbacks, self._on_click)
            if layer.mode == "pan_zoom":  # (unless the annotator chose a mode since)
                layer.mode = mode

    def _on_click(self, viewer, event) -> None:
        if self._armed is None:
            return
        if self.w._released:  # the widget closed while waiting: leave the viewer as it was
            layer, mode = self._armed
            self._armed = None
            QTimer.singleShot(0, lambda: (_forget(viewer.mouse_drag_callbacks, self._on_click),
                                          setattr(layer, "mode", mode)))
            return
        layer = self._armed[0]
        if layer is not self.w.annotation_layer:  # another case took over since
            point = None
        else:
            point = tuple(int(round(c)) for c in layer.world_to_data(event.position))
        # After this press has gone through napari (its callbacks list is being walked now, and
        # the layer, still panning, must not paint on it).
        QTimer.singleShot(0, lambda: self._clicked(point))

    def _clicked(self, point) -> None:
        if self._armed is None:
            return
        self.w.keep_piece_btn.setChecked(False)  # disarms
        if point is not None:
            self.keep_piece_at(point)

    # ------------------------------------------------------------------ common
    def _target(self):
        """What a tool works on: (session, layer, a copy of its labels, a voxel's mL, the slices
        to keep), or None with the reason shown."""
        if self.w.tasks.refuse_if_busy():
            return None
        layer, session = self.w.annotation_layer, self.w.session
        if layer is None or session is None:
            self.w._error("open a case first (File > Open, File > Open Sample, or napari-unet annotate)")
            return None
        if not layer.editable:
            self.w._error(f"{layer.name} is read-only: it belongs to a case no longer annotated")
            return None
        self.w._collect_edits()  # strokes not noticed yet are reviewed before the tool decides
        return session, layer, np.array(layer.data, copy=True), session.source.voxel_ml, self._protect(session)

    def _protect(self, session) -> set[int]:
        if self.w.change_reviewed_check.isChecked():
            return set()
        # A case marked done has every slice reviewed, whatever its list says.
        return set(range(session.shape[0])) if session.done else set(session.reviewed)

    def _run(self, session, layer, labels: np.ndarray, work, what: str, napari_bar: bool = False, landed=None):
        """`work` (on a worker thread, on the copy `labels`) returns (Edit, what to say); `landed`
        is told the result once the edit is in the layer."""
        protected = bool(self._protect(session))

        def done(result):
            edit, text = result
            if session is not self.w.session or layer is not self.w.annotation_layer:
                return  # the case was left meanwhile
            if self.w.tasks.cancel_event.is_set():
                self.w._message(f"{what} cancelled; nothing was changed")
                return
            if edit.empty:
                self.w._message(f"{what}: nothing to change" + (" outside reviewed slices" if protected else ""))
                return
            if not np.array_equal(layer.data[edit.changed], labels[edit.changed]):
                self.w._error(f"{what}: the labels were edited meanwhile; nothing was changed, press again")
                return
            _apply(layer, labels, edit)
            self.w._collect_edits()  # now, not in 50 ms: the lists match the message
            self.w._message(text)
            if landed is not None:
                landed(result)

        return self.w.tasks.start(work, done, what, napari_bar=napari_bar)


def _forget(callbacks: list, callback) -> None:
    if callback in callbacks:
        callbacks.remove(callback)


def _apply(layer, before: np.ndarray, edit: edits.Edit) -> None:
    """The edit as one step of the layer's undo history (napari's Ctrl-Z undoes it whole)."""
    zs = np.asarray(edit.changed)
    iz, iy, ix = np.nonzero(edit.labels[zs] != before[zs])
    index = (zs[iz], iy, ix)
    with layer.block_history():  # one history item, however napari splits the write
        layer.data_setitem(index, edit.labels[index])


def _removed(before: np.ndarray, edit: edits.Edit, voxel_ml: float) -> str:
    """'3 pieces, 1.20 mL': the pieces (26-connected) the edit took voxels from."""
    from scipy import ndimage

    gone = (before > 0) & (edit.labels == 0)
    pieces, _ = ndimage.label(before > 0, structure=np.ones((3, 3, 3), bool))
    n = len(np.unique(pieces[gone]))
    return f"{n} piece{'s' if n != 1 else ''}, {gone.sum() * voxel_ml:.2f} mL"
