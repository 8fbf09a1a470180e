"""Slice datasets over BraTS roots (every slice trusted) and corrections stores (reviewed slices).

A corrections store is a folder of case folders in any layout the reader knows, each with an
optional `corrections.json`:

    {"reviewed_slices": [axial indices]}

(`napari_unet.store` owns the format and the slice numbering). Only the reviewed slices of a case
with a corrections.json teach the model; a case without one, or one marked `"done": true`,
counts as fully annotated.
Tools other than napari (ITK-SNAP, 3D Slicer) can write the same store.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_unet import NapariUnetError
from napari_unet.cases import Case, find_cases, read_case
from napari_unet.modelfile import input_stack, modality_spec
from napari_unet.preprocess import Normalisation, prepare
from napari_unet.store import read_store_case


@dataclass
class TrainCase:
    """A case ready for training: normalised crop, labels, and the slices it may teach from."""

    case_id: str
    image: np.ndarray  # (C, Z, H, W) float16, z-scored brain-box crop
    labels: np.ndarray  # (Z, H, W) uint8 canonical
    trusted: np.ndarray  # crop-relative axial indices whose labels are trusted
    provenance: dict = field(default_factory=dict)

    @property
    def tumour_slices(self) -> np.ndarray:
        has = self.labels[self.trusted].reshape(len(self.trusted), -1).any(axis=1)
        return self.trusted[has]

    def read_slice(self, z: int) -> tuple[np.ndarray, np.ndarray]:
        return self.image[:, z].astype(np.float32), self.labels[z]

    def volume(self) -> tuple[np.ndarray, np.ndarray]:
        return self.image.astype(np.float32), self.labels


def slice_hash(labels_slice: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels_slice, dtype=np.uint8).tobytes()).hexdigest()[:16]


def train_case(case: Case, modalities, norm: Normalisation, reviewed: list[int] | None = None,
               required=None) -> TrainCase:
    """A read case -> TrainCase; `reviewed` are display axial indices (None: all brain slices).
    A modality outside `required` (default: all) may be missing: its channel is zeros."""
    if case.labels is None:
        raise NapariUnetError(f"{case.source.path}: the case has no segmentation to learn from")
    crop, box, mask = prepare(input_stack(modality_spec(modalities, required), case.images, case.source.path), norm)
    labels = case.labels[box]
    z0, nz = box[0].start, crop.shape[1]
    brain = np.flatnonzero(mask.any(axis=(1, 2)))
    if reviewed is None:
        trusted = brain
    else:
        rel = np.asarray(sorted(set(reviewed)), int) - z0
        trusted = rel[(rel >= 0) & (rel < nz)]
    provenance = {
        "case": case.case_id,
        "path": case.source.path,
        "slices": [int(case.source.axial_to_file_index(int(z + z0))) for z in trusted] if reviewed is not None else "all",
    }
    if reviewed is not None:
        provenance["sha256"] = [slice_hash(labels[z]) for z in trusted]
    return TrainCase(case.case_id, crop.astype(np.float16), labels, trusted.astype(int), provenance)


def _progress_iter(items, progress):
    for i, item in enumerate(items):
        yield item
        if progress:
            progress(i + 1, len(items))


def load_root(root, modalities, norm: Normalisation, progress: Callable | None = None) -> list[TrainCase]:
    """Every case under a BraTS root (any layout), all slices trusted."""
    cases = find_cases(root)
    return [train_case(read_case(p), modalities, norm) for p in _progress_iter(cases, progress)]


def load_store(store, modalities, norm: Normalisation, progress: Callable | None = None,
               required=None) -> list[TrainCase]:
    """The reviewed slices of every case in a corrections store (`required`: as in `train_case`)."""
    store = Path(store)
    if not store.is_dir():
        raise NapariUnetError(f"{store}: the corrections store must be a folder of cases")
    if not any(not p.name.startswith(".") for p in store.iterdir()):  # (a window's lock is no case)
        raise NapariUnetError(f"{store}: the corrections store is empty")
    out = []
    for path in _progress_iter(find_cases(store), progress):
        case, corrections = read_store_case(path)
        # A case without corrections.json, or marked done, teaches whole: every brain slice.
        reviewed = None if corrections is None or corrections.done else sorted(corrections.reviewed)
        tc = train_case(case, modalities, norm, reviewed, required)
        if len(tc.trusted):
            out.append(tc)
    if not out:
        raise NapariUnetError(f"{store}: no reviewed slices with brain in them to learn from "
                              "(corrections.json lists none, or the images are blank)")
    return out


def split_validation(cases: list[TrainCase], fraction: float, seed: int) -> tuple[list, list]:
    if fraction <= 0 or len(cases) < 2:
        return cases, []
    n_val = max(1, int(round(len(cases) * fraction)))
    order = np.random.default_rng(seed).permutation(len(cases))
    val = set(order[:n_val].tolist())
    return [c for i, c in enumerate(cases) if i not in val], [c for i, c in enumerate(cases) if i in val]


class PatchDataset:
    """Random training patches, each made from its index alone: (image (C, P, P), labels (P, P)).

    Patch `i` comes from a generator seeded with (seed, rank, i), so a run draws the same
    patches whatever the number of DataLoader workers, and a resumed run goes on with the
    patches an uninterrupted one would have drawn. Half the patches (by default) centre on
    tumour. Sources are in-memory `TrainCase`s or on-disk `CachedCase`s: anything with
    `trusted`, `tumour_slices` and `read_slice(z) -> (image, labels)`.

    With `replay`, a list of (sources, patches per batch), the last patches of every batch of
    `batch_size` come from those sources instead, group after group (fine-tuning mixes in
    earlier knowledge that way: the base model's labels elsewhere, the synthetic bank).
    """

    def __init__(self, sources, patch: int = 128, tumour_fraction: float = 0.5, seed: int = 0, rank: int = 0,
                 replay=(), batch_size: int = 1):
        if not sources:
            raise NapariUnetError("no training cases")
        self.groups = [_SourceGroup(list(sources))]
        # Batch position -> group: the main sources first, then each replay group's share.
        self.position_group = []
        for k, (group_sources, per_batch) in enumerate((g for g in replay if g[0] and g[1]), start=1):
            self.groups.append(_SourceGroup(list(group_sources)))
            self.position_group += [k] * int(per_batch)
        if len(self.position_group) >= batch_size:
            raise NapariUnetError(f"replay takes {len(self.position_group)} of a batch of {batch_size}: "
                                  "nothing would be left for the training data")
        self.position_group = [0] * (batch_size - len(self.position_group)) + self.position_group
        self.patch, self.tumour_fraction, self.seed, self.rank = patch, tumour_fraction, seed, rank
        self.batch_size = batch_size

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.rank, int(index)])
        group = self.groups[self.position_group[index % self.batch_size]]
        k = int(rng.choice(len(group.sources), p=group.case_p))
        source = group.sources[k]
        tumour = source.tumour_slices
        on_tumour = len(tumour) and rng.random() < self.tumour_fraction
        z = int(rng.choice(tumour if on_tumour else source.trusted))
        image, labels = source.read_slice(z)
        plane = labels > 0 if on_tumour else image[0] != 0
        return crop_patch(image, labels, _random_point(plane, rng), self.patch)


def _random_point(plane: np.ndarray, rng: np.random.Generator, tries: int = 64) -> tuple[int, int]:
    """A random True pixel of a 2D mask (the centre of the plane if it has none).

    Random draws first: on a brain or tumour plane one of 64 hits almost always, far cheaper
    than listing every True pixel of the slice for each patch.
    """
    h, w = plane.shape
    ys, xs = rng.integers(0, h, tries), rng.integers(0, w, tries)
    hit = np.flatnonzero(plane[ys, xs])
    if len(hit):
        return int(ys[hit[0]]), int(xs[hit[0]])
    candidates = np.argwhere(plane)
    if len(candidates):
        return tuple(int(v) for v in candidates[rng.integers(len(candidates))])
    return h // 2, w // 2


class _SourceGroup:
    def __init__(self, sources):
        self.sources = sources
        weights = np.array([len(s.trusted) for s in sources], float)
        if not weights.sum():
            raise NapariUnetError("no trusted slices to learn from")
        self.case_p = weights / weights.sum()


def crop_patch(image: np.ndarray, labels: np.ndarray, centre: tuple[int, int], p: int):
    """A (C, p, p) float32 / (p, p) int64 window of a slice around `centre`, zero beyond its edge."""
    _, h, w = image.shape
    y0 = int(np.clip(centre[0] - p // 2, min(0, h - p), max(0, h - p)))
    x0 = int(np.clip(centre[1] - p // 2, min(0, w - p), max(0, w - p)))
    img = np.zeros((image.shape[0], p, p), np.float32)
    lab = np.zeros((p, p), np.int64)
    ys, xs = slice(max(0, y0), min(h, y0 + p)), slice(max(0, x0), min(w, x0 + p))
    dy, dx = ys.start - y0, xs.start - x0
    img[:, dy : dy + ys.stop - ys.start, dx : dx + xs.stop - xs.start] = image[:, ys, xs]
    lab[dy : dy + ys.stop - ys.start, dx : dx + xs.stop - xs.start] = labels[ys, xs]
    return img, lab


def augment(x, y, generator):
    """Flips, small rotations and scalings, intensity jitter; on torch tensors (N, C, H, W), (N, H, W)."""
    import torch
    import torch.nn.functional as F

    n = x.shape[0]
    g = generator

    def rand(*shape):  # drawn on the CPU generator (reproducible), applied where x lives (GPU)
        return torch.rand(*shape, generator=g).to(x.device)

    flip = rand(n) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    y = torch.where(flip[:, None, None], y.flip(2), y)
    angle = (rand(n) * 2 - 1) * math.radians(15)
    scale = 1 + (rand(n) * 2 - 1) * 0.1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    brain = (x != 0).any(1, keepdim=True)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    brain = F.grid_sample(brain.float(), grid, mode="nearest", align_corners=False) > 0
    y = F.grid_sample(y[:, None].float(), grid, mode="nearest", align_corners=False)[:, 0].long()
    gain = 1 + (rand(n, x.shape[1], 1, 1) * 2 - 1) * 0.15
    shift = (rand(n, x.shape[1], 1, 1) * 2 - 1) * 0.15
    x = torch.where(brain, x * gain + shift, torch.zeros_like(x))
    return x, y


def drop_modalities(x, p: float, droppable: list[int], generator):
    """Modality dropout: each droppable channel of each sample is zeroed with probability `p`, as a
    missing modality is given to the model; at least one channel stays. (N, C, H, W), any device."""
    import torch

    if p <= 0 or not droppable:
        return x  # draws nothing: training without dropout is unchanged
    n = x.shape[0]
    drop = torch.zeros(n, x.shape[1], dtype=torch.bool)
    drop[:, droppable] = torch.rand(n, len(droppable), generator=generator) < p
    emptied = drop.all(1)
    if emptied.any():  # every channel dropped: give one back
        back = torch.as_tensor(droppable)[torch.randint(len(droppable), (n,), generator=generator)]
        drop[emptied, back[emptied]] = False
    return x * (~drop).to(device=x.device, dtype=x.dtype)[:, :, None, None]
