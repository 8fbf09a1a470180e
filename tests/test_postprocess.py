"""Post-processing of whole-volume proposals: the three rules on small volumes, and the engine
applying them to whole volumes only."""

from __future__ import annotations

import numpy as np

from napari_unet.labels import EDEMA, ENHANCING, NECROTIC
from napari_unet.postprocess import PostProcessing, remove_islands, remove_rimless_cores, small_enhancing_to_core

MM3 = 1e-3  # mL per 1 mm voxel


def _ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def test_a_small_enhancing_region_becomes_core_and_a_large_one_stays():
    labels = np.zeros((30, 40, 40), np.uint8)
    labels[_ball(labels.shape, (15, 20, 20), 8)] = EDEMA
    labels[_ball(labels.shape, (15, 20, 20), 3)] = ENHANCING  # 123 voxels: 0.12 mL
    out = small_enhancing_to_core(labels, MM3, 0.5)
    assert not (out == ENHANCING).any()
    assert np.array_equal(out == NECROTIC, labels == ENHANCING)  # still core, same voxels
    assert np.array_equal(out > 0, labels > 0)  # the whole tumour is unchanged
    # The same voxels are 1 mL at 2 mm voxels: a real rim, kept.
    assert np.array_equal(small_enhancing_to_core(labels, 8 * MM3, 0.5), labels)


def test_small_islands_far_from_the_tumour_go_and_large_second_lesions_stay():
    labels = np.zeros((40, 60, 60), np.uint8)
    labels[_ball(labels.shape, (20, 20, 20), 9)] = EDEMA  # the tumour: ~3000 voxels
    labels[_ball(labels.shape, (20, 20, 20), 4)] = NECROTIC
    labels[_ball(labels.shape, (20, 50, 50), 2)] = ENHANCING  # a speck: 33 voxels
    labels[_ball(labels.shape, (5, 50, 10), 6)] = EDEMA  # a second lesion: ~900 voxels, 30% of the first
    out = remove_islands(labels, MM3, 0.1, 2.0)
    assert not out[_ball(labels.shape, (20, 50, 50), 2)].any()
    assert np.array_equal(out[_ball(labels.shape, (20, 20, 20), 9)], labels[_ball(labels.shape, (20, 20, 20), 9)])
    assert (out[_ball(labels.shape, (5, 50, 10), 6)] == EDEMA).all()
    assert np.array_equal(PostProcessing().apply(labels, MM3), out)  # the engine's rules include it
    # An island at least island_max_ml is never removed, however small beside the tumour.
    assert out is not labels and (remove_islands(labels, MM3, 0.1, 0.02)[_ball(labels.shape, (20, 50, 50), 2)] > 0).all()


def test_a_second_piece_of_bare_necrotic_core_goes_and_a_second_tumour_with_edema_stays():
    """The false alarm of real scans (cerebellum, skull base): a large piece called necrotic core
    with no tumour around it, far from the tumour; the islands rule keeps it (over 2 mL)."""
    labels = np.zeros((50, 80, 80), np.uint8)
    labels[_ball(labels.shape, (25, 25, 25), 14)] = EDEMA  # the tumour: ~11500 voxels
    labels[_ball(labels.shape, (25, 25, 25), 6)] = NECROTIC
    bare = _ball(labels.shape, (25, 60, 60), 10)  # ~4200 voxels, 4.2 mL: a third of the tumour
    labels[bare] = NECROTIC
    labels[bare & (np.indices(labels.shape)[0] > 29)] = EDEMA  # an edge of edema: the core still 81% of it
    second = _ball(labels.shape, (10, 60, 15), 8)  # a second lesion: edema around a necrotic core
    labels[second] = EDEMA
    labels[_ball(labels.shape, (10, 60, 15), 4)] = NECROTIC

    out = PostProcessing().apply(labels, MM3)
    assert not out[bare].any()
    assert np.array_equal(out[~bare], labels[~bare])  # the tumour and the second lesion as they were
    # The largest piece stays however much of it is core; over the fraction it is not a bare core.
    all_core = np.where(labels > 0, NECROTIC, 0).astype(np.uint8)
    assert np.array_equal(remove_rimless_cores(all_core, 0.5)[all_core > 0] > 0, _largest(all_core))
    assert np.array_equal(remove_rimless_cores(labels, 0.9), labels)


def _largest(labels: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    pieces, _ = ndimage.label(labels > 0, structure=np.ones((3, 3, 3), bool))
    return (pieces == np.argmax(np.bincount(pieces.ravel())[1:]) + 1)[labels > 0]


def test_post_processing_leaves_an_empty_or_single_tumour_alone():
    empty = np.zeros((10, 10, 10), np.uint8)
    assert not PostProcessing().apply(empty, MM3).any()
    one = np.zeros((20, 30, 30), np.uint8)
    one[_ball(one.shape, (10, 15, 15), 8)] = EDEMA
    one[_ball(one.shape, (10, 15, 15), 6)] = ENHANCING  # ~900 voxels: a rim, above 0.5 mL
    assert np.array_equal(PostProcessing().apply(one, MM3), one)


def test_the_engine_post_processes_whole_volumes_only(tiny_model, dataset_factory):
    """The engine applies its rules to a whole-volume proposal; a proposal for some slices (the
    widget's current slice) is the network's own. Rules strict enough to change any proposal
    (every enhancing voxel called core) make the difference visible."""
    from napari_unet.cases import read_case
    from napari_unet.modelfile import load_model
    from napari_unet.predict import Predictor

    path, _ = tiny_model
    case = read_case(dataset_factory("brats2021", cases=1, seed=11)[0])
    loaded = load_model(path)
    strict = PostProcessing(min_enhancing_ml=1e6, island_fraction=1.0)
    raw = Predictor(loaded, "cpu", postprocess=None).predict_case(case).labels
    predictor = Predictor(loaded, "cpu", postprocess=strict)
    processed = predictor.predict_case(case).labels
    assert (raw == ENHANCING).any() and not (processed == ENHANCING).any()
    assert np.array_equal(processed, strict.apply(raw, case.source.voxel_ml))
    some = np.flatnonzero((raw == ENHANCING).any(axis=(1, 2)))[:3]
    part = predictor.predict(predictor.prepare_case(case), slices=some).labels
    assert np.array_equal(part[some], raw[some])


def test_proposals_are_post_processed_by_default_and_not_with_no_postprocess(tiny_model, dataset_factory, tmp_path,
                                                                          monkeypatch):
    """The default engine, and `predict` without a flag, apply the rules; `--no-postprocess` does
    not. (Rules strict enough to change any proposal make the difference visible.)"""
    from napari_unet.cases import read_case, read_labels
    from napari_unet.cli import main
    from napari_unet.modelfile import load_model
    from napari_unet.predict import Predictor

    strict = PostProcessing(min_enhancing_ml=1e6, island_fraction=1.0)
    rules = PostProcessing.apply
    monkeypatch.setattr(PostProcessing, "apply", lambda self, labels, voxel_ml: rules(strict, labels, voxel_ml))
    path, _ = tiny_model
    case_path = dataset_factory("brats2021", cases=1, seed=11)[0]
    case = read_case(case_path)
    assert (Predictor(load_model(path), "cpu", postprocess=None).predict_case(case).labels == ENHANCING).any()
    assert not (Predictor(load_model(path), "cpu").predict_case(case).labels == ENHANCING).any()

    assert main(["predict", str(case_path), "--out", str(tmp_path / "default"), "--model", str(path)]) == 0
    assert main(["predict", str(case_path), "--out", str(tmp_path / "raw"), "--model", str(path),
                 "--no-postprocess"]) == 0
    default, raw = (read_labels(next((tmp_path / d).rglob("*.nii.gz")))[0] for d in ("default", "raw"))
    assert not (default == 3).any() and (raw == 3).any() | (raw == 4).any()

