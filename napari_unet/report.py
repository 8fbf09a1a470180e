"""A report of a dataset's labels: one row per case, volumes in mL, review state, Dice.

Each path given is one of two kinds:

- a folder whose NIfTI files lie at its top and is not itself a BraTS case folder: the output
  of `napari-unet predict`, one `<case_id>.nii.gz` per case, with no review state;
- anything else is read as a corrections store (or any dataset root the reader knows): its cases
  are found as `list_dataset` finds them, the review state comes from each case's
  corrections.json, and labels without one count as fully annotated, as fine-tuning takes them.

Volumes are those recorded in corrections.json when there; otherwise (a prediction, a store
case saved by another tool) they are computed from the label file. Dice needs a reference:
`reference` (a dataset root, a Decathlon task or a folder of `<case_id>.nii.gz`) matched by case
id, as `napari-unet evaluate` matches its truth; a case without one has no Dice.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

from napari_unet import NapariUnetError
from napari_unet import store as store_format
from napari_unet.cases import case_id_of, find_case, find_cases, is_nifti, read_labels
from napari_unet.labels import REGIONS, VOLUME_KEYS, region_mask, volumes_ml

# The CSV's volume columns, in VOLUME_KEYS order.
VOLUME_COLUMNS = ("necrotic_core_ml", "edema_ml", "enhancing_ml", "WT_ml", "TC_ml", "ET_ml")
COLUMNS = ("case", *VOLUME_COLUMNS, "reviewed_slices", "done", "model",
           *(f"dice_{r}" for r in REGIONS), "labels")


@dataclass
class Row:
    case_id: str
    labels: Path
    volumes_ml: dict[str, float]  # labels.VOLUME_KEYS
    reviewed: int | None = None  # None: no review state (a prediction)
    done: bool | None = None
    model: str | None = None
    dice: dict[str, float] = field(default_factory=dict)  # by region; empty: no reference

    def csv_values(self) -> list[str]:
        volumes = [f"{self.volumes_ml[k]:.4f}" for k in VOLUME_KEYS]
        dice = [f"{self.dice[r]:.4f}" if r in self.dice else "" for r in REGIONS]
        return [self.case_id, *volumes, "" if self.reviewed is None else str(self.reviewed),
                "" if self.done is None else str(self.done).lower(), self.model or "", *dice, str(self.labels)]


def is_predictions_folder(path: Path) -> bool:
    """NIfTI files at the folder's top, and not a case folder or a Decathlon task."""
    if not path.is_dir() or (path / "imagesTr").is_dir():
        return False
    try:
        if not any(is_nifti(p) and not p.name.startswith(".") for p in path.iterdir() if p.is_file()):
            return False
    except OSError as err:
        raise NapariUnetError(f"{path}: cannot list the folder ({err.strerror or err})") from None
    try:
        find_case(path)
    except NapariUnetError:
        return True
    return False


def report(paths: list[str | os.PathLike], reference: str | os.PathLike | None = None, progress=None) -> list[Row]:
    """One Row per case of every path, in the order given."""
    references = _references(Path(reference)) if reference is not None else {}
    found: list[tuple[str, Path, store_format.Summary | None]] = []
    for path in map(Path, paths):
        if not path.exists():
            raise NapariUnetError(f"{path}: no such file or folder")
        if is_predictions_folder(path):
            files = sorted(p for p in path.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("."))
            found += [(case_id_of(p), p, None) for p in files]
            continue
        for case in find_cases(path):
            files = find_case(case)
            if files.seg is None:
                continue  # a case not annotated yet: nothing to report
            root = case.parent.parent if files.layout == "msd" else case.parent
            summary = store_format.summary(root, files.layout, files.case_id) if files.layout != "single" else None
            found.append((files.case_id, files.seg, summary))
    if not found:
        raise NapariUnetError(f"{', '.join(map(str, paths))}: no label files found (no segmentations, "
                              "no predictions)")
    rows = []
    for i, (case_id, seg, summary) in enumerate(found):
        rows.append(_row(case_id, seg, summary, references.get(case_id)))
        if progress:
            progress(i + 1, len(found))
    return rows


def _row(case_id: str, seg: Path, summary, reference: Path | None) -> Row:
    recorded = summary.volumes_ml if summary is not None else None
    labels = source = None
    if recorded is None or reference is not None:
        labels, source = read_labels(seg)
    row = Row(case_id, seg, recorded if recorded is not None else volumes_ml(labels, source.voxel_ml))
    if summary is not None:
        row.reviewed, row.done, row.model = summary.reviewed, summary.done, summary.model
    if reference is not None:
        row.dice = _dice(labels, source, seg, reference)
    return row


def _dice(labels, source, seg: Path, reference: Path) -> dict[str, float]:
    from napari_unet.evaluation import _grid_offset_mm
    from napari_unet.metrics import dice

    truth, truth_source = read_labels(reference)
    if truth.shape != labels.shape:
        raise NapariUnetError(f"{seg}: shape {labels.shape} differs from the reference {reference} {truth.shape}")
    offset = _grid_offset_mm(source, truth_source)
    if offset > 0.5:
        raise NapariUnetError(f"{seg}: its voxels lie {offset:.1f} mm away from those of the reference {reference}")
    return {r: dice(region_mask(labels, r), region_mask(truth, r)) for r in REGIONS}


def _references(path: Path) -> dict[str, Path]:
    from napari_unet.evaluation import _label_files

    if not path.exists():
        raise NapariUnetError(f"{path}: no such file or folder (--reference)")
    return _label_files(path, "pred" if is_predictions_folder(path) else "truth")


def to_csv(rows: list[Row]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(r.csv_values() for r in rows)
    return out.getvalue()


def write_csv(rows: list[Row], path: str | os.PathLike) -> Path:
    """The CSV, written whole or not at all (a reader never sees half a report)."""
    from napari_unet.atomic import atomic_path

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(to_csv(rows), encoding="utf-8")
    except OSError as err:
        raise NapariUnetError(f"{path}: cannot write the CSV ({err.strerror or err})") from None
    return path


_TABLE = (("NCR mL", "necrotic core"), ("ED mL", "edema"), ("ET mL", "enhancing tumour"), ("WT mL", "WT"),
          ("TC mL", "TC"))


def format_table(rows: list[Row]) -> str:
    """The report as text, like `napari-unet cases`: enhancing is the ET region, one column."""
    header = ["case", *(h for h, _ in _TABLE), "reviewed", "done", "model", *(f"Dice {r}" for r in REGIONS)]
    lines = []
    for r in rows:
        reviewed = "-" if r.reviewed is None else str(r.reviewed)
        done = "-" if r.done is None else ("yes" if r.done else "no")
        model = "-" if r.model is None else Path(r.model).name
        dice = [f"{r.dice[g]:.4f}" if g in r.dice else "-" for g in REGIONS]
        lines.append([r.case_id, *(f"{r.volumes_ml[k]:.2f}" for _, k in _TABLE), reviewed, done, model, *dice])
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    text = {0, 7, 8}  # case, done, model: left-aligned; numbers right-aligned

    def line(cells):
        cells = zip(cells, widths)
        return "  ".join(c.ljust(w) if i in text else c.rjust(w) for i, (c, w) in enumerate(cells)).rstrip()

    with_dice = sum(bool(r.dice) for r in rows)
    return "\n".join([line(header), *map(line, lines), "", f"{len(rows)} case(s), {with_dice} with a reference"])
