"""Click prompts in the widget: "Click (K)" in the Correct panel, the clicks in a Points layer.

While clicking is on, the annotation layer pans (a click must not also paint) and each left click
on the canvas is a click prompt (`napari_unet.prompts`): with the label chosen in the Paint row
it adds that label where the proposal missed it; with background chosen, or with a right click
or Shift-click, it removes the clicked label's region. The work runs on the widget's task runner
(the network's evidence for the slices a click reaches is computed the first time, then kept for
the case) and lands through the Correct panel's one-step apply: Ctrl-Z undoes a click whole, and
the slices it changed count as edited, like a stroke.

Reviewed slices are never changed, with one exception that makes several clicks work together:
a slice whose labels are still exactly what a click left there stays open to the next clicks
(painting on it, or marking it, closes it like any other).
"""

from __future__ import annotations

import zlib

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton

from napari_unet import NapariUnetError
from napari_unet.labels import BACKGROUND, LABEL_COLORS
from napari_unet.prompts import Click, apply_click, describe

CLICK_KEY = "K"
NEGATIVE_COLOUR = (1.0, 0.0, 1.0, 1.0)  # magenta, unlike any label's


def _digest(labels_slice: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(labels_slice).tobytes())


def click_row(w) -> QHBoxLayout:
    """The Correct panel's row: the Click toggle and how to click."""
    w.click_prompts = ClickPrompts(w)
    w.click_btn = QPushButton(f"Click ({CLICK_KEY})")
    w.click_btn.setCheckable(True)
    w.click_btn.setToolTip("click prompts: a left click adds the Paint row's label where the proposal "
                           "missed it, in 3D; a right click or Shift-click removes the clicked region. "
                           f"Press again, or {CLICK_KEY}, to paint")
    w.click_btn.toggled.connect(w.click_prompts.arm)
    hint = QLabel("left: add label · right: remove")
    row = QHBoxLayout()
    row.addWidget(w.click_btn)
    row.addWidget(hint, 1)
    return row


class ClickPrompts:
    """The reactions, on AnnotationWidget `w` (its session, annotation layer, Correct panel tools)."""

    def __init__(self, w):
        self.w = w
        self._armed = None  # (layer, its mode before) while clicking is on
        self._points = None  # the Points layer of the clicks
        self._made: dict[int, int] = {}  # slice -> digest of the labels a click left there
        self._session = None  # the session the clicks above belong to

    @property
    def armed(self) -> bool:
        return self._armed is not None

    def toggle(self) -> None:
        self.w.click_btn.setChecked(not self.w.click_btn.isChecked())

    def arm(self, on: bool) -> None:
        viewer = self.w.viewer
        if on and self._armed is None:
            layer = self.w.annotation_layer
            if layer is None or self.w.session is None:
                self.w._error("open a case first")
                self.w.click_btn.setChecked(False)
                return
            if viewer.dims.ndisplay != 2:
                self.w._error("clicks: switch to the 2D view, so a click names one voxel")
                self.w.click_btn.setChecked(False)
                return
            if self.w.keep_piece_btn.isChecked():  # one kind of click at a time
                self.w.keep_piece_btn.setChecked(False)
            self.w.grid.close()  # the clicks layer would take a grid box of its own
            self._armed = (layer, layer.mode)
            layer.mode = "pan_zoom"
            self._points_layer(layer)
            viewer.mouse_drag_callbacks.append(self._on_press)
            self.w._message("clicking: left click adds the Paint row's label, right click or Shift-click "
                            f"removes; {CLICK_KEY} to paint again")
            self._prepare_evidence()
        elif not on and self._armed is not None:
            layer = self._armed[0]
            self._armed = None
            if self._on_press in viewer.mouse_drag_callbacks:
                viewer.mouse_drag_callbacks.remove(self._on_press)
            if layer.mode == "pan_zoom":  # K switches between clicking and painting
                layer.mode = "erase" if int(layer.selected_label) == BACKGROUND else "paint"

    def _prepare_evidence(self) -> None:
        """No proposal made on this case by this model yet (a case reopened from the store, a
        model just chosen): the network's evidence for the whole case is computed now, in the
        background, once, so that clicks do not each wait for it (2-3 s on 2 cores without bf16
        for the slices one click reaches)."""
        session, w = self.w.session, self.w
        if w.tasks.worker is not None:  # a proposal on its way keeps its evidence anyway
            return
        device = w.device_combo.currentText()

        def work():
            session.click_evidence(device).fill(progress=lambda d, t: w._bridge.progress.emit(d, t, None),
                                                cancel=w.tasks.cancel_event.is_set)

        def done(_):
            if session is w.session and self.armed:
                w._message("ready to click: left click adds the Paint row's label, right click removes")

        w.tasks.start(work, done, "clicks: the network's evidence for this case (once)", napari_bar=False)

    def _on_press(self, viewer, event) -> None:
        if self._armed is None:
            return
        layer = self._armed[0]
        if self.w._released or layer is not self.w.annotation_layer:  # closed, or another case took over
            mode = self._armed[1]
            self._armed = None
            QTimer.singleShot(0, lambda: (viewer.mouse_drag_callbacks.remove(self._on_press)
                                          if self._on_press in viewer.mouse_drag_callbacks else None,
                                          setattr(layer, "mode", mode),
                                          None if self.w._released else self.w.click_btn.setChecked(False)))
            return
        if str(layer.mode) != "pan_zoom":  # a brush chosen in napari's controls: painting again
            QTimer.singleShot(0, lambda: self.w.click_btn.setChecked(False))
            return
        point = tuple(int(round(c)) for c in layer.world_to_data(event.position))
        negative = event.button == 2 or "Shift" in {str(m) for m in event.modifiers}
        label = BACKGROUND if negative else int(layer.selected_label)
        # After this press has gone through napari's callbacks.
        QTimer.singleShot(0, lambda: self.click(point, label))

    # ------------------------------------------------------------------ the click
    def click(self, point, label: int):
        """A click prompt at `point` (z, y, x voxel) saying `label`; what the button and the tests call."""
        tools = self.w.correct_tools
        target = tools._target()
        if target is None:
            return None
        session, layer, labels, voxel_ml, protect = target
        if session is not self._session:
            self._session, self._made = session, {}
            if self._points is not None and self._points in self.w.viewer.layers:
                self._points.data = np.zeros((0, 3))
        if not all(0 <= c < s for c, s in zip(point, labels.shape)):
            self.w._message("clicks: that click is outside the case")
            return None
        # Slices only clicks have changed stay open to the next clicks.
        protect = {z for z in protect if self._made.get(z) != _digest(labels[z])}
        click = Click(tuple(point), int(label))
        device = self.w.device_combo.currentText()

        def work():
            edit = apply_click(labels, session.click_evidence(device), click, protect=protect)
            return edit, describe(click, edit, labels, voxel_ml)

        def landed(result):
            edit = result[0]
            for z in edit.changed:
                self._made[z] = _digest(edit.labels[z])
            self._show_point(layer, click)

        first = not session.has_click_evidence()
        what = "click" + (" (the network's evidence for this case, the first time)" if first else "")
        try:
            return tools._run(session, layer, labels, work, what, landed=landed)
        except NapariUnetError as err:
            self.w._error(str(err))
            return None

    def _points_layer(self, layer):
        """The clicks layer, made when clicking is switched on: making a napari layer takes
        0.1-0.2 s of the GUI thread, which the first click would otherwise wait for."""
        viewer = self.w.viewer
        if self._points is None or self._points not in viewer.layers:
            mode = layer.mode  # napari puts a layer that loses the selection in pan_zoom mode
            self._points = viewer.add_points(
                np.zeros((0, 3)), name="clicks", ndim=3, size=4, scale=layer.scale, translate=layer.translate,
                face_color="transparent", border_width=0.3, border_width_is_relative=True)
            viewer.layers.selection.active = layer  # Ctrl-Z and the brush stay on the annotation
            layer.mode = mode
        return self._points

    def _show_point(self, layer, click: Click) -> None:
        colour = LABEL_COLORS[click.label] if click.positive else NEGATIVE_COLOUR
        points = self._points_layer(layer)
        points.selected_data = set()  # else the current style below would restyle the last click
        points.current_symbol = "disc" if click.positive else "x"
        points.current_border_color = colour
        points.current_face_color = "transparent" if click.positive else colour
        points.add(np.asarray([click.point], float))
        points.selected_data = set()
