"""Reading every layout, canonical labels, voxel-exact round trips, orientation, bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ALL_TISSUES_SEED, SMALL, expected_labels

from napari_unet import NapariUnetError
from napari_unet.cases import (
    MODALITIES,
    find_case,
    find_cases,
    read_case,
    read_labels,
    write_case_files,
    write_labels,
)
from napari_unet.labels import EDEMA, ENHANCING, NECROTIC


def _seg_file(case_path: Path) -> Path:
    return Path(find_case(case_path).seg)


def test_every_layout_reads_four_modalities_and_canonical_labels(case_path, layout):
    case = read_case(case_path)
    assert case.source.layout == layout
    assert set(case.images) == set(MODALITIES)
    # Display order is (axial, row, column): the file's third axis becomes the slider axis.
    assert case.shape == (SMALL[2], SMALL[1], SMALL[0])
    assert all(img.dtype == np.float32 for img in case.images.values())
    truth = case.source.to_display(expected_labels(ALL_TISSUES_SEED, 1))
    np.testing.assert_array_equal(case.labels, truth)
    assert set(np.unique(case.labels)) == {0, NECROTIC, EDEMA, ENHANCING}


@pytest.mark.parametrize(
    "layout, stored_values",
    [("brats2020", {1, 2, 4}), ("brats2021", {1, 2, 4}), ("brats2023", {1, 2, 3}), ("msd", {1, 2, 3})],
)
def test_files_hold_each_layouts_own_label_values(dataset_factory, layout, stored_values):
    path = dataset_factory(layout, cases=1, seed=ALL_TISSUES_SEED)[0]
    stored = np.asarray(nib.load(_seg_file(path)).dataobj)
    assert set(np.unique(stored)) - {0} == stored_values
    edema_canonical = read_case(path).labels == EDEMA
    edema_value = 1 if layout == "msd" else 2
    np.testing.assert_array_equal(read_case(path).source.to_file(edema_canonical), stored == edema_value)


def test_writing_labels_back_reproduces_the_segmentation_exactly(case_path, tmp_path):
    case = read_case(case_path)
    seg = _seg_file(case_path)
    out = write_labels(case.labels, case.source, tmp_path / "roundtrip.nii.gz")
    original, written = nib.load(seg), nib.load(out)
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(original.dataobj))
    assert written.get_data_dtype() == original.get_data_dtype()
    np.testing.assert_allclose(written.affine, original.affine)
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind


def test_brats2020_segm_named_case(dataset_factory, tmp_path):
    """One public BraTS 2020 case calls its segmentation *_Segm.nii (uncompressed)."""
    src = dataset_factory("brats2020", cases=1)[0]
    case_dir = tmp_path / "BraTS20_Training_355"
    case_dir.mkdir()
    for f in src.iterdir():
        name = f.name.replace("BraTS20_Training_001", "BraTS20_Training_355")
        if "_seg" in name:
            nib.save(nib.load(f), case_dir / "W39_1998.09.19_Segm.nii")
        else:
            (case_dir / name).write_bytes(f.read_bytes())
    case = read_case(case_dir)
    assert case.source.layout == "brats2020"
    np.testing.assert_array_equal(case.labels, read_case(src).labels)


def test_orientation_puts_anterior_top_and_patient_right_on_screen_left(tmp_path):
    """The same world point lands on the same display voxel whatever the file's voxel order."""
    shape = (20, 24, 16)
    marker_world = np.array([5.0, 7.0, 3.0, 1.0])  # right, anterior, superior of the centre
    # Three voxel orders over the same world box: x -10..9, y -12..11, z -8..7 mm.
    layouts = {
        "lps": np.array([[-1, 0, 0, 9], [0, -1, 0, 11], [0, 0, 1, -8], [0, 0, 0, 1]], float),
        "ras": np.array([[1, 0, 0, -10], [0, 1, 0, -12], [0, 0, 1, -8], [0, 0, 0, 1]], float),
        "permuted": np.array([[0, 0, 1, -10], [0, -1, 0, 11], [1, 0, 0, -8], [0, 0, 0, 1]], float),
    }
    where = {}
    for name, affine in layouts.items():
        vox_shape = shape if name != "permuted" else (shape[2], shape[1], shape[0])
        data = np.zeros(vox_shape, np.int16)
        ijk = np.rint(np.linalg.inv(affine) @ marker_world).astype(int)[:3]
        data[tuple(ijk)] = 100
        path = tmp_path / f"{name}_flair.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), path)
        case = read_case(path)
        assert case.shape == (16, 24, 20)
        where[name] = tuple(int(i) for i in np.argwhere(case.images["flair"] == 100)[0])
    assert len(set(where.values())) == 1, where
    # Slice 11 of 16 (superior), row 4 of 24 (anterior at the top), column 4 of 20 (the
    # patient's right on the screen's left, the radiological convention).
    assert where["lps"] == (11, 4, 4)


def test_single_modality_file(dataset_factory):
    flair = next(dataset_factory("brats2021", cases=1)[0].glob("*_flair.nii.gz"))
    case = read_case(flair)
    assert list(case.images) == ["flair"] and case.labels is None


def test_find_cases_in_a_dataset_root(dataset_factory):
    paths = dataset_factory("brats2023", cases=2)
    assert find_cases(paths[0].parent) == paths
    msd = dataset_factory("msd", cases=2)
    assert find_cases(msd[0].parent.parent) == msd


# --------------------------------------------------------------------------- bad input


def _copy_case(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture
def good_case(dataset_factory, tmp_path):
    return _copy_case(dataset_factory("brats2021", cases=1)[0], tmp_path / "BraTS2021_00001")


def _expect(path, *fragments):
    with pytest.raises(NapariUnetError) as info:
        read_case(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_case_with_some_modalities_missing_opens_and_says_which(good_case, tiny_model):
    for m in ("t1", "t2"):
        next(good_case.glob(f"*_{m}.nii.gz")).unlink()
    case = read_case(good_case)
    assert sorted(case.images) == ["flair", "t1ce"] and case.labels is not None
    # The notification names the case and the problem first; the folder's path comes last.
    assert f"{case.case_id}: no T1, T2 image (it has T1CE, FLAIR); in {good_case}" in case.warnings
    from napari_unet.modelfile import load_model
    from napari_unet.predict import Predictor

    with pytest.raises(NapariUnetError, match="missing t1, t2"):  # a model trained on all four
        Predictor(load_model(tiny_model[0]), "cpu").predict_case(case)
    assert Predictor(load_model(None), "cpu").predict_case(case).labels.any()  # the shipped one: any set


def _rewrite(case_dir: Path, suffix: str, change) -> None:
    path = next(case_dir.glob(f"*_{suffix}.nii.gz"))
    img = nib.load(path)
    data = change(np.asarray(img.dataobj))
    header = img.header.copy()
    header.set_data_dtype(data.dtype)
    nib.save(nib.Nifti1Image(data, img.affine, header), path)


def test_brats2015_labels_read_as_core_and_write_back_exactly(good_case, tmp_path):
    """BraTS 2013-2015: 1 necrosis, 2 edema, 3 non-enhancing tumour, 4 enhancing, stored as float."""
    reference = read_case(good_case).labels

    def to_2015(seg):
        out = seg.astype(np.float32)
        core = np.argwhere(seg == 1)
        out[tuple(core[: len(core) // 2].T)] = 3  # half the core is non-enhancing
        return out

    _rewrite(good_case, "seg", to_2015)
    seg_file = next(good_case.glob("*_seg.nii.gz"))
    case = read_case(good_case)
    assert case.source.convention == "brats2015"
    np.testing.assert_array_equal(case.labels, reference)  # 3 is tumour core: canonical 1
    out = write_labels(case.labels, case.source, tmp_path / "back.nii.gz")
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), np.asarray(nib.load(seg_file).dataobj))
    assert nib.load(out).get_data_dtype() == np.float32


def test_a_case_and_its_bare_label_file_agree_on_brats2015_labels(good_case, tmp_path):
    """A BraTS2021-named segmentation holding 2015 labels reads alike as a case, a case folder's
    labels and a bare file (evaluate reads bare files): one detector of the convention."""
    from napari_unet.evaluation import evaluate

    reference = read_case(good_case).labels

    def to_2015(seg):
        out = seg.copy()
        core = np.argwhere(seg == 1)
        out[tuple(core[: len(core) // 2].T)] = 3
        return out

    _rewrite(good_case, "seg", to_2015)
    seg_file = next(good_case.glob("*_seg.nii.gz"))
    assert seg_file.name.startswith("BraTS2021")
    np.testing.assert_array_equal(read_case(good_case).labels, reference)
    for path in (seg_file, good_case):
        labels, source = read_labels(path)
        assert source.convention == "brats2015"
        np.testing.assert_array_equal(labels, reference)
    prediction = tmp_path / "predictions" / f"{good_case.name}.nii.gz"  # as `predict` names its files
    prediction.parent.mkdir()
    prediction.write_bytes(seg_file.read_bytes())
    assert evaluate(prediction.parent, good_case)["mean"]["WT"]["dice"] == 1.0


def test_zscored_images_with_a_negative_background_are_shifted_to_zero(good_case):
    reference = read_case(good_case)
    for m in MODALITIES:
        def zscore(data):
            data = data.astype(np.float32)
            brain = data != 0
            out = np.full(data.shape, -1.7, np.float32)  # a negative constant outside the brain
            out[brain] = (data[brain] - data[brain].mean()) / data[brain].std()
            return out

        _rewrite(good_case, m, zscore)
    case = read_case(good_case)
    assert not any("background is not 0" in w for w in case.warnings)
    for m in MODALITIES:
        np.testing.assert_array_equal(case.images[m] == 0, reference.images[m] == 0)
    from napari_unet.preprocess import Normalisation, prepare

    ours, _, _ = prepare(case.stack(), Normalisation())
    theirs, _, _ = prepare(reference.stack(), Normalisation())
    np.testing.assert_allclose(ours, theirs, atol=1e-4)  # the model sees the same input


def test_a_brain_mask_file_beside_the_images_sets_the_brain(good_case):
    reference = read_case(good_case)
    flair = next(good_case.glob("*_flair.nii.gz"))
    img = nib.load(flair)
    brain = np.asarray(img.dataobj) != 0
    smaller = brain.copy()
    smaller[: brain.shape[0] // 2] = False
    nib.save(nib.Nifti1Image(smaller.astype(np.uint8), img.affine), good_case / f"{good_case.name}_brainmask.nii.gz")
    _rewrite(good_case, "t1", lambda d: np.where(d == 0, 5, d).astype(d.dtype))  # a bright skull-like rim
    case = read_case(good_case)
    inside = case.source.to_display(smaller)
    for m in MODALITIES:
        assert not case.images[m][~inside].any()
    np.testing.assert_array_equal(case.images["flair"][inside], reference.images["flair"][inside])


def test_modalities_of_different_shapes(good_case):
    t2 = next(good_case.glob("*_t2.nii.gz"))
    img = nib.load(t2)
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.int16), img.affine), t2)
    _expect(good_case, t2.name, "shape")


def test_modalities_of_different_affines(good_case):
    t2 = next(good_case.glob("*_t2.nii.gz"))
    img = nib.load(t2)
    shifted = img.affine.copy()
    shifted[0, 3] += 5
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), t2)
    _expect(good_case, t2.name, "affine")


@pytest.mark.parametrize("shape", [(48, 48), (48, 48, 32, 2, 2)])
def test_2d_and_5d_files(good_case, shape):
    t1 = next(good_case.glob("*_t1.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), t1)
    _expect(good_case, t1.name, f"{len(shape)}D")


def test_file_that_is_not_nifti(good_case):
    t1 = next(good_case.glob("*_t1.nii.gz"))
    t1.write_text("this is a radiology report, not an image\n")
    _expect(good_case, t1.name)


def test_truncated_gz(good_case):
    flair = next(good_case.glob("*_flair.nii.gz"))
    data = flair.read_bytes()
    flair.write_bytes(data[: len(data) // 2])
    _expect(good_case, flair.name, "truncated")


def test_uncompressed_gz_named_file_is_read(good_case):
    """A .nii.gz holding an uncompressed .nii (a renamed file) reads as the same volume."""
    reference = read_case(good_case).images["flair"]
    flair = next(good_case.glob("*_flair.nii.gz"))
    flair.write_bytes(gzip.decompress(flair.read_bytes()))
    assert flair.read_bytes()[:2] != b"\x1f\x8b"  # no longer gzip
    np.testing.assert_array_equal(read_case(good_case).images["flair"], reference)


def test_label_values_outside_the_convention(good_case):
    seg = next(good_case.glob("*_seg.nii.gz"))
    img = nib.load(seg)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 6  # no BraTS label (3 is read as BraTS 2015's non-enhancing tumour)
    nib.save(nib.Nifti1Image(data, img.affine), seg)
    _expect(good_case, seg.name, "6", "brats2021")


def test_empty_folder(tmp_path):
    _expect(tmp_path, str(tmp_path), "no NIfTI")


def test_a_crash_while_writing_keeps_the_previous_file(good_case, tmp_path, monkeypatch):
    case = read_case(good_case)
    out = tmp_path / "labels.nii.gz"
    write_labels(case.labels, case.source, out)
    before = out.read_bytes()

    def explode(self, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", explode)
    with pytest.raises(OSError):
        write_labels(np.zeros_like(case.labels), case.source, out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.glob("*.nii*")) == ["labels.nii.gz"]
    assert not list(tmp_path.glob(".*partial*"))


def test_write_case_files_rejects_non_canonical_labels(tmp_path):
    with pytest.raises(NapariUnetError, match="not canonical"):
        write_case_files(tmp_path, "brats2021", "X", {m: np.zeros((4, 4, 4)) for m in MODALITIES},
                         np.full((4, 4, 4), 7, np.uint8), np.eye(4))


def test_a_leftover_temporary_file_is_never_taken_for_data(good_case):
    """A kill during an atomic write leaves `.<name>.partial-XXXX<suffix>`; the finder skips it."""
    seg = next(good_case.glob("*_seg.nii.gz"))
    truth = read_case(good_case).labels
    (good_case / f".{good_case.name}_seg.partial-0badc0de.nii.gz").write_bytes(b"truncated")
    case = read_case(good_case)
    assert case.source.files["seg"] == str(seg)
    np.testing.assert_array_equal(case.labels, truth)


def test_cases_nested_below_a_dataset_root(dataset_factory, tmp_path):
    """Kaggle's BraTS 2020 mount puts the case folders two levels down, CSV files beside them."""
    import shutil

    paths = dataset_factory("brats2020", cases=2)
    nested = tmp_path / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData"
    shutil.copytree(paths[0].parent, nested)
    (nested / "name_mapping.csv").write_text("Grade,BraTS_2020_subject_ID\n")
    assert [p.name for p in find_cases(tmp_path / "BraTS2020_TrainingData")] == [p.name for p in paths]
