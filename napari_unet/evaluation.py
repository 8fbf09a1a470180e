"""Evaluate predicted label files against the truth: Dice and HD95 per BraTS region."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from napari_unet import NapariUnetError
from napari_unet.cases import _stem, find_case, find_cases, is_nifti, read_labels
from napari_unet.metrics import mean_scores, region_scores


def _label_files(path: Path, side: str) -> dict[str, Path]:
    """case id -> label file, for a file, a case folder or a folder of either."""
    if path.is_file():
        return {_stem(path): path}
    if not path.is_dir():
        raise NapariUnetError(f"{path}: no such file or folder")
    flat = sorted(p for p in path.iterdir() if p.is_file() and is_nifti(p))
    if side == "pred" and flat:
        return {_stem(p): p for p in flat}
    if (path / "labelsTr").is_dir():
        return {_stem(p): p for p in sorted((path / "labelsTr").iterdir()) if is_nifti(p)}
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
        p_lab, _ = read_labels(p)
        t_lab, t_src = read_labels(t)
        if p_lab.shape != t_lab.shape:
            raise NapariUnetError(f"{p}: shape {p_lab.shape} differs from the truth {t} {t_lab.shape}")
        cases[cid] = region_scores(p_lab, t_lab, t_src.spacing)
        if progress:
            progress(i + 1, len(pairs))
    return {"cases": cases, "mean": mean_scores(cases)}


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


def mean_dice(result: dict) -> dict[str, float]:
    return {r: float(np.round(v["dice"], 4)) for r, v in result["mean"].items()}
