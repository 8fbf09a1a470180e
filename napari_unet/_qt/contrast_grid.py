"""The contrast grid: every contrast of the case side by side, the annotation over each.

Judging an enhancing rim needs T1ce and edema needs FLAIR; the grid shows them at once. It is
napari's own grid: napari 0.9 puts each `stride` consecutive layers in one view box and maps a
click in any box to the same world point, so a stroke in any box paints the one annotation
layer. The boxes other than the annotation's show display copies that share its array and are
redrawn when it changes; they carry no napari-unet metadata, so nothing saves or follows them.
While the grid is on the case's other layers (reference, uncertainty, clicks) are hidden, since
each would take a box of its own; turning the grid off puts back the order and visibility the
layers had.
"""

from __future__ import annotations

from qtpy.QtCore import QTimer

from napari_unet._qt.case_layers import edit_events
from napari_unet.cases import MODALITIES

GRID_KEY = "Shift-G"


def _show(layer, visible: bool) -> None:
    if layer.visible != visible:  # (napari resets a Labels layer's mode even when nothing changes)
        layer.visible = visible


class ContrastGrid:
    def __init__(self, w):
        self.w = w
        self.copies: list = []  # the display copies of the annotation, one per contrast but the top one
        self._before = None  # (layer order, visibility by layer id, grid settings) to put back
        self._annotation = None
        self._named: list = []  # (image layer, whether its name was shown before)
        # A stroke sends a paint event per mouse move: the copies are redrawn once it pauses.
        self._redraw_timer = QTimer(w, singleShot=True, interval=40)
        self._redraw_timer.timeout.connect(self.redraw)

    @property
    def on(self) -> bool:
        return self._before is not None

    def toggle(self) -> bool:
        """Grid on (True) or off (False)."""
        if self.on:
            self.close()
        else:
            self.open()
        self.w.grid_btn.setChecked(self.on)
        return self.on

    def open(self) -> bool:
        w = self.w
        annotation = w.annotation_layer
        if w.session is None or annotation is None:
            w._message("open a case first: the grid shows its contrasts")
            return False
        images = w._open_cases().get((w.session.case_id, w.session.source.path), {})
        order = [m for m in MODALITIES if m in images] or list(images)
        if len(order) < 2:
            w._message(f"{w.session.case_id} has one contrast only: no grid to show")
            return False
        w.click_btn.setChecked(False)  # the clicks layer would be hidden: clicks nobody sees
        viewer, grid = w.viewer, w.viewer.canvas.grid
        self._before = (list(viewer.layers), {id(layer): layer.visible for layer in viewer.layers},
                        (grid.enabled, grid.stride, grid.shape))
        self._named = [(images[m], images[m].name_overlay.visible) for m in order]
        self._annotation = annotation
        mode = annotation.mode  # napari puts a layer that loses the selection in pan_zoom mode
        self.copies = [viewer.add_labels(annotation.data, name=f"{annotation.name} over {images[m].name}",
                                         scale=annotation.scale, translate=annotation.translate,
                                         colormap=annotation.colormap, opacity=annotation.opacity)
                       for m in order[:-1]]
        # Pairs from the bottom of the layer list: (contrast, its copy), ..., (last contrast, the annotation).
        placed = [layer for m, copy in zip(order, self.copies + [annotation]) for layer in (images[m], copy)]
        for index, layer in enumerate(placed):
            viewer.layers.move(viewer.layers.index(layer), index)
        for layer in viewer.layers:
            _show(layer, layer in placed)
        for image, _ in self._named:  # each box says which contrast it shows
            image.name_overlay.visible = True
        grid.stride, grid.shape = 2, (-1, -1)
        grid.enabled = True
        viewer.layers.selection.active = annotation
        annotation.mode = mode
        for event in edit_events(annotation):
            w._connect(event, self._annotation_changed, annotation)
        for emitter, callback in self._watching():
            w._connect(emitter, callback)
        w._message(f"{w.session.case_id}: {', '.join(images[m].name for m in order)} side by side; "
                   f"paint in any of them ({GRID_KEY}: back to one contrast)")
        return True

    def close(self) -> None:
        """Back to one view: the copies removed, the layers' order, visibility and the grid as before."""
        if not self.on:
            return
        w = self.w
        order, visible, (enabled, stride, shape) = self._before
        self._before = None  # first: napari's grid event below comes back here
        self._redraw_timer.stop()
        for emitter, callback in self._watching():
            w._disconnect(emitter, callback)
        if self._annotation is not None:
            for event in edit_events(self._annotation):
                w._disconnect(event, self._annotation_changed)
        grid = w.viewer.canvas.grid
        grid.enabled = False
        grid.stride, grid.shape = stride, shape
        grid.enabled = enabled
        for copy in self.copies:
            if copy in w.viewer.layers:
                w.viewer.layers.remove(copy)
        self.copies, self._annotation = [], None
        present = [layer for layer in order if layer in w.viewer.layers]
        for index, layer in enumerate(present):
            w.viewer.layers.move(w.viewer.layers.index(layer), index)
        annotation = w.annotation_layer
        mode = annotation.mode if annotation is not None else None
        for layer in present:
            _show(layer, visible[id(layer)])
        if annotation is not None:  # napari gives a layer shown again the mode it was hidden in
            w.viewer.layers.selection.active = annotation
            annotation.mode = mode
        for image, shown in self._named:
            image.name_overlay.visible = shown
        self._named = []
        w.grid_btn.setChecked(False)

    def redraw(self) -> None:
        annotation = self._annotation
        if annotation is None:
            return
        for copy in self.copies:
            if copy.data is not annotation.data:
                copy.data = annotation.data  # the annotation was given a new array
            else:
                copy.refresh()

    def _annotation_changed(self, event=None) -> None:
        self._redraw_timer.start()

    def _keep_annotation_active(self, event=None) -> None:
        """A copy chosen in the layer list would take strokes nothing records: the annotation stays chosen."""
        active = self.w.viewer.layers.selection.active
        if active is not None and any(active is copy for copy in self.copies) and self._annotation is not None:
            QTimer.singleShot(0, self._select_annotation)

    def _select_annotation(self) -> None:
        if self._annotation is not None and self._annotation in self.w.viewer.layers:
            self.w.viewer.layers.selection.active = self._annotation

    def _watching(self) -> list[tuple]:
        """What closes the grid, or keeps the annotation chosen, while it is on."""
        viewer = self.w.viewer
        return [(viewer.layers.selection.events.active, self._keep_annotation_active),
                (viewer.canvas.grid.events.enabled, self._grid_switched),
                # a layer added, removed or moved would pair the wrong layers in the boxes
                (viewer.layers.events.inserted, self._layers_changed),
                (viewer.layers.events.removed, self._layers_changed),
                (viewer.layers.events.moved, self._layers_changed)]

    def _grid_switched(self, event=None) -> None:
        if not self.w.viewer.canvas.grid.enabled:  # napari's own grid button
            self.close()

    def _layers_changed(self, event=None) -> None:
        QTimer.singleShot(0, self.close)  # after napari has finished with its list
