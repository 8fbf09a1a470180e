"""The annotation dock widget: propose, correct, review, save, fine-tune.

Its panels are laid out by `widget_gui` and its background tasks run through `tasks.TaskRunner`;
it wires signals and keeps napari's layers in step with one Qt-free
`AnnotationSession` per open case, which owns the state and makes every decision. Long work
runs in a worker thread; progress comes back through a Qt signal so the GUI thread only
updates widgets. `closeEvent` releases everything it connected.
"""

from __future__ import annotations

import datetime as _dt
import functools
import operator
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from qtpy.QtCore import QEvent, Qt, QTimer
from qtpy.QtWidgets import QFileDialog, QWidget

from napari_unet import NapariUnetError
from napari_unet._qt import case_layers, widget_gui
from napari_unet._qt.case_list import CaseList
from napari_unet._qt.clicks import CLICK_KEY
from napari_unet._qt.contrast_grid import GRID_KEY, ContrastGrid
from napari_unet._qt.review import Review
from napari_unet._qt.tasks import TaskRunner
from napari_unet._qt.wiring import Bridge, disconnect, display_ready, emit, release, unwrapped
from napari_unet._reader import prefer_this_reader
from napari_unet.labels import BACKGROUND, EDEMA, ENHANCING, NECROTIC
from napari_unet.layers import META_KEY, source_of
from napari_unet.store import DEFAULT_STORE_NAME, default_store
from napari_unet.session import NOTHING_TO_TEACH
from napari_unet.store_lock import StoreHolder, StoreInUse

WIDGET_NAME = "Tumour annotation (U-Net)"
_KEYS = {"Shift-R": "toggle_reviewed", "Shift-N": "review_next", "Shift-C": "review.cycle_contrast",
         GRID_KEY: "grid.toggle", CLICK_KEY: "click_prompts.toggle",
         "Alt-0": BACKGROUND, "Alt-1": NECROTIC, "Alt-2": EDEMA, "Alt-3": ENHANCING}
AXIS_LABELS = ("axial", "coronal", "sagittal")  # the slices each axis's slider steps through


def _case_key(source) -> tuple[str, str]:
    return source.case_id, source.path


class AnnotationWidget(QWidget):
    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = None
        self._annotation = None  # the session's Labels layer
        self._store_chosen = False  # a store the user picked is kept for every case
        self._seen: set = set()  # the cases open at the last look, to tell a newly opened one
        self._warming: Future | None = None
        self._released = False
        self._docked = False
        self._watched = weakref.WeakSet()  # the layers whose visibility is followed
        self._bridge = Bridge(self)  # a child: destroyed with the widget, so late signals go nowhere
        self._bridge.saved.connect(self._on_saved)
        self._bridge.failed.connect(self._error)
        # Saving runs on its own thread: painting never waits for a NIfTI file to be written.
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-unet-save")
        self._pending_save: Future | None = None  # the last save asked for (saves run in order)
        self._saves: dict[str, Future] = {}  # the last save of each case id, maybe still being written
        # Loading torch and the model takes seconds: on a thread of its own, so no save waits behind it.
        self._warmer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-unet-warm-up")
        self._save_timer = QTimer(self, singleShot=True, interval=300)
        self._save_timer.timeout.connect(self.save)
        self._edit_timer = QTimer(self, singleShot=True, interval=50)
        self._edit_timer.timeout.connect(self._collect_edits)
        self.cases = CaseList(self)  # the dataset open, if any: its panel is laid out with the others
        self.review = Review(self)  # painting labels, review and the plane on screen
        self.grid = ContrastGrid(self)  # the case's contrasts side by side
        widget_gui.build(self)
        self.tasks = TaskRunner(self.progress_bar, self.cancel_btn, self._message, self._error,
                                lambda info: self.loss_plot.add(info["loss"]) if "loss" in info else None)
        self._bridge.progress.connect(self.tasks.on_progress)
        self._connections: list[tuple] = []  # (emitter, callback, its layer or None), disconnected on teardown
        self._key_handlers: list[tuple] = []  # (key, handler) bound on the viewer
        self._store = StoreHolder()  # the store this window annotates in, locked against other windows
        self._release = functools.partial(release, self.viewer, self._connections, self._key_handlers,
                                          self._saver, self._warmer, self.tasks.cancel_event, self._store)
        self.destroyed.connect(self._release)
        # Deferred: a reader adds several layers in a row; attach once they are all in.
        self._connect(self.viewer.layers.events.inserted, self._schedule_attach)
        self._connect(self.viewer.layers.events.removed, self._schedule_attach)
        self._connect(self.viewer.dims.events.current_step, self.review.update_slice_label)
        self._connect(self.viewer.dims.events.order, self.review.plane_changed)
        self._connect(self.viewer.dims.events.ndisplay, self.review.plane_changed)
        for key, action in _KEYS.items():
            handler = (lambda v, a=action: operator.attrgetter(a)(self)()) if isinstance(action, str) \
                else (lambda v, a=action: self.select_label(a))
            self.viewer.bind_key(key, handler, overwrite=True)
            self._key_handlers.append((key, handler))
        prefer_this_reader()
        self._attach()
        self.review.plane_changed()

    # ------------------------------------------------------------------ the case
    def _open_cases(self) -> dict[tuple, dict]:
        """The cases whose image layers are in the viewer: key -> {modality: layer}, in layer order."""
        cases: dict[tuple, dict] = {}
        for layer in self.viewer.layers:
            meta = layer.metadata.get(META_KEY, {})
            if meta.get("role") == "image" and meta.get("modality"):
                cases.setdefault(_case_key(source_of(layer.metadata)), {})[meta["modality"]] = layer
        return cases

    @property
    def annotation_layer(self):
        """The Labels layer of the case being annotated (None when no case is open)."""
        layer = self._annotation
        return layer if layer is not None and layer in self.viewer.layers else None

    def _connect(self, emitter, callback, layer=None) -> None:
        emitter.connect(callback)
        self._connections.append((emitter, callback, unwrapped(layer) if layer is not None else None))

    def _disconnect(self, emitter, callback) -> None:
        disconnect(emitter, callback)
        self._connections[:] = [c for c in self._connections if not (c[0] is emitter and c[1] == callback)]

    def _forget_removed_layers(self) -> None:
        """A connection to a layer no longer in the viewer would keep its data alive."""
        present = {id(unwrapped(layer)) for layer in self.viewer.layers}
        for entry in [c for c in self._connections if c[2] is not None and id(c[2]) not in present]:
            self._connections.remove(entry)
            disconnect(*entry[:2])

    def _edits_maybe(self, event=None) -> None:
        self._edit_timer.start()
        self.review.volumes_timer.start()

    def _schedule_attach(self, event=None) -> None:
        QTimer.singleShot(0, self._attach)

    def _attach(self) -> None:
        """Follow the viewer: the case opened last, or opened again, is annotated; when its images
        are closed, a case still open takes over."""
        if self._released:
            return
        reopened = self._drop_duplicates()
        self._forget_removed_layers()
        cases = self._open_cases()
        self._follow_visibility()
        current = _case_key(self.session.source) if self.session is not None else None
        new = [key for key in cases if key not in self._seen]  # opened since the last look
        self._seen = set(cases)
        if new:
            target = new[-1]
        elif reopened:
            target = reopened[-1]
        elif current is not None and current not in cases:
            target = next(reversed(cases), None)  # the topmost case still open, if any
        else:
            target = current
        if target != current:
            self._switch(cases, target)
        elif current is not None and self.annotation_layer is None:
            self._start_session(cases[current])  # the annotation layer was removed: bring back what was saved
        elif reopened:
            self._bring_to_top()

    def _switch(self, cases: dict, target) -> None:
        """Leave the current case (saved; its layers hidden if another case takes over) for `target`."""
        left = self.session
        if left is not None:
            self._end_session(hide=target is not None)
        if target is not None:
            self._start_session(cases[target], left=left.case_id if left is not None else None)
        elif left is not None:
            self._message(f"{left.case_id} closed; its corrections are in {left.case_path}")

    def _drop_duplicates(self) -> list[tuple]:
        """A case opened again while its layers are still here (maybe hidden) adds a second copy of
        each; remove the copies and return the keys of the cases opened again."""
        kept, reopened = set(), []
        for layer in list(self.viewer.layers):
            meta = layer.metadata.get(META_KEY, {})
            source = source_of(layer.metadata)
            if source is None or meta.get("role") not in ("image", "labels"):
                continue
            what = (_case_key(source), meta["role"], meta.get("modality"))
            if what in kept:
                self.viewer.layers.remove(layer)
                if what[0] not in reopened:
                    reopened.append(what[0])
            else:
                kept.add(what)
        return reopened

    def _follow_visibility(self) -> None:
        for layer in self.viewer.layers:
            real = unwrapped(layer)
            if real not in self._watched and source_of(layer.metadata) is not None:
                self._watched.add(real)
                self._connect(layer.events.visible, self._visibility_changed, layer)

    def _visibility_changed(self, event) -> None:
        """Showing a layer of another open case makes that case the one annotated. (The widget
        itself only ever shows the current case's layers.)"""
        layer = event.source
        source = source_of(layer.metadata)
        if layer.visible and self.session is not None and source is not None and not self.session.owns(source):
            QTimer.singleShot(0, functools.partial(self._show_case, _case_key(source)))

    def _show_case(self, key) -> None:
        if self._released:
            return
        cases = self._open_cases()
        if key in cases and (self.session is None or _case_key(self.session.source) != key):
            self._switch(cases, key)

    def _start_session(self, image_layers: dict, left: str | None = None) -> None:
        from napari_unet.session import AnnotationSession

        source = source_of(next(iter(image_layers.values())).metadata)
        self._saved_before(source.case_id)  # its store files are read below
        if not self._store_chosen:
            # A case made in memory has no folder: a store in the user's home takes its place.
            store = default_store(source.path) if source.path else Path.home() / "napari-unet" / DEFAULT_STORE_NAME
            self.store_edit.setText(str(store))
        if not self._take_store(self.store_edit.text()):
            self._store.release()  # no case open: the store left is free for others
            return
        try:
            session = AnnotationSession(source, {m: layer.data for m, layer in image_layers.items()},
                                        self.store_edit.text(), model=self._combo_model())
            labels = session.open_labels()
        except NapariUnetError as err:
            self._error(str(err))
            return
        self.session = session
        self.review.next_at = None
        if not any(layer.visible for layer in image_layers.values()):  # else the contrast the user chose
            shown = image_layers.get("flair") or image_layers.get("image") or next(reversed(image_layers.values()))
            shown.visible = True
        if self.viewer.dims.ndim == len(AXIS_LABELS) and all(
                label.lstrip("-").isdigit() for label in self.viewer.dims.axis_labels):  # napari's "-3": none chosen
            self.viewer.dims.axis_labels = AXIS_LABELS
        self._show_annotation(labels)
        if session.model_path is not None:
            self.set_model(session.model_path)
        self.loss_plot.clear()
        self.save_label.setText("")
        if session.reviewed:
            text = f"{session.case_id}: restored {len(session.reviewed)} reviewed slice(s) from {session.case_path}"
        else:
            text = f"{session.case_id}: ready; corrections go to {session.case_path}"
        self._message(text + (f" ({left} was saved and hidden)" if left else ""))
        self.review.refresh_list()
        self._warm_up()

    def _end_session(self, hide: bool) -> None:
        """Save the case being left; its annotation, no longer followed, becomes
        read-only, and with `hide` all its layers are hidden."""
        session, layer = self.session, self.annotation_layer
        self.grid.close()
        self._save_timer.stop()
        if layer is not None:
            self._collect_edits()
            self.save()
        # Its save is not waited for (0.1-0.2 s of the GUI thread on Next case): the write holds a
        # copy of the labels and the saving thread keeps order; opening this case again or giving
        # the store back waits for it (_saved_before).
        if layer is not None:
            layer.editable = False  # edits to a case no longer tracked would be lost
        if hide:
            for other in self.viewer.layers:
                if session.owns(source_of(other.metadata)):
                    other.visible = False
        self.session = self._annotation = None
        self.review.next_at = None
        self.review.refresh_list()

    def _show_annotation(self, labels: np.ndarray) -> None:
        case_layers.show_annotation(self, labels)

    def _bring_to_top(self) -> None:
        layer = self.annotation_layer
        if layer is None:
            return
        if self.grid.on:  # the annotation stays in its box: the grid pairs it with its contrast
            self.viewer.layers.selection.active = layer
            return
        layer.visible = True
        self.viewer.layers.move(self.viewer.layers.index(layer), len(self.viewer.layers))
        self.viewer.layers.selection.active = layer

    def _uncertainty_layer(self):
        return case_layers.uncertainty_layer(self)

    def _warm_up(self) -> None:
        """Load torch and the model in the background while the user looks at the case.

        A failure (a bad model file, torch that cannot load) is shown as it happens.
        """
        session, device, tta = self.session, self.device_combo.currentText(), self.tta_check.isChecked()
        bridge = self._bridge

        def load():
            from napari_unet.predict import read_torch_libraries

            read_torch_libraries()  # without the interpreter lock: the import below then holds it briefly
            from training.loop import warm_up

            session.predictor(device, tta)
            warm_up()

        def report(future: Future) -> None:
            if future.cancelled() or future.exception() is None:
                return
            err = future.exception()
            text = str(err) if isinstance(err, NapariUnetError) else f"{type(err).__name__}: {err}"
            emit(bridge, "failed", f"the model could not be loaded: {text}")

        self._warming = self._warmer.submit(load)
        self._warming.add_done_callback(report)

    # ------------------------------------------------------------------ model and store
    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model file", "", "Models (*.safetensors *.pt)")
        if path:
            self.set_model(path)

    def set_model(self, path) -> None:
        """Use this model file from now on (None: the shipped default). The menu shows its name
        (and its folder's, if another model has the same name); the tooltip the whole path."""
        combo = self.model_combo
        if path is not None and combo.findData(str(path)) < 0:
            path = Path(path)
            taken = {combo.itemText(i) for i in range(combo.count())}
            name = path.stem if path.stem not in taken else f"{path.stem} ({path.parent.name})"
            combo.addItem(name, str(path))
            combo.setItemData(combo.count() - 1, str(path), Qt.ToolTipRole)
        combo.setCurrentIndex(0 if path is None else combo.findData(str(path)))

    def _combo_model(self) -> Path | None:
        path = self.model_combo.currentData()
        return Path(path) if path else None

    @property
    def model_path(self) -> Path | None:
        """The model file in use (None: the shipped default)."""
        return self._combo_model()

    def _model_changed(self) -> None:
        path = self._combo_model()
        self.model_combo.setToolTip(str(path) if path else "the model that ships with napari-unet")
        if self.session is not None:
            self.session.set_model(self._combo_model())
        self.cases.model_changed()  # a new model (a fine-tune's) is unsure of other cases

    def set_store(self, path) -> None:
        """Save corrections under this folder, for this case and the next ones."""
        if self.session is not None and not self._take_store(path):
            self.store_edit.setText(str(self.session.store))
            return
        self.store_edit.setText(str(path))
        self._store_chosen = True
        self.cases.refresh()  # the dataset's cases as this store holds them
        if self.session is not None:
            self.session.store = Path(path)
            self._save_timer.start()
        elif cases := self._open_cases():  # a case refused its store (in use) starts in this one
            self._switch(cases, next(reversed(cases)))

    def _saved_before(self, case_id: str | None = None) -> None:
        """Wait until the saves of `case_id` (any: every save) asked for so far are written."""
        pending = self._saves.pop(case_id, None) if case_id is not None else self._pending_save
        if case_id is None:
            self._saves.clear()
        if pending is not None:
            try:
                pending.result()
            except Exception:  # noqa: BLE001 (reported by the write itself)
                pass

    def _take_store(self, path) -> bool:  # giving back the one held; False if another window has it
        held = self._store.lock
        if held is not None and held.store != Path(path).expanduser().resolve():
            self._saved_before()  # no write may land in a store after its lock is given back
        try:
            notice = self._store.hold(path)
        except StoreInUse as err:
            self._error(str(err))
            return False
        except NapariUnetError as err:  # a store that cannot be written: saving will say so
            notice = str(err)
        if notice:
            self._warn(notice)
        return True

    def _browse_store(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Corrections store")
        if path:
            self.set_store(path)

    # ------------------------------------------------------------------ propose
    def propose(self, current_slice: bool = False, note: str = ""):
        """Propose labels (off the GUI thread); reviewed slices are kept."""
        if self.tasks.refuse_if_busy():
            return None
        if self.session is None or self.annotation_layer is None:
            self._error("open a BraTS case first (File > Open, File > Open Sample, or napari-unet annotate)")
            return None
        session = self.session
        slices = [self.current_slice()] if current_slice else None
        device, tta = self.device_combo.currentText(), self.tta_check.isChecked()

        def work():
            return display_ready(session.predict(
                slices, device=device, tta=tta, cancel=self.tasks.cancel_event.is_set,
                progress=lambda d, t: self._bridge.progress.emit(d, t, None)))

        # A single slice is done in a blink: napari's activity bar would cost more than the work.
        return self.tasks.start(work, lambda result: self._proposal_done(session, result, note), "proposing",
                           napari_bar=not current_slice)

    def _proposal_done(self, session, result, note: str) -> None:
        if session is not self.session or self.annotation_layer is None:
            return  # the case was closed meanwhile
        prediction, warning = result
        layer = self.annotation_layer
        taken = session.merge_proposal(layer.data, prediction)  # in place: no new array for napari
        if len(prediction.computed_slices) > 1:
            self.review.next_at = None  # a new ranking: Review next starts again from its top
        layer.refresh()
        uncertainty = self._uncertainty_layer()
        uncertainty.data[prediction.computed_slices] = prediction.uncertainty[prediction.computed_slices]
        uncertainty.refresh()
        self._bring_to_top()
        kept = len(prediction.computed_slices) - len(taken)
        text = (f"proposed {len(prediction.computed_slices)} slice(s) in {prediction.seconds:.2f} s"
                + (f"; kept {kept} reviewed slice(s)" if kept else ""))
        self._message(f"{note} · {text}" if note else text)
        if warning:
            self._warn(warning)
        self._save_timer.start()  # the store records which model made the labels

    def _toggle_uncertainty(self, on: bool) -> None:
        if self.session is not None:
            self._uncertainty_layer().visible = on

    # ------------------------------------------------------------------ paint and review (review.Review)
    def select_label(self, value: int) -> None:
        self.review.select_label(value)

    def current_slice(self) -> int:
        return int(self.viewer.dims.current_step[0])

    def go_to_slice(self, z: int) -> None:
        self.viewer.dims.set_current_step(0, int(z))

    def view_plane(self) -> str:
        return self.review.plane()

    def toggle_reviewed(self) -> None:
        self.review.toggle_reviewed()

    def review_next(self) -> int | None:
        return self.review.next()

    def _collect_edits(self) -> None:
        layer = self.annotation_layer
        if layer is None or self.session is None:
            return
        changed, note = self.session.collect_edits(layer.data)
        if note:
            layer.refresh()
            self._message(note)
        if changed:
            self.review.refresh_list()
            self._save_timer.start()

    # ------------------------------------------------------------------ save
    def save(self) -> Future | None:
        """Write the annotation and corrections.json to the store, on the saving thread (the labels
        and review are copied here, on the GUI thread). Returns the Future of the write."""
        # Edits not collected yet go into this save, reviewed and with a BraTS 4 made 3: a save
        # timer can fire before the edit timer, and a raw 4 is no canonical label.
        self._edit_timer.stop()
        self._collect_edits()
        self._save_timer.stop()
        layer = self.annotation_layer
        if self.session is None or layer is None:
            return None
        session, snapshot = self.session, self.session.snapshot(layer.data)

        bridge = self._bridge

        def write():
            try:
                path = session.save(snapshot)
            except Exception as err:  # noqa: BLE001 (whatever it is, the annotator hears of it)
                emit(bridge, "saved", f"could not save the corrections of {session.case_id}: {err}", True, session)
                raise
            emit(bridge, "saved", f"saved {_dt.datetime.now():%H:%M:%S} to {path}", False, session)
            return path

        self._saves = {case: f for case, f in self._saves.items() if not f.done()}
        self._pending_save = self._saves[session.case_id] = self._saver.submit(write)
        return self._pending_save

    # ------------------------------------------------------------------ fine-tune
    def finetune(self, steps: int | None = None):
        """Fine-tune the current model on the store; the result becomes the current model."""
        if self.tasks.refuse_if_busy():
            return None
        if self.session is None or not self.session.teaches:
            self._error(NOTHING_TO_TEACH)
            return None
        self._collect_edits()
        pending, session, device = self.save(), self.session, self.device_combo.currentText()
        self.loss_plot.clear()

        def work():
            if pending is not None:
                pending.result()  # the store holds the latest corrections before training reads it
            return session.finetune(steps=steps, device=device, cancel=self.tasks.cancel_event.is_set,
                                    progress=lambda d, t, **info: self._bridge.progress.emit(d, t, info))

        return self.tasks.start(work, self._finetune_done, "fine-tuning")

    def _finetune_done(self, result) -> None:
        self.set_model(result.path)
        from napari_unet.session import taught_by

        note = (f"fine-tuned in {result.seconds:.1f} s ({result.steps} steps) on {taught_by(result.metadata)}: "
                f"now using {result.path.name}")
        self._message(note)
        self.propose(current_slice=False, note=note)  # re-propose the unreviewed slices with the new model

    # ------------------------------------------------------------------ workers
    @property
    def busy(self) -> bool:
        """A proposal or a fine-tuning is running (or the model is still loading)."""
        return self.tasks.worker is not None or (self._warming is not None and not self._warming.done())

    def cancel(self) -> None:
        self.tasks.cancel()

    # ------------------------------------------------------------------ messages
    def _on_saved(self, text: str, is_error: bool, session) -> None:
        if is_error:
            self._error(text)
        elif session is self.session:  # a case left meanwhile: its save is no news about this one
            self.save_label.setText(text)
        self.cases.refresh()  # the list follows the store

    def _message(self, text: str) -> None:
        self.status.setText(text)

    def _error(self, text: str) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(text)
        show_error(text)

    def _warn(self, text: str) -> None:
        from napari.utils.notifications import show_warning

        show_warning(text)

    # ------------------------------------------------------------------ teardown
    def event(self, event) -> bool:
        # napari's [x] on the dock takes the widget out of it (setParent(None)) without closing or
        # deleting it: left alive, it would go on following the viewer's layers, against the
        # widget docked next from the Plugins menu.
        if event.type() == QEvent.ParentChange:
            if self.parent() is not None:
                self._docked = True
            elif self._docked and not self._released:
                self._teardown()
                self.deleteLater()
        return super().event(event)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        self._teardown()
        super().closeEvent(event)

    def _teardown(self) -> None:
        """Save what is not saved yet, then release every event, key, thread and case the widget took."""
        if self._released:
            return
        self._released = True
        self._save_timer.stop()
        self._edit_timer.stop()
        if self.session is not None and self.annotation_layer is not None:
            self._collect_edits()
            self.save()
        self.tasks.abandon()
        self.grid.close()
        self.cases.close()
        self._release()
        self.session = self._annotation = None
