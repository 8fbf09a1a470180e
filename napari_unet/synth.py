"""Synthetic BraTS-like cases: a skull-stripped brain with a glioma, in four MRI contrasts.

Geometry is BraTS's: 240 x 240 x 155 voxels of 1 mm, the BraTS affine (voxel axes run
towards patient left, posterior, superior). The brain has CSF, cortex (grey matter), white
matter and two lateral ventricles; the tumour has a necrotic core, an enhancing rim and
surrounding edema. Each tissue has its typical relative brightness per contrast (FLAIR
suppresses CSF, T1ce lights up the enhancing rim, T2 and FLAIR show the edema), followed by
partial-volume blur, a smooth bias field and noise.

`shift` (0..1) moves the appearance towards another "scanner": tissue contrasts change
non-linearly (which z-scoring cannot undo), the gamma, bias and noise grow. A model trained
at shift 0 does worse at shift 1; fine-tuning on a few corrected slices brings it back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_unet.cases import MODALITIES, Case, case_ids, make_source, write_case_files
from napari_unet.labels import EDEMA, ENHANCING, NECROTIC

BRATS_SHAPE = (240, 240, 155)
BRATS_AFFINE = np.array(
    [[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]
)

# Relative brightness per tissue: CSF, grey matter, white matter, edema, necrosis, enhancing.
_TISSUES = ("csf", "gm", "wm", "edema", "necrosis", "enhancing")
_STANDARD = {
    "t1": (0.25, 0.55, 0.80, 0.45, 0.30, 0.50),
    "t1ce": (0.25, 0.55, 0.80, 0.45, 0.22, 1.00),
    "t2": (1.00, 0.55, 0.35, 0.80, 0.90, 0.62),
    "flair": (0.12, 0.50, 0.40, 0.88, 0.55, 0.75),
}
_SHIFTED = {  # another scanner: grey/white contrast inverted on T1, edema much less conspicuous
    "t1": (0.45, 0.80, 0.60, 0.62, 0.40, 0.62),
    "t1ce": (0.45, 0.80, 0.60, 0.60, 0.35, 0.85),
    "t2": (0.85, 0.55, 0.50, 0.68, 0.80, 0.62),
    "flair": (0.35, 0.52, 0.48, 0.66, 0.58, 0.64),
}


def _smooth_noise(rng: np.random.Generator, shape, cells=(5, 5, 4), terms: int = 6) -> np.ndarray:
    """A smooth random field of about `cells` bumps per axis, roughly in [-1, 1].

    A sum of products of smooth 1D profiles: as random-looking as a zoomed 3D grid for our
    purpose, and a hundred times cheaper on a 240 x 240 x 155 volume.
    """

    def profile(n: int, c: int) -> np.ndarray:
        knots = rng.uniform(-1, 1, c + 3)
        x = np.linspace(1, c + 1, n)
        return ndimage.map_coordinates(knots, [x], order=3, mode="nearest").astype(np.float32)

    field = np.zeros(shape, np.float32)
    for _ in range(terms):
        px, py, pz = (profile(n, c) for n, c in zip(shape, cells))
        field += px[:, None, None] * py[None, :, None] * pz[None, None, :]
    return np.clip(field * (1.6 / np.sqrt(terms)), -1, 1)


def generate(
    rng: np.random.Generator, shape=BRATS_SHAPE, shift: float = 0.0
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One case in file voxel order: (images per modality as int16, canonical labels, affine)."""
    shape = tuple(int(s) for s in shape)
    voxel = np.array(BRATS_SHAPE, float) / np.array(shape, float)  # mm per voxel
    affine = BRATS_AFFINE.copy()
    affine[:3, :3] = affine[:3, :3] * voxel
    affine[1, 3] = (shape[1] - 1) * voxel[1]
    # Coordinates in mm from the head's centre, as broadcastable grids.
    centre = np.array([120.0, 118.0, 72.0]) + rng.normal(0, 3, 3)
    gx, gy, gz = (
        (np.arange(n, dtype=np.float32) * v - c).reshape([-1 if i == a else 1 for i in range(3)])
        for a, (n, v, c) in enumerate(zip(shape, voxel, centre))
    )
    radii = np.array([66.0, 82.0, 60.0]) * rng.uniform(0.93, 1.05, 3)
    rho = np.sqrt((gx / radii[0]) ** 2 + (gy / radii[1]) ** 2 + (gz / radii[2]) ** 2)
    outline = _smooth_noise(rng, shape, (6, 6, 4))
    folds = _smooth_noise(rng, shape, (14, 14, 9))
    brain = rho < 1.0 + 0.03 * outline
    tissue = np.zeros(shape, np.uint8)  # 0 outside, 1.. index into _TISSUES + 1
    tissue[brain] = 3  # white matter
    tissue[brain & (rho > 0.80 + 0.06 * folds)] = 2  # cortex
    tissue[brain & (rho > 0.955 + 0.02 * outline)] = 1  # CSF around the brain
    for side in (-1, 1):  # lateral ventricles
        v = ((gx - side * 9) / 6.5) ** 2 + ((gy - 4) / 24) ** 2 + ((gz - 8) / 11) ** 2
        tissue[v < 1] = 1

    # The tumour: a perturbed sphere in one hemisphere, edema spreading around it.
    side = rng.choice([-1, 1])
    t_centre = np.array([side * rng.uniform(18, 38), rng.uniform(-35, 35), rng.uniform(-18, 18)])
    core_r = rng.uniform(9, 20)
    d = np.sqrt((gx - t_centre[0]) ** 2 + (gy - t_centre[1]) ** 2 + (gz - t_centre[2]) ** 2)
    d_core = d / core_r * (1 + 0.18 * _smooth_noise(rng, shape, (9, 9, 6)))
    edema_r = rng.uniform(1.5, 2.3)
    d_edema = d / (core_r * edema_r) * (1 + 0.3 * _smooth_noise(rng, shape, (8, 8, 5)))
    rim = rng.uniform(2.0, 4.5) / core_r
    labels = np.zeros(shape, np.uint8)
    labels[(d_edema < 1) & brain & (tissue != 1)] = EDEMA
    core = (d_core < 1) & brain
    labels[core] = ENHANCING
    labels[core & (d_core < 1 - rim)] = NECROTIC
    tissue[labels == EDEMA] = 4
    tissue[labels == NECROTIC] = 5
    tissue[labels == ENHANCING] = 6

    gamma = 1.0 + 0.6 * shift
    bias_amp = 0.12 + 0.18 * shift
    noise_sd = 0.025 * (1 + shift)
    images = {}
    for modality in MODALITIES:
        table = (1 - shift) * np.array(_STANDARD[modality]) + shift * np.array(_SHIFTED[modality])
        table = table * rng.uniform(0.95, 1.05, len(table))  # case-to-case variation
        lut = np.concatenate([[0.0], table]).astype(np.float32)
        img = ndimage.gaussian_filter(lut[tissue], 0.7 / voxel.mean())
        img *= 1 + bias_amp * _smooth_noise(rng, shape, (3, 3, 2))
        img += rng.normal(0, noise_sd, shape).astype(np.float32)
        img = np.clip(img, 0, None) ** gamma
        scale = rng.uniform(600, 1400) * (1 + shift)
        img = np.where(brain, img * scale + 1.0, 0.0)  # skull-stripped: zero outside
        images[modality] = np.clip(img, 0, 32767).astype(np.int16)
    return images, labels, affine


def _synthetic_source(case_id: str, affine: np.ndarray, shape, layout: str = "brats2021"):
    import nibabel as nib

    ref = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), affine)
    ref.header.set_data_shape(shape)
    ref.header.set_zooms(tuple(np.abs(np.diag(affine)[:3])))
    source = make_source(layout, case_id, "", ref)
    source.shape = [int(s) for s in shape]
    return source


def synthetic_case(seed: int = 0, shift: float = 0.0, shape=BRATS_SHAPE, case_id: str | None = None) -> Case:
    """One synthetic case in memory, in the display orientation like any case read from disk."""
    images, labels, affine = generate(np.random.default_rng(seed), shape, shift)
    case_id = case_id or f"synthetic_{seed:03d}"
    source = _synthetic_source(case_id, affine, labels.shape)
    return Case(
        case_id,
        {m: source.to_display(v.astype(np.float32)) for m, v in images.items()},
        source.to_display(labels),
        source,
    )


def write_dataset(
    out: str | os.PathLike,
    cases: int,
    *,
    seed: int = 0,
    layout: str = "brats2021",
    shift: float = 0.0,
    shape=BRATS_SHAPE,
    start: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write `cases` synthetic cases under `out` in the naming of `layout`; returns case paths."""
    out = Path(out)
    written = []
    for i, case_id in enumerate(case_ids(layout, cases, start)):
        rng = np.random.default_rng([seed, start + i])
        images, labels, affine = generate(rng, shape, shift)
        image_paths, _ = write_case_files(out, layout, case_id, images, labels, affine)
        written.append(image_paths["flair"] if layout == "msd" else image_paths["flair"].parent)
        if progress:
            progress(i + 1, cases)
    return written
