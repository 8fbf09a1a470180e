"""Synthetic BraTS-like cases: a real brain's anatomy with a grown glioma, in four MRI contrasts.

The anatomy is the MNI152 2009c template (grey matter, white matter and CSF probability maps,
vendored in `napari_unet/templates`), made into a new subject each time by an affine and a
smooth elastic deformation, a change of ventricle size and cortical atrophy.

The tumour is grown, not drawn: a Fisher-KPP reaction-diffusion model (tumour cells diffuse
twenty times faster along white matter than through grey matter and not into CSF), seeded in
white matter, sometimes at two sites. Its concentration gives the regions: the infiltrated
low-density tail is the edema (so it follows white matter, its signal fading at the edge), the
dense part the core. The tumour displaces the anatomy around it (mass effect).

The core is made to look like a real glioma's, because a model trained here can only learn the
differences the generator shows (Menze et al. 2015, Bakas et al. 2018):
- its surface is lobulated at two scales (the density's level set moved in and out by smooth
  random fields), not the smooth blob a reaction-diffusion front gives;
- high grade (four in five): an enhancing rim of irregular thickness with gaps of solid
  non-enhancing wall, a necrotic centre (mostly) with solid tumour mixed in, and no dither:
  enhancing specks of a few voxels are made core, bar a handful;
- low grade (one in five): no enhancement and no necrosis, a large solid non-enhancing core
  and modest edema;
- a cyst in about one tumour in five: a CSF-like pocket, labelled necrotic core as BraTS does;
- each tissue its own brightness per contrast, so that the sub-regions differ across contrasts
  as they do in patients: solid non-enhancing tumour bright on T2 but darker than edema on T1
  and usually on FLAIR; necrosis near CSF on T2 and dark on T1 and T1ce; edema bright on FLAIR
  and T2, mildly dark on T1; and a multiplicative texture inside the tumour, strong in the
  core's tissues (10-25 %) and mild in edema, partly shared between contrasts.

Healthy tissue is given what real scans show and the template lacks (`_HealthyDetail`): folded
cortex, the cerebellum's folia, grain, small white-matter lesions and what skull stripping
leaves at the edge, none of it labelled, so that a model does not learn that anything not smooth
is tumour. It is drawn from its own random stream: a seed's anatomy and tumour are unchanged.

Appearance otherwise follows the physics of each contrast (FLAIR suppresses CSF, T2 shows
fluid, T1ce lights up the enhancing rim and vessels against T1). `appearance="standard"` gives
one look (and `shift` moves it towards another scanner); `appearance="random"` randomises every
tissue's brightness within those orderings (the tumour's tissues as ratios to the edema, so that
core and edema differ in every draw), the bias field, noise, blur, gamma and thick-slice
acquisitions per case and contrast, in the manner of SynthSeg's domain randomisation, which is
what the shipped model is trained on.

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

# Brightness per tissue class, relative to the brightest tissue of the contrast. The tumour's
# sub-regions are told apart by how they differ across contrasts, as in real gliomas (Menze et
# al. 2015, Bakas et al. 2018): solid non-enhancing tumour is bright on T2 but darker than the
# edema on T1 and usually on FLAIR; necrosis is near CSF on T2 and dark on T1 and T1ce; a cyst is
# fluid (CSF-like); edema is bright on FLAIR and T2 and only mildly dark on T1.
_TISSUES = ("csf", "gm", "wm", "edema", "necrosis", "enhancing", "non_enhancing", "cyst")
_STANDARD = {
    "t1": (0.25, 0.55, 0.80, 0.48, 0.28, 0.50, 0.36, 0.22),
    "t1ce": (0.25, 0.55, 0.80, 0.48, 0.22, 1.00, 0.38, 0.21),
    "t2": (1.00, 0.55, 0.38, 0.80, 0.92, 0.62, 0.78, 0.98),
    "flair": (0.12, 0.52, 0.42, 0.88, 0.55, 0.75, 0.72, 0.25),
}
_SHIFTED = {  # another scanner: grey/white contrast inverted on T1, edema much less conspicuous
    "t1": (0.45, 0.80, 0.60, 0.62, 0.40, 0.62, 0.50, 0.42),
    "t1ce": (0.45, 0.80, 0.60, 0.60, 0.35, 0.85, 0.50, 0.40),
    "t2": (0.85, 0.55, 0.50, 0.68, 0.80, 0.62, 0.66, 0.86),
    "flair": (0.35, 0.52, 0.48, 0.66, 0.58, 0.64, 0.58, 0.40),
}
# Texture amplitude per tissue (relative sd of a multiplicative field): tumour tissue is
# heterogeneous, edema much less so, fluid hardly at all.
_TEXTURE = {"edema": (0.03, 0.08), "necrosis": (0.12, 0.25), "enhancing": (0.10, 0.22),
            "non_enhancing": (0.10, 0.22), "cyst": (0.01, 0.04)}


def _random_table(rng: np.random.Generator, modality: str) -> np.ndarray:
    """Tissue brightness drawn widely, keeping the orderings each contrast's physics imposes.

    The tumour's sub-regions are drawn as ratios to the edema (not from their own ranges), so
    that the difference between them, which is what tells core from edema, survives every draw.
    """
    u = rng.uniform
    if modality in ("t1", "t1ce"):
        wm = u(0.65, 0.95)
        gm = wm * u(0.55, 0.88)
        csf = u(0.05, 0.5) * gm
        edema = gm * u(0.7, 1.0)
        non_enh = edema * u(0.6, 0.9)
        necrosis = edema * u(0.25, 0.7)
        cyst = min(csf * u(1.0, 1.6), non_enh * 0.8)
        enhancing = (wm * u(1.15, 1.7)) if modality == "t1ce" else gm * u(0.75, 1.05)
        if modality == "t1ce":
            necrosis = min(necrosis, enhancing * u(0.15, 0.6))
            non_enh *= u(1.0, 1.12)  # a little patchy uptake, still well below the rim
        return np.array([csf, gm, wm, edema, necrosis, enhancing, non_enh, cyst])
    if modality == "t2":
        csf = u(0.85, 1.0)
        gm = u(0.35, 0.65)
        wm = gm * u(0.55, 0.9)
        edema = u(max(gm * 1.3, 0.55), 0.95)
        non_enh = max(edema * u(0.8, 1.05), gm * 1.1)
        necrosis = max(csf * u(0.75, 1.0), edema * 0.9)
        cyst = csf * u(0.92, 1.02)
        enhancing = u(gm, edema)
        return np.array([csf, gm, wm, edema, necrosis, enhancing, non_enh, cyst])
    # FLAIR
    gm = u(0.35, 0.65)
    wm = gm * u(0.65, 0.97)
    csf = u(0.02, 0.6) * wm
    edema = u(max(gm * 1.25, 0.55), 1.0)
    non_enh = max(edema * u(0.55, 0.95), gm * 0.95)  # the infiltrated edge of edema is dimmer
    necrosis = edema * u(0.25, 0.95)
    cyst = csf + u(0.0, 0.9) * (gm - csf)  # suppressed fluid, or intermediate if proteinaceous
    enhancing = u(gm * 1.05, edema)
    return np.array([csf, gm, wm, edema, necrosis, enhancing, non_enh, cyst])


def _blobs(rng: np.random.Generator, shape, voxel, sigma_mm: float) -> np.ndarray:
    """Isotropic smooth noise of unit sd and feature size ~sigma_mm on a grid of `voxel` mm:
    made on a coarse grid and interpolated, so a large box costs little."""
    voxel = np.asarray(voxel, float)
    step = np.maximum(voxel, sigma_mm / 2.5)
    n = np.ceil(np.asarray(shape) * voxel / step).astype(int) + 2
    coarse = ndimage.gaussian_filter(rng.standard_normal(n).astype(np.float32), sigma_mm / step, mode="wrap")
    coarse /= coarse.std() + 1e-6
    if np.all(step == voxel):
        return coarse[: shape[0], : shape[1], : shape[2]]
    coords = np.meshgrid(*[np.arange(s) * v / st for s, v, st in zip(shape, voxel, step)], indexing="ij",
                         sparse=False)
    return ndimage.map_coordinates(coarse, np.stack(coords).astype(np.float32), order=1, mode="nearest")


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
        origin = z["origin_mm"].astype(np.float32)  # MNI mm of voxel (0, 0, 0); voxels are 1 mm
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
    return {"maps": maps, "centre": centre, "ventricles": ventricles, "origin_mm": origin}


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


def _sample_maps(subject: _Subject, pts, grid_axes, with_mni: bool = False):
    """Tissue probabilities (csf, gm, wm) at output points, (3, ...); with `with_mni`, also
    where each point lies in the template's MNI space (3, ...), mm."""
    t = subject.to_template(pts, grid_axes)
    tpl = _template()
    flat = t.reshape(3, -1)
    out = np.stack([ndimage.map_coordinates(m, flat, order=1, mode="constant", cval=0.0) for m in tpl["maps"]])
    out = out.reshape((3,) + t.shape[1:])
    if not with_mni:
        return out
    return out, t + tpl["origin_mm"].reshape((3,) + (1,) * (t.ndim - 1))


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


@dataclass
class _Tumour:
    """The tumour's labels and what fills them: `kind` holds the index in _TISSUES of the tumour
    tissue at each voxel (0: none), `box` the slices of the labelled region."""

    labels: np.ndarray
    kind: np.ndarray
    box: tuple
    low_grade: bool


def _bounding_box(mask, pad, shape) -> tuple:
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + pad + 1, shape)
    return tuple(slice(int(l), int(h)) for l, h in zip(lo, hi))


def _tumour_labels(rng, u, brain, tissue_csf, tissue_white, voxel, extent, axes) -> _Tumour:
    """Canonical labels from the tumour density at the output voxels, and the tissue in each.
    `axes`: the grid's 1D axes in mm from the corner of the `extent` box."""
    shape = u.shape
    vv = float(np.prod(voxel))
    labels = np.zeros(shape, np.uint8)
    kind = np.zeros(shape, np.uint8)
    wobble = _SmoothField(rng, extent, (14, 14, 9)).on_grid(axes)
    # About one tumour in five is low grade: no enhancement and no necrosis, but a large solid
    # non-enhancing core, which reaches far into the infiltrated zone and leaves little edema.
    low_grade = rng.random() < 0.2
    if low_grade:
        t_core = rng.uniform(0.1, 0.3)
        t_edema = t_core * rng.uniform(0.2, 0.5)
    else:
        t_edema = rng.uniform(0.04, 0.2)
        t_core = rng.uniform(0.3, 0.6)
    # Vasogenic edema spreads along white-matter tracts and spares the cortex, except next to
    # the core.
    infiltrated = (u > t_edema * (1 + 0.5 * wobble)) & brain & (tissue_csf < 0.6)
    infiltrated &= (tissue_white > 0.3) | (u > 0.5 * t_core)
    labels[infiltrated] = EDEMA
    kind[infiltrated] = _TISSUES.index("edema")
    core0 = (u > t_core * (1 + 0.1 * wobble)) & brain
    if not core0.any():
        box = _bounding_box(infiltrated, 1, shape) if infiltrated.any() else tuple(slice(0, 1) for _ in shape)
        return _Tumour(labels, kind, box, low_grade)

    # Lobulation: the density's level set is a smooth blob; real cores are lobulated at several
    # scales, so the surface is moved in and out by smooth fields in mm (a level-set offset).
    radius = (np.count_nonzero(core0) * vv * 3 / (4 * np.pi)) ** (1 / 3)
    a_lo = radius * rng.uniform(0.2, 0.45)
    a_hi = max(radius * rng.uniform(0.06, 0.15), 0.5 * voxel.max())
    pad = np.ceil(2.5 * (a_lo + a_hi) / voxel).astype(int) + 2
    box = _bounding_box(core0, pad, shape)
    c0 = core0[box]
    cshape = c0.shape
    signed = ndimage.distance_transform_edt(c0, sampling=voxel) - ndimage.distance_transform_edt(~c0, sampling=voxel)
    lobes = a_lo * np.clip(_blobs(rng, cshape, voxel, max(0.6 * radius, 4.0)), -2.5, 2.5)
    lobes += a_hi * np.clip(_blobs(rng, cshape, voxel, max(0.2 * radius, 2.0)), -2.5, 2.5)
    core = (signed + lobes > 0) & brain[box] & (tissue_csf[box] < 0.7) & (u[box] > 0.5 * t_edema)
    del signed, lobes
    parts, n = ndimage.label(core)
    if n:  # drop crumbs the lobes cut off: satellites are kept only when sizeable
        sizes = np.bincount(parts.ravel())[1:]
        core = np.isin(parts, 1 + np.flatnonzero(sizes >= max(0.03 * sizes.max(), 30 / vv)))
    if not core.any():
        core = c0
    depth = ndimage.distance_transform_edt(core, sampling=voxel)

    crop = np.zeros(cshape, np.uint8)  # tissue index inside the core
    non_enh, necrosis, enhancing = (_TISSUES.index(t) for t in ("non_enhancing", "necrosis", "enhancing"))
    crop[core] = non_enh
    rim = np.zeros(cshape, bool)
    if not low_grade:
        # An enhancing rim of irregular thickness around a necrotic centre, with gaps where the
        # wall is solid non-enhancing tumour, and solid tumour mixed into the necrosis.
        thickness = max(rng.uniform(1.5, 6.0), 1.2 * voxel.max()) * np.exp(
            0.45 * np.clip(_blobs(rng, cshape, voxel, 6.0), -2.5, 2.5))
        thickness = np.maximum(thickness, voxel.max())
        rim = core & (depth <= thickness)
        interior = core & ~rim
        if rng.random() < 0.85 and interior.any():
            crop[interior] = necrosis
            solid_share = rng.uniform(0.0, 0.5)
            if solid_share > 0.05:
                field = _blobs(rng, cshape, voxel, 5.0)
                crop[interior & (field > np.quantile(field[interior], 1 - solid_share))] = non_enh
        if rim.any():
            gaps = _blobs(rng, cshape, voxel, max(8.0, 0.5 * radius))
            rim &= gaps > np.quantile(gaps[rim], rng.uniform(0.0, 0.4))
            # No dither: specks of a few voxels are made solid core, bar a few kept as real
            # cases show them beside one contiguous rim.
            parts, n = ndimage.label(rim)
            if n:
                sizes = np.bincount(parts.ravel())[1:]
                tiny = np.flatnonzero(sizes <= max(2, int(np.ceil(5.0 / vv)))) + 1
                keep = rng.permutation(tiny)[: rng.integers(0, 7)]
                rim &= ~np.isin(parts, np.setdiff1d(tiny, keep))
            crop[rim] = enhancing
    # Cysts in some tumours: a fluid pocket deep in the core (labelled necrotic core, as BraTS
    # does), sharp-walled; the enhancing wall stays.
    if rng.random() < 0.22 and depth.max() > 2.5 * voxel.max():
        deep = np.argwhere(depth >= 0.5 * depth.max())
        centre = deep[rng.integers(len(deep))]
        semi = depth.max() * rng.uniform(0.5, 0.9) * rng.uniform(0.8, 1.25, 3)
        dist = _ellipsoid_distance(tuple(slice(0, s) for s in cshape), centre, voxel, semi)
        cyst = (dist + 0.12 * _blobs(rng, cshape, voxel, max(2.0, 0.5 * semi.mean())) < 1) & core & ~rim
        crop[cyst] = _TISSUES.index("cyst")

    sub = labels[box]
    sub[core] = NECROTIC
    sub[crop == enhancing] = ENHANCING
    kind[box][core] = crop[core]
    whole = labels > 0
    box = _bounding_box(whole, 2, shape)
    return _Tumour(labels, kind, box, low_grade)


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
    return _generate(rng, shape, shift, appearance)[0]


def _generate(
    rng: np.random.Generator, shape=BRATS_SHAPE, shift: float = 0.0, appearance: str = "standard"
) -> tuple[Synthetic, _Tumour]:
    """The case and its tumour (the tissue inside each label, for tests)."""
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
    # Fade the density out towards the faces of the growth box, so that a far-reaching edema ends
    # in a soft edge and not a straight cut where the box ends.
    ramp = np.clip(np.minimum(np.arange(n), np.arange(n)[::-1]) / 8.0, 0, 1)
    ramp = ramp * ramp * (3 - 2 * ramp)
    u_box = u_box * (ramp[:, None, None] * ramp[None, :, None] * ramp[None, None, :])

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
    (csf, gm, wm), mni = _sample_maps(subject, pts, grid_axes, with_mni=True)
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
    tumour = _tumour_labels(rng, u, brain, csf, wm, voxel, extent, grid_axes)
    labels, kind, box = tumour.labels, tumour.kind, tumour.box

    # Tissue fractions: normal tissue, replaced by tumour where the labels say so; the tumour's
    # own tissues only inside its box.
    normal = np.stack([csf, gm, wm]) * brain
    infiltration = np.clip(0.55 + 0.45 * u[box] / 0.5, 0, 1)
    k = kind[box]
    tumour_fr = np.zeros((len(_TISSUES) - 3,) + k.shape, np.float32)
    edema = k == _TISSUES.index("edema")
    tumour_fr[0][edema] = infiltration[edema]
    keep = np.where(edema, 1 - infiltration, (k == 0).astype(np.float32))
    normal[(slice(None),) + box] *= keep
    for index in range(4, len(_TISSUES)):
        tumour_fr[index - 3][k == index] = 1
    tumour_fr *= brain[box]
    del infiltration, edema, keep
    # Its own stream, so that the anatomy and tumour of a seed are what they were without it.
    detail = _HealthyDetail.draw(rng.spawn(1)[0], normal, brain, box, voxel, mni)
    del mni

    # Texture inside the tumour: multiplicative, strong in the core's tissues and mild in the
    # edema. Its structure is partly shared between contrasts (the same fluid-rich or cellular
    # patches, bright on T2 and dark on T1) and partly each contrast's own.
    shared = 0.5 * _blobs(rng, k.shape, voxel, 1.0) + 0.85 * _blobs(rng, k.shape, voxel, 3.0)
    shared /= shared.std() + 1e-6
    if appearance == "random":
        amp = np.array([rng.uniform(*_TEXTURE[t]) for t in _TISSUES[3:]], np.float32)
    else:
        amp = np.array([np.mean(_TEXTURE[t]) for t in _TISSUES[3:]], np.float32)

    images = {}
    for modality in MODALITIES:
        if appearance == "random":
            table = _random_table(rng, modality)
            gamma = rng.uniform(0.7, 1.4)
            bias_amp = rng.uniform(0.0, 0.35)
            noise_sd = rng.uniform(0.005, 0.05)
            blur = rng.uniform(0.3, 1.1)
            sign = {"t2": 1.0, "flair": rng.choice([-1.0, 1.0])}.get(modality, -1.0)
        else:
            table = (1 - shift) * np.array(_STANDARD[modality]) + shift * np.array(_SHIFTED[modality])
            table = table * rng.uniform(0.95, 1.05, len(table))  # case-to-case variation
            gamma, bias_amp, noise_sd, blur = 1.0 + 0.6 * shift, 0.12 + 0.18 * shift, 0.02 * (1 + shift), 0.6
            sign = 1.0 if modality in ("t2", "flair") else -1.0
        table = table.astype(np.float32)
        img = detail.apply(np.tensordot(table[:3], normal, axes=1), table, normal[2], sign)
        own = _blobs(rng, k.shape, voxel, 2.0)
        grain = np.clip(0.8 * sign * shared + 0.6 * own, -2.5, 2.5)
        img[box] += np.tensordot(table[3:], tumour_fr * (1 + amp.reshape(-1, 1, 1, 1) * grain), axes=1)
        del own, grain
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
    return Synthetic(images, labels, affine, tissue), tumour


@dataclass
class _HealthyDetail:
    """What real healthy tissue shows and the template does not, so that a model cannot take it
    for tumour. A model trained without it called the cerebellum of real T1+FLAIR scans
    necrotic core (dark on T1, middling on FLAIR, striated), because in the generator only
    tumour was ever anything but smooth:
    - folded cortex: the template is a population average whose cortex is blurred smooth; real
      sulci are thin sheets of CSF every few mm through the grey matter (the zero level sets of
      a smooth field here);
    - the cerebellum's folia: thin shells of CSF between folia and white-matter cores inside
      them, stacked every 2-4 mm around the fourth ventricle (the striated look of the posterior
      fossa);
    - grain in all healthy tissue (partial volume, vessels, the scanner), at times as strong as
      the tumour's;
    - small white-matter lesions (small-vessel disease, common at glioma patients' ages): bright
      on FLAIR and T2 like edema, mildly dark on T1, away from the tumour and not labelled, so
      that a bright spot on FLAIR is not edema by itself;
    - what skull stripping leaves at the brain's edge in some scans: patches of a thin shell
      much brighter (fat, marrow) or darker (dura, bone) than brain, not labelled.
    """

    rng: np.random.Generator  # its own stream; `apply` draws each contrast's own grain from it
    voxel: np.ndarray
    lesions: np.ndarray  # lesion fraction per voxel, 0-1
    lesion_weight: float  # a lesion's brightness, from white matter's (0) to edema's (1)
    grain_amp: float
    grain: np.ndarray  # the grain's part shared between contrasts, unit sd
    rim: np.ndarray | None  # the skull-stripping leftovers, or None
    rim_gain: float

    @classmethod
    def draw(cls, rng, normal, brain, tumour_box, voxel, mni) -> "_HealthyDetail":
        """Folds the cortex and the cerebellum of `normal` (csf, grey, white fractions) in place
        and draws the rest. `mni`: (3, ...) template (MNI) mm of each voxel."""
        shape = normal.shape[1:]
        _fold_cortex(rng, normal, voxel)
        _fold_cerebellum(rng, normal, voxel, mni)
        outside = np.ones(shape, bool)  # away from the tumour
        margin = np.ceil(10.0 / voxel).astype(int)  # for centres: a lesion reaches 7 mm at most
        outside[tuple(slice(max(s.start - m, 0), s.stop + m) for s, m in zip(tumour_box, margin))] = False
        lesions = np.zeros(shape, np.float32)
        if rng.random() < 0.6:
            spots = np.argwhere((normal[2] > 0.7) & outside)
            for centre in spots[rng.integers(0, len(spots), rng.integers(1, 16))] if len(spots) else []:
                radius = rng.uniform(1.5, 5.0) * rng.uniform(0.7, 1.4, 3)  # mm per axis
                reach = np.ceil(radius / voxel).astype(int) + 1
                sl = tuple(slice(max(c - r, 0), min(c + r + 1, n)) for c, r, n in zip(centre, reach, shape))
                dist = _ellipsoid_distance(sl, centre, voxel, radius)
                np.maximum(lesions[sl], np.clip((1 - dist) * 3, 0, 1), out=lesions[sl])
        grain = _blobs(rng, shape, voxel, rng.uniform(1.0, 2.5))
        rim, rim_gain = None, 1.0
        if rng.random() < 0.4:
            depth = max(1, int(round(rng.uniform(1.0, 4.0) / voxel.min())))
            shell = brain & ~ndimage.binary_erosion(brain, iterations=depth) & outside
            patches = _blobs(rng, shape, voxel, 10.0)
            rim = shell & (patches > np.quantile(patches, rng.uniform(0.4, 0.9)))
            rim_gain = rng.uniform(1.6, 3.0) if rng.random() < 0.7 else rng.uniform(0.3, 0.6)
        return cls(rng, voxel, lesions, rng.uniform(0.3, 1.0), rng.uniform(0.02, 0.15), grain, rim, rim_gain)

    def apply(self, healthy: np.ndarray, table: np.ndarray, white: np.ndarray, sign: float) -> np.ndarray:
        """The healthy image of one contrast (`table`: its tissue brightness, _TISSUES order) with
        the lesions, grain and leftovers at the edge; `sign` flips the grain's shared part as the
        tumour's is flipped."""
        lesion = table[2] + self.lesion_weight * (table[3] - table[2])  # white matter towards edema
        healthy += self.lesions * white * (lesion - table[2])
        own = _blobs(self.rng, healthy.shape, self.voxel, 1.5)
        healthy *= 1 + self.grain_amp * np.clip(0.8 * sign * self.grain + 0.6 * own, -2.5, 2.5)
        if self.rim is not None:
            healthy[self.rim] *= self.rim_gain * self.rng.uniform(0.8, 1.25)
        return healthy


def _fold_cortex(rng, normal, voxel) -> None:
    """Sulci: thin sheets of CSF through the grey matter, the zero level sets of a smooth field."""
    sheet = np.exp(-((_blobs(rng, normal.shape[1:], voxel, rng.uniform(2.5, 5.0)) / rng.uniform(0.15, 0.35)) ** 2))
    moved = normal[1] * sheet * rng.uniform(0.4, 0.9)
    normal[1] -= moved
    normal[0] += moved


def _fold_cerebellum(rng, normal, voxel, mni) -> None:
    """Folia in the template's (smooth) cerebellum: shells around the fourth ventricle every
    2-4 mm, CSF at one phase and a white-matter core at the other."""
    x, y, z = mni
    # Below the tentorium, behind the brainstem (MNI mm), with a soft edge.
    inside = np.clip((-38.0 - y) / 4, 0, 1) * np.clip((-8.0 - 0.25 * np.abs(x) - z) / 4, 0, 1)
    inside *= 1 - np.clip((12.0 - np.abs(x)) / 4, 0, 1) * np.clip((y + 50.0) / 4, 0, 1)  # the brainstem
    if not inside.any():
        return
    period = rng.uniform(2.0, 4.0)
    radius = np.sqrt(x**2 + (y + 55.0) ** 2 + (z + 30.0) ** 2)
    radius += rng.uniform(1.0, 4.0) * _blobs(rng, inside.shape, voxel, 8.0)
    phase = np.cos(2 * np.pi * radius / period)
    gap = inside * normal[1] * ((1 + phase) / 2) ** 6 * rng.uniform(0.4, 0.9)  # CSF between folia
    core = inside * normal[1] * ((1 - phase) / 2) ** 6 * rng.uniform(0.2, 0.6)  # white matter inside
    normal[1] -= gap + core
    normal[0] += gap
    normal[2] += core


def _ellipsoid_distance(window: tuple[slice, ...], centre, voxel, semi_mm) -> np.ndarray:
    """Over the voxels of `window`, the distance from `centre` (voxel indices) in units of an
    ellipsoid's semi-axes (`semi_mm`, mm per axis): under 1 inside it."""
    grid = np.ogrid[window]
    return np.sqrt(sum(((g - c) * v / r) ** 2 for g, c, v, r in zip(grid, centre, voxel, semi_mm)))


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
