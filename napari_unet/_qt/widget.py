"""The annotation dock widget: propose, correct, review, save, fine-tune.

It builds the layout and connects signals; every decision is made by the Qt-free core
(`napari_unet.session`, `napari_unet.predict`, `training.loop`). Long work runs in a
worker thread (superqt/napari workers); progress comes back through a Qt signal so the
GUI thread only updates widgets.
"""

from __future__ import annotations

import datetime as _dt
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_unet import NapariUnetError
from napari_unet._qt.plot import LossPlot
from napari_unet.layers import META_KEY, labels_layer_kwargs, source_of

DEFAULT_MODEL = "shipped default model"


class _Bridge(QObject):
    """Carries progress from worker threads to the GUI thread (queued signal)."""

    progress = Signal(int, int, object)
    message = Signal(str, bool)  # text, is_error


def _with_button(field: QWidget, text: str, slot) -> QHBoxLayout:
    """A form row: a field that stretches and a small button beside it."""
    button = QPushButton(text)
    button.clicked.connect(slot)
    row = QHBoxLayout()
    row.addWidget(field, 1)
    row.addWidget(button)
    return row


def _display_ready(prediction):
    """Uncertainty as 8 bits for display, converted in the worker: a quarter of the bytes to copy
    on the GUI thread (the ranking of slices uses the float values, taken before)."""
    prediction.slice_scores = prediction.slice_uncertainty()
    if prediction.uncertainty is not None:
        prediction.uncertainty = np.round(prediction.uncertainty * 255).astype(np.uint8)
    return prediction


class AnnotationWidget(QWidget):
    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.session = None
        self.case = None  # an in-memory Case when the sample is open (for the store)
        self.model_path: Path | None = None  # None: the shipped default
        self._predictor = None
        self._predictor_key = None
        self._prepared = None
        self._prepared_key = None
        self._slice_scores = None
        self._shadow = None
        self._worker = None
        self._napari_bar = None
        self._cancel = threading.Event()
        self._bridge = _Bridge()
        self._bridge.progress.connect(self._on_progress)
        self._bridge.message.connect(lambda text, is_error: (self._error if is_error else self._message)(text))
        # Saving runs on its own thread: painting never waits for a NIfTI file to be written.
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-unet-save")
        self._save_timer = QTimer(self, singleShot=True, interval=300)
        self._save_timer.timeout.connect(self.save)
        self._edit_timer = QTimer(self, singleShot=True, interval=50)
        self._edit_timer.timeout.connect(self._collect_edits)
        self._build()
        # Deferred: a reader adds several layers in a row; attach once they are all in.
        self.viewer.layers.events.inserted.connect(lambda e: QTimer.singleShot(0, self._attach))
        self.viewer.dims.events.current_step.connect(lambda e: self._update_slice_label())
        self.viewer.bind_key("Shift-R", lambda v: self.toggle_reviewed(), overwrite=True)
        self.viewer.bind_key("Shift-N", lambda v: self.review_next(), overwrite=True)
        self._attach()

    # ------------------------------------------------------------------ layout
    def _build(self) -> None:
        layout = QVBoxLayout(self)

        box = QGroupBox("Model")
        form = QFormLayout(box)
        self.model_combo = QComboBox()
        self.model_combo.addItem(DEFAULT_MODEL)
        form.addRow("model", _with_button(self.model_combo, "File…", self._browse_model))
        self.model_combo.currentIndexChanged.connect(self._model_changed)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        form.addRow("device", self.device_combo)
        self.tta_check = QCheckBox("flip averaging (4x slower)")
        form.addRow("", self.tta_check)
        layout.addWidget(box)

        box = QGroupBox("Propose")
        col = QVBoxLayout(box)
        row = QHBoxLayout()
        self.propose_volume_btn = QPushButton("Whole volume")
        self.propose_slice_btn = QPushButton("This slice")
        self.propose_volume_btn.clicked.connect(lambda: self.propose(current_slice=False))
        self.propose_slice_btn.clicked.connect(lambda: self.propose(current_slice=True))
        row.addWidget(self.propose_volume_btn)
        row.addWidget(self.propose_slice_btn)
        col.addLayout(row)
        self.show_uncertainty = QCheckBox("show uncertainty layer")
        self.show_uncertainty.toggled.connect(self._toggle_uncertainty)
        col.addWidget(self.show_uncertainty)
        layout.addWidget(box)

        box = QGroupBox("Review")
        col = QVBoxLayout(box)
        self.slice_label = QLabel("no case open")
        col.addWidget(self.slice_label)
        row = QHBoxLayout()
        self.reviewed_btn = QPushButton("Mark reviewed (Shift-R)")
        self.reviewed_btn.clicked.connect(self.toggle_reviewed)
        self.next_btn = QPushButton("Review next (Shift-N)")
        self.next_btn.setToolTip("jump to the unreviewed slice where the model is least sure")
        self.next_btn.clicked.connect(self.review_next)
        row.addWidget(self.reviewed_btn)
        row.addWidget(self.next_btn)
        col.addLayout(row)
        self.reviewed_list = QListWidget()
        self.reviewed_list.setMaximumHeight(110)
        self.reviewed_list.itemClicked.connect(lambda item: self.go_to_slice(int(item.data(Qt.UserRole))))
        col.addWidget(QLabel("reviewed slices (click to jump):"))
        col.addWidget(self.reviewed_list)
        layout.addWidget(box)

        box = QGroupBox("Corrections store and fine-tuning")
        form = QFormLayout(box)
        self.store_edit = QLineEdit()
        self.store_edit.setPlaceholderText("folder for corrections")
        form.addRow("store", _with_button(self.store_edit, "…", self._browse_store))
        self.finetune_btn = QPushButton("Fine-tune on corrections")
        self.finetune_btn.clicked.connect(self.finetune)
        form.addRow(self.finetune_btn)
        self.loss_plot = LossPlot()
        form.addRow(self.loss_plot)
        layout.addWidget(box)

        row = QHBoxLayout()
        self.progress_bar = QProgressBar()
        self.progress_bar.setTextVisible(True)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        row.addWidget(self.progress_bar, 1)
        row.addWidget(self.cancel_btn)
        layout.addLayout(row)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        layout.addStretch(1)

    # ------------------------------------------------------------------ the case
    def _image_layers(self) -> dict:
        found = {}
        for layer in self.viewer.layers:
            meta = layer.metadata.get(META_KEY, {}) if hasattr(layer, "metadata") else {}
            if meta.get("role") == "image" and meta.get("modality"):
                found[meta["modality"]] = layer
        return found

    @property
    def annotation_layer(self):
        if self.session is None:
            return None
        name = f"{self.session.case_id} annotation"
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _attach(self) -> None:
        """Find the open case (by our metadata) and start or restore its session."""
        images = self._image_layers()
        if not images:
            return
        source = source_of(next(iter(images.values())).metadata)
        if self.session is not None and self.session.source.case_id == source.case_id:
            return
        if not self.store_edit.text():
            parent = Path(source.path).parent if source.path else Path.home() / "napari-unet"
            self.store_edit.setText(str(parent / "napari-unet-corrections"))
        try:
            from napari_unet.session import AnnotationSession

            self.session = AnnotationSession(source, self.store_edit.text())
        except NapariUnetError as err:
            self._error(str(err))
            return
        self._prepared = self._prepared_key = self._slice_scores = None
        restored = self.session.restore()
        # The (empty) annotation layer is made now, while the case opens, not in the middle of
        # a proposal: creating a 240x240x155 Labels layer takes the GUI thread a few 100 ms.
        self._ensure_annotation_layer(restored)
        self._ensure_uncertainty_layer()
        if restored is not None:
            self._message(f"restored {len(self.session.reviewed)} reviewed slice(s) from {self.session.case_path}")
        self._refresh_review_list()
        self._warm_up()

    def _warm_up(self) -> None:
        """Load torch and the model in the background while the user looks at the case."""
        device = self.device_combo.currentText()

        def load():
            try:
                # Imports hold the GIL for long stretches: do them now, not in the middle of a task.
                import torch.distributed  # noqa: F401  (warm the import)

                from training.loop import warm_up

                self._get_predictor(device)
                warm_up()
            except Exception:  # noqa: BLE001  (a bad model is reported when the user proposes)
                pass

        self._warming = self._saver.submit(load)

    def _ensure_annotation_layer(self, data: np.ndarray | None = None):
        layer = self.annotation_layer
        if layer is None:
            source = self.session.source
            shape = next(iter(self._image_layers().values())).data.shape
            initial = data if data is not None else np.zeros(shape, np.uint8)
            layer = self.viewer.add_labels(
                initial, **labels_layer_kwargs(source.case_id, source, name=f"{source.case_id} annotation")
            )
            layer.opacity = 0.6
            for other in self.viewer.layers:  # a reference segmentation would hide what is edited
                if other is not layer and other.metadata.get(META_KEY, {}).get("role") == "labels":
                    other.visible = False
            self.viewer.layers.selection.active = layer
            layer.events.paint.connect(lambda e: self._edit_timer.start())
            if hasattr(layer.events, "labels_update"):
                layer.events.labels_update.connect(lambda e: self._edit_timer.start())
        elif data is not None:
            layer.data = data
        self._shadow = np.array(layer.data, copy=True)
        return layer

    # ------------------------------------------------------------------ model
    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model file", "", "Models (*.safetensors *.pt)")
        if path:
            self.set_model(path)

    def set_model(self, path) -> None:
        """Use this model file from now on (None: the shipped default)."""
        if path is None:
            self.model_combo.setCurrentIndex(0)
            return
        path = str(path)
        if self.model_combo.findText(path) < 0:
            self.model_combo.addItem(path)
        self.model_combo.setCurrentIndex(self.model_combo.findText(path))

    def _model_changed(self) -> None:
        text = self.model_combo.currentText()
        self.model_path = None if text == DEFAULT_MODEL else Path(text)

    def _get_predictor(self, device: str):
        from napari_unet.modelfile import load_model
        from napari_unet.predict import Predictor

        key = (str(self.model_path), device, self.tta_check.isChecked())
        if self._predictor_key != key:
            self._predictor = Predictor(load_model(self.model_path), device, tta=key[2])
            self._predictor_key = key
        return self._predictor

    # ------------------------------------------------------------------ propose
    def propose(self, current_slice: bool = False):
        """Propose labels (off the GUI thread); reviewed and edited slices are kept."""
        if self._busy():
            return None
        images = self._image_layers()
        if not images or self.session is None:
            self._error("open a BraTS case with napari-unet first (File > Open, or the sample data)")
            return None
        z = int(self.viewer.dims.current_step[0])
        device = self.device_combo.currentText()
        stack_key = tuple(id(layer.data) for layer in images.values())

        def work():
            from napari_unet.modelfile import check_modalities
            from napari_unet.predict import resolve_device

            if getattr(self, "_warming", None) is not None:
                self._warming.result()
            predictor = self._get_predictor(device)
            check_modalities(predictor.metadata, list(images), self.session.source.path or self.session.case_id)
            if self._prepared_key != (stack_key, predictor.modalities):
                stack = np.stack([np.asarray(images[m].data, np.float32) for m in predictor.modalities])
                self._prepared = predictor.prepare(stack)
                self._prepared_key = (stack_key, predictor.modalities)
            kwargs = dict(slices=[z] if current_slice else None, with_uncertainty=True,
                          progress=lambda d, t: self._bridge.progress.emit(d, t, None),
                          cancel=self._cancel.is_set)
            try:
                return _display_ready(predictor.predict(self._prepared, **kwargs)), None
            except RuntimeError as err:  # out of GPU memory: carry on on the CPU
                if "out of memory" not in str(err).lower() or resolve_device(device).type == "cpu":
                    raise
                self._predictor_key = None
                prediction = self._get_predictor("cpu").predict(self._prepared, **kwargs)
                return _display_ready(prediction), "GPU out of memory: ran on the CPU"

        # A single slice is done in a blink: napari's activity bar would cost more than the work.
        return self._start(work, self._proposal_done, "proposing", napari_bar=not current_slice)

    def _proposal_done(self, result) -> None:
        prediction, warning = result
        layer = self._ensure_annotation_layer()
        # In place, slice by slice: no new 9M-voxel array for napari to take in on the GUI thread.
        take = self.session.unprotected(prediction.computed_slices)
        layer.data[take] = prediction.labels[take]
        self._shadow[take] = prediction.labels[take]
        layer.refresh()
        scores = prediction.slice_scores
        if self._slice_scores is None or len(prediction.computed_slices) > 1:
            self._slice_scores = scores
        else:
            self._slice_scores[prediction.computed_slices] = scores[prediction.computed_slices]
        self._set_uncertainty(prediction)
        kept = len(self.session.protected() & set(prediction.computed_slices.tolist()))
        self._message(f"proposed {len(prediction.computed_slices)} slice(s) in {prediction.seconds:.2f} s"
                      + (f"; kept {kept} reviewed slice(s)" if kept else ""))
        if warning:
            self._warn(warning)

    def _set_uncertainty(self, prediction) -> None:
        if prediction.uncertainty is None:
            return
        layer = self._ensure_uncertainty_layer()
        layer.data[prediction.computed_slices] = prediction.uncertainty[prediction.computed_slices]
        layer.refresh()

    def _ensure_uncertainty_layer(self):
        """The per-voxel uncertainty as an image layer (made when the case opens, filled by proposals)."""
        name = "uncertainty"
        shape = self.annotation_layer.data.shape
        if name in self.viewer.layers and self.viewer.layers[name].data.shape == shape:
            return self.viewer.layers[name]
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        layer = self.viewer.add_image(np.zeros(shape, np.uint8), name=name, colormap="inferno", blending="additive",
                                      contrast_limits=(0, 255), scale=self.session.source.spacing,
                                      visible=self.show_uncertainty.isChecked())
        # keep the labels on top, and the one to paint on selected
        self.viewer.layers.move(self.viewer.layers.index(self.annotation_layer), len(self.viewer.layers))
        self.viewer.layers.selection.active = self.annotation_layer
        return layer

    def _toggle_uncertainty(self, on: bool) -> None:
        if "uncertainty" in self.viewer.layers:
            self.viewer.layers["uncertainty"].visible = on

    # ------------------------------------------------------------------ review
    def current_slice(self) -> int:
        return int(self.viewer.dims.current_step[0])

    def go_to_slice(self, z: int) -> None:
        self.viewer.dims.set_current_step(0, int(z))

    def toggle_reviewed(self, z: int | None = None) -> None:
        if self.session is None:
            return
        z = self.current_slice() if z is None else int(z)
        self.session.mark_reviewed(z, z not in self.session.reviewed)
        self._ensure_annotation_layer()
        self._refresh_review_list()
        self._save_timer.start()

    def review_next(self) -> int | None:
        if self.session is None or self._slice_scores is None:
            self._message("propose first: the ranking comes from the model's uncertainty")
            return None
        z = self.session.next_to_review(self._slice_scores)
        if z is None:
            self._message("every slice with brain has been reviewed")
            return None
        self.go_to_slice(z)
        self._message(f"slice {z}: uncertainty {self._slice_scores[z]:.3f} (highest among unreviewed)")
        return z

    def _collect_edits(self) -> None:
        layer = self.annotation_layer
        if layer is None or self._shadow is None or self.session is None:
            return
        data = np.asarray(layer.data)
        changed = np.flatnonzero((data != self._shadow).reshape(data.shape[0], -1).any(axis=1))
        if changed.size:
            self.session.record_edits(changed.tolist())
            self._shadow[changed] = data[changed]
            self._refresh_review_list()
            self._save_timer.start()

    def _refresh_review_list(self) -> None:
        self.reviewed_list.clear()
        if self.session is None:
            return
        from qtpy.QtWidgets import QListWidgetItem

        for z in sorted(self.session.reviewed):
            tag = " (edited)" if z in self.session.edited else ""
            item = QListWidgetItem(f"slice {z}{tag}")
            item.setData(Qt.UserRole, z)
            self.reviewed_list.addItem(item)
        self._update_slice_label()

    def _update_slice_label(self) -> None:
        if self.session is None:
            return
        z = self.current_slice()
        state = "reviewed" if z in self.session.reviewed else "not reviewed"
        self.slice_label.setText(f"slice {z}: {state} · {len(self.session.reviewed)} reviewed")
        self.reviewed_btn.setText("Unmark (Shift-R)" if z in self.session.reviewed else "Mark reviewed (Shift-R)")

    # ------------------------------------------------------------------ save
    def save(self) -> Future | None:
        """Write the annotation and corrections.json to the store, on the saving thread.

        The labels and the review state are copied here, on the GUI thread; the files are
        written (atomically) in the background. Returns the Future of the write.
        """
        self._save_timer.stop()
        layer = self.annotation_layer
        if self.session is None or layer is None:
            return None
        self.session.store = Path(self.store_edit.text())
        labels = np.array(layer.data, copy=True)
        reviewed, edited = set(self.session.reviewed), set(self.session.edited)
        session, case, model = self.session, self.case, self._model_name()

        def write():
            try:
                path = session.save(labels, case, model=model, reviewed=reviewed, edited=edited)
            except (NapariUnetError, OSError) as err:
                self._bridge.message.emit(f"could not save the corrections: {err}", True)
                raise
            self._bridge.message.emit(f"saved to {path}", False)
            return path

        return self._saver.submit(write)

    def _model_name(self) -> str:
        return self.model_path.name if self.model_path else "default"

    # ------------------------------------------------------------------ fine-tune
    def finetune(self, steps: int | None = None):
        """Fine-tune the current model on the store; the result becomes the current model."""
        if self._busy():
            return None
        if self.session is None or not self.session.reviewed:
            self._error("review or correct some slices first: only reviewed slices teach the model")
            return None
        pending = self.save()
        store = Path(self.store_edit.text())
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = store.parent / f"{store.name}-models" / f"finetuned-{stamp}.safetensors"
        base = self.model_path
        device = self.device_combo.currentText()
        self.loss_plot.clear()

        def work():
            from training.loop import FINETUNE_DEFAULTS, Settings, finetune

            if pending is not None:
                pending.result()  # the store holds the latest corrections before training reads it
            settings = Settings(**{**FINETUNE_DEFAULTS, "device": device, **({"steps": steps} if steps else {})})
            return finetune(store, base, out, settings=settings, cancel=self._cancel.is_set,
                            progress=lambda d, t, **info: self._bridge.progress.emit(d, t, info))

        return self._start(work, self._finetune_done, "fine-tuning")

    def _finetune_done(self, result) -> None:
        self._message(f"fine-tuned in {result.seconds:.1f} s ({result.steps} steps): now using {result.path.name}")
        self.set_model(result.path)
        self.propose(current_slice=False)  # re-propose the unreviewed slices with the new model

    # ------------------------------------------------------------------ workers
    def _busy(self) -> bool:
        if self._worker is not None:
            self._message("busy: wait, or press Cancel")
            return True
        return False

    def _start(self, func, on_done, what: str, napari_bar: bool = True):
        from napari.qt.threading import create_worker
        from napari.utils import progress as napari_progress

        from napari_unet.predict import Cancelled

        def guarded():
            # Expected outcomes come back as values; only real bugs travel as exceptions.
            try:
                return "done", func()
            except Cancelled:
                return "cancelled", None
            except NapariUnetError as err:
                return "error", err

        def returned(outcome):
            self._finish(worker)  # before on_done, which may start the next task
            kind, value = outcome
            if kind == "done":
                on_done(value)
            elif kind == "cancelled":
                self._message(f"{what} cancelled; nothing was changed")
            else:
                self._error(str(value))

        self._cancel.clear()
        self._what = what
        self._napari_bar = napari_progress(total=0, desc=what) if napari_bar else None
        worker = create_worker(guarded)
        worker.returned.connect(returned)
        worker.errored.connect(self._on_error)
        worker.finished.connect(lambda: self._finish(worker))
        self._worker = worker
        self.cancel_btn.setEnabled(True)
        self.progress_bar.setFormat(f"{what} %p%")
        self.progress_bar.setValue(0)
        worker.start()
        return worker

    def _on_progress(self, done: int, total: int, info) -> None:
        self.progress_bar.setMaximum(max(total, 1))
        self.progress_bar.setValue(done)
        bar = getattr(self, "_napari_bar", None)
        if bar is not None:
            if bar.total != total:
                bar.total = total
            bar.n = done
            bar.refresh()
        if info and "loss" in info:
            self.loss_plot.add(info["loss"])

    def _on_error(self, err) -> None:
        self._error(f"{self._what} failed: {type(err).__name__}: {err}")

    def _finish(self, worker) -> None:
        """Forget a finished task (once; a later task may already have started)."""
        if self._worker is not worker:
            return
        self._worker = None
        self.cancel_btn.setEnabled(False)
        if self._napari_bar is not None:
            self._napari_bar.close()
            self._napari_bar = None

    def cancel(self) -> None:
        self._cancel.set()
        self._message(f"cancelling {getattr(self, '_what', '')}…")

    # ------------------------------------------------------------------ messages
    def _message(self, text: str) -> None:
        self.status.setText(text)

    def _error(self, text: str) -> None:
        from napari.utils.notifications import show_error

        self.status.setText(text)
        show_error(text)

    def _warn(self, text: str) -> None:
        from napari.utils.notifications import show_warning

        show_warning(text)

    def _browse_store(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Corrections store")
        if path:
            self.store_edit.setText(path)
            if self.session is not None:
                self.session.store = Path(path)
