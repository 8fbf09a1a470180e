"""The correction tools: fill between slices, pieces removed or kept, holes in the core filled;
reviewed slices never changed."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet import NapariUnetError
from napari_unet.edits import fill_between, fill_core_holes, keep_pieces_at, remove_small_pieces
from napari_unet.labels import EDEMA, ENHANCING, NECROTIC


def _disk(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_fill_between_interpolates_a_moving_growing_shape_and_keeps_reviewed_slices():
    labels = np.zeros((12, 48, 48), np.uint8)
    labels[2][_disk((48, 48), (16, 16), 4)] = EDEMA
    labels[8][_disk((48, 48), (28, 30), 10)] = EDEMA
    labels[5, 40:44, 40:44] = NECROTIC  # another label elsewhere on a slice between: kept
    edit = fill_between(labels, 8, 2, EDEMA, protect={6})
    assert edit.changed == [3, 4, 5, 7]
    areas = [(edit.labels[z] == EDEMA).sum() for z in range(2, 9)]
    assert areas[4] == 0  # slice 6 is reviewed: untouched
    rest = [a for i, a in enumerate(areas) if i != 4]
    assert rest == sorted(rest) and rest[0] < rest[1] and rest[-2] < rest[-1]  # grows slice by slice
    centres = [np.argwhere(edit.labels[z] == EDEMA).mean(axis=0) for z in (3, 5, 7)]
    assert centres[0][0] < centres[1][0] < centres[2][0] and centres[0][1] < centres[1][1] < centres[2][1]  # moves
    assert (edit.labels[5, 40:44, 40:44] == NECROTIC).all()
    assert np.array_equal(edit.labels[[0, 1, 2, 8, 9, 10, 11]], labels[[0, 1, 2, 8, 9, 10, 11]])
    assert not labels[3].any()  # the input is not changed


@pytest.mark.parametrize("first, last, message", [(2, 3, "no slice between"), (2, 9, "slice 9 has no voxel"),
                                                  (2, 40, "not two slices")])
def test_fill_between_says_what_is_missing(first, last, message):
    labels = np.zeros((12, 16, 16), np.uint8)
    labels[[2, 3], 4:8, 4:8] = EDEMA
    with pytest.raises(NapariUnetError, match=message):
        fill_between(labels, first, last, EDEMA)


def _two_pieces():
    labels = np.zeros((10, 32, 32), np.uint8)
    labels[2:8, 4:14, 4:14] = EDEMA  # 600 voxels
    labels[4:6, 10:12, 10:12] = NECROTIC
    labels[3:5, 25:27, 25:27] = ENHANCING  # 8 voxels, apart
    return labels


def test_small_pieces_are_removed_by_volume_except_on_reviewed_slices():
    labels = _two_pieces()
    edit = remove_small_pieces(labels, voxel_ml=0.001, min_ml=0.05)  # 8 voxels = 0.008 mL
    assert edit.changed == [3, 4] and not (edit.labels == ENHANCING).any()
    assert np.array_equal(edit.labels == EDEMA, labels == EDEMA)
    protected = remove_small_pieces(labels, voxel_ml=0.001, min_ml=0.05, protect=[4])
    assert protected.changed == [3] and (protected.labels[4] == ENHANCING).sum() == 4
    assert remove_small_pieces(labels, voxel_ml=0.001, min_ml=0.005).empty  # both pieces larger


def test_only_the_clicked_piece_is_kept():
    labels = _two_pieces()
    edit = keep_pieces_at(labels, [(4, 25, 26)])
    assert (edit.labels > 0).sum() == 8 and (edit.labels == ENHANCING).sum() == 8
    assert keep_pieces_at(labels, [(4, 6, 6), (3, 25, 25)]).empty
    with pytest.raises(NapariUnetError, match="no point lies on the tumour"):
        keep_pieces_at(labels, [(0, 0, 0)])


def test_holes_in_the_core_become_necrotic_core_and_edema_outside_stays():
    labels = np.zeros((6, 32, 32), np.uint8)
    labels[1:5][:, _disk((32, 32), (16, 16), 12)] = EDEMA
    labels[1:5][:, _disk((32, 32), (16, 16), 7)] = ENHANCING
    labels[1:5][:, _disk((32, 32), (16, 16), 3)] = EDEMA  # a proposal's gap inside the rim
    edit = fill_core_holes(labels, protect=[4])
    gap = _disk((32, 32), (16, 16), 3)
    assert edit.changed == [1, 2, 3]
    assert (edit.labels[1:4][:, gap] == NECROTIC).all() and (edit.labels[4][gap] == EDEMA).all()
    outside = np.broadcast_to(~gap, labels.shape)
    assert np.array_equal(edit.labels[outside], labels[outside])  # the edema around the core stays


@pytest.mark.parametrize("z, gap", [(12, (10, 15)), (15, (10, 15)), (3, (2, 5)), (30, (15, 20)), (5, (2, 5)),
                                    (10, (5, 10))])  # 5 and 10 each bound two gaps: the one below
def test_the_gap_to_fill_is_the_unpainted_gap_nearest_the_current_slice(z, gap):
    from napari_unet.edits import gap_to_fill

    assert gap_to_fill([2, 5, 10, 15, 20, 21], z) == gap


@pytest.mark.parametrize("painted, message", [([], "on no slice"), ([4], "slice 4 only"),
                                               ([4, 5, 6], "every slice from 4 to 6")])
def test_no_gap_to_fill_is_said(painted, message):
    from napari_unet.edits import gap_to_fill

    with pytest.raises(NapariUnetError, match=message):
        gap_to_fill(painted, 5)
