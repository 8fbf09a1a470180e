"""The state of one case's annotation, without Qt: reviewed slices, the corrections store.

The widget keeps one `AnnotationSession` per open case and calls it for every decision that
is not about drawing: which slices are protected from new proposals, which to review next,
what goes into the corrections store and how it comes back when the case is opened again.

Store layout (the format `training.data.load_store` reads): the case in its own layout and
label convention, plus `corrections.json` beside its files:

    STORE/BraTS2021_00001/BraTS2021_00001_{t1,t1ce,t2,flair,seg}.nii.gz
    STORE/BraTS2021_00001/corrections.json   {"reviewed_slices": [file axial indices], ...}
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path

import numpy as np

from napari_unet import NapariUnetError
from napari_unet.atomic import atomic_path, write_text
from napari_unet.cases import Case, CaseSource, layout_paths, read_labels, write_case_files, write_labels
from napari_unet.store import corrections_path


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


class AnnotationSession:
    """Reviewed slices (display axial indices) of one case and its place in a corrections store."""

    def __init__(self, source: CaseSource, store: str | os.PathLike):
        if source.layout == "single":
            raise NapariUnetError(
                f"{source.path}: a single image cannot go into a corrections store; open the whole case folder"
            )
        self.source = source
        self.store = Path(store)
        self.reviewed: set[int] = set()
        self.edited: set[int] = set()

    # ------------------------------------------------------------------ where things go
    @property
    def case_id(self) -> str:
        return self.source.case_id

    def paths(self) -> tuple[dict[str, Path], Path]:
        return layout_paths(self.store, self.source.layout, self.case_id)

    @property
    def case_path(self) -> Path:
        images, _ = self.paths()
        first = next(iter(images.values()))
        return first if self.source.layout == "msd" else first.parent

    @property
    def corrections_file(self) -> Path:
        return corrections_path(self.case_path)

    # ------------------------------------------------------------------ review state
    def protected(self) -> set[int]:
        """Slices a new proposal must not overwrite."""
        return self.reviewed | self.edited

    def mark_reviewed(self, z: int, reviewed: bool = True) -> None:
        (self.reviewed.add if reviewed else self.reviewed.discard)(int(z))

    def record_edits(self, slices) -> None:
        for z in slices:
            self.edited.add(int(z))
            self.reviewed.add(int(z))  # an edited slice has been looked at

    def unprotected(self, slices) -> np.ndarray:
        """The slices among `slices` that a new proposal may overwrite."""
        slices = np.asarray(slices, int)
        return slices[~np.isin(slices, sorted(self.protected()))]

    def merge_proposal(self, current: np.ndarray, proposal: np.ndarray, computed=None) -> np.ndarray:
        """The current labels with the proposal on every unprotected (computed) slice."""
        out = current.copy()
        take = self.unprotected(np.arange(current.shape[0]) if computed is None else computed)
        out[take] = proposal[take]
        return out

    def next_to_review(self, slice_scores: np.ndarray, after: int | None = None) -> int | None:
        """The most uncertain slice not yet reviewed (NaN scores: no brain, never offered)."""
        scores = np.asarray(slice_scores, float).copy()
        scores[list(self.reviewed)] = np.nan
        if np.all(np.isnan(scores)):
            return None
        return int(np.nanargmax(scores))

    # ------------------------------------------------------------------ the store
    def save(self, labels: np.ndarray, case: Case | None = None, *, model: str | None = None,
             reviewed: set[int] | None = None, edited: set[int] | None = None) -> Path:
        """Write the labels and corrections.json into the store (atomically, images once).

        `reviewed` and `edited` default to the session's own (pass copies from another thread).
        """
        reviewed = self.reviewed if reviewed is None else reviewed
        edited = self.edited if edited is None else edited
        images, seg = self.paths()
        missing = [p for p in dict.fromkeys(images.values()) if not p.exists()]
        if missing:
            self._store_images(images, case)
        write_labels(labels, self.source, seg)
        record = {
            "reviewed_slices": sorted(self.source.axial_to_file_index(z) for z in reviewed),
            "edited_slices": sorted(self.source.axial_to_file_index(z) for z in edited),
            "axis": "third voxel axis of the NIfTI files",
            "label_convention": self.source.convention,
            "model": model,
            "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_text(self.corrections_file, json.dumps(record, indent=1))
        return self.case_path

    def _store_images(self, images: dict[str, Path], case: Case | None) -> None:
        files = self.source.files
        if self.source.layout == "msd" and files.get("flair") and Path(files["flair"]).exists():
            _copy_atomic(Path(files["flair"]), images["flair"])
            return
        if all(Path(files.get(m, "")).is_file() for m in images):
            for modality, dst in images.items():
                _copy_atomic(Path(files[modality]), dst)
            return
        if case is None:
            raise NapariUnetError(f"{self.source.path}: the case's image files are gone; cannot fill the store")
        # An in-memory case (the synthetic sample): write its images in its layout.
        arrays = {m: self.source.to_file(v) for m, v in case.images.items()}
        write_case_files(self.store, self.source.layout, self.case_id, arrays, None, np.asarray(self.source.affine),
                         image_dtype=np.float32)

    def restore(self) -> np.ndarray | None:
        """Labels and reviewed slices saved earlier for this case (None if never saved)."""
        _, seg = self.paths()
        if not seg.exists():
            return None
        labels, _ = read_labels(seg, self.source.convention)
        if self.corrections_file.exists():
            data = json.loads(self.corrections_file.read_text())
            self.reviewed = {self.source.file_to_axial_index(z) for z in data.get("reviewed_slices", [])}
            self.edited = {self.source.file_to_axial_index(z) for z in data.get("edited_slices", [])}
        return labels

