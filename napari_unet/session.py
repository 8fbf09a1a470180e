"""The annotation of one case, without Qt: the state and every decision that is not drawing.

An `AnnotationSession` owns what the annotator has done to one case (reviewed and edited
slices, the slice ranking, which model made the proposals), the images needed to propose and to
fill the corrections store, the predictor and the prepared volume it reuses, and the fine-tuned
model it leads to. The labels array itself belongs to whoever shows it (napari's Labels layer,
or a benchmark's array) and is passed in: the session diffs it against its own copy to find the
slices a user edited, merges proposals into it, and snapshots it for saving.

The widget, the HITL benchmark and the tests all drive this one class.
"""

from __future__ import annotations

import datetime as _dt
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_unet import NapariUnetError
from napari_unet import store as store_format
from napari_unet.cases import CaseSource
from napari_unet.labels import ENHANCING, LABEL_NAMES

# BraTS 2017-2021 files and napari's "new label" button both lead annotators to paint 4, which
# is enhancing tumour in those files; canonical enhancing is 3.
_BRATS_ENHANCING = 4
NOTHING_TO_TEACH = "review or correct some slices first: only reviewed slices teach the model"


@dataclass
class Snapshot:
    """What one save writes, copied on the thread that owns the labels."""

    labels: np.ndarray
    corrections: store_format.Corrections


class AnnotationSession:
    """One case being annotated: its images, review state, store place, model and predictor."""

    def __init__(self, source: CaseSource, images: dict[str, np.ndarray], store: str | Path,
                 model: str | Path | None = None):
        if source.layout == "single":
            raise NapariUnetError(
                f"{source.path}: a single image cannot go into a corrections store; open the whole case folder"
            )
        self.source = source
        self.images = dict(images)
        self.store = Path(store)
        self.model_path: Path | None = Path(model) if model else None  # None: the shipped default
        self.reviewed: set[int] = set()
        self.edited: set[int] = set()
        self.done = False  # every slice reviewed ("Case done"); `reviewed` is kept for unmarking
        self.slice_scores: np.ndarray | None = None
        self.proposal_model: str | None = None  # the model that made the labels' proposals
        self._shadow: np.ndarray | None = None  # the labels as last seen, to find edits
        # Per edited slice: its labels before the first edit and whether it was reviewed then, so
        # that undoing the edit undoes what the edit decided.
        self._before_edit: dict[int, tuple[np.ndarray, bool]] = {}
        self._predictor = self._predictor_key = None
        self._prepared = self._prepared_key = None
        self._evidence = None  # the click prompts' ClickEvidence, for the predictor above
        self._lock = threading.Lock()  # the predictor is built on a worker thread

    # ------------------------------------------------------------------ identity
    @property
    def case_id(self) -> str:
        return self.source.case_id

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(next(iter(self.images.values())).shape)

    def owns(self, source: CaseSource | None) -> bool:
        """Whether a layer made from `source` belongs to this case (same id and same files)."""
        return source is not None and source.case_id == self.case_id and source.path == self.source.path

    @property
    def case_path(self) -> Path:
        """The case's folder (or Decathlon file) inside the store."""
        _, seg, record = store_format.case_location(self.store, self.source)
        return record.parent if record.name == store_format.CORRECTIONS_FILE else seg

    # ------------------------------------------------------------------ the labels
    def open_labels(self) -> np.ndarray:
        """The labels to start from: the store's if the case was saved there, else empty.

        Also restores the review state and the model that made those labels.
        """
        saved = store_format.read(self.store, self.source)
        if saved is None:
            labels = np.zeros(self.shape, np.uint8)
        else:
            labels, corrections = saved
            self.reviewed, self.edited = set(corrections.reviewed), set(corrections.edited)
            self.done = corrections.done
            self.proposal_model = corrections.model
            if corrections.model not in (None, store_format.SHIPPED_MODEL_NAME) and Path(corrections.model).is_file():
                self.model_path = Path(corrections.model)
        self.track(labels)
        return labels

    def track(self, labels: np.ndarray) -> None:
        """Take `labels` as they are now as the reference for finding edits."""
        self._shadow = np.array(labels, np.uint8, copy=True)
        self._before_edit = {}

    def collect_edits(self, labels: np.ndarray) -> tuple[list[int], str | None]:
        """The slices the user changed since the last look, marked edited and reviewed; a slice
        brought back to what it was before its first edit (undo) is no longer edited, nor reviewed
        unless it was before.

        Label values other than the three tissues are fixed in place: 4 (enhancing in BraTS
        2017-2021 files) becomes 3, anything else is undone. Returns (slices, a note to show).
        """
        if self._shadow is None or self._shadow.shape != labels.shape:
            self.track(labels)
            return [], None
        data = np.asarray(labels)
        changed = np.flatnonzero((data != self._shadow).reshape(data.shape[0], -1).any(axis=1))
        note = None
        for z in changed:
            foreign = data[z] > ENHANCING
            if foreign.any():
                brats_et = data[z] == _BRATS_ENHANCING
                data[z][brats_et] = ENHANCING
                other = foreign & ~brats_et
                data[z][other] = self._shadow[z][other]
                note = ("label 4 is enhancing tumour in BraTS files: painted as 3 (enhancing tumour)"
                        if not other.any() else
                        f"only labels 1-3 ({', '.join(LABEL_NAMES[v] for v in (1, 2, 3))}) are tumour: "
                        "other values were undone")
        for z in changed.tolist():
            before = self._before_edit.get(z)
            if before is None:
                self._before_edit[z] = (self._shadow[z].copy(), z in self.reviewed)
            elif np.array_equal(data[z], before[0]):
                del self._before_edit[z]
                self.edited.discard(z)
                if not before[1]:
                    self.reviewed.discard(z)
                continue
            self.edited.add(z)
            self.reviewed.add(z)  # an edited slice has been looked at
        self._shadow[changed] = data[changed]
        return changed.tolist(), note

    def merge_proposal(self, labels: np.ndarray, prediction) -> list[int]:
        """Write a prediction into `labels` (in place) on every computed slice not reviewed
        (none in a case marked done).

        Returns the slices written. The slice ranking and the proposing model are updated.
        """
        computed = np.asarray(prediction.computed_slices, int)
        take = computed[~np.isin(computed, sorted(self.reviewed))] if not self.done else computed[:0]
        labels[take] = prediction.labels[take]
        if self._shadow is not None:
            self._shadow[take] = prediction.labels[take]
        scores = prediction.slice_scores
        if scores is not None:
            if self.slice_scores is None or len(computed) > 1:
                self.slice_scores = np.array(scores, np.float32)
            else:
                self.slice_scores[computed] = scores[computed]
        if not self.done:  # a done case's labels keep the model that made them
            self.proposal_model = self.model_name
        return take.tolist()

    # ------------------------------------------------------------------ review
    def set_reviewed(self, z: int, reviewed: bool = True) -> None:
        """Mark or unmark a slice; an unmarked slice takes the next proposal again."""
        z = int(z)
        if reviewed:
            self.reviewed.add(z)
            if z in self._before_edit:  # marked by hand: undoing its edits leaves it reviewed
                self._before_edit[z] = (self._before_edit[z][0], True)
        else:
            self.reviewed.discard(z)
            self.edited.discard(z)
            self._before_edit.pop(z, None)

    def set_done(self, done: bool = True) -> None:
        """Mark the case done (every slice reviewed: it teaches fine-tuning whole, and no proposal
        changes it) or not; the slices reviewed one by one are kept either way."""
        self.done = bool(done)

    def toggle_done(self) -> bool:
        """"Case done" pressed: marks the case done, or undoes that; returns the new state."""
        self.set_done(not self.done)
        return self.done

    def next_to_review(self, current: int | None = None) -> int | None:
        """The unreviewed slice where the model is least sure; asked again from that slice,
        the next one down the ranking. NaN scores (no brain) are never offered; nothing is in
        a case marked done."""
        if self.slice_scores is None or self.done:
            return None
        scores = np.asarray(self.slice_scores, float)
        order = [int(z) for z in np.argsort(-np.nan_to_num(scores, nan=-np.inf), kind="stable")
                 if not np.isnan(scores[z]) and int(z) not in self.reviewed]
        if not order:
            return None
        if current is not None and int(current) in order:
            i = order.index(int(current))
            return order[(i + 1) % len(order)] if len(order) > 1 else order[0]
        return order[0]

    # ------------------------------------------------------------------ the store
    def snapshot(self, labels: np.ndarray) -> Snapshot:
        """A copy of everything a save writes (take it on the thread that owns `labels`)."""
        return Snapshot(np.array(labels, np.uint8, copy=True),
                        store_format.Corrections(set(self.reviewed), set(self.edited), self.proposal_model,
                                                 self.done))

    def save(self, snapshot: Snapshot) -> Path:
        """Write a snapshot into the store (atomically); safe to call from a worker thread."""
        return store_format.write(self.store, self.source, snapshot.labels, snapshot.corrections, self.images)

    # ------------------------------------------------------------------ the model
    @property
    def model_name(self) -> str:
        """How the store records the current model: its path, or the shipped model's name."""
        return str(self.model_path) if self.model_path else store_format.SHIPPED_MODEL_NAME

    def set_model(self, path: str | Path | None) -> None:
        self.model_path = Path(path) if path else None

    def predictor(self, device: str = "auto", tta: bool = False):
        """The current model on `device`, loaded once and reused while nothing changes."""
        from napari_unet.modelfile import load_model
        from napari_unet.predict import Predictor

        key = (self.model_name, device, bool(tta))
        with self._lock:
            if self._predictor_key != key:
                self._predictor = Predictor(load_model(self.model_path), device, tta=tta)
                self._predictor_key = key
            return self._predictor

    def predict(self, slices: list[int] | None = None, *, device: str = "auto", tta: bool = False,
                progress: Callable | None = None, cancel: Callable | None = None):
        """Propose labels for the whole case or `slices`; returns (Prediction, warning or None).

        Out of GPU memory, it carries on on the CPU and says so.
        """
        from napari_unet.predict import resolve_device

        predictor = self.predictor(device, tta)
        self._prepare(predictor)
        kwargs = dict(slices=slices, with_uncertainty=True, with_log_probs=not tta, progress=progress, cancel=cancel)
        try:
            prediction, warning = predictor.predict(self._prepared, **kwargs), None
        except RuntimeError as err:
            if "out of memory" not in str(err).lower() or resolve_device(device).type == "cpu":
                raise
            device = "cpu"
            prediction, warning = self.predictor(device, tta).predict(self._prepared, **kwargs), \
                "GPU out of memory: ran on the CPU"
        if prediction.log_probs is not None:  # the clicks that follow weigh what was just computed
            self.click_evidence(device).keep(prediction.computed_slices, prediction.log_probs)
            prediction.log_probs = None
        return prediction, warning

    def _prepare(self, predictor) -> None:
        from napari_unet.modelfile import input_stack

        key = (predictor.modalities, tuple(predictor.metadata.get("required_modalities", ())))
        if self._prepared_key != key:
            self._prepared = predictor.prepare(input_stack(predictor.metadata, self.images,
                                                           self.source.path or self.case_id),
                                               voxel_ml=self.source.voxel_ml)
            self._prepared_key = key

    def click_evidence(self, device: str = "auto"):
        """What click prompts weigh: the current model's log-probabilities on this case, computed
        slice by slice as clicks need them and kept until the model changes."""
        from napari_unet.prompts import ClickEvidence

        predictor = self.predictor(device)
        self._prepare(predictor)
        if self._evidence is None or self._evidence.predictor is not predictor \
                or self._evidence.volume is not self._prepared:
            self._evidence = ClickEvidence(predictor, self._prepared)
        return self._evidence

    def reuse_model_state(self, other: "AnnotationSession") -> None:
        """Take over what `other`, a session of the same case images (the one that proposed it
        ahead), loaded and computed: the predictor, the prepared volume and the clicks' evidence."""
        if other is self or other.model_name != self.model_name:
            return
        with self._lock:
            self._predictor, self._predictor_key = other._predictor, other._predictor_key
            self._prepared, self._prepared_key = other._prepared, other._prepared_key
            self._evidence = other._evidence

    def has_click_evidence(self) -> bool:
        return self._evidence is not None and self._evidence.predictor is self._predictor

    def finetuned_model_path(self) -> Path:
        """Where the next fine-tuned model goes: beside the store, named by the time."""
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = self.store.parent / f"{self.store.name}-models"
        path = folder / f"finetuned-{stamp}.safetensors"
        n = 1
        while path.exists():
            n += 1
            path = folder / f"finetuned-{stamp}-{n}.safetensors"
        return path

    @property
    def teaches(self) -> bool:
        """Whether this case has slices a fine-tune learns from (reviewed ones, or all when done)."""
        return bool(self.reviewed or self.done)

    def finetune(self, *, steps: int | None = None, device: str = "auto", progress: Callable | None = None,
                 cancel: Callable | None = None):
        """Fine-tune the current model on the store (save first); the result becomes current."""
        if not self.teaches:
            raise NapariUnetError(NOTHING_TO_TEACH)
        from training.loop import FINETUNE, finetune

        result = finetune(self.store, self.model_path, self.finetuned_model_path(),
                          settings=FINETUNE.updated(device=device, steps=steps),
                          cancel=cancel, progress=progress)
        self.set_model(result.path)
        return result


def taught_by(metadata: dict) -> str:
    """What a fine-tuned model learned from, in words: "12 reviewed slices of 3 cases and 2 whole
    cases" (the store's every case counts, not only the one on screen)."""
    corrections = metadata.get("training", {}).get("corrections", [])
    whole = sum(1 for c in corrections if c.get("slices") == "all")
    partial = [c for c in corrections if c.get("slices") != "all"]
    slices = sum(len(c.get("slices", [])) for c in partial)
    parts = []
    if partial:
        parts.append(f"{slices} reviewed slice{'s' * (slices != 1)} of {len(partial)} case{'s' * (len(partial) != 1)}")
    if whole:
        parts.append(f"{whole} whole case{'s' * (whole != 1)}")
    return " and ".join(parts) or "no corrections"

