"""Painting labels and reviewing slices: the reactions of the Paint and Review panels.

Review is per axial slice, the store's unit; in a coronal or sagittal view the panel says so
and Review next brings the axial view back. The state is the session's; this object keeps only
where Review next last went.
"""

from __future__ import annotations

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QListWidgetItem

from napari_unet.cases import MODALITIES
from napari_unet.labels import BACKGROUND, EDEMA, ENHANCING, LABEL_COLORS, LABEL_NAMES, NECROTIC, volumes_ml


class Review:
    def __init__(self, w):
        self.w = w
        self.next_at: int | None = None  # the slice Review next last went to
        # Volumes are recounted once painting pauses (a few ms for a whole BraTS volume).
        self.volumes_timer = QTimer(w, singleShot=True, interval=150)
        self.volumes_timer.timeout.connect(self.show_volumes)

    # ------------------------------------------------------------------ paint
    def select_label(self, value: int) -> None:
        """Paint with a tissue label (0: erase) on the annotation layer."""
        layer = self.w.annotation_layer
        if layer is None:
            return
        layer.selected_label = int(value)
        if not self.w.click_prompts.armed:  # while clicking, the label is what a click says
            layer.mode = "erase" if value == BACKGROUND else "paint"
        self.w.viewer.layers.selection.active = layer
        self.show_paint_label()  # (a click on the button already pressed changes nothing in napari)

    def show_paint_label(self, event=None) -> None:
        """Press the Paint button of what the annotation layer paints with (the eraser in napari's
        erase mode), whether chosen here, by key or in napari's own controls."""
        layer = self.w.annotation_layer
        active = None
        if layer is not None:
            active = BACKGROUND if str(layer.mode) == "erase" else int(layer.selected_label)
        for value, button in self.w.label_buttons.items():
            button.setChecked(value == active)

    def cycle_contrast(self) -> str | None:
        """Show the case's next contrast under the annotation (T1, T1ce, T2, FLAIR, those it has),
        the others hidden: the enhancing rim is judged on T1ce, edema on FLAIR."""
        w = self.w
        if w.session is None:
            return None
        if w.grid.on:
            w._message("the grid shows every contrast (Shift-G: back to one, then Shift-C cycles them)")
            return None
        layers = w._open_cases().get((w.session.case_id, w.session.source.path), {})
        order = [m for m in MODALITIES if m in layers] or list(layers)
        if not order:
            return None
        shown = [m for m in order if layers[m].visible]
        following = order[(order.index(shown[-1]) + 1) % len(order)] if shown else order[0]
        for m in order:
            layers[m].visible = m == following
        w._message(f"{w.session.case_id}: showing {layers[following].name} (Shift-C: the next contrast)")
        return following

    def show_volumes(self) -> None:
        """The label legend: each tissue in its colour with its volume, and the BraTS regions."""
        w = self.w
        layer = w.annotation_layer
        if w.session is None or layer is None:
            w.volumes_label.setText("")
            return
        ml = volumes_ml(layer.data, w.session.source.voxel_ml)
        swatches = []
        for value in (NECROTIC, EDEMA, ENHANCING):  # one line, in the Paint buttons' colours
            r, g, b, _ = (int(255 * c) for c in LABEL_COLORS[value])
            swatches.append(f'<span style="color:rgb({r},{g},{b})">&#9632;</span>{ml[LABEL_NAMES[value]]:.1f}')
        regions = " ".join(f"{k} {ml[k]:.1f}" for k in ("WT", "TC", "ET"))
        w.volumes_label.setText(" ".join(swatches) + f" · {regions} mL")
        w.volumes_label.setToolTip("<br>".join(f"{k}: {v:.2f} mL" for k, v in ml.items()))

    def check_label(self, layer) -> None:
        """Only the three tissue labels can be painted (napari's "new label" offers 4, 5, …)."""
        value = int(layer.selected_label)
        if value <= ENHANCING:
            return
        layer.selected_label = ENHANCING if value == 4 else NECROTIC
        self.w._message(f"label {value} is not a tumour label here: painting with {layer.selected_label} "
                        f"({LABEL_NAMES[layer.selected_label]}); the labels are 1, 2 and 3 (Alt-1 … Alt-3)")

    # ------------------------------------------------------------------ the plane on screen
    def plane(self) -> str:
        """The plane on screen: "axial", "coronal", "sagittal" or "3D" (the display's axes are
        superior, posterior, left; see cases.DISPLAY_AXCODES)."""
        dims = self.w.viewer.dims
        if dims.ndisplay == 3:
            return "3D"
        return {(1, 2): "axial", (2, 1): "axial", (0, 2): "coronal", (2, 0): "coronal",
                (0, 1): "sagittal", (1, 0): "sagittal"}.get(tuple(dims.order[-2:]), "axial")

    def plane_changed(self, event=None) -> None:
        # Array row 0 is the most inferior slice: drawn downwards, coronal and sagittal views
        # would show the head upside down.
        dims, camera = self.w.viewer.dims, self.w.viewer.camera
        vertical_is_superior = dims.ndisplay == 2 and dims.order[-2] == 0
        camera.orientation2d = ("up" if vertical_is_superior else "down", camera.orientation2d[1])
        axial = self.plane() == "axial"
        self.w.reviewed_btn.setEnabled(axial)
        self.w.reviewed_btn.setToolTip("" if axial else "review is per axial slice: transpose back to the axial view")
        self.update_slice_label()

    # ------------------------------------------------------------------ review
    def toggle_reviewed(self) -> None:
        """Mark the current slice reviewed, or unmark it (it then takes new proposals again)."""
        w = self.w
        if w.session is None:
            return
        if self.plane() != "axial":
            w._message(f"the view is {self.plane()}: review is per axial slice; "
                       "napari's transpose button brings the axial view back")
            return
        z = w.current_slice()
        w.session.set_reviewed(z, z not in w.session.reviewed)
        self.refresh_list()
        w._save_timer.start()

    def next(self) -> int | None:
        """Go to the unreviewed slice where the model is least sure (again: the next one)."""
        w = self.w
        if w.session is None or w.session.slice_scores is None:
            w._message("propose first: the ranking comes from the model's uncertainty")
            return None
        if self.plane() != "axial":  # the slice to review is an axial one: show it so
            w.viewer.dims.ndisplay = 2
            w.viewer.dims.order = (0, 1, 2)
        # Pressed again on the slice it went to: the next one down. From anywhere else: the top.
        again = self.next_at is not None and w.current_slice() == self.next_at
        z = w.session.next_to_review(self.next_at if again else None)
        self.next_at = z
        if z is None:
            w._message("every slice with brain has been reviewed")
            return None
        w.go_to_slice(z)
        where = "the next down the ranking" if again else "the most among unreviewed slices"
        w._message(f"slice {z}: about {w.session.slice_scores[z]:.0f} voxels the model is unsure of ({where})")
        return z

    def refresh_list(self) -> None:
        w = self.w
        w.cases.follow_session()
        self.volumes_timer.start()  # a case opened or closed: its legend
        w.reviewed_list.clear()
        if w.session is None:
            w.slice_label.setText("no case open")
            w.reviewed_btn.setText("Mark reviewed (Shift-R)")
            self.show_paint_label()
            return
        for z in sorted(w.session.reviewed):
            tag = " (edited)" if z in w.session.edited else ""
            item = QListWidgetItem(f"slice {z}{tag}")
            item.setData(Qt.UserRole, z)
            w.reviewed_list.addItem(item)
        self.update_slice_label()

    def update_slice_label(self, event=None) -> None:
        w = self.w
        if w.session is None:
            return
        plane = self.plane()
        if plane != "axial":
            w.slice_label.setText(
                f"{w.session.case_id}, {plane} view: review is per axial slice; a stroke here marks "
                f"each axial slice it touches edited · {len(w.session.reviewed)} reviewed")
            return
        z = w.current_slice()
        state = "reviewed" if z in w.session.reviewed else "not reviewed"
        w.slice_label.setText(f"{w.session.case_id}, slice {z}: {state} · {len(w.session.reviewed)} reviewed")
        w.reviewed_btn.setText("Unmark (Shift-R)" if z in w.session.reviewed else "Mark reviewed (Shift-R)")
