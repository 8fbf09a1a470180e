"""Dice and the 95th-percentile Hausdorff distance for the BraTS regions, with BraTS's rules."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from napari_unet.labels import REGIONS, region_mask

# BraTS's convention for HD95 when exactly one of prediction and truth is empty: the
# diagonal of the 240 x 240 x 155 mm volume.
EMPTY_HD95 = 373.13


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred.astype(bool), truth.astype(bool)
    denom = p.sum() + t.sum()
    if denom == 0:
        return 1.0
    return float(2.0 * np.logical_and(p, t).sum() / denom)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def hd95(pred: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> float:
    """Symmetric 95th-percentile surface distance in mm (max of the two directed ones)."""
    p, t = pred.astype(bool), truth.astype(bool)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return EMPTY_HD95
    sp, st = _surface(p), _surface(t)
    dist_to_t = ndimage.distance_transform_edt(~st, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return float(max(np.percentile(dist_to_t[sp], 95), np.percentile(dist_to_p[st], 95)))


def region_scores(pred: np.ndarray, truth: np.ndarray, spacing=(1.0, 1.0, 1.0), regions=tuple(REGIONS)) -> dict:
    """{"WT": {"dice": .., "hd95": ..}, "TC": .., "ET": ..} from canonical label volumes."""
    out = {}
    for region in regions:
        p, t = region_mask(pred, region), region_mask(truth, region)
        out[region] = {"dice": dice(p, t), "hd95": hd95(p, t, spacing)}
    return out


def mean_scores(per_case: dict[str, dict]) -> dict:
    regions = next(iter(per_case.values())).keys() if per_case else REGIONS
    return {
        r: {k: float(np.mean([c[r][k] for c in per_case.values()])) for k in ("dice", "hd95")} for r in regions
    }
