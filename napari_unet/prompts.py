"""Click prompts: one click on a slice becomes a 3D correction, weighed by the model itself.

A click at voxel v says "v is label T" (a positive click with the paint row's label; a negative
click says background). The voxel's current label C is wrong there, and the network's
log-probabilities say by how much it preferred C: the gap g = log p_C(v) - log p_T(v). The click
raises T's log-probability around v by ((1 + trust) g + margin) x G x S: G a Gaussian of the
distance to v (sigma in-plane and across slices), S the likeness of a voxel's contrasts to v's
(a Gaussian of their mean squared difference, in the z-scored intensities the network sees).
Every voxel of label C where T then wins, and that connects to v (6-connected, in 3D), becomes
T. So a click reaches along tissue that looks like the clicked voxel and that the network was no
surer of, slice after slice while it goes on, and stops where the tissue changes, where the
network is surer, or beyond a few sigma: a missed lobe is added, a false island removed, a core
called edema turned core, while tissue that only lies near the click is left alone.

The clicked voxel's own label is the only one a click changes (a positive edema click never eats
core), and slices in `protect` (the reviewed ones) are never changed, nor crossed. This uses the
shipped four-contrast network as it is, with no extra input channels to train; see the README
("Click prompts") for what it achieves and what the trained prompt channels of DeepEdit or
nnInteractive would add.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from napari_unet import NapariUnetError
from napari_unet.edits import Edit, finish_edit
from napari_unet.labels import BACKGROUND, LABEL_NAMES

_SIX = np.array([[[0, 0, 0], [0, 1, 0], [0, 0, 0]],
                 [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
                 [[0, 0, 0], [0, 1, 0], [0, 0, 0]]], bool)


@dataclass(frozen=True)
class ClickSettings:
    """How far a click reaches: the Gaussian's sigma in voxels, in-plane and across slices; the
    margin (in nats) by which the click outweighs the network at the clicked voxel; the trust
    in the click over the network; the likeness scale of the contrasts.
    Chosen on synthetic held-out cases with benchmarks/bench_clicks.py (README)."""

    sigma_yx: float = 18.0
    sigma_z: float = 8.0
    margin: float = 2.0
    trust: float = 1.0  # how far the click overrules a network sure of the clicked voxel
    likeness: float = 1.2  # the contrasts' difference (z-score units) at which S falls to 0.61

    def reach(self) -> tuple[int, int]:
        """Half-sizes of the window beyond which the boost is negligible (3 sigma)."""
        return int(np.ceil(3 * self.sigma_z)), int(np.ceil(3 * self.sigma_yx))


DEFAULT_CLICK = ClickSettings()


@dataclass(frozen=True)
class Click:
    point: tuple[int, int, int]  # (z, y, x) voxel of the case
    label: int  # what the voxel is: 1-3 (positive click), 0 (negative click)

    @property
    def positive(self) -> bool:
        return self.label != BACKGROUND


class ClickEvidence:
    """The network's log-probabilities for one case, slice by slice, computed when a click first
    needs them and kept (float16 over the brain's box: about 60 MB for a 240x240x155 case)."""

    def __init__(self, predictor, volume):
        self.predictor, self.volume = predictor, volume
        self._slices: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._brain = set(volume.brain_slices().tolist())

    def missing(self) -> list[int]:
        """Brain slices whose log-probabilities are not computed yet."""
        with self._lock:
            return sorted(z for z in self._brain if z not in self._slices)

    def fill(self, progress=None, cancel=None, chunk: int = 8) -> None:
        """Compute every missing slice now (one network pass over the case, as a proposal takes),
        so that no click waits for the network."""
        from napari_unet.predict import Cancelled

        todo = self.missing()
        for first in range(0, len(todo), chunk):
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            part = todo[first : first + chunk]
            logp = self.predictor.log_probabilities(self.volume, part)
            self.keep(part, logp)
            if progress:
                progress(first + len(part), len(todo))

    def keep(self, slices, log_probs: np.ndarray) -> None:
        """Log-probabilities a proposal computed anyway (`Prediction.log_probs`), so that clicks
        after a proposal need no network at all."""
        with self._lock:
            for z, logp in zip(np.asarray(slices).tolist(), log_probs):
                self._slices[int(z)] = logp

    def intensities(self, zs: range, ys: slice, xs: slice) -> np.ndarray:
        """(modalities, len(zs), Y, X) float32: the z-scored contrasts the network sees (0 outside
        the brain's box and for a missing modality)."""
        crop, box = self.volume.crop, self.volume.box
        out = np.zeros((crop.shape[0], len(zs), ys.stop - ys.start, xs.stop - xs.start), np.float32)
        z0, z1 = max(zs.start, box[0].start), min(zs.stop, box[0].stop)
        y0, y1 = max(ys.start, box[1].start), min(ys.stop, box[1].stop)
        x0, x1 = max(xs.start, box[2].start), min(xs.stop, box[2].stop)
        if z0 < z1 and y0 < y1 and x0 < x1:
            out[:, z0 - zs.start : z1 - zs.start, y0 - ys.start : y1 - ys.start, x0 - xs.start : x1 - xs.start] = \
                crop[:, z0 - box[0].start : z1 - box[0].start, y0 - box[1].start : y1 - box[1].start,
                     x0 - box[2].start : x1 - box[2].start]
        return out

    def window(self, zs: range, ys: slice, xs: slice) -> np.ndarray:
        """(classes, len(zs), Y, X) float32 log-probabilities over the window (full-volume
        coordinates); outside the brain, background is certain."""
        box = self.volume.box
        with self._lock:
            todo = [z for z in zs if z in self._brain and z not in self._slices]
            if todo:
                for z, logp in zip(todo, self.predictor.log_probabilities(self.volume, todo)):
                    self._slices[z] = logp
            classes = next(iter(self._slices.values())).shape[0] if self._slices else 4
        ny, nx = ys.stop - ys.start, xs.stop - xs.start
        out = np.full((classes, len(zs), ny, nx), -30.0, np.float32)
        out[BACKGROUND] = 0.0
        # The window's part inside the crop's in-plane box.
        y0, y1 = max(ys.start, box[1].start), min(ys.stop, box[1].stop)
        x0, x1 = max(xs.start, box[2].start), min(xs.stop, box[2].stop)
        if y0 >= y1 or x0 >= x1:
            return out
        for i, z in enumerate(zs):
            logp = self._slices.get(z)
            if logp is not None:
                out[:, i, y0 - ys.start : y1 - ys.start, x0 - xs.start : x1 - xs.start] = \
                    logp[:, y0 - box[1].start : y1 - box[1].start, x0 - box[2].start : x1 - box[2].start]
        return out


def apply_click(labels: np.ndarray, evidence: ClickEvidence, click: Click, protect: Iterable[int] = (),
                settings: ClickSettings = DEFAULT_CLICK) -> Edit:
    """The labels after `click` (see the module's docstring); `labels` is not modified."""
    from scipy import ndimage

    z, y, x = (int(c) for c in click.point)
    if not all(0 <= c < s for c, s in zip((z, y, x), labels.shape)):
        raise NapariUnetError(f"click: the point {(z, y, x)} is outside the case {labels.shape}")
    if not 0 <= click.label <= max(LABEL_NAMES):
        raise NapariUnetError(f"click: {click.label} is not a label (0 to {max(LABEL_NAMES)})")
    protect = {int(p) for p in protect}
    if z in protect:
        raise NapariUnetError(f"click: slice {z} is reviewed; clicks never change a reviewed slice "
                              "(unmark it first, Shift-R)")
    current, target = int(labels[z, y, x]), int(click.label)
    if current == target:
        return Edit(labels.copy(), [])
    rz, ryx = settings.reach()
    zs = range(max(0, z - rz), min(labels.shape[0], z + rz + 1))
    ys = slice(max(0, y - ryx), min(labels.shape[1], y + ryx + 1))
    xs = slice(max(0, x - ryx), min(labels.shape[2], x + ryx + 1))
    logp = evidence.window(zs, ys, xs)
    gap = max(0.0, float(logp[current, z - zs.start, y - ys.start, x - xs.start]
                         - logp[target, z - zs.start, y - ys.start, x - xs.start]))
    dz = (np.arange(zs.start, zs.stop) - z)[:, None, None] / settings.sigma_z
    dy = (np.arange(ys.start, ys.stop) - y)[None, :, None] / settings.sigma_yx
    dx = (np.arange(xs.start, xs.stop) - x)[None, None, :] / settings.sigma_yx
    image = evidence.intensities(zs, ys, xs)
    present = np.flatnonzero(image.reshape(len(image), -1).any(axis=1))  # a missing modality is all zeros
    cz, cy, cx = z - zs.start, y - ys.start, x - xs.start
    if present.size:
        # The clicked tissue: the mean of the voxel and its in-plane neighbours (less noise).
        seed = image[present, cz, max(0, cy - 1) : cy + 2, max(0, cx - 1) : cx + 2].mean(axis=(1, 2))
        distance = ((image[present] - seed[:, None, None, None]) ** 2).mean(axis=0)
        like = np.exp(-0.5 * distance / settings.likeness**2)
    else:
        like = np.ones(logp.shape[1:], np.float32)
    boost = ((1 + settings.trust) * gap + settings.margin) * np.exp(-0.5 * (dz**2 + dy**2 + dx**2)) * like
    window = labels[zs.start : zs.stop, ys, xs]
    flips = (window == current) & (logp[target] + boost >= logp[current])
    for p in protect:
        if zs.start <= p < zs.stop:
            flips[p - zs.start] = False  # neither changed nor crossed
    flips[cz, cy, cx] = True
    pieces, _ = ndimage.label(flips, structure=_SIX)
    region = pieces == pieces[cz, cy, cx]
    out = labels.copy()
    out[zs.start : zs.stop, ys, xs][region] = target
    return finish_edit(labels, out, protect)


def describe(click: Click, edit: Edit, before: np.ndarray, voxel_ml: float) -> str:
    """'necrotic core click at slice 40: 1.25 mL on slices 36-44' for the status line."""
    kind = f"{LABEL_NAMES[click.label]} click"
    if edit.empty:
        return f"{kind} at slice {click.point[0]}: the voxel is {LABEL_NAMES[click.label]} already"
    n = int(np.count_nonzero(edit.labels[edit.changed] != before[edit.changed]))
    span = f"{edit.changed[0]}-{edit.changed[-1]}" if len(edit.changed) > 1 else str(edit.changed[0])
    return f"{kind} at slice {click.point[0]}: {n * voxel_ml:.2f} mL changed on slice(s) {span}"
