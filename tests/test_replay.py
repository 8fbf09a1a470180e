"""The synthetic replay bank: made from the generator, written and read by one module, refused
when damaged, seen through any model's modalities."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet import NapariUnetError
from training.replay import load_bank, make_bank, quantise, save_bank, shipped_bank_path


def test_quantised_patches_come_back_within_half_a_level():
    rng = np.random.default_rng(0)
    patch = rng.normal(0, 1, (2, 16, 16)).astype(np.float32)
    patch[:, :3] = 0  # outside the brain
    patch[1] = 0  # a missing modality
    q, lo, hi = quantise(patch)
    assert (q[:, :3] == 0).all() and (q[1] == 0).all() and (q[0, 3:] > 0).all()
    from training.replay import ReplayBank

    bank = ReplayBank(q[None], lo[None], hi[None], np.zeros((1, 16, 16), np.uint8), ("t1", "flair"), {})
    back, _ = bank.read_slice(0)
    level = (hi[0] - lo[0]) / 254
    assert np.abs(back[0, 3:] - patch[0, 3:]).max() <= level / 2 + 1e-5
    assert (back[0, :3] == 0).all() and (back[1] == 0).all()


def test_a_bank_made_from_the_generator_round_trips_and_holds_every_class(tmp_path):
    images, lo, hi, labels, record = make_bank(1, seed=3, patches_per_case=6, patch=64)
    path = save_bank(tmp_path / "bank.npz", images, lo, hi, labels, ("t1", "t1ce", "t2", "flair"), record)
    bank = load_bank(path)
    assert bank.images.shape == (6, 4, 64, 64) and bank.record["seed"] == 3
    assert len(bank.tumour_slices) >= 3  # most patches centre on tumour
    image, lab = bank.read_slice(int(bank.tumour_slices[0]))
    assert image.shape == (4, 64, 64) and image.dtype == np.float32 and lab.any()
    # A model of two modalities in another order sees those channels; one the bank lacks is zeros.
    view = load_bank(path).for_modalities(("flair", "t1ce"))
    two, _ = view.read_slice(0)
    full, _ = bank.read_slice(0)
    assert np.array_equal(two[0], full[3]) and np.array_equal(two[1], full[1])


def test_the_shipped_bank_is_there_and_holds_every_class():
    bank = load_bank(shipped_bank_path())
    counts = np.bincount(bank.labels.ravel(), minlength=4)
    assert (counts[1:] > 1000).all(), counts  # necrosis, edema and enhancing all taught
    assert bank.modalities == ("t1", "t1ce", "t2", "flair")


@pytest.mark.parametrize("damage", ["truncated", "not npz", "mismatched", "missing"])
def test_a_damaged_bank_is_refused_naming_the_file(tmp_path, damage):
    good = shipped_bank_path().read_bytes()
    path = tmp_path / "bank.npz"
    if damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "not npz":
        path.write_text("hello")
    elif damage == "mismatched":
        bank = load_bank(shipped_bank_path())
        save_bank(path, bank.images[:3], bank.lo[:3], bank.hi[:3], bank.labels[:2], bank.modalities, bank.record)
    with pytest.raises(NapariUnetError, match="bank.npz"):
        load_bank(path)
    with pytest.raises(NapariUnetError, match="none of the model's modalities"):
        load_bank(shipped_bank_path()).for_modalities(("pd",))


def test_the_bank_follows_the_model_it_was_made_for_through_its_fine_tunes(tiny_model, tmp_path):
    import shutil

    from napari_unet.modelfile import default_model_path, load_model
    from training.replay import bank_for_model, mark_model

    assert bank_for_model(load_model(default_model_path()).metadata) == shipped_bank_path()
    model = tmp_path / "m.safetensors"
    shutil.copy(tiny_model[0], model)
    assert bank_for_model(load_model(model).metadata) is None  # trained elsewhere: no bank of its data
    mark_model(model)
    marked = load_model(model).metadata
    assert bank_for_model(marked) == shipped_bank_path()
    # A fine-tune of a fine-tune: its record nests the base models' records.
    twice = {"training": {"kind": "fine-tuned", "base_model": {"training": {
        "kind": "fine-tuned", "base_model": {"training": marked["training"]}}}}}
    assert bank_for_model(twice) == shipped_bank_path()
    assert bank_for_model({"training": {"base_model": {"training": {"kind": "from scratch"}}}}) is None
