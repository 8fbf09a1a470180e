"""The corrections store: the one module that writes and reads it.

A store is a folder of cases in their own layout and label convention, each with a
`corrections.json` beside its files:

    STORE/BraTS2021_00001/BraTS2021_00001_{t1,t1ce,t2,flair,seg}.nii.gz
    STORE/BraTS2021_00001/corrections.json
        {"reviewed_slices": [...], "edited_slices": [...], "done": false, "axis": ..., "model": ...,
         "volumes_ml": {...}, "saved": ...}

Slice index: a slice is numbered along the file's voxel axis that runs closest to the head's
superior-inferior axis, counting in the file's own voxel order (for BraTS files: the third
voxel axis). That holds for any orientation; `CaseSource` converts it to and from the axial
index of the display. Tools other than napari (ITK-SNAP, 3D Slicer) can write the same store:
only `reviewed_slices` is required.

`done: true` says every slice of the case is reviewed, whatever `reviewed_slices` lists (those
are kept, so that unmarking the case gives back the review as it was). `volumes_ml` holds the
saved labels' volume per tissue and BraTS region (`labels.VOLUME_KEYS`), so that a dataset is
listed from its corrections.json files alone, without reading an image; records written before
it existed have none, and their volumes are unknown until the case is saved again.

`case_uncertainty.json` at the store's top caches the case-level uncertainty of cases not yet
annotated, per model file (by its SHA-256, so a fine-tuned model's scores are its own).

A save is one step as every reader sees it. The segmentation and its corrections.json cannot be
renamed into place together, so the new corrections.json is first written under a hidden
temporary name, holding the SHA-256 of the new segmentation (`segmentation_sha256`); renaming the
segmentation into place is the commit, and corrections.json follows. A kill before the commit
leaves the previous pair; a kill after it leaves the new segmentation with its record still
hidden, and readers take that record because it names the segmentation now in place (no reader
ever pairs new labels with the old review). The next save finishes such a save first, then
removes the temporary files. A corrections.json without `segmentation_sha256` (written by hand,
or by another tool) is simply trusted.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_unet import NapariUnetError
from napari_unet.atomic import atomic_path, commit, file_sha256, partial_path, partials_of, sync_file, write_text
from napari_unet.cases import CaseSource, labels_to_nifti, layout_paths, read_labels, write_case_files
from napari_unet.labels import VOLUME_KEYS, volumes_ml

CORRECTIONS_FILE = "corrections.json"
# The `model` a corrections.json records for proposals of the model shipped with the package
# (any other model is recorded by its file path).
SHIPPED_MODEL_NAME = "default"
AXIS = "the file's voxel axis nearest to superior-inferior, in file voxel order"
# A corrections.json is a few kB; anything far larger is not one (and would be slow to parse).
MAX_CORRECTIONS_BYTES = 4 * 2**20
SCORES_FILE = "case_uncertainty.json"
# The store a case's annotation goes to unless one is chosen: this folder beside the case.
DEFAULT_STORE_NAME = "napari-unet-corrections"
# Scores of this many model files are kept; older ones (models fine-tuned away) are dropped.
SCORED_MODELS_KEPT = 4


@dataclass
class Corrections:
    """The review state of one case, in display axial indices."""

    reviewed: set[int] = field(default_factory=set)
    edited: set[int] = field(default_factory=set)
    model: str | None = None  # the model that made the proposals the labels started from (SHIPPED_MODEL_NAME or a path)
    done: bool = False  # every slice reviewed, whatever `reviewed` holds
    # As last saved (None: unknown); `write` computes them from the labels it writes.
    volumes_ml: dict[str, float] | None = None


def default_store(case_path: str | Path) -> Path:
    """The store beside a case (folder or Decathlon image) when none was chosen."""
    return Path(case_path).parent / DEFAULT_STORE_NAME


def corrections_path(case_dir_or_file: Path) -> Path:
    """Where a store case keeps its corrections.json (Decathlon cases: one file per case)."""
    p = Path(case_dir_or_file)
    if p.is_dir() or not p.name.lower().endswith((".nii", ".nii.gz")):
        return p / CORRECTIONS_FILE
    stem = p.name.split(".nii")[0]
    return p.with_name(f"{stem}.{CORRECTIONS_FILE}")


def case_location(store: str | Path, source: CaseSource) -> tuple[dict[str, Path], Path, Path]:
    """(image files, segmentation file, corrections.json) of `source`'s case inside `store`."""
    return case_location_of(store, source.layout, source.case_id)


def case_location_of(store: str | Path, layout: str, case_id: str) -> tuple[dict[str, Path], Path, Path]:
    """`case_location` from a case's layout and id alone (what finding a case tells, unread)."""
    layout = "brats2021" if layout == "single" else layout
    images, seg = layout_paths(store, layout, case_id)
    case = next(iter(images.values())) if layout == "msd" else seg.parent
    return images, seg, corrections_path(case)


# --------------------------------------------------------------------------- writing


def write(store: str | Path, source: CaseSource, labels: np.ndarray, corrections: Corrections,
          images: dict[str, np.ndarray] | None = None) -> Path:
    """Write the case's labels and corrections.json into `store`, its images the first time.

    `images` (display orientation) are written when the source's files cannot be copied
    (a case made in memory, or whose files have gone). Returns the case's folder or file.
    """
    if source.layout == "single":
        raise NapariUnetError(
            f"{source.path}: a single image cannot go into a corrections store; open the whole case folder"
        )
    image_paths, seg, record_path = case_location(store, source)
    if source.layout != "msd":  # a case lacking a modality is stored without it
        have = set(images or {}) | {m for m in source.files if m != "seg"}
        image_paths = {m: p for m, p in image_paths.items() if m in have}
    _finish_interrupted_save(seg, record_path)  # before its hidden record is swept away below
    # This case's leftovers only: in a Decathlon store every case's files share imagesTr/, and
    # another case's hidden record may be the one its readers must take (see _committed_record).
    for final in (seg, record_path, *image_paths.values()):
        for path in {*partials_of(final), *partials_of(final, _nifti_suffix(final))}:  # copied, or written
            path.unlink(missing_ok=True)
    if not all(p.exists() for p in image_paths.values()):
        _write_images(store, source, image_paths, images)
    record = {
        "reviewed_slices": sorted(source.axial_to_file_index(z) for z in corrections.reviewed),
        "edited_slices": sorted(source.axial_to_file_index(z) for z in corrections.edited),
        "axis": AXIS,
        "done": bool(corrections.done),
        "label_convention": source.convention,
        "model": corrections.model,
        "voxel_ml": source.voxel_ml,
        "volumes_ml": {k: round(v, 6) for k, v in volumes_ml(labels, source.voxel_ml).items()},
        "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    img = labels_to_nifti(labels, source)
    seg_tmp = partial_path(seg, _nifti_suffix(seg))
    record_tmp = partial_path(record_path)
    committed = False
    try:
        seg.parent.mkdir(parents=True, exist_ok=True)
        record_path.parent.mkdir(parents=True, exist_ok=True)
        img.to_filename(str(seg_tmp))  # the temporary name keeps the extension: nibabel compresses by it
        record["segmentation_sha256"] = file_sha256(seg_tmp)
        record_tmp.write_text(json.dumps(record, indent=1))
        sync_file(record_tmp)  # on disk before the commit names it
        commit(seg_tmp, seg)  # the commit: from here readers take the hidden record with it
        committed = True
        commit(record_tmp, record_path)
    finally:
        # Before the commit the previous state stands whole: drop the halves of the new one. After
        # it, a record that could not be renamed is still the one readers take; leave it.
        for tmp in (seg_tmp,) if committed else (seg_tmp, record_tmp):
            if tmp.exists():
                tmp.unlink()
    return record_path.parent if record_path.name == CORRECTIONS_FILE else seg


def _nifti_suffix(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"


def _committed_record(seg: Path, record_path: Path) -> Path:
    """The corrections.json that belongs to the segmentation in place: corrections.json itself, or
    the hidden record of a save killed between its commit and the rename of its record."""
    pending = partials_of(record_path)
    if not pending or not seg.is_file():  # the usual case: nothing to hash
        return record_path
    current = file_sha256(seg)
    if record_path.is_file() and _recorded_sha256(record_path) == current:
        return record_path
    for path in pending:
        if _recorded_sha256(path) == current:
            return path
    return record_path  # hidden records of saves that never committed: not data


def _recorded_sha256(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None  # a record cut short by a kill before its save committed
    return data.get("segmentation_sha256") if isinstance(data, dict) else None


def _finish_interrupted_save(seg: Path, record_path: Path) -> None:
    committed = _committed_record(seg, record_path)
    if committed != record_path:
        os.replace(committed, record_path)


def _write_images(store, source: CaseSource, paths: dict[str, Path], images: dict[str, np.ndarray] | None) -> None:
    files = {m: Path(f) for m, f in source.files.items() if m != "seg"}
    if files and all(files.get(m, Path()).is_file() for m in paths):
        for modality, dst in paths.items():
            with atomic_path(dst) as tmp:
                shutil.copyfile(files[modality], tmp)
        return
    if images is None or not all(m in images for m in paths):
        raise NapariUnetError(f"{source.path or source.case_id}: the case's image files are gone; cannot fill the store")
    arrays = {m: source.to_file(np.asarray(images[m])) for m in paths}
    write_case_files(store, source.layout, source.case_id, arrays, None, np.asarray(source.affine),
                     image_dtype=np.float32)


# --------------------------------------------------------------------------- reading


def read(store: str | Path, source: CaseSource) -> tuple[np.ndarray, Corrections] | None:
    """The labels and review state saved earlier for this case (None: never saved)."""
    _, seg, record_path = case_location(store, source)
    if not seg.exists():
        return None
    labels, _ = read_labels(seg, source.convention)
    expected = tuple(source.to_display(np.empty(source.shape, np.uint8)).shape)
    if labels.shape != expected:
        raise NapariUnetError(f"{seg}: shape {labels.shape} in the store differs from the open case {expected}")
    return labels, _read_record(_committed_record(seg, record_path), source) or Corrections()


def read_corrections(case_dir_or_file: str | Path, source: CaseSource) -> Corrections | None:
    """The validated corrections.json of a store case, in display indices (None: there is none).

    The record taken is the one of the segmentation in place (see the module's docstring).
    """
    record_path = corrections_path(Path(case_dir_or_file))
    seg = Path(source.files["seg"]) if source.files.get("seg") else None
    return _read_record(_committed_record(seg, record_path) if seg else record_path, source)


def read_store_case(case_dir_or_file: str | Path, *, attempts: int = 5):
    """A store case as training reads it: (Case with its labels, its Corrections or None), a pair.

    The segmentation and its record are two files, and a save may commit while they are read: the
    segmentation's hash before and after the read tells, and then the case is read again.
    """
    from napari_unet.cases import find_case, read_case

    path = Path(case_dir_or_file)
    for _ in range(attempts):
        seg = find_case(path).seg
        before = file_sha256(seg) if seg is not None and seg.is_file() else None
        case = read_case(path)
        if before is None:
            return case, read_corrections(path, case.source)
        record = _committed_record(seg, corrections_path(path))
        corrections = _read_record(record, case.source)
        recorded = _recorded_sha256(record) if record.exists() else None
        # A record without a hash (written by hand, or by another tool) is trusted.
        if file_sha256(seg) == before and recorded in (None, before):
            return case, corrections
    raise NapariUnetError(f"{path}: the case kept changing while it was read (is an annotator saving it?); "
                          "try again")


def _read_record(path: Path, source: CaseSource) -> Corrections | None:
    if not path.exists():
        return None
    data = _parse_record(path)
    n_axial = source.axial_size
    reviewed = _slice_list(data, "reviewed_slices", path, n_axial, required=True)
    edited = _slice_list(data, "edited_slices", path, n_axial, required=False)
    edited_display = {source.file_to_axial_index(z) for z in edited}
    reviewed_display = {source.file_to_axial_index(z) for z in reviewed} | edited_display  # edited = looked at
    return Corrections(reviewed_display, edited_display, data.get("model"), data.get("done", False),
                       data.get("volumes_ml"))


def _parse_record(path: Path) -> dict:
    """A corrections.json's object, its optional fields checked (the slices need the case's size)."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise NapariUnetError(f'{path}: expected an object like {{"reviewed_slices": [axial indices]}}')
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise NapariUnetError(f"{path}: 'model' must be a file name or null")
    if not isinstance(data.get("done", False), bool):
        raise NapariUnetError(f"{path}: 'done' must be true or false")
    volumes = data.get("volumes_ml")
    if volumes is not None and not (
            isinstance(volumes, dict) and set(volumes) == set(VOLUME_KEYS)
            and all(_is_number(v) and 0 <= v < 1e7 for v in volumes.values())):
        raise NapariUnetError(f"{path}: 'volumes_ml' must give {', '.join(VOLUME_KEYS)} in mL")
    return data


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


@dataclass
class Summary:
    """What a dataset's case list shows of a store case, read without its images or labels."""

    reviewed: int  # slices listed as reviewed (edited ones included)
    done: bool
    volumes_ml: dict[str, float] | None  # None: unknown (saved before volumes were recorded)
    model: str | None
    saved: str | None  # when, as the record says (ISO 8601)
    has_record: bool  # False: labels without corrections.json, which count as fully annotated


def summary(store: str | Path, layout: str, case_id: str) -> Summary | None:
    """The case's state in `store` from its corrections.json alone (None: not in the store).

    Reads no image data: listing hundreds of cases stays quick. The slices are counted, not
    checked against the volume (which would need its header); opening the case checks them.
    """
    _, seg, record_path = case_location_of(store, layout, case_id)
    if not seg.is_file():
        return None
    record = _committed_record(seg, record_path)  # hashes the labels only after an interrupted save
    if not record.exists():
        return Summary(0, True, None, None, None, has_record=False)
    data = _parse_record(record)
    slices = {key: data.get(key, []) for key in ("reviewed_slices", "edited_slices")}
    for key, value in slices.items():
        if not isinstance(value, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
            raise NapariUnetError(f'{record}: expected "{key}": [axial indices as integers]')
    if "reviewed_slices" not in data:
        raise NapariUnetError(f'{record}: expected "reviewed_slices": [axial indices as integers]')
    saved = data.get("saved")
    return Summary(len(set(slices["reviewed_slices"]) | set(slices["edited_slices"])), data.get("done", False),
                   data.get("volumes_ml"), data.get("model"), saved if isinstance(saved, str) else None,
                   has_record=True)


# --------------------------------------------------------------------------- case scores


def read_case_scores(store: str | Path, model_sha256: str) -> dict[str, float]:
    """Case id -> case-level uncertainty cached for the model file of this SHA-256 ({}: none)."""
    entry = _scores_file(Path(store)).get(model_sha256)
    scores = entry.get("scores") if isinstance(entry, dict) else None
    if not isinstance(scores, dict):
        return {}
    return {str(k): float(v) for k, v in scores.items() if _is_number(v)}


def write_case_scores(store: str | Path, model_sha256: str, scores: dict[str, float], model: str | None = None) -> Path:
    """Add `scores` to the cache of the model of this SHA-256 (the store's one scores file)."""
    store = Path(store)
    cached = _scores_file(store)
    entry = cached.pop(model_sha256, None)
    merged = dict(entry.get("scores", {})) if isinstance(entry, dict) and isinstance(entry.get("scores"), dict) else {}
    merged.update({k: float(v) for k, v in scores.items()})
    cached[model_sha256] = {"model": model, "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                            "scores": merged}
    kept = dict(list(cached.items())[-SCORED_MODELS_KEPT:])  # the latest written last
    path = store / SCORES_FILE
    write_text(path, json.dumps({"models": kept}, indent=1))
    return path


def _scores_file(store: Path) -> dict:
    """The cached scores per model; a damaged or foreign file is a cache miss, never an error."""
    path = store / SCORES_FILE
    if not path.is_file():
        return {}
    try:
        data = _load_json(path)
    except NapariUnetError:
        return {}
    models = data.get("models") if isinstance(data, dict) else None
    return {k: v for k, v in models.items() if isinstance(v, dict)} if isinstance(models, dict) else {}


def _load_json(path: Path):
    try:
        if path.is_dir():
            raise NapariUnetError(f"{path}: is a folder, not a corrections file")
        if path.stat().st_size > MAX_CORRECTIONS_BYTES:
            raise NapariUnetError(f"{path}: {path.stat().st_size / 2**20:.0f} MB is far too large for a corrections file")
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise NapariUnetError(f"{path}: cannot be read ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise NapariUnetError(f"{path}: not a text file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise NapariUnetError(f"{path}: not valid JSON ({err})") from None
    except (RecursionError, ValueError) as err:  # absurd nesting, 5000-digit numbers
        raise NapariUnetError(f"{path}: not a corrections file ({type(err).__name__})") from None


def _slice_list(data: dict, key: str, path: Path, n_axial: int, *, required: bool) -> list[int]:
    if key not in data and not required:
        return []
    slices = data.get(key)
    if not isinstance(slices, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in slices):
        raise NapariUnetError(f'{path}: expected "{key}": [axial indices as integers]')
    bad = [s for s in slices if not 0 <= s < n_axial]
    if bad:
        raise NapariUnetError(f"{path}: {key} {bad[:5]} are outside the volume (0..{n_axial - 1})")
    return slices
