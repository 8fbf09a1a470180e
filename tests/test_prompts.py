"""Click prompts: a click becomes a 3D correction weighed by the network's own evidence."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import MEDIUM

from napari_unet import NapariUnetError
from napari_unet.labels import BACKGROUND, EDEMA, NECROTIC
from napari_unet.metrics import dice
from napari_unet.prompts import DEFAULT_CLICK, Click, ClickEvidence, apply_click

SHAPE = (30, 40, 40)


class FieldEvidence:
    """Log-probabilities (classes, Z, Y, X) and one contrast (Z, Y, X) given as arrays: the
    network's answer and the image, set by the test."""

    def __init__(self, logp: np.ndarray, image: np.ndarray | None = None):
        self.logp = logp
        self.image = np.zeros(SHAPE, np.float32) if image is None else image.astype(np.float32)

    def window(self, zs, ys, xs):
        return self.logp[:, zs.start : zs.stop, ys, xs].astype(np.float32)

    def intensities(self, zs, ys, xs):
        return self.image[None, zs.start : zs.stop, ys, xs]


def _ball(centre, radii, shape=SHAPE) -> np.ndarray:
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + ((xx - centre[2]) / radii[2]) ** 2 <= 1


def _evidence(doubtful: dict[int, np.ndarray], sure_of: np.ndarray | None = None, image=None) -> FieldEvidence:
    """Background sure everywhere, except `doubtful` (label -> mask) where that label nearly wins;
    `sure_of`: labels the network is sure of (as a proposal it made); `image`: the contrast
    (default: each doubtful region bright, 2 z-scores above the rest)."""
    logp = np.full((4,) + SHAPE, -20.0, np.float32)
    logp[BACKGROUND] = 0.0
    for label, mask in doubtful.items():
        logp[BACKGROUND][mask] = -0.3
        logp[label][mask] = -1.4
    if sure_of is not None:
        for label in (1, 2, 3):
            logp[BACKGROUND][sure_of == label] = -20.0
            logp[label][sure_of == label] = 0.0
    if image is None:
        image = np.zeros(SHAPE, np.float32)
        for mask in doubtful.values():
            image[mask] = 2.0
    return FieldEvidence(logp, image)


def test_a_positive_click_adds_the_missed_region_on_its_slices_and_stops_where_it_ends():
    missed = _ball((15, 20, 20), (3, 5, 5))  # slices 12-18
    evidence = _evidence({EDEMA: missed})
    labels = np.zeros(SHAPE, np.uint8)
    edit = apply_click(labels, evidence, Click((15, 20, 20), EDEMA))
    assert labels.max() == 0  # the input is left alone
    added = edit.labels == EDEMA
    assert not (added & ~missed).any()  # nothing where the network is sure of background
    assert dice(added, missed) > 0.9
    assert edit.changed == list(range(12, 19))  # the clicked slice and its neighbours, in 3D


def test_a_click_on_tumour_the_network_missed_entirely_follows_the_tissue_that_looks_alike():
    missed = _ball((15, 20, 20), (2, 4, 4))
    image = np.where(missed, 2.0, 0.0)  # bright on the contrast, unseen by the network
    evidence = _evidence({}, image=image)
    labels = np.zeros(SHAPE, np.uint8)
    edit = apply_click(labels, evidence, Click((15, 20, 20), NECROTIC))
    added = edit.labels == NECROTIC
    assert dice(added, missed) > 0.8 and not (added & ~missed).any()
    assert edit.changed == list(range(13, 18))


def test_a_click_on_tissue_like_its_surroundings_the_network_is_sure_of_stays_near_the_click():
    evidence = _evidence({}, image=np.zeros(SHAPE))
    labels = np.zeros(SHAPE, np.uint8)
    edit = apply_click(labels, evidence, Click((15, 20, 20), NECROTIC))
    rz, ryx = DEFAULT_CLICK.reach()
    zz, yy, xx = np.nonzero(edit.labels == NECROTIC)
    assert edit.labels[15, 20, 20] == NECROTIC
    assert np.abs(zz - 15).max() <= rz and np.abs(yy - 20).max() <= ryx and np.abs(xx - 20).max() <= ryx


def test_a_negative_click_removes_a_false_island_in_3d_and_nothing_else():
    island = _ball((10, 10, 10), (2, 3, 3))
    tumour = _ball((18, 28, 28), (4, 6, 6))
    labels = np.zeros(SHAPE, np.uint8)
    labels[island] = EDEMA
    labels[tumour] = EDEMA
    sure = np.where(tumour, EDEMA, 0)
    evidence = _evidence({EDEMA: island}, sure_of=sure)
    edit = apply_click(labels, evidence, Click((10, 10, 10), BACKGROUND))
    assert not (edit.labels[island]).any()  # the island gone on all its slices
    np.testing.assert_array_equal(edit.labels[tumour], EDEMA)  # the tumour kept
    assert edit.changed == list(range(8, 13))


def test_a_click_changes_only_the_clicked_label_and_never_a_reviewed_slice():
    missed = _ball((15, 20, 20), (4, 8, 8))
    core = _ball((15, 20, 20), (4, 3, 3))
    labels = np.zeros(SHAPE, np.uint8)
    labels[core] = NECROTIC  # inside the missed edema: a click saying edema must not eat it
    evidence = _evidence({EDEMA: missed & ~core}, sure_of=np.where(core, NECROTIC, 0))
    edit = apply_click(labels, evidence, Click((15, 20, 14), EDEMA), protect={13})
    np.testing.assert_array_equal(edit.labels[core], NECROTIC)
    assert 13 not in edit.changed and (edit.labels[13] == labels[13]).all()
    # A reviewed slice is not crossed either: the region below it is not reached through it.
    assert not (edit.labels[11:13] == EDEMA).any()
    assert {14, 15, 16} <= set(edit.changed)
    with pytest.raises(NapariUnetError, match="slice 13 is reviewed"):
        apply_click(labels, evidence, Click((13, 20, 14), EDEMA), protect={13})


def test_a_click_saying_what_the_voxel_is_already_changes_nothing_and_bad_clicks_are_clear_errors():
    labels = np.zeros(SHAPE, np.uint8)
    evidence = _evidence({})
    assert apply_click(labels, evidence, Click((5, 5, 5), BACKGROUND)).empty
    with pytest.raises(NapariUnetError, match="outside the case"):
        apply_click(labels, evidence, Click((40, 5, 5), EDEMA))
    with pytest.raises(NapariUnetError, match="not a label"):
        apply_click(labels, evidence, Click((5, 5, 5), 7))


def test_the_shipped_model_s_evidence_brings_back_a_region_taken_out_of_its_proposal(dataset_factory):
    """The real network on a synthetic case: a hole cut through several slices of its own proposal
    is filled again by one click, on the clicked and the neighbouring slices."""
    from napari_unet.cases import read_case
    from napari_unet.modelfile import load_model
    from napari_unet.predict import Predictor

    case = read_case(dataset_factory("brats2021", cases=1, seed=5, shape=MEDIUM)[0])
    predictor = Predictor(load_model(None), "cpu")
    volume = predictor.prepare_case(case)
    proposal = predictor.predict(volume).labels
    edema = proposal == EDEMA
    z = int(np.argmax(edema.sum(axis=(1, 2))))
    ys, xs = np.nonzero(edema[z])
    y, x = int(np.median(ys)), int(np.median(xs))
    if proposal[z, y, x] != EDEMA:
        i = int(np.argmin((ys - y) ** 2 + (xs - x) ** 2))
        y, x = int(ys[i]), int(xs[i])
    cut = proposal.copy()
    hole = _ball((z, y, x), (2, 4, 4), proposal.shape) & edema
    cut[hole] = BACKGROUND
    evidence = ClickEvidence(predictor, volume)
    edit = apply_click(cut, evidence, Click((z, y, x), EDEMA))
    back = (edit.labels == EDEMA) & hole
    assert back.sum() >= 0.8 * hole.sum()
    assert len({int(s) for s in np.flatnonzero(back.any(axis=(1, 2)))}) >= 3  # in 3D
    assert dice(edit.labels == EDEMA, edema) > dice(cut == EDEMA, edema)
    # Nothing far from the click changes.
    rz, ryx = DEFAULT_CLICK.reach()
    far = np.ones(proposal.shape, bool)
    far[max(0, z - rz) : z + rz + 1, max(0, y - ryx) : y + ryx + 1, max(0, x - ryx) : x + ryx + 1] = False
    np.testing.assert_array_equal(edit.labels[far], cut[far])


def test_a_proposal_keeps_the_evidence_clicks_weigh_so_the_first_click_needs_no_network(dataset_factory, tmp_path):
    from napari_unet.cases import read_case
    from napari_unet.session import AnnotationSession

    case = read_case(dataset_factory("brats2021", cases=1, seed=5, shape=MEDIUM)[0])
    session = AnnotationSession(case.source, case.images, tmp_path / "store")
    prediction, _ = session.predict(device="cpu")
    evidence = session.click_evidence("cpu")
    kept = {z: evidence._slices[z].copy() for z in prediction.computed_slices.tolist()}
    assert len(kept) == len(prediction.computed_slices) > 0
    # The same numbers the network gives when asked slice by slice.
    some = prediction.computed_slices[:: max(1, len(kept) // 4)]
    fresh = evidence.predictor.log_probabilities(evidence.volume, some)
    for z, logp in zip(some.tolist(), fresh):
        np.testing.assert_allclose(kept[z].astype(np.float32), logp.astype(np.float32), atol=0.15)
