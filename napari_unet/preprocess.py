"""Pre-processing shared by training and inference (its parameters live in the model file).

z-score per modality inside the brain (the non-zero voxels of a skull-stripped case), zero
outside; crop to the brain's bounding box (with a margin).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from napari_unet import NapariUnetError


@dataclass(frozen=True)
class Normalisation:
    method: str = "zscore-brain"
    crop: str = "brain-box"
    margin: int = 4  # voxels kept around the brain in-plane

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Normalisation":
        known = {k: data[k] for k in ("method", "crop", "margin") if k in data}
        norm = cls(**known)
        if norm.method != "zscore-brain":
            raise NapariUnetError(f"unknown normalisation method {str(norm.method)[:40]!r}")
        if norm.crop != "brain-box":
            raise NapariUnetError(f"unknown crop {str(norm.crop)[:40]!r}")
        if not isinstance(norm.margin, int) or isinstance(norm.margin, bool) or not 0 <= norm.margin <= 64:
            raise NapariUnetError(f"normalisation margin must be a whole number of voxels from 0 to 64, "
                                  f"not {str(norm.margin)[:40]}")
        return norm


def brain_mask(stack: np.ndarray) -> np.ndarray:
    """(C, *S) -> bool (*S): voxels where any modality is non-zero."""
    return np.any(stack != 0, axis=0)


def zscore(stack: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-channel z-score over the brain; 0 outside it. (C, *S) float32."""
    out = np.zeros(stack.shape, np.float32)
    for c in range(stack.shape[0]):
        values = stack[c][mask]
        if values.size == 0:
            continue
        mean = float(values.mean(dtype=np.float64))
        std = float(values.std(dtype=np.float64)) or 1.0
        out[c][mask] = (values - mean) / std
    return out


def brain_box(mask: np.ndarray, margin: int = 4) -> tuple[slice, ...]:
    """Bounding box of the brain (Z, Y, X): the slices holding brain, in-plane with a margin."""
    if not mask.any():
        return tuple(slice(0, 0) for _ in mask.shape)
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        pad = 0 if axis == 0 else margin  # slices without brain need no prediction
        box.append(slice(max(0, hits[0] - pad), min(mask.shape[axis], hits[-1] + 1 + pad)))
    return tuple(box)


def prepare(stack: np.ndarray, norm: Normalisation) -> tuple[np.ndarray, tuple[slice, ...], np.ndarray]:
    """Raw (C, Z, Y, X) -> (normalised crop, its box in the volume, brain mask of the crop)."""
    mask = brain_mask(stack)
    box = brain_box(mask, norm.margin)
    crop = stack[(slice(None),) + box]
    crop_mask = mask[box]
    return zscore(crop, crop_mask), box, crop_mask
