"""The plugin inside a real napari viewer (run under Xvfb)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
import pytest

from napari_unet.cases import read_case
from napari_unet.labels import EDEMA


def test_open_a_case_through_the_viewer(make_napari_viewer, dataset_factory, layout):
    viewer = make_napari_viewer()
    path = dataset_factory(layout, cases=1)[0]
    layers = viewer.open(path, plugin="napari-unet")
    names = [layer.name for layer in layers]
    case = read_case(path)
    assert names == ["T1", "T1CE", "T2", "FLAIR", f"{case.case_id} tumour"]
    labels = viewer.layers[-1]
    np.testing.assert_array_equal(labels.data, case.labels)
    for layer in viewer.layers:
        np.testing.assert_allclose(layer.scale, case.spacing)
        assert layer.data.shape == case.shape  # labels exactly on top of the images
    flair = viewer.layers["FLAIR"]
    lo, hi = flair.contrast_limits
    assert 0 < lo < hi <= flair.data.max()
    # Hovering an edema voxel names it.
    depth = ndimage.distance_transform_edt(labels.data == EDEMA)  # a voxel well inside the edema
    z, y, x = np.unravel_index(np.argmax(depth), depth.shape)
    viewer.dims.set_current_step(0, z)  # the status reads the slice on screen
    status = labels.get_status(np.array([z, y, x]) * case.spacing, world=True)
    assert "edema" in str(status)
    # The slider runs over the axial slices.
    assert viewer.dims.nsteps[0] == case.shape[0]


def test_bad_case_shows_a_notification_and_opens_nothing(make_napari_viewer, tmp_path, monkeypatch):
    from napari.utils import notifications

    shown = []
    monkeypatch.setattr(notifications, "show_error", lambda msg: shown.append(msg))
    viewer = make_napari_viewer()
    (tmp_path / "BraTS2021_00009_flair.nii.gz").write_text("not an image")
    viewer.open(tmp_path, plugin="napari-unet")
    assert len(viewer.layers) == 0
    assert len(shown) == 1
    assert "BraTS2021_00009_flair.nii.gz" in shown[0] and "not a NIfTI file" in shown[0]


def test_sample_data_opens_a_full_size_synthetic_case(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-unet", "synthetic_brats")
    assert [layer.name for layer in viewer.layers][-1] == "synthetic_sample tumour"
    assert viewer.layers["FLAIR"].data.shape == (155, 240, 240)


def test_writer_saves_the_labels_layer_in_the_source_convention(make_napari_viewer, dataset_factory, tmp_path):
    import nibabel as nib

    viewer = make_napari_viewer()
    path = dataset_factory("brats2020", cases=1)[0]
    viewer.open(path, plugin="napari-unet")
    labels = viewer.layers[-1]
    out = tmp_path / "edited.nii.gz"
    written = labels.save(str(out), plugin="napari-unet")
    assert written == [str(out)]
    original = nib.load(next(path.glob("*_seg.nii.gz")))
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), np.asarray(original.dataobj))


@pytest.mark.parametrize("plugin_name", ["napari-unet"])
def test_manifest_is_found_by_napari(plugin_name):
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    assert plugin_name in pm._manifests
