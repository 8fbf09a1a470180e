"""Correction tools that change many voxels at once: fill between slices, and cleanup.

Each tool takes the labels (Z, Y, X, canonical) and returns an `Edit`: the new labels and the
axial slices it changed. Slices in `protect` (the reviewed ones) are never changed: the tools
work on a copy and put those slices back, so a tool cannot undo the annotator's review. The
widget applies an Edit as one undoable step and counts its slices as edited.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from napari_unet import NapariUnetError
from napari_unet.labels import ENHANCING, NECROTIC

_FULL_3D = np.ones((3, 3, 3), bool)


@dataclass
class Edit:
    labels: np.ndarray
    changed: list[int]  # axial slices whose voxels differ from the input

    @property
    def empty(self) -> bool:
        return not self.changed


def finish_edit(before: np.ndarray, after: np.ndarray, protect: Iterable[int]) -> Edit:
    protect = [z for z in protect if 0 <= z < before.shape[0]]
    after[protect] = before[protect]
    diff = (after != before).reshape(before.shape[0], -1).any(axis=1)
    return Edit(after, np.flatnonzero(diff).tolist())


def painted_slices(labels: np.ndarray, label: int) -> list[int]:
    """Axial slices that hold `label`."""
    return np.flatnonzero((labels == label).reshape(labels.shape[0], -1).any(axis=1)).tolist()


def gap_to_fill(painted: Iterable[int], z: int) -> tuple[int, int]:
    """The two painted slices that bound the unpainted gap nearest slice `z`: the gap `z` is in,
    or, from a painted slice (the one just painted, typically), the gap it borders; on a tie the
    gap below. Only unpainted slices are filled, as 3D Slicer's "fill between slices" does, so a
    shape the proposal already has on every slice is never overwritten by a guess."""
    painted = sorted(set(int(p) for p in painted))
    if len(painted) < 2:
        where = f"slice {painted[0]} only" if painted else "no slice"
        raise NapariUnetError(f"fill between: the label is on {where}; paint the shape on two slices first")
    gaps = [(a, b) for a, b in zip(painted, painted[1:]) if b - a >= 2]
    if not gaps:
        raise NapariUnetError(f"fill between: the label is on every slice from {painted[0]} to {painted[-1]}; "
                              "there is no unpainted slice between two painted ones")
    return min(gaps, key=lambda g: (0 if g[0] <= z <= g[1] else min(abs(z - g[0]), abs(z - g[1])), g[0]))


def fill_between(labels: np.ndarray, first: int, last: int, label: int, protect: Iterable[int] = ()) -> Edit:
    """The slices strictly between `first` and `last` get `label` where the shape painted on those
    two slices passes through them: morphological contour interpolation (Albu et al. 2008, the
    ITK filter 3D Slicer uses), which follows a shape that moves, grows, splits or merges.
    Voxels of other labels inside the interpolated shape are overwritten; none are removed."""
    lo, hi = sorted((int(first), int(last)))
    if not 0 <= lo < hi < labels.shape[0]:
        raise NapariUnetError(f"fill between: slices {first} and {last} are not two slices of this case "
                              f"(0 to {labels.shape[0] - 1})")
    if hi - lo < 2:
        raise NapariUnetError(f"fill between: slices {lo} and {hi} have no slice between them")
    for z in (lo, hi):
        if not (labels[z] == label).any():
            raise NapariUnetError(f"fill between: slice {z} has no voxel of the label to fill; "
                                  "paint the shape on both end slices first")
    try:
        import itk
    except ImportError:
        raise NapariUnetError("fill between needs itk-morphologicalcontourinterpolation: "
                              "pip install 'napari-unet[napari]'") from None
    block = np.zeros((hi - lo + 1,) + labels.shape[1:], np.uint8)
    block[0] = labels[lo] == label
    block[-1] = labels[hi] == label
    image = itk.image_from_array(block)
    interpolator = itk.MorphologicalContourInterpolator.New(image)
    interpolator.SetAxis(2)  # ITK's axis 2 is numpy's first (axial) axis
    interpolator.Update()
    filled = itk.array_from_image(interpolator.GetOutput()).astype(bool)
    out = labels.copy()
    inner = out[lo + 1 : hi]
    inner[filled[1:-1]] = label
    return finish_edit(labels, out, protect)


def remove_small_pieces(labels: np.ndarray, voxel_ml: float, min_ml: float, protect: Iterable[int] = ()) -> Edit:
    """Every connected piece of tumour (26-connected, all labels together) below `min_ml` removed."""
    from scipy import ndimage

    if min_ml <= 0:
        raise NapariUnetError(f"remove pieces: the size must be above 0 mL, not {min_ml}")
    pieces, n = ndimage.label(labels > 0, structure=_FULL_3D)
    out = labels.copy()
    if n:
        sizes = np.bincount(pieces.ravel())[1:] * voxel_ml
        out[np.isin(pieces, np.flatnonzero(sizes < min_ml) + 1)] = 0
    return finish_edit(labels, out, protect)


def keep_pieces_at(labels: np.ndarray, points: Iterable[tuple[int, int, int]], protect: Iterable[int] = ()) -> Edit:
    """Only the connected pieces of tumour that hold one of `points` (z, y, x) kept."""
    from scipy import ndimage

    points = [tuple(int(round(c)) for c in p) for p in points]
    if not points:
        raise NapariUnetError("keep pieces: click on the tumour to keep first")
    pieces, _ = ndimage.label(labels > 0, structure=_FULL_3D)
    keep = set()
    for p in points:
        if not all(0 <= c < s for c, s in zip(p, labels.shape)):
            raise NapariUnetError(f"keep pieces: the point {p} is outside the case {labels.shape}")
        if pieces[p]:
            keep.add(int(pieces[p]))
    if not keep:
        raise NapariUnetError("keep pieces: no point lies on the tumour; nothing was removed")
    out = labels.copy()
    out[(pieces > 0) & ~np.isin(pieces, list(keep))] = 0
    return finish_edit(labels, out, protect)


def fill_core_holes(labels: np.ndarray, protect: Iterable[int] = ()) -> Edit:
    """Holes inside the tumour core (necrotic core and enhancing tumour) become necrotic core:
    a core is solid, and a gap of edema or background enclosed by it is a proposal's error.
    Holes are found in 3D and, for cores open at the top or bottom slice, in each axial slice."""
    from scipy import ndimage

    core = (labels == NECROTIC) | (labels == ENHANCING)
    solid = ndimage.binary_fill_holes(core)
    for z in np.flatnonzero(core.reshape(core.shape[0], -1).any(axis=1)):
        solid[z] |= ndimage.binary_fill_holes(core[z])
    out = labels.copy()
    out[solid & ~core] = NECROTIC
    return finish_edit(labels, out, protect)

