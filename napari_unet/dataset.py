"""A dataset as a worklist, without Qt: its cases listed with their state, and the next case.

`list_dataset` finds the cases of any root the reader knows (a BraTS root, a Decathlon task, a
folder of case folders, nested as Kaggle mounts them) and reads each one's state from its
corrections.json in the store alone: no image is opened, so hundreds of cases list in well under
a second. `next_case` picks the case to annotate next, in order or where the model is least sure;
`score_cases` computes that case-level uncertainty (the one part here that reads images and runs
the model; torch is imported only there) and caches it in the store per model file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_unet import NapariUnetError
from napari_unet import store as store_format
from napari_unet.cases import find_case, find_cases
from napari_unet.labels import LABEL_NAMES

NOT_STARTED, IN_PROGRESS, DONE, UNREADABLE = "not started", "in progress", "done", "unreadable"
ORDERS = ("uncertainty", "order")
# Slices scored per case: enough to see the tumour in a few of them, few enough to take about a
# second on a CPU. Evenly spaced over the brain.
SCORE_SLICES = 16
# The ring around the predicted tumour whose uncertainty counts: where its border is decided.
SCORE_MARGIN_MM = 5.0
# Where the model predicts no tumour at all, the voxels at least this unsure are scored instead.
SCORE_DOUBT = 0.2


@dataclass
class CaseEntry:
    """One case of a dataset as the case list shows it."""

    case_id: str
    path: Path  # the case in the dataset: its folder, or a Decathlon image
    store: Path  # the corrections store its annotation goes to
    status: str  # NOT_STARTED, IN_PROGRESS, DONE or UNREADABLE
    reviewed: int = 0  # slices reviewed one by one (a done case may list fewer: all count)
    volumes_ml: dict[str, float] | None = None  # labels.VOLUME_KEYS; None: unknown or not started
    model: str | None = None  # the model that made its labels' proposals (SHIPPED_MODEL_NAME or a path)
    saved: str | None = None  # the last save (ISO 8601)
    layout: str = ""
    error: str | None = None  # why the case cannot be listed (UNREADABLE)

    @property
    def done(self) -> bool:
        return self.status == DONE


def list_dataset(root: str | os.PathLike, store: str | os.PathLike | None = None) -> list[CaseEntry]:
    """The cases under `root`, each with its state in `store` (default: the store beside each
    case, where the widget puts it). Reads directory listings and corrections.json files only.

    A case that cannot be listed (gone, unreadable, a damaged corrections.json) is an UNREADABLE
    entry naming the problem: one bad case does not hide the others.
    """
    chosen = Path(store) if store is not None else None
    paths = find_cases(root)
    if chosen is not None:  # a store kept inside the dataset is not part of it
        inside = os.path.abspath(chosen) + os.sep
        paths = [p for p in paths if not os.path.abspath(p).startswith(inside)]
    return [_entry(p, chosen if chosen is not None else store_format.default_store(p)) for p in paths]


def _entry(path: Path, store: Path) -> CaseEntry:
    try:
        files = find_case(path)
        summary = store_format.summary(store, files.layout, files.case_id)
    except (NapariUnetError, OSError) as err:
        message = str(err) if isinstance(err, NapariUnetError) else f"{path}: {err.strerror or err}"
        return CaseEntry(_case_id(path), path, store, UNREADABLE, error=message)
    if summary is None:
        return CaseEntry(files.case_id, path, store, NOT_STARTED, layout=files.layout)
    return CaseEntry(files.case_id, path, store, DONE if summary.done else IN_PROGRESS, summary.reviewed,
                     summary.volumes_ml, summary.model, summary.saved, files.layout)


def _case_id(path: Path) -> str:
    from napari_unet.cases import case_id_of, is_nifti

    return case_id_of(path) if is_nifti(path) else path.name


# --------------------------------------------------------------------------- the next case


def next_case(entries: list[CaseEntry], order: str = "uncertainty", current: str | None = None,
              scores: dict[str, float] | None = None) -> CaseEntry | None:
    """The case to annotate after `current` (a case id; None: from the start). None: all done.

    "order": the first case not started after the current one in the list (wrapping round),
    then likewise the first in progress. "uncertainty": of the cases not started, the one with
    the highest score (`score_cases`); cases without a score, or none left to start, as "order".
    """
    if order not in ORDERS:
        raise NapariUnetError(f"unknown order {order!r} (use {' or '.join(ORDERS)})")
    ids = [e.case_id for e in entries]
    start = ids.index(current) + 1 if current in ids else 0
    after = [e for e in entries[start:] + entries[:start] if e.case_id != current]
    if order == "uncertainty" and scores:
        scored = [e for e in after if e.status == NOT_STARTED and np.isfinite(scores.get(e.case_id, np.nan))]
        if scored:
            return max(scored, key=lambda e: scores[e.case_id])  # ties: the first after the current
    for status in (NOT_STARTED, IN_PROGRESS):
        for entry in after:
            if entry.status == status:
                return entry
    return None


def case_uncertainty(predictor, case, *, slices: int = SCORE_SLICES, margin_mm: float = SCORE_MARGIN_MM) -> float:
    """How unsure `predictor` is of a case: the mean normalised entropy of its softmax (0 sure, 1
    uniform) over the predicted tumour and a `margin_mm` ring around it, on `slices` slices spread
    over the brain.

    A mean, not a sum: a large tumour the model is sure of must not outrank a small one it is
    not. Only the tumour and its ring: the brain far from it is background the model is sure of
    in every case, and voxels of middling doubt elsewhere would pull an unusual case's mean down
    towards a normal one's. Where no tumour is predicted, the voxels more doubtful than
    SCORE_DOUBT are scored (0 if none); a case without any brain (a blank image) scores 1, so
    that it is looked at first.
    """
    from scipy import ndimage

    volume = predictor.prepare_case(case)
    brain = volume.brain_slices()
    if not len(brain):
        return 1.0
    chosen = np.unique(brain[np.linspace(0, len(brain) - 1, min(slices, len(brain))).round().astype(int)])
    prediction = predictor.predict(volume, slices=chosen, with_uncertainty=True)
    uncertainty = prediction.uncertainty[chosen]
    tumour = prediction.labels[chosen] > 0
    in_plane_mm = float(min(case.source.spacing[1:]))
    steps = max(1, int(round(margin_mm / in_plane_mm)))
    ring = ndimage.binary_dilation(tumour, structure=ndimage.generate_binary_structure(3, 1)[1:2], iterations=steps)
    region = np.zeros_like(tumour)
    region[(slice(None),) + volume.box[1:]] = volume.mask[chosen - volume.box[0].start]
    region &= ring if tumour.any() else uncertainty > SCORE_DOUBT
    return float(uncertainty[region].mean()) if region.any() else 0.0


def score_cases(entries: list[CaseEntry], model: str | os.PathLike | None = None, *, device: str = "auto",
                progress: Callable[[int, int], None] | None = None, cancel: Callable[[], bool] | None = None,
                log: Callable[[str], None] | None = None) -> dict[str, float]:
    """Case-level uncertainty (`case_uncertainty`) of every case not started, by case id.

    Scores are cached in each case's store per model file (by its SHA-256: a fine-tuned model
    scores afresh) and only missing ones are computed. A case that cannot be read is left out
    with a message to `log`; `cancel()` stops between cases, keeping what was scored.
    """
    from napari_unet.modelfile import default_model_path

    model_file = Path(model) if model else default_model_path()
    if not model_file.is_file():
        raise NapariUnetError(f"{model_file}: no such model file")
    todo = [e for e in entries if e.status == NOT_STARTED]
    sha = store_format.file_sha256(model_file)
    scores: dict[str, float] = {}
    for store in {e.store for e in todo}:
        wanted = {e.case_id for e in todo if e.store == store}
        scores |= {k: v for k, v in store_format.read_case_scores(store, sha).items() if k in wanted}
    missing = [e for e in todo if e.case_id not in scores]
    if progress:
        progress(0, len(missing))
    if not missing:
        return scores
    from napari_unet.cases import read_case
    from napari_unet.modelfile import load_model
    from napari_unet.predict import Predictor

    predictor = Predictor(load_model(model), device)
    name = str(model) if model else store_format.SHIPPED_MODEL_NAME
    for i, entry in enumerate(missing):
        if cancel is not None and cancel():
            break
        try:
            score = case_uncertainty(predictor, read_case(entry.path, with_labels=False))
        except NapariUnetError as err:
            if log:
                log(f"not scored: {err}")
        else:
            scores[entry.case_id] = score
            store_format.write_case_scores(entry.store, sha, {entry.case_id: score}, name)
        if progress:
            progress(i + 1, len(missing))
    return scores


# --------------------------------------------------------------------------- the table


# Enhancing tumour is both a tissue and the ET region: one column.
_TABLE_VOLUMES = {"NCR": LABEL_NAMES[1], "ED": LABEL_NAMES[2], "ET": LABEL_NAMES[3], "WT": "WT", "TC": "TC"}


def format_table(entries: list[CaseEntry]) -> str:
    """The case list as text: id, status, reviewed slices, volumes in mL, model; problems below."""
    header = ["case", "status", "reviewed", *(f"{k} mL" for k in _TABLE_VOLUMES), "model"]
    rows = []
    for e in entries:
        if e.volumes_ml is not None:
            volumes = [f"{e.volumes_ml[k]:.2f}" for k in _TABLE_VOLUMES.values()]
        else:  # not started: nothing to measure; saved before volumes were recorded: unknown
            volumes = ["-" if e.status in (NOT_STARTED, UNREADABLE) else "?"] * len(_TABLE_VOLUMES)
        reviewed = "all" if e.done else str(e.reviewed) if e.status == IN_PROGRESS else "-"
        model = "-" if e.model is None else Path(e.model).name
        rows.append([e.case_id, e.status, reviewed, *volumes, model])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    numeric = set(range(2, 3 + len(_TABLE_VOLUMES)))

    def line(cells):
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    counts = {s: sum(e.status == s for e in entries) for s in (DONE, IN_PROGRESS, NOT_STARTED, UNREADABLE)}
    total = ", ".join(f"{n} {s}" for s, n in counts.items() if n or s != UNREADABLE)
    out = [line(header), *(line(r) for r in rows), "", f"{len(entries)} case(s): {total}"]
    if any(e.volumes_ml is None and e.status in (IN_PROGRESS, DONE) for e in entries):
        out.append("?: volumes not recorded (saved by an older napari-unet or another tool); "
                   "saving the case in napari-unet records them")
    out += [f"{e.case_id}: {e.error}" for e in entries if e.error]
    return "\n".join(out)
