"""Dice and HD95 against MONAI's independent implementation, and BraTS's empty-region rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from napari_unet.metrics import EMPTY_HD95, dice, hd95, region_scores


def _blob(rng, shape, n=3):
    field = ndimage.gaussian_filter(rng.normal(size=shape), 3)
    return field > np.quantile(field, 0.9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_and_hd95_agree_with_monai(seed):
    from monai.metrics import compute_dice, compute_hausdorff_distance

    rng = np.random.default_rng(seed)
    shape, spacing = (30, 40, 36), (2.0, 1.0, 1.5)
    a, b = _blob(rng, shape), _blob(rng, shape)
    b |= np.roll(a, 3, axis=1)
    ours_dice, ours_hd = dice(a, b), hd95(a, b, spacing)
    ta, tb = (torch.from_numpy(m[None, None].astype(np.float32)) for m in (a, b))
    monai_dice = float(compute_dice(ta, tb, include_background=True))
    monai_hd = float(compute_hausdorff_distance(ta, tb, include_background=True, percentile=95, spacing=spacing))
    assert ours_dice == pytest.approx(monai_dice, abs=1e-6)
    assert ours_hd == pytest.approx(monai_hd, rel=0.02, abs=0.2)


def test_brats_rules_for_empty_regions():
    empty, some = np.zeros((5, 5, 5), bool), np.zeros((5, 5, 5), bool)
    some[2, 2, 2] = True
    assert dice(empty, empty) == 1.0 and hd95(empty, empty) == 0.0
    assert dice(some, empty) == 0.0 and hd95(some, empty) == EMPTY_HD95 == hd95(empty, some)


def test_regions_from_canonical_labels():
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[0] = 2  # edema
    truth[1] = 3  # enhancing
    pred = truth.copy()
    pred[1] = 1  # enhancing called necrotic: WT and TC right, ET wrong
    scores = region_scores(pred, truth)
    assert scores["WT"]["dice"] == 1.0 and scores["TC"]["dice"] == 1.0
    assert scores["ET"]["dice"] == 0.0 and scores["ET"]["hd95"] == EMPTY_HD95
