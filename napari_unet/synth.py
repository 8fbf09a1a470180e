"""Synthetic BraTS-like cases: a real brain's anatomy with a grown glioma, in four MRI contrasts.

The anatomy is the MNI152 2009c template (grey matter, white matter and CSF probability maps,
vendored in `napari_unet/templates`), made into a new subject each time by an affine and a
smooth elastic deformation, a change of ventricle size and cortical atrophy.

The tumour is grown, not drawn: a Fisher-KPP reaction-diffusion model (tumour cells diffuse
twenty times faster along white matter than through grey matter and not into CSF), seeded in
white matter, sometimes at two sites. Its concentration gives the regions: the infiltrated
low-density tail is the edema (so it follows white matter), the dense part the core; the core
has a necrotic centre of irregular depth, an enhancing rim of varying thickness, often
incomplete, and about one tumour in five is non-enhancing (low grade, labelled as core). The
tumour displaces the anatomy around it (mass effect).

Appearance follows the physics of each contrast (FLAIR suppresses CSF and shows edema, T2 shows
fluid and edema, T1ce lights up the enhancing rim and vessels against T1, necrosis is dark on
T1ce). `appearance="standard"` gives one look (and `shift` moves it towards another scanner);
`appearance="random"` randomises every tissue's brightness within those orderings, the bias
field, noise, blur, gamma and thick-slice acquisitions per case and contrast, in the manner of
SynthSeg's domain randomisation, which is what the shipped model is trained on.

Geometry is BraTS's: 240 x 240 x 155 voxels of 1 mm, the BraTS affine (voxel axes run towards
patient left, posterior, superior); a smaller `shape` is the same field of view on a coarser grid.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from napari_unet.cases import MODALITIES, Case, case_ids, make_source, write_case_files
from napari_unet.labels import EDEMA, ENHANCING, NECROTIC

BRATS_SHAPE = (240, 240, 155)
BRATS_AFFINE = np.array(
    [[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]
)
APPEARANCES = ("standard", "random")
TEMPLATE_FILE = Path(__file__).parent / "templates" / "mni152_2009c.npz"

# Brightness per tissue class, relative to the brightest tissue of the contrast.
_TISSUES = ("csf", "gm", "wm", "edema", "necrosis", "enhancing", "non_enhancing")
_STANDARD = {
    "t1": (0.25, 0.55, 0.80, 0.48, 0.30, 0.50, 0.42),
    "t1ce": (0.25, 0.55, 0.80, 0.48, 0.22, 1.00, 0.44),
    "t2": (1.00, 0.55, 0.38, 0.80, 0.90, 0.62, 0.82),
    "flair": (0.12, 0.52, 0.42, 0.88, 0.55, 0.75, 0.85),
}
_SHIFTED = {  # another scanner: grey/white contrast inverted on T1, edema much less conspicuous
    "t1": (0.45, 0.80, 0.60, 0.62, 0.40, 0.62, 0.55),
    "t1ce": (0.45, 0.80, 0.60, 0.60, 0.35, 0.85, 0.58),
    "t2": (0.85, 0.55, 0.50, 0.68, 0.80, 0.62, 0.70),
    "flair": (0.35, 0.52, 0.48, 0.66, 0.58, 0.64, 0.66),
}


def _random_table(rng: np.random.Generator, modality: str) -> np.ndarray:
    """Tissue brightness drawn widely, keeping the orderings each contrast's physics imposes."""
    u = rng.uniform
    if modality in ("t1", "t1ce"):
        wm = u(0.65, 0.95)
        gm = wm * u(0.55, 0.88)
        csf = u(0.05, 0.5) * gm
        edema = gm * u(0.65, 1.0)
        necrosis = u(0.1, 0.75) * edema
        non_enh = edema * u(0.75, 1.05)
        enhancing = (wm * u(1.05, 1.6)) if modality == "t1ce" else gm * u(0.75, 1.05)
        if modality == "t1ce":
            necrosis = min(necrosis, enhancing * u(0.15, 0.6))
        return np.array([csf, gm, wm, edema, necrosis, enhancing, non_enh])
    if modality == "t2":
        csf = u(0.85, 1.0)
        gm = u(0.35, 0.65)
        wm = gm * u(0.55, 0.9)
        edema = u(max(gm * 1.15, 0.5), 0.95)
        necrosis = u(0.55, 1.0)
        enhancing = u(gm, edema)
        non_enh = u(gm * 1.1, 0.95)
        return np.array([csf, gm, wm, edema, necrosis, enhancing, non_enh])
    # FLAIR
    gm = u(0.35, 0.65)
    wm = gm * u(0.65, 0.97)
    csf = u(0.02, 0.6) * wm
    edema = u(max(gm * 1.25, 0.55), 1.0)
    necrosis = u(0.2, 0.9) * edema
    enhancing = u(gm * 1.05, edema)
    non_enh = u(gm * 1.2, 1.0)
    return np.array([csf, gm, wm, edema, necrosis, enhancing, non_enh])


class _SmoothField:
    """A smooth random field of about `cells` bumps per axis over a box, roughly in [-1, 1].

    A sum of products of smooth 1D profiles, so it can be evaluated on any axis-aligned grid
    (the whole volume, or a coarse box around the tumour) for the cost of its 1D profiles.
    """

    def __init__(self, rng: np.random.Generator, extent_mm, cells, terms: int = 6):
        self.extent = np.asarray(extent_mm, float)
        self.knots = [[rng.uniform(-1, 1, c + 3) for c in cells] for _ in range(terms)]
        self.cells = cells
        self.scale = 1.6 / np.sqrt(terms)

    def on_grid(self, axes_mm) -> np.ndarray:
        """The field at the grid spanned by three 1D coordinate arrays (mm from the box's corner)."""
        shape = tuple(len(a) for a in axes_mm)
        field = np.zeros(shape, np.float32)
        for knots in self.knots:
            prod = None
            for axis, (k, c, a) in enumerate(zip(knots, self.cells, axes_mm)):
                x = 1 + np.clip(np.asarray(a, float) / self.extent[axis], 0, 1) * c
                p = ndimage.map_coordinates(k, [x], order=3, mode="nearest").astype(np.float32)
                p = p.reshape([-1 if i == axis else 1 for i in range(3)])
                prod = p if prod is None else prod * p
            field += prod
        return np.clip(field * self.scale, -1, 1)


@functools.lru_cache(maxsize=1)
def _template() -> dict:
    """The MNI152 tissue maps (probabilities in [0, 1], 1 mm, RAS voxel axes) and landmarks."""
    with np.load(TEMPLATE_FILE) as z:
        t1, gm, wm = z["t1"], z["gm"], z["wm"]
    brain = t1 > 0  # the template is skull-stripped
    gm = gm.astype(np.float32) / 255
    wm = wm.astype(np.float32) / 255
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0, 1)
    maps = np.stack([csf, gm, wm])
    centre = np.argwhere(brain).mean(0)
    # The lateral ventricles: CSF deep in the middle of the cerebrum.
    idx = np.argwhere(csf > 0.8)
    near = np.all(np.abs(idx - (centre + [0, 0, 15])) < [22, 30, 18], axis=1)
    ventricles = idx[near].mean(0) if near.any() else centre
    return {"maps": maps, "centre": centre, "ventricles": ventricles}


@dataclass
class _Subject:
    """A subject's geometry: output mm (from the head centre, file axes) -> template voxels."""

    matrix: np.ndarray  # 3x3, output mm -> template voxel offsets
    centre: np.ndarray  # template voxel at the head centre
    elastic: list  # three _SmoothField, mm
    elastic_mm: float
    ventricles: np.ndarray
    ventricle_gain: float

    def to_template(self, pts, grid_axes) -> np.ndarray:
        """pts: (3, ...) mm in output space; grid_axes: the output grid's 1D axes (for the elastic
        field, evaluated on the grid points themselves)."""
        t = np.tensordot(self.matrix, pts, axes=1) + self.centre.reshape((3,) + (1,) * (pts.ndim - 1))
        for a in range(3):
            t[a] += self.elastic_mm * self.elastic[a].on_grid(grid_axes)
        if self.ventricle_gain:
            d = t - self.ventricles.reshape((3,) + (1,) * (t.ndim - 1))
            fall = np.exp(-np.sum(d * d, axis=0) / (2 * 18.0**2))
            t -= d * (self.ventricle_gain * fall)
        return t


def _rotation(rng, degrees) -> np.ndarray:
    ax, ay, az = np.radians(rng.uniform(-degrees, degrees, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _subject(rng, extent_mm) -> _Subject:
    tpl = _template()
    flip = np.diag([-1.0, -1.0, 1.0])  # file axes L, P, S -> template axes R, A, S
    scale = rng.uniform(0.92, 1.08) * rng.uniform(0.96, 1.04, 3)
    matrix = np.diag(1 / scale) @ _rotation(rng, 8) @ flip
    centre = tpl["centre"] + rng.normal(0, 2, 3) + [0, 0, 4]
    elastic = [_SmoothField(rng, extent_mm, (5, 5, 4), terms=4) for _ in range(3)]
    return _Subject(matrix, centre, elastic, rng.uniform(1.5, 4.0), tpl["ventricles"],
                    rng.uniform(-0.2, 0.45))


def _sample_maps(subject: _Subject, pts, grid_axes) -> np.ndarray:
    """Tissue probabilities (csf, gm, wm) at output points, (3, ...)."""
    t = subject.to_template(pts, grid_axes)
    maps = _template()["maps"]
    flat = t.reshape(3, -1)
    out = np.stack([ndimage.map_coordinates(m, flat, order=1, mode="constant", cval=0.0) for m in maps])
    return out.reshape((3,) + t.shape[1:])


def _grow(rng, subject: _Subject, seeds_mm, box_lo, spacing, n, head_centre) -> np.ndarray:
    """Fisher-KPP growth on a coarse box (origin box_lo mm, `spacing` mm voxels, n per axis)."""
    axes = [box_lo[a] + spacing * np.arange(n) for a in range(3)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)
    grid_axes = [a + c for a, c in zip(axes, head_centre)]
    csf, gm, wm = _sample_maps(subject, pts, grid_axes)
    d_white = rng.uniform(0.14, 0.2)
    diffusion = (d_white * wm + 0.05 * d_white * gm) * (csf < 0.5)
    rate = rng.uniform(0.02, 0.06)
    u = np.zeros_like(wm)
    for k, seed in enumerate(seeds_mm):
        r2 = sum(((pts[a] - seed[a]) / 4.0) ** 2 for a in range(3))
        u += np.exp(-r2) * (1.0 if k == 0 else rng.uniform(0.2, 0.8))
    target = rng.uniform(2e3, 35e3) / spacing**3  # voxels of dense tumour (2-35 cm3)
    for step in range(600):
        lap = -6 * u
        for a in range(3):
            lap += np.roll(u, 1, a) + np.roll(u, -1, a)
        u = np.clip(u + diffusion * lap + rate * u * (1 - u) * (wm + gm > 0.2), 0, 1)
        if step % 10 == 9 and np.count_nonzero(u > 0.6) >= target:
            break
    return u


def _tumour_labels(rng, u, brain, tissue_csf, tissue_white, voxel, extent, axes) -> tuple[np.ndarray, np.ndarray]:
    """Canonical labels from the tumour density at the output voxels, and where the core is
    solid non-enhancing tumour (labelled with necrosis, but not looking like it). `axes`: the
    grid's 1D axes in mm from the corner of the `extent` box."""
    shape = u.shape
    labels = np.zeros(shape, np.uint8)
    wobble = _SmoothField(rng, extent, (14, 14, 9)).on_grid(axes)
    t_edema = rng.uniform(0.008, 0.08)
    t_core = rng.uniform(0.45, 0.7)
    # Vasogenic edema spreads along white-matter tracts and spares the cortex, except next to
    # the core.
    infiltrated = (u > t_edema * (1 + 0.5 * wobble)) & brain & (tissue_csf < 0.6)
    infiltrated &= (tissue_white > 0.3) | (u > 0.5 * t_core)
    core = (u > t_core * (1 + 0.2 * wobble)) & brain
    labels[infiltrated] = EDEMA
    if not core.any():
        return labels, np.zeros(shape, bool)
    if rng.random() < 0.2:  # non-enhancing (low-grade) tumour: all core, no rim, no necrosis
        labels[core] = NECROTIC
        return labels, core
    depth = ndimage.distance_transform_edt(core, sampling=voxel)
    # At least about a voxel: a coarse grid keeps the rim.
    thickness = max(rng.uniform(2.0, 9.0), 1.2 * voxel.max()) * (
        1 + 0.5 * _SmoothField(rng, extent, (10, 10, 7)).on_grid(axes)
    )
    labels[core] = ENHANCING
    if rng.random() < 0.85:
        labels[core & (depth > thickness)] = NECROTIC
    gaps = _SmoothField(rng, extent, (9, 9, 6)).on_grid(axes)
    solid = core & (labels == ENHANCING) & (gaps < rng.uniform(-1.0, 0.1))  # gaps in the rim
    labels[solid] = NECROTIC
    return labels, solid


@dataclass
class Synthetic:
    """One generated case in file voxel order."""

    images: dict[str, np.ndarray]  # int16 per modality, 0 outside the brain
    labels: np.ndarray  # canonical labels, uint8
    affine: np.ndarray
    tissue: np.ndarray  # (3, ...) csf, grey, white matter fractions of the subject before the tumour


def generate(
    rng: np.random.Generator, shape=BRATS_SHAPE, shift: float = 0.0, appearance: str = "standard"
) -> Synthetic:
    """One case in file voxel order, with the tissue it was made from (see the module's docstring)."""
    if appearance not in APPEARANCES:
        raise ValueError(f"appearance must be one of {APPEARANCES}, not {appearance!r}")
    shape = tuple(int(s) for s in shape)
    voxel = np.array(BRATS_SHAPE, float) / np.array(shape, float)  # mm per voxel
    affine = BRATS_AFFINE.copy()
    affine[:3, :3] = affine[:3, :3] * voxel
    affine[1, 3] = (shape[1] - 1) * voxel[1]
    extent = np.array(BRATS_SHAPE, float)
    head_centre = np.array([120.0, 120.0, 76.0])
    subject = _subject(rng, extent)
    grid_axes = [np.arange(n) * v for n, v in zip(shape, voxel)]  # mm from the corner
    axes = [g - c for g, c in zip(grid_axes, head_centre)]  # mm from the head centre

    # Seeds in white matter of the cerebrum, one hemisphere; sometimes a second focus.
    seeds = []
    for _ in range(200):
        p = np.array([rng.choice([-1, 1]) * rng.uniform(12, 45), rng.uniform(-55, 50), rng.uniform(-10, 45)])
        csf, gm, wm = _sample_maps(subject, p.reshape(3, 1, 1, 1), [[x] for x in p + head_centre])[:, 0, 0, 0]
        if wm > 0.6:
            seeds.append(p)
            break
    if not seeds:
        seeds.append(np.array([25.0, 0.0, 20.0]))
    if rng.random() < 0.15:
        seeds.append(seeds[0] + rng.normal(0, 1, 3) * [12, 18, 10])
    spacing = 2.5
    n = 48
    box_lo = seeds[0] - spacing * n / 2
    u_box = _grow(rng, subject, seeds, box_lo, spacing, n, head_centre)

    # Mass effect: tissue around the tumour is pushed outward (sampled from nearer its centre).
    dense = np.argwhere(u_box > 0.6)
    radius = (len(dense) * spacing**3 * 3 / (4 * np.pi)) ** (1 / 3) if len(dense) else 0.0
    centre = (box_lo + spacing * dense.mean(0)) if len(dense) else seeds[0]
    push = rng.uniform(0.0, 0.3) if radius > 5 else 0.0
    pts = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)
    if push:
        d = pts - centre.reshape(3, 1, 1, 1).astype(np.float32)
        fall = np.exp(-np.sum(d * d, axis=0) / (2 * (1.3 * radius) ** 2))
        pts -= d * (push * fall)
    csf, gm, wm = _sample_maps(subject, pts, grid_axes)
    # Tumour density at the subject-space points (outside the box: none).
    box = (pts - box_lo.reshape(3, 1, 1, 1)) / spacing
    u = ndimage.map_coordinates(u_box, box.reshape(3, -1), order=1, mode="constant", cval=0.0).reshape(shape)
    del pts, box
    if rng.random() < 0.6:  # cortical atrophy: widened sulci
        atrophy = rng.uniform(0, 0.35) * (0.5 + 0.5 * _SmoothField(rng, extent, (4, 4, 3)).on_grid(grid_axes))
        lost = gm * atrophy
        gm, csf = gm - lost, csf + lost
    brain = (csf + gm + wm) > 0.5
    tissue = np.stack([csf, gm, wm])
    labels, solid = _tumour_labels(rng, u, brain, csf, wm, voxel, extent, grid_axes)

    # Tissue fractions: normal tissue, replaced by tumour where the labels say so.
    fractions = np.zeros((len(_TISSUES),) + shape, np.float32)
    fractions[0], fractions[1], fractions[2] = csf, gm, wm
    infiltration = np.clip(0.55 + 0.45 * u / 0.5, 0, 1)
    edema = labels == EDEMA
    fractions[:3, edema] *= 1 - infiltration[edema]
    fractions[3, edema] = infiltration[edema]
    for mask, index in ((labels == NECROTIC, 4), (labels == ENHANCING, 5), (solid, 6)):
        fractions[:, mask] = 0
        fractions[index, mask] = 1
    fractions *= brain

    images = {}
    for modality in MODALITIES:
        if appearance == "random":
            table = _random_table(rng, modality)
            gamma = rng.uniform(0.7, 1.4)
            bias_amp = rng.uniform(0.0, 0.35)
            noise_sd = rng.uniform(0.005, 0.05)
            blur = rng.uniform(0.3, 1.1)
        else:
            table = (1 - shift) * np.array(_STANDARD[modality]) + shift * np.array(_SHIFTED[modality])
            table = table * rng.uniform(0.95, 1.05, len(table))  # case-to-case variation
            gamma, bias_amp, noise_sd, blur = 1.0 + 0.6 * shift, 0.12 + 0.18 * shift, 0.02 * (1 + shift), 0.6
        img = np.tensordot(table.astype(np.float32), fractions, axes=1)
        texture = _SmoothField(rng, extent, (40, 40, 26), terms=3).on_grid(grid_axes)
        img *= 1 + rng.uniform(0.02, 0.06) * texture
        if modality == "t1ce":
            img = _vessels(rng, img, brain, table[2], voxel)
        img = ndimage.gaussian_filter(img, blur / voxel)
        if appearance == "random" and rng.random() < 0.35:
            img = _thick_slices(rng, img, voxel)
        img *= np.exp(bias_amp * _SmoothField(rng, extent, (3, 3, 2)).on_grid(grid_axes))
        img += rng.normal(0, noise_sd, shape).astype(np.float32)
        img = np.clip(img, 0, None) ** gamma
        scale = rng.uniform(600, 1400) * (1 + shift) * (rng.uniform(0.3, 3) if appearance == "random" else 1)
        img = np.where(brain, img * scale + 1.0, 0.0)  # skull-stripped: zero outside
        images[modality] = np.clip(img, 0, 32767).astype(np.int16)
    return Synthetic(images, labels, affine, tissue)


def _vessels(rng, img, brain, white, voxel) -> np.ndarray:
    """Bright enhancing vessels and choroid plexus on T1ce: small spots that are not tumour."""
    inside = np.argwhere(brain)
    if not len(inside):
        return img
    spots = inside[rng.integers(0, len(inside), rng.integers(20, 120))]
    mark = np.zeros(img.shape, np.float32)
    mark[tuple(spots.T)] = 1
    mark = ndimage.gaussian_filter(mark, rng.uniform(0.6, 1.4) / voxel)
    peak = mark.max()
    if peak > 0:
        img = img + mark / peak * white * rng.uniform(0.2, 0.7)
    return img


def _thick_slices(rng, img, voxel) -> np.ndarray:
    """A 2D acquisition with thick slices, resampled back to the grid."""
    axis = 2 if rng.random() < 0.7 else int(rng.integers(0, 2))
    thickness_mm = rng.uniform(2.5, 6.0)
    factor = thickness_mm / voxel[axis]
    if factor < 1.5:
        return img
    sigma = [0.0, 0.0, 0.0]
    sigma[axis] = factor / 2.355
    img = ndimage.gaussian_filter(img, sigma)
    n = img.shape[axis]
    planes = np.round(np.arange(0, n, factor)).astype(int).clip(0, n - 1)
    taken = np.take(img, planes, axis=axis)
    # Back to the grid by linear interpolation between the acquired planes.
    pos = np.interp(np.arange(n), planes, np.arange(len(planes)))
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(planes) - 1)
    w = (pos - lo).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
    return np.take(taken, lo, axis=axis) * (1 - w) + np.take(taken, hi, axis=axis) * w


def _synthetic_source(case_id: str, affine: np.ndarray, shape, layout: str = "brats2021"):
    import nibabel as nib

    ref = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), affine)
    ref.header.set_data_shape(shape)
    ref.header.set_zooms(tuple(np.abs(np.diag(affine)[:3])))
    source = make_source(layout, case_id, "", ref)
    source.shape = [int(s) for s in shape]
    return source


def synthetic_case(
    seed: int = 0, shift: float = 0.0, shape=BRATS_SHAPE, case_id: str | None = None, appearance: str = "standard"
) -> Case:
    """One synthetic case in memory, in the display orientation like any case read from disk."""
    made = generate(np.random.default_rng(seed), shape, shift, appearance)
    case_id = case_id or f"synthetic_{seed:03d}"
    source = _synthetic_source(case_id, made.affine, made.labels.shape)
    return Case(
        case_id,
        {m: source.to_display(v.astype(np.float32)) for m, v in made.images.items()},
        source.to_display(made.labels),
        source,
    )


def write_dataset(
    out: str | os.PathLike,
    cases: int,
    *,
    seed: int = 0,
    layout: str = "brats2021",
    shift: float = 0.0,
    appearance: str = "standard",
    shape=BRATS_SHAPE,
    start: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write `cases` synthetic cases under `out` in the naming of `layout`; returns case paths."""
    out = Path(out)
    written = []
    for i, case_id in enumerate(case_ids(layout, cases, start)):
        rng = np.random.default_rng([seed, start + i])
        made = generate(rng, shape, shift, appearance)
        image_paths, _ = write_case_files(out, layout, case_id, made.images, made.labels, made.affine)
        written.append(image_paths["flair"] if layout == "msd" else image_paths["flair"].parent)
        if progress:
            progress(i + 1, cases)
    return written
