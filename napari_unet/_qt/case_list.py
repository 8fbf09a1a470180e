"""The dataset panel: a dataset's cases as a list (status, volumes in mL, model), "Case done" and
"Next case".

The list comes from the Qt-free `dataset.list_dataset` and is re-read after every save, done
toggle and fine-tune, on a thread of its own: listing reads only corrections.json files, but
hundreds of them take longer than the GUI thread may stall while the annotator paints. Cases
are opened the way File > Open opens them (`viewer.open` with napari-unet's reader), so the
widget switches to them by its one code path: the case left is saved first.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtGui import QFont
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QGroupBox,
    QHBoxLayout,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_unet import NapariUnetError
from napari_unet.layers import META_KEY, source_of

# The order combo's entries and the `dataset.next_case` order each stands for.
ORDER_CHOICES = {"uncertainty": "uncertainty", "in order": "order"}


def case_list_panel(w) -> QGroupBox:
    """Open dataset…, the case list, Case done, Next case and its order."""
    box = QGroupBox("Dataset")
    col = QVBoxLayout(box)
    row = QHBoxLayout()
    w.open_dataset_btn = QPushButton("Open dataset…")
    w.open_dataset_btn.setToolTip("a BraTS root, a Decathlon task or a folder of case folders")
    w.open_dataset_btn.clicked.connect(lambda: w.cases.browse())
    w.done_btn = QPushButton("Case done")
    w.done_btn.setCheckable(True)
    w.done_btn.setEnabled(False)  # until a case is open
    w.done_btn.setToolTip("every slice of this case is reviewed (press again to undo)")
    w.done_btn.clicked.connect(lambda: w.cases.toggle_done())
    row.addWidget(w.open_dataset_btn, 1)
    row.addWidget(w.done_btn)
    col.addLayout(row)
    # Shown once a dataset is open: until then an empty list would take the reviewed slices' room.
    w.dataset_part = QWidget()
    part = QVBoxLayout(w.dataset_part)
    part.setContentsMargins(0, 0, 0, 0)
    w.case_list = QListWidget()
    w.case_list.setMinimumHeight(6 * w.case_list.fontMetrics().height() + 8)  # three cases of two lines
    w.case_list.itemClicked.connect(lambda item: w.cases.open_case(item.data(Qt.UserRole)))
    part.addWidget(w.case_list)
    row = QHBoxLayout()
    w.next_case_btn = QPushButton("Next case")
    w.next_case_btn.setToolTip("save this case and open the next one to annotate")
    w.next_case_btn.clicked.connect(lambda: w.cases.open_next())
    w.case_order_combo = QComboBox()
    w.case_order_combo.addItems(list(ORDER_CHOICES))
    w.case_order_combo.setToolTip("uncertainty: the case not started that the model is least sure of "
                                  "(scored in the background); in order: the next in the list")
    w.case_order_combo.currentIndexChanged.connect(lambda: w.cases.prepare_next())  # another next case
    row.addWidget(w.next_case_btn, 1)
    row.addWidget(w.case_order_combo)
    part.addLayout(row)
    # Off by default: training after every submitted case is what MONAI Label users find
    # frustrating; the annotator chooses.
    w.auto_finetune = QCheckBox("fine-tune when a case is done")
    w.auto_finetune.setToolTip("after Case done, fine-tune the current model on the whole store; "
                               "the next proposals come from the new model (shown under Model)")
    part.addWidget(w.auto_finetune)
    w.dataset_part.setVisible(False)
    col.addWidget(w.dataset_part)
    return box


def entry_text(entry, current: bool) -> str:
    """Two lines: the case and its status; its volumes (mL) and the model that made its labels."""
    from napari_unet import dataset

    if entry.status == dataset.UNREADABLE:
        return f"{entry.case_id}: unreadable"
    status = {dataset.IN_PROGRESS: f"{entry.reviewed} reviewed"}.get(entry.status, entry.status)
    head = f"{'▶ ' if current else ''}{entry.case_id}: {status}"
    if entry.status == dataset.NOT_STARTED:
        return head
    if entry.volumes_ml is None:  # saved by an older napari-unet or another tool
        volumes = "volumes not recorded"
    else:
        volumes = " ".join(f"{k} {entry.volumes_ml[k]:.1f}" for k in ("WT", "TC", "ET")) + " mL"
    model = "-" if entry.model is None else Path(entry.model).name
    return f"{head}\n    {volumes} · {model}"


def entry_tooltip(entry) -> str:
    if entry.error:
        return entry.error
    lines = [str(entry.path)]
    if entry.volumes_ml is not None:
        lines += [f"{k}: {v:.2f} mL" for k, v in entry.volumes_ml.items()]
    if entry.model is not None:
        lines.append(f"labels by {entry.model}")
    return "\n".join(lines)


class CaseList(QObject):
    """The dataset open in widget `w`: its entries, the list shown, done and next case."""

    listed = Signal(int, object)  # generation, entries (or a NapariUnetError)
    scored = Signal(int, object)  # generation, {case_id: score}
    ahead = Signal(object, object)  # key, (layer data, (prediction, warning), read warnings) or an exception

    def __init__(self, w):
        super().__init__(w)
        self.w = w
        self.root: Path | None = None
        self.entries: list = []
        self.scores: dict[str, float] = {}
        self._generation = 0  # a listing started before the latest one is out of date
        self._score_generation = 0
        self._scoring_model = None  # (model path, device) the running or last scoring is for
        self._stop = threading.Event()
        self._lister = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-unet-list")
        # Scoring runs the model on every case not started: its own thread, niced, so that it
        # never holds up a proposal, a save or the GUI; it stops between cases when told.
        self._scorer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-unet-scores",
                                          initializer=_lower_priority)
        self._score_cancel = threading.Event()
        # The next case, read and proposed while the annotator works on this one: niced like the
        # scoring, and on a thread of its own so that a scoring of hundreds of cases never holds it up.
        self._aheader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-unet-ahead",
                                           initializer=_lower_priority)
        self._ahead_key = None  # (case id, path, model, device, tta) being prepared or ready
        self._ahead = None  # (layer data, (prediction, warning), read warnings, its session) once ready
        self._ahead_cancel = threading.Event()
        self._marked = None  # the case marked current in the list
        # (case id, session left, why, (model, proposal) made ahead or None) of a case being opened
        self._pending = None
        self._rescore = False  # score once the listing under way is in
        w.destroyed.connect(self._stop.set)  # deleted with its window, never closed: stop the threads
        self.listed.connect(self._on_listed)
        self.scored.connect(self._on_scored)
        self.ahead.connect(self._on_ahead)

    # ------------------------------------------------------------------ the list
    def browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self.w, "Dataset (a BraTS root, a Decathlon task, a folder of cases)")
        if path:
            self.open_dataset(path)

    def open_dataset(self, root) -> None:
        """List the cases under `root`; the model scores them in the background."""
        self.root = Path(root)
        self.entries, self.scores = [], {}
        self.w._message(f"listing the cases of {self.root}…")
        self.refresh(rescore=True)

    def _store(self) -> str | None:
        # A store the user chose holds every case; otherwise each case's default, as the widget uses.
        return self.w.store_edit.text() if self.w._store_chosen else None

    def refresh(self, rescore: bool = False) -> None:
        """Re-read the list from the store (in the background)."""
        if self.root is None or self._stop.is_set():
            return
        self._generation += 1
        generation, root, store, stop = self._generation, self.root, self._store(), self._stop

        def work():
            from napari_unet.dataset import list_dataset

            try:
                result = list_dataset(root, store)
            except NapariUnetError as err:
                result = err
            if not stop.is_set():
                _emit(self, "listed", generation, result)

        self._lister.submit(work)
        if rescore:
            self._rescore = True

    def _on_listed(self, generation: int, result) -> None:
        if generation != self._generation or self._stop.is_set():
            return
        if isinstance(result, NapariUnetError):
            self.w._error(str(result))
            return
        first = not self.entries
        self.entries = result
        self.w.dataset_part.setVisible(True)
        self.show()
        if first:
            self.w._message(f"{self.root.name}: {len(result)} case(s); click one to open it, or press Next case")
        if self._rescore:
            self._rescore = False
            self.score()
        self.prepare_next()  # statuses changed: the next case may be another

    def show(self) -> None:
        """Fill the list widget from the entries; the case being annotated is marked."""
        current = self.w.session.case_id if self.w.session is not None else None
        self._marked = current
        view = self.w.case_list
        row = view.currentRow()
        view.clear()
        for entry in self.entries:
            item = QListWidgetItem(entry_text(entry, entry.case_id == current))
            item.setData(Qt.UserRole, entry.case_id)
            item.setToolTip(entry_tooltip(entry))
            if entry.case_id == current:
                font = QFont(item.font())
                font.setBold(True)
                item.setFont(font)
            view.addItem(item)
        if 0 <= row < view.count():
            view.setCurrentRow(row)

    def text(self) -> str:
        """The list as shown, one case after the other (for a glance and the tests)."""
        return "\n".join(self.w.case_list.item(i).text() for i in range(self.w.case_list.count()))

    def follow_session(self) -> None:
        """The case being annotated changed, or its review state: the list's mark and the Done button."""
        session = self.w.session
        self.w.done_btn.setChecked(bool(session is not None and session.done))
        self.w.done_btn.setEnabled(session is not None)
        current = session.case_id if session is not None else None
        if self.entries and current != self._marked:  # (called on every edit: rebuild only when needed)
            self.show()
            self.prepare_next()
        pending = self._pending
        if pending is not None and current == pending[0]:
            self._pending = None
            self._opened(*pending)
        elif pending is not None and session is not None and session is not pending[1]:
            self._pending = None  # another case took over (opened otherwise meanwhile)

    def _opened(self, case_id: str, left, why: str | None, ahead=None) -> None:
        """A case opened from the list is the widget's now: the case left goes, the proposal made
        ahead is merged as any proposal would be, and the status says why this case came next."""
        w = self.w
        text = f"{case_id}: ready; corrections go to {w.session.case_path}"
        if ahead is not None and ahead[0] == self._model_key(w.session.model_path):
            # The session's own merge: slices reviewed before (a case already started) are kept.
            w.session.reuse_model_state(ahead[2])  # the loaded model and what clicks weigh
            w._proposal_done(w.session, ahead[1], "")
            text = f"{case_id}: ready and proposed ahead; corrections go to {w.session.case_path}"
        if left is not None:
            # Saved before the switch, and only hidden by it: going through a dataset, the images of
            # every case left would pile up in memory (some 150 MB a BraTS case).
            QTimer.singleShot(0, lambda: self._drop_left(left))
            text += f" ({left.case_id} was saved and closed)"
        w._message(f"next case, {why}: {text}" if why else text)

    # ------------------------------------------------------------------ open a case
    def _entry(self, case_id: str):
        return next((e for e in self.entries if e.case_id == case_id), None)

    def open_case(self, case_id: str, why: str | None = None) -> None:
        """Open the case as File > Open does: the widget saves the case left and takes this one."""
        from napari_unet.dataset import UNREADABLE

        entry = self._entry(case_id)
        w = self.w
        if entry is None:
            return
        if entry.status == UNREADABLE:
            w._error(f"{entry.case_id} cannot be opened: {entry.error}")
            return
        if w.session is not None and w.session.case_id == entry.case_id:
            return
        ahead = self._take_ahead(entry)
        # Finished in follow_session, once the widget has switched (its attach is queued).
        self._pending = (entry.case_id, w.session, why, None if ahead is None else (ahead[0][2:], ahead[2], ahead[4]))
        try:
            if ahead is None:
                w.viewer.open(str(entry.path), plugin="napari-unet")
            else:  # read already: the layers napari's reader would make, from the arrays read ahead
                for warning in ahead[3]:
                    w._warn(warning)
                for data, kwargs, kind in self._into_left_layers(ahead[1], w.session):
                    getattr(w.viewer, f"add_{kind}")(data, **kwargs)
                w._schedule_attach()  # (a layer given new data is no layer inserted)
        except Exception as err:  # noqa: BLE001 (napari wraps the reader's errors in its own)
            self._pending = None
            w._error(f"{entry.case_id} could not be opened: {err}")
            self.refresh()

    def _into_left_layers(self, layer_data: list[tuple], left) -> list[tuple]:
        """Put the new case's images (and reference) into the layers of the case being left, of
        the same modality (see case_layers: much faster than new layers); returns the layer data
        that found no layer. The contrast on screen stays the one chosen."""
        from napari_unet._qt.case_layers import give_new_data

        if left is None:
            return layer_data
        free = {}
        for layer in self.w.viewer.layers:
            meta = layer.metadata.get(META_KEY, {})
            if left.owns(source_of(layer.metadata)) and meta.get("role") in ("image", "labels"):
                free.setdefault((meta["role"], meta.get("modality")), layer)
        rest = []
        for data, kwargs, kind in layer_data:
            meta = kwargs["metadata"][META_KEY]
            layer = free.pop((meta["role"], meta.get("modality")), None)
            if layer is None or layer.ndim != data.ndim:
                rest.append((data, kwargs, kind))
            else:
                give_new_data(layer, data, kwargs)
        return rest

    def layer_of_case_left(self, role: str):
        """While a case opened from the list starts: a layer of `role` of the case it replaces
        (closed once the new one is open), for the new case to take over; else None."""
        pending, w = self._pending, self.w
        if pending is None or pending[1] is None or w.session is None or w.session.case_id != pending[0]:
            return None
        left = pending[1]
        return next((layer for layer in w.viewer.layers if left.owns(source_of(layer.metadata))
                     and layer.metadata[META_KEY].get("role") == role), None)

    def _drop_left(self, left) -> None:
        w = self.w
        if w.session is None or w.session.owns(left.source):
            return  # it came back meanwhile
        for layer in [layer for layer in w.viewer.layers if left.owns(source_of(layer.metadata))]:
            w.viewer.layers.remove(layer)

    def _next_entry(self):
        from napari_unet.dataset import next_case

        order = ORDER_CHOICES[self.w.case_order_combo.currentText()]
        current = self.w.session.case_id if self.w.session is not None else None
        return next_case(self.entries, order, current, self.scores)

    def open_next(self) -> None:
        """Open the next case to annotate, in the order chosen."""
        if not self.entries:
            self.w._message("open a dataset first (Open dataset…)")
            return
        order = ORDER_CHOICES[self.w.case_order_combo.currentText()]
        entry = self._next_entry()
        if entry is None:
            self.w._message("every case of the dataset is done")
            return
        if order == "uncertainty" and entry.case_id in self.scores:
            why = f"the one the model is least sure of (uncertainty {self.scores[entry.case_id]:.3f})"
        elif order == "uncertainty":
            why = "in order (the cases are not scored yet)"
        else:
            why = "in order"
        self.open_case(entry.case_id, why)

    # ------------------------------------------------------------------ done
    def toggle_done(self) -> None:
        """"Case done": every slice of the case reviewed, or undone; saved at once."""
        w = self.w
        if w.session is None:
            w.done_btn.setChecked(False)
            w._message("open a case first")
            return
        done = w.session.toggle_done()
        w.review.refresh_list()
        w.save()  # the list follows once the store has it
        w._message(f"{w.session.case_id}: " + ("done: every slice counts as reviewed" if done
                                               else "no longer done; its reviewed slices are kept"))
        if done and w.auto_finetune.isChecked():
            w.finetune()  # (it waits for the save just started)

    # ------------------------------------------------------------------ scores
    def score(self) -> None:
        """Score the cases not started with the current model, in the background; cached ones are
        read from the store."""
        if self.root is None or not self.entries or self._stop.is_set():
            return
        key = (self.w.model_path, self.w.device_combo.currentText())
        self._score_cancel.set()  # a scoring for another model or list is out of date
        self._score_cancel = cancel = threading.Event()
        self._score_generation += 1
        generation, entries, stop = self._score_generation, list(self.entries), self._stop
        self._scoring_model = key

        def work():
            from napari_unet.dataset import score_cases

            if cancel.is_set() or stop.is_set():
                return
            try:
                # (no log: a case that cannot be read is already named in the list)
                scores = score_cases(entries, key[0], device=key[1],
                                     cancel=lambda: cancel.is_set() or stop.is_set())
            except NapariUnetError:
                return  # a model that cannot load is reported by the widget's warm-up
            if not stop.is_set():
                _emit(self, "scored", generation, scores)

        self._scorer.submit(work)

    def _on_scored(self, generation: int, scores: dict) -> None:
        if generation == self._score_generation:
            self.scores = dict(scores)
            self.prepare_next()  # by uncertainty, the next case may be another now

    def model_changed(self) -> None:
        """A fine-tune made a new model: cases not started are scored again with it, and the next
        case is proposed again (its proposal made ahead came from the old model)."""
        self.refresh(rescore=True)
        self.prepare_next()

    # ------------------------------------------------------------------ the next case, ahead
    def _model_key(self, model) -> tuple:
        return (str(model) if model else None, self.w.device_combo.currentText(), self.w.tta_check.isChecked())

    def _drop_ahead(self) -> None:
        self._ahead_cancel.set()
        self._ahead_key = self._ahead = None

    def prepare_next(self) -> None:
        """Read and propose the case Next case would open, in the background, with the current
        model; what was made ahead for another case or model is dropped. Only while a case is
        being annotated: until then the scoring has the CPU to itself."""
        from napari_unet.dataset import DONE, UNREADABLE

        w = self.w
        if self._stop.is_set() or not self.entries or w.session is None:
            return
        entry = self._next_entry()
        if entry is None or entry.status in (DONE, UNREADABLE):
            self._drop_ahead()
            return
        key = (entry.case_id, str(entry.path)) + self._model_key(w.model_path)
        if key == self._ahead_key:
            return  # under way, or ready
        self._drop_ahead()
        self._ahead_cancel = cancel = threading.Event()
        self._ahead_key = key
        stop, store = self._stop, entry.store

        def work():
            from napari_unet._qt.wiring import display_ready
            from napari_unet.cases import read_case
            from napari_unet.layers import case_layer_data
            from napari_unet.session import AnnotationSession

            if cancel.is_set() or stop.is_set():
                return
            try:
                case = read_case(entry.path)
                layers, warnings = case_layer_data(case), list(case.warnings)
                images = {kw["metadata"][META_KEY]["modality"]: data
                          for data, kw, kind in layers if kind == "image"}
                source = source_of(layers[0][1]["metadata"])
                # A session of its own, never the store's: nothing of the case is written or read
                # back until it opens, so a case being corrected elsewhere is never touched.
                session = AnnotationSession(source, images, store, model=key[2])
                result = display_ready(session.predict(device=key[3], tta=key[4],
                                                        cancel=lambda: cancel.is_set() or stop.is_set()))
            except Exception as err:  # noqa: BLE001 (Cancelled, a case or model that cannot load:
                # opening the case the ordinary way then says why, where the annotator looks)
                result = err
            if not (cancel.is_set() or stop.is_set()):
                _emit(self, "ahead", key, result if isinstance(result, Exception) else (layers, result, warnings, session))

        self._aheader.submit(work)

    def _on_ahead(self, key, result) -> None:
        if key != self._ahead_key or self._stop.is_set():
            return  # dropped meanwhile
        if isinstance(result, Exception):
            return  # kept as the key: not tried again and again; Next case opens it the ordinary way
        self._ahead = result
        text = self.w.status.text().split(" · next: ")[0]
        self.w._message(f"{text} · next: {key[0]} proposed ahead")

    def _take_ahead(self, entry):
        """(key, layer data, proposal, read warnings) made ahead for `entry` with the current model,
        or None. Dropped either way: once the case opens, it is being annotated, and a late result
        must not land in it."""
        key, ahead = self._ahead_key, self._ahead
        self._drop_ahead()
        if ahead is None or key != (entry.case_id, str(entry.path)) + self._model_key(self.w.model_path):
            return None
        return (key, *ahead)

    def close(self) -> None:
        self._stop.set()
        self._score_cancel.set()
        self._ahead_cancel.set()
        self._aheader.shutdown(wait=False, cancel_futures=True)
        self._lister.shutdown(wait=False, cancel_futures=True)
        self._scorer.shutdown(wait=False, cancel_futures=True)


def _emit(obj: QObject, signal: str, *args) -> None:
    """Emit from a worker thread. The signal is looked up now, not kept: a signal kept from an
    object deleted since (the window closed) crashes the process when emitted; a lookup raises."""
    try:
        getattr(obj, signal).emit(*args)
    except RuntimeError:
        pass


def _lower_priority() -> None:
    """Best effort: Linux nices one thread (and the threads it starts) by its id; elsewhere nothing."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass
