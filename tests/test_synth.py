"""The synthetic generator: real anatomy, a grown tumour, the physics of each contrast."""

from __future__ import annotations

import numpy as np
import pytest

from scipy import ndimage
from scipy.spatial import ConvexHull

from napari_unet.labels import EDEMA, ENHANCING, NECROTIC
from napari_unet.synth import _TISSUES, _generate, _HealthyDetail, generate

SHAPE = (96, 96, 62)  # 2.5 mm voxels: the anatomy and tumour regions are still resolved


@pytest.fixture(scope="module")
def made():
    """Eight cases of randomised appearance and eight of the standard one, with their tumours."""
    return [_generate(np.random.default_rng([5, i]), SHAPE, appearance="random") for i in range(8)] + [
        _generate(np.random.default_rng([6, i]), SHAPE) for i in range(8)
    ]


@pytest.fixture(scope="module")
def cases(made):
    return [case for case, _ in made]


def _brain(case):
    return case.tissue.sum(0) > 0.5


def _dice(a, b):
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_every_case_has_a_tumour_inside_the_brain_and_nothing_outside(cases):
    for case in cases:
        brain = _brain(case)
        assert np.count_nonzero(case.labels) > 50
        assert not case.labels[~brain].any()
        for image in case.images.values():
            assert image.dtype == np.int16
            assert not image[~brain].any()
            assert np.count_nonzero(image[brain] > 0) > 0.99 * np.count_nonzero(brain)


def test_edema_follows_white_matter_not_csf(cases):
    for case in cases:
        csf, _, white = case.tissue
        edema = case.labels == EDEMA
        brain = _brain(case)
        assert white[edema].mean() > white[brain].mean() + 0.1
        assert csf[edema].mean() < 0.35


def test_the_regions_look_as_each_contrast_shows_them(cases):
    """Edema bright on FLAIR and T2 against white matter; enhancement on T1ce, not on T1;
    necrosis darker than the rim on T1ce."""
    for case in cases:
        img = {m: v.astype(float) for m, v in case.images.items()}
        white = (case.tissue[2] > 0.9) & (case.labels == 0)
        edema = case.labels == EDEMA
        assert img["flair"][edema].mean() > 1.15 * img["flair"][white].mean()
        assert img["t2"][edema].mean() > 1.15 * img["t2"][white].mean()
        rim = case.labels == ENHANCING
        if np.count_nonzero(rim) > 20:
            t1ce_gain = img["t1ce"][rim].mean() / img["t1ce"][white].mean()
            t1_gain = img["t1"][rim].mean() / img["t1"][white].mean()
            assert t1ce_gain > 1.0 and t1ce_gain > 1.2 * t1_gain
            necrosis = case.labels == NECROTIC
            if np.count_nonzero(necrosis) > 20:
                assert img["t1ce"][necrosis].mean() < img["t1ce"][rim].mean()


def test_tumours_vary_from_case_to_case(cases):
    """Sizes, enhancing and non-enhancing ones, and the share of core."""
    whole = [np.count_nonzero(c.labels) for c in cases]
    assert max(whole) > 2 * min(whole)
    enhancing = [np.count_nonzero(c.labels == ENHANCING) > 0 for c in cases]
    assert any(enhancing)
    rng_cases = [generate(np.random.default_rng([9, i]), (48, 48, 32)) for i in range(12)]
    assert any(np.count_nonzero(c.labels) and not (c.labels == ENHANCING).any() for c in rng_cases)


def test_each_subject_is_a_deformed_brain(cases):
    """The same template, but every subject's brain differs in shape and size."""
    brains = [_brain(c) for c in cases]
    overlaps = [_dice(brains[i], brains[j]) for i in range(4) for j in range(i + 1, 4)]
    assert all(0.75 < d < 0.97 for d in overlaps), overlaps
    sizes = [np.count_nonzero(b) for b in brains]
    assert max(sizes) > 1.1 * min(sizes)


def test_random_appearance_changes_the_contrast_not_the_anatomy():
    a = generate(np.random.default_rng(3), (48, 48, 32), appearance="standard")
    b = generate(np.random.default_rng(3), (48, 48, 32), appearance="random")
    np.testing.assert_array_equal(a.labels, b.labels)
    brain = _brain(a)
    ratio = lambda c: c.images["t1"][brain].astype(float).mean() / c.images["flair"][brain].astype(float).mean()  # noqa: E731
    assert abs(ratio(a) - ratio(b)) > 0.02


def test_the_same_seed_gives_the_same_case():
    a = generate(np.random.default_rng(4), (48, 48, 32), appearance="random")
    b = generate(np.random.default_rng(4), (48, 48, 32), appearance="random")
    np.testing.assert_array_equal(a.labels, b.labels)
    for m in a.images:
        np.testing.assert_array_equal(a.images[m], b.images[m])


def test_the_synth_command_writes_randomised_cases_that_read_back(tmp_path):
    from napari_unet.cases import read_case
    from napari_unet.cli import main

    out = tmp_path / "train"
    assert main(["synth", str(out), "--cases", "2", "--seed", "3", "--appearance", "random",
                 "--shape", "48", "48", "32"]) == 0
    cases = [read_case(p) for p in sorted(out.iterdir())]
    assert len(cases) == 2
    for case in cases:
        assert set(case.images) == {"t1", "t1ce", "t2", "flair"}
        assert (case.labels > 0).any()
    # Two cases of one run look different: their tissue contrasts were drawn separately.
    a, b = (c.images["t1"][c.labels == 0] for c in cases)
    assert abs(np.percentile(a[a != 0], 50) / np.percentile(a[a != 0], 90)
               - np.percentile(b[b != 0], 50) / np.percentile(b[b != 0], 90)) > 0.01


# The tumour's look, as BraTS describes real gliomas (Menze et al. 2015, Bakas et al. 2018).


def _tissue(tumour, name):
    return tumour.kind == _TISSUES.index(name)


def _images(case):
    return {m: v.astype(float) for m, v in case.images.items()}


def test_non_enhancing_core_is_darker_than_edema_on_t1_and_usually_on_flair(made):
    for group in (made[:8], made[8:]):  # random, standard
        t1, flair = [], []
        for case, tumour in group:
            solid, edema = _tissue(tumour, "non_enhancing"), case.labels == EDEMA
            if np.count_nonzero(solid) > 20 and np.count_nonzero(edema) > 20:
                img = _images(case)
                t1.append(np.median(img["t1"][solid]) / np.median(img["t1"][edema]))
                flair.append(np.median(img["flair"][solid]) / np.median(img["flair"][edema]))
        assert len(t1) >= 4
        assert max(t1) < 0.95 and np.median(t1) < 0.75, t1
        assert np.median(flair) < 1.0, flair


def test_necrosis_is_bright_on_t2_and_darker_than_the_rim_on_t1ce(made):
    seen = 0
    for case, tumour in made:
        necrosis, rim = _tissue(tumour, "necrosis"), case.labels == ENHANCING
        if np.count_nonzero(necrosis) < 20:
            continue
        seen += 1
        img = _images(case)
        white = (case.tissue[2] > 0.9) & (case.labels == 0)
        assert np.all(case.labels[necrosis] == NECROTIC)
        assert np.median(img["t2"][necrosis]) > 1.2 * np.median(img["t2"][white])
        assert np.median(img["t1"][necrosis]) < np.median(img["t1"][case.labels == EDEMA])
        if np.count_nonzero(rim) > 20:
            assert np.median(img["t1ce"][necrosis]) < 0.8 * np.median(img["t1ce"][rim])
    assert seen >= 4


def test_some_tumours_hold_a_fluid_cyst_labelled_necrotic(made):
    seen = 0
    for case, tumour in made:
        cyst = _tissue(tumour, "cyst")
        if np.count_nonzero(cyst) < 20:
            continue
        seen += 1
        img = _images(case)
        assert np.all(case.labels[cyst] == NECROTIC)
        fluid = (case.tissue[0] > 0.95) & (case.labels == 0)
        white = (case.tissue[2] > 0.9) & (case.labels == 0)
        edema = case.labels == EDEMA
        assert np.median(img["t2"][cyst]) > 0.85 * np.median(img["t2"][fluid])
        assert np.median(img["t2"][cyst]) > np.median(img["t2"][edema])
        assert np.median(img["t1"][cyst]) < 0.6 * np.median(img["t1"][white])
        assert np.median(img["t1"][cyst]) < np.median(img["t1"][edema])
    assert seen >= 1


def test_the_core_is_heterogeneous_and_the_edema_less_so(made):
    ratios, core_cv = [], []
    for case, tumour in made:
        solid = ndimage.binary_erosion(_tissue(tumour, "non_enhancing"))
        edema = ndimage.binary_erosion(case.labels == EDEMA)
        if np.count_nonzero(solid) < 20 or np.count_nonzero(edema) < 20:
            continue
        for m in ("t2", "flair"):
            v = case.images[m].astype(float)
            cv = lambda mask: v[mask].std() / v[mask].mean()  # noqa: E731
            core_cv.append(cv(solid))
            ratios.append(cv(solid) / cv(edema))
    assert len(ratios) >= 8
    assert np.median(core_cv) > 0.1 and np.median(ratios) > 1.3, (core_cv, ratios)


def test_no_dither_of_enhancing_specks(made):
    """One contiguous rim (or a few pieces) with a handful of specks, not a dither through the core."""
    for case, _ in made:
        parts, n = ndimage.label(case.labels == ENHANCING)
        sizes = np.bincount(parts.ravel())[1:]
        assert np.count_nonzero(sizes <= 2) <= 10, sizes


def test_low_grade_tumours_have_no_enhancement_and_a_large_core(made):
    low = [(c, t) for c, t in made if t.low_grade]
    assert low and len(low) < len(made) / 2
    for case, _ in low:
        core = np.count_nonzero(case.labels == NECROTIC)
        assert not (case.labels == ENHANCING).any()
        assert core > 0.4 * np.count_nonzero(case.labels)
    high = [c for c, t in made if not t.low_grade and np.count_nonzero(c.labels == NECROTIC) > 100]
    assert sum((c.labels == ENHANCING).any() for c in high) >= 0.8 * len(high)


def _solidity(mask):
    """Volume over the volume of the convex hull, both counted in voxels: 1 for a convex shape."""
    pts = np.argwhere(mask)
    lo, hi = pts.min(0), pts.max(0) + 1
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1).reshape(-1, 3)
    facets = ConvexHull(pts).equations
    inside = np.all(grid @ facets[:, :3].T + facets[:, 3] <= 1e-6, axis=1)
    return len(pts) / max(np.count_nonzero(inside), len(pts))


def test_cores_are_lobulated(made):
    solidity = [_solidity(np.isin(c.labels, (NECROTIC, ENHANCING))) for c, _ in made
                if np.count_nonzero(np.isin(c.labels, (NECROTIC, ENHANCING))) > 200]
    assert len(solidity) >= 8
    assert np.median(solidity) < 0.93, solidity


# Healthy tissue as real scans show it, so that the model does not take it for tumour.


def _slab(shape=(64, 64, 40), tissue=1):
    normal = np.zeros((3,) + shape, np.float32)
    normal[tissue] = 1
    return normal


def _draw(seed, normal, box=(slice(0, 4),) * 3, mni_origin=(0.0, 0.0, 40.0), brain=None):
    """Healthy detail on a slab of 1 mm voxels at `mni_origin` (MNI mm; the default is cerebrum),
    all of it brain unless `brain` says otherwise."""
    shape = normal.shape[1:]
    mni = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) + o for n, o in zip(shape, mni_origin)],
                               indexing="ij"))
    brain = np.ones(shape, bool) if brain is None else brain
    return _HealthyDetail.draw(np.random.default_rng(seed), normal, brain, box, np.ones(3), mni)


def test_the_cortex_is_folded_into_thin_sulci_of_csf():
    """The template's cortex is blurred smooth; real grey matter is cut by sulci every few mm."""
    normal = _slab(tissue=1)
    _draw(0, normal)
    np.testing.assert_allclose(normal.sum(0), 1, atol=1e-5)  # grey matter became CSF, nothing lost
    sulci = normal[0] > 0.3
    assert 0.03 < sulci.mean() < 0.5, sulci.mean()
    # Thin sheets: eroding by 2 mm leaves almost nothing, and every axial slice is cut by them.
    assert np.count_nonzero(ndimage.binary_erosion(sulci, iterations=2)) < 0.1 * np.count_nonzero(sulci)
    assert all(sulci[:, :, z].any() for z in range(sulci.shape[2]))


def test_white_matter_lesions_are_flair_bright_unlabelled_and_far_from_the_tumour():
    box = (slice(0, 12),) * 3
    seen = 0
    for seed in range(10):
        normal = _slab(tissue=2)
        detail = _draw(seed, normal, box)
        if not (detail.lesions > 0.5).any():
            continue
        seen += 1
        near = np.zeros(normal.shape[1:], bool)
        near[:15, :15, :15] = True  # within 3 mm of the tumour's box
        assert not detail.lesions[near].any()
        lesion = detail.lesions > 0.9
        flair = np.array([0.1, 0.5, 0.4, 0.9, 0.5, 0.7, 0.7, 0.2], np.float32)  # _TISSUES order
        t1 = np.array([0.2, 0.55, 0.8, 0.48, 0.28, 0.5, 0.36, 0.22], np.float32)
        on_flair = detail.apply(np.full(normal.shape[1:], flair[2]), flair, normal[2], 1.0)
        on_t1 = detail.apply(np.full(normal.shape[1:], t1[2]), t1, normal[2], -1.0)
        assert np.median(on_flair[lesion]) > 1.2 * np.median(on_flair[~(detail.lesions > 0)])
        assert np.median(on_flair[lesion]) <= flair[3] * 1.05
        assert np.median(on_t1[lesion]) < np.median(on_t1[~(detail.lesions > 0)])
    assert 3 <= seen <= 9  # in some subjects, not all


def test_healthy_tissue_is_at_times_nearly_as_grainy_as_the_tumour_core(made):
    """Grain alone must not say tumour: the fine variation (what a 2 mm blur removes) of healthy
    white matter far from the tumour comes near the solid core's in several cases (on T1, where
    the rest of the generator leaves it at a third of the core's or less)."""
    ratios = []
    for case, tumour in made[:8]:
        solid = ndimage.binary_erosion(_tissue(tumour, "non_enhancing"))
        if np.count_nonzero(solid) < 20:
            continue
        white = ndimage.binary_erosion(case.tissue[2] > 0.9) & (ndimage.distance_transform_edt(case.labels == 0) > 8)
        v = case.images["t1"].astype(float)
        fine = v - ndimage.gaussian_filter(v, 2.0)
        ratios.append((fine[white].std() / v[white].mean()) / (fine[solid].std() / v[solid].mean()))
    assert len(ratios) >= 4
    assert np.count_nonzero(np.array(ratios) > 0.38) >= 3, ratios  # without the grain: 0.23-0.33


def test_the_cerebellum_is_striated_by_folia():
    """The posterior fossa's folia: stacked thin shells of CSF every few mm, only below the
    tentorium (a smooth grey cerebellum is what the template has, and what real ones never are)."""
    cerebellum = _slab(tissue=1)
    _draw(1, cerebellum, mni_origin=(14.0, -90.0, -50.0))
    cerebrum = _slab(tissue=1)
    _draw(1, cerebrum, mni_origin=(14.0, 0.0, 30.0))
    gaps = cerebellum[0] - cerebrum[0]  # the same cortical folds in both: what the folia add
    assert (gaps > 0.2).mean() > 0.05
    assert (cerebellum[2] > 0.1).mean() > 0.05 and not (cerebrum[2] > 0.1).any()  # white-matter cores
    # Striated: along a line through the fourth ventricle's shells, CSF comes and goes every 2-4 mm.
    profile = (gaps[10, :, 20] > 0.2).astype(int)
    assert np.count_nonzero(np.diff(profile) == 1) >= 5, profile


def test_skull_stripping_leaves_bright_or_dark_patches_at_the_edge_in_some_scans():
    shape = (64, 64, 40)
    brain = np.zeros(shape, bool)
    brain[8:56, 8:56, 4:36] = True
    seen = 0
    for seed in range(10):
        normal = _slab(shape, tissue=2) * brain
        detail = _draw(seed, normal, (slice(30, 34),) * 3, brain=brain)
        if detail.rim is None:
            continue
        seen += 1
        deep = ndimage.binary_erosion(brain, iterations=5)
        assert detail.rim.any() and not (detail.rim & deep).any() and not (detail.rim & ~brain).any()
        table = np.array([0.1, 0.5, 0.6, 0.9, 0.5, 0.7, 0.7, 0.2], np.float32)
        image = detail.apply(np.where(brain, table[2], 0).astype(np.float32), table, normal[2], 1.0)
        ratio = np.median(image[detail.rim]) / np.median(image[deep])
        assert ratio > 1.3 or ratio < 0.75, ratio
    assert 2 <= seen <= 8
