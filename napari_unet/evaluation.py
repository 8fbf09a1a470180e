"""Evaluate predicted label files against the truth: Dice and HD95 per BraTS region."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from napari_unet import NapariUnetError
from napari_unet.cases import CaseSource, case_id_of, find_case, find_cases, is_nifti, read_labels
from napari_unet.metrics import mean_scores, region_scores


def _label_files(path: Path, side: str) -> dict[str, Path]:
    """case id -> label file, for a file, a case folder or a folder of either."""
    if path.is_file():
        return {case_id_of(path): path}
    if not path.is_dir():
        raise NapariUnetError(f"{path}: no such file or folder")
    flat = sorted(p for p in path.iterdir() if p.is_file() and is_nifti(p))
    if side == "pred" and flat:
        return {case_id_of(p): p for p in flat}
    if (path / "labelsTr").is_dir():
        return {case_id_of(p): p for p in sorted((path / "labelsTr").iterdir()) if is_nifti(p)}
    out = {}
    for case in find_cases(path):
        files = find_case(case)
        if files.seg is not None:
            out[files.case_id] = files.seg
    if not out:
        raise NapariUnetError(f"{path}: no segmentation files found")
    return out


def evaluate(pred: str | os.PathLike, truth: str | os.PathLike, progress=None) -> dict:
    """{"cases": {id: {region: {"dice", "hd95"}}}, "mean": {...}} for matching case ids."""
    pred, truth = Path(pred), Path(truth)
    preds, truths = _label_files(pred, "pred"), _label_files(truth, "truth")
    if pred.is_file() and truth.is_file():
        pairs = {next(iter(truths)): (pred, truth)}
    else:
        common = sorted(set(preds) & set(truths))
        if not common:
            raise NapariUnetError(
                f"no case ids in common between {pred} ({len(preds)} files) and {truth} ({len(truths)} cases)"
            )
        pairs = {cid: (preds[cid], truths[cid]) for cid in common}
    cases = {}
    for i, (cid, (p, t)) in enumerate(pairs.items()):
        p_lab, p_src = read_labels(p)
        t_lab, t_src = read_labels(t)
        if p_lab.shape != t_lab.shape:
            raise NapariUnetError(f"{p}: shape {p_lab.shape} differs from the truth {t} {t_lab.shape}")
        offset = _grid_offset_mm(p_src, t_src)
        if offset > 0.5:
            raise NapariUnetError(f"{p}: its voxels lie {offset:.1f} mm away from those of the truth {t}; "
                                  "the prediction is not on the truth's grid")
        cases[cid] = region_scores(p_lab, t_lab, t_src.spacing)
        if progress:
            progress(i + 1, len(pairs))
    return {"cases": cases, "mean": mean_scores(cases)}


def _grid_offset_mm(a: CaseSource, b: CaseSource) -> float:
    """The largest distance between the world positions of the same display voxel in two label
    files, over the corners of the volume."""
    shape = a.to_display(np.empty(a.shape, np.uint8)).shape
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    return float(np.abs((a.display_affine() - b.display_affine()) @ corners.T).max())


def format_table(result: dict) -> str:
    regions = list(result["mean"])
    header = f"{'case':<28}" + "".join(f"{r + ' Dice':>10}{r + ' HD95':>10}" for r in regions)
    rows = [header, "-" * len(header)]
    for cid, scores in result["cases"].items():
        rows.append(f"{cid:<28}" + "".join(f"{scores[r]['dice']:>10.4f}{scores[r]['hd95']:>10.2f}" for r in regions))
    rows.append("-" * len(header))
    rows.append(f"{'mean':<28}" + "".join(
        f"{result['mean'][r]['dice']:>10.4f}{result['mean'][r]['hd95']:>10.2f}" for r in regions))
    return "\n".join(rows)
