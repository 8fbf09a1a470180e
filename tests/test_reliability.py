"""Hard inputs: fuzzed headers, bad values, hostile model files, bad arguments, a kill mid-save.

Each path must end in the project's own error (a message naming the file) or a correct result,
never a traceback from inside numpy, nibabel or torch, and never lose saved work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from napari_unet import NapariUnetError
from napari_unet.cases import read_case, read_labels
from napari_unet.cli import main
from napari_unet.modelfile import META_KEY, load_model, make_metadata
from napari_unet.unet import UNet, UNetConfig

# --------------------------------------------------------------------------- headers


def _tiny_nifti(path: Path) -> bytes:
    data = np.zeros((8, 8, 6), np.int16)
    data[2:6, 2:6, 1:5] = 100
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, path)
    return path.read_bytes()


def test_fuzzed_headers_give_only_our_error(tmp_path):
    """300 seeded mutations of a header's 348 bytes: read, or refuse with a message."""
    original = _tiny_nifti(tmp_path / "orig_flair.nii")
    rng = np.random.default_rng(1234)
    # Fields that matter most get most of the mutations: dim, datatype, bitpix, pixdim, vox_offset,
    # scl_slope/inter, qform/sform codes, quatern_*, srow_*.
    hot = list(range(40, 56)) + list(range(70, 74)) + list(range(76, 112)) + list(range(112, 120)) + \
        list(range(252, 256)) + list(range(256, 348))
    outcomes = {"read": 0, "refused": 0}
    path = tmp_path / "BraTS_fuzz_flair.nii"
    for trial in range(300):
        raw = bytearray(original)
        for _ in range(int(rng.integers(1, 6))):
            i = int(rng.choice(hot)) if rng.random() < 0.8 else int(rng.integers(0, 348))
            raw[i] = int(rng.integers(0, 256))
        path.write_bytes(bytes(raw))
        try:
            case = read_case(path)
            assert all(np.isfinite(v).all() for v in case.images.values())
            outcomes["read"] += 1
        except NapariUnetError as err:
            assert str(path) in str(err), err
            outcomes["refused"] += 1
    assert outcomes["read"] > 0 and outcomes["refused"] > 0, outcomes


def _header_case(tmp_path, mutate) -> Path:
    path = tmp_path / "case_flair.nii"
    _tiny_nifti(path)
    img = nib.load(path)
    header = img.header.copy()
    data, affine = mutate(np.asarray(img.dataobj), header, img.affine.copy())
    nib.save(nib.Nifti1Image(data, affine, header), path)
    return path


def _set_dims(path: Path, dims) -> None:
    raw = bytearray(path.read_bytes())
    raw[40:56] = np.array([3, *dims, 1, 1, 1, 1], "<i2").tobytes()
    path.write_bytes(bytes(raw))


def test_huge_declared_dims_are_refused_before_allocating(tmp_path):
    path = tmp_path / "big_flair.nii"
    _tiny_nifti(path)
    _set_dims(path, (30000, 30000, 30000))
    with pytest.raises(NapariUnetError, match="no MRI volume"):
        read_case(path)


@pytest.mark.parametrize("affine_value, message", [(np.nan, "NaN"), (0.0, "singular")])
def test_a_nan_or_singular_sform_is_named(tmp_path, affine_value, message):
    path = tmp_path / "case_flair.nii"
    raw = bytearray(_tiny_nifti(path))
    raw[252:256] = np.array([0, 1], "<i2").tobytes()  # qform_code 0, sform_code 1: the sform rules
    for row, offset in enumerate((280, 296, 312)):  # srow_x, srow_y, srow_z
        raw[offset:offset + 12] = np.full(3, affine_value, "<f4").tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(NapariUnetError, match=message):
        read_case(path)


def test_nan_voxels_are_refused_with_their_count(tmp_path):
    path = tmp_path / "nan_flair.nii.gz"
    data = np.ones((8, 8, 6), np.float32)
    data[0, 0, :3] = np.nan
    data[1, 1, 1] = np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(NapariUnetError, match="4 voxel"):
        read_case(path)


def test_a_constant_background_is_shifted_and_a_noisy_one_warned_about(tmp_path):
    path = tmp_path / "z_flair.nii.gz"
    data = np.full((16, 16, 8), -1.2, np.float32)
    data[4:12, 4:12, 2:6] = np.linspace(-3, 3, 256, dtype=np.float32).reshape(8, 8, 4)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    case = read_case(path)
    assert any("background (-1.2) is shown as 0" in w for w in case.warnings)
    assert np.count_nonzero(case.images["flair"]) == 256
    noisy = np.random.default_rng(0).normal(500, 20, (16, 16, 8)).astype(np.float32)
    nib.save(nib.Nifti1Image(noisy, np.eye(4)), path)
    assert any("background is not 0" in w for w in read_case(path).warnings)


def test_spacing_comes_from_the_affine_when_pixdim_is_zero(tmp_path):
    def mutate(data, header, affine):
        affine[:3, :3] = np.diag([2.5, 2.5, 2.5])
        return data, affine

    path = _header_case(tmp_path, mutate)
    raw = bytearray(path.read_bytes())
    raw[80:92] = np.zeros(3, "<f4").tobytes()  # pixdim[1:4] = 0, as some writers leave it (nibabel reads 1)
    path.write_bytes(bytes(raw))
    assert read_case(path).spacing == (2.5, 2.5, 2.5)


def test_an_unreadable_folder_is_named(tmp_path, monkeypatch):
    from napari_unet._reader import get_reader, read_case_layers

    folder = tmp_path / "locked"
    folder.mkdir()
    real_iterdir = Path.iterdir

    def iterdir(self):  # what listing a folder without read permission does (also as root)
        if self == folder:
            raise PermissionError(13, "Permission denied")
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(NapariUnetError, match="cannot list the folder"):
        read_case(folder)
    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    assert get_reader(str(folder)) is read_case_layers  # claimed, so the user hears why
    assert read_case_layers(str(folder)) == [(None,)] and "cannot list" in shown[0]


# --------------------------------------------------------------------------- model files


def _model_file(tmp_path, edit) -> Path:
    config = UNetConfig(base_channels=4, depth=2, padding="same", norm="batch")
    meta = make_metadata(config)
    edit(meta)
    path = tmp_path / "m.safetensors"
    state = {k: v.contiguous() for k, v in UNet(config).state_dict().items()}
    save_file(state, str(path), metadata={META_KEY: meta if isinstance(meta, str) else json.dumps(meta)})
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format_version="1"), "format_version"),
    (lambda m: m.update(architecture="unet"), "'architecture'"),
    (lambda m: m["architecture"].update(depth=40), "depth"),
    (lambda m: m["architecture"].update(base_channels=100_000), "base_channels"),
    (lambda m: m["architecture"].update(base_channels=True), "base_channels"),
    (lambda m: m.update(normalisation=None), "'normalisation'"),
    (lambda m: m.pop("normalisation"), "'normalisation'"),
    (lambda m: m["normalisation"].update(margin=-1000), "margin"),
    (lambda m: m["normalisation"].update(margin="4"), "margin"),
    (lambda m: m.update(training=[1, 2]), "'training'"),
    (lambda m: m.pop("label_convention"), "label_convention"),
    (lambda m: m.update(modalities=["t1", "t1", "t2", "flair"]), "modalities"),
])
def test_model_metadata_is_checked_against_the_schema_before_building(tmp_path, edit, message):
    path = _model_file(tmp_path, edit)
    with pytest.raises(NapariUnetError, match=message) as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_deeply_nested_metadata_is_refused(tmp_path):
    config = UNetConfig(base_channels=4, depth=2, padding="same", norm="batch")
    path = tmp_path / "deep.safetensors"
    state = {k: v.contiguous() for k, v in UNet(config).state_dict().items()}
    save_file(state, str(path), metadata={META_KEY: "[" * 100_000 + "]" * 100_000})
    with pytest.raises(NapariUnetError, match="not a model's"):
        load_model(path)


def test_a_pt_that_unpacks_to_gigabytes_is_refused_unread(tmp_path, monkeypatch):
    import napari_unet.modelfile as modelfile

    monkeypatch.setattr(modelfile, "MAX_UNPACKED_BYTES", 10 * 2**20)  # the same check at a small scale
    path = tmp_path / "bomb.pt"
    torch.save({"state_dict": {"w": torch.zeros(4 * 2**20)}, "metadata": {}}, path)  # 16 MB of zeros
    assert path.stat().st_size > 10 * 2**20  # (torch stores uncompressed: the zip lists the true size)
    with pytest.raises(NapariUnetError, match="unpacks to"):
        load_model(path)


@pytest.mark.parametrize("kind, message", [("empty", "is empty"), ("folder", "is a folder")])
def test_an_empty_or_folder_pt_says_so(tmp_path, kind, message):
    path = tmp_path / "m.pt"
    path.mkdir() if kind == "folder" else path.write_bytes(b"")
    with pytest.raises(NapariUnetError, match=message):
        load_model(path)


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("argv", [
    ["predict", "X", "--out", "O", "--batch-size", "-1"],
    ["finetune", "S", "--out", "o.safetensors", "--steps", "-5"],
    ["train", "D", "--out", "o.safetensors", "--val-fraction", "1.5"],
    ["train", "D", "--out", "o.safetensors", "--lr", "nan"],
    ["synth", "O", "--cases", "0"],
])
def test_nonsense_numbers_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "argument" in capsys.readouterr().err


def test_outputs_that_cannot_be_written_are_named(dataset_factory, tmp_path, capsys):
    case = dataset_factory("brats2021", cases=1)[0]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert main(["predict", str(case), "--out", str(a_file)]) == 2
    assert "is a file; --out must be a folder" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["evaluate", str(case), str(case), "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_evaluate_refuses_a_prediction_on_another_grid(dataset_factory, tmp_path, capsys):
    case = dataset_factory("brats2021", cases=1)[0]
    seg = next(case.glob("*_seg.nii.gz"))
    img = nib.load(seg)
    shifted_affine = img.affine.copy()
    shifted_affine[0, 3] += 10
    shifted = tmp_path / f"{case.name}.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted_affine, img.header), shifted)
    assert main(["evaluate", str(shifted), str(case)]) == 2
    assert "10.0 mm away" in capsys.readouterr().err
    # The same labels in another voxel order but on the same grid are fine.
    reoriented = tmp_path / "r" / f"{case.name}.nii.gz"
    reoriented.parent.mkdir()
    nib.save(img.as_reoriented([[2, 1], [1, 1], [0, -1]]), reoriented)
    assert main(["evaluate", str(reoriented), str(case)]) == 0
    assert read_labels(reoriented)[0].shape == read_labels(seg)[0].shape


# --------------------------------------------------------------------------- a kill while saving

# A save of state B over state A, in a process that dies (os._exit: no finally, no cleanup) just
# before its Nth rename: every point of the save at which a kill leaves something new on disk.
_KILLED_SAVER = """
import json, os, sys
import numpy as np
from napari_unet.cases import read_case
from napari_unet.session import AnnotationSession
case_path, store, labels_file, reviewed, kill_at = sys.argv[1:]
case = read_case(case_path)
session = AnnotationSession(case.source, case.images, store)
session.open_labels()
session.reviewed = set(json.loads(reviewed))
real_replace, calls = os.replace, [0]
def replace(src, dst):
    calls[0] += 1
    if calls[0] == int(kill_at):
        os._exit(9)
    real_replace(src, dst)
os.replace = replace
session.save(session.snapshot(np.load(labels_file)))
print("renames", calls[0])
"""


def _store_pairs(case, store):
    """(labels, reviewed) as the widget reads the store, and as training reads it."""
    from napari_unet.session import AnnotationSession
    from napari_unet.store import read_store_case

    session = AnnotationSession(case.source, case.images, store)
    widget = (session.open_labels(), session.reviewed)
    stored, corrections = read_store_case(store / case.case_id)
    return widget, (stored.labels, corrections.reviewed)


@pytest.mark.parametrize("kill_at, expected", [(1, "before"), (2, "after"), (3, "after")])
def test_a_kill_while_saving_leaves_the_store_as_before_or_after(dataset_factory, tmp_path, kill_at, expected):
    """The (labels, review) pair is whole: the previous one before the commit, the new one after."""
    from napari_unet.session import AnnotationSession

    case_path = dataset_factory("brats2021", cases=1)[0]
    case = read_case(case_path)
    store = tmp_path / "store"
    tumour = np.flatnonzero(case.labels.reshape(case.labels.shape[0], -1).any(axis=1))
    before = (case.labels.copy(), {int(tumour[0])})
    after_labels = case.labels.copy()
    after_labels[tumour[len(tumour) // 2]] = 0  # a slice whose tumour the annotator erased ...
    after = (after_labels, {int(tumour[0]), int(tumour[len(tumour) // 2])})  # ... and so reviewed
    session = AnnotationSession(case.source, case.images, store)
    session.open_labels()
    session.reviewed = set(before[1])
    session.save(session.snapshot(before[0]))
    np.save(tmp_path / "after.npy", after[0])

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-c", _KILLED_SAVER, str(case_path), str(store), str(tmp_path / "after.npy"),
                          json.dumps(sorted(after[1])), str(kill_at)], env=env, capture_output=True, text=True)
    killed = run.returncode == 9
    assert killed == (kill_at < 3), run.stderr  # a save is two renames: 3 is past its end
    if not killed:
        assert run.stdout.split() == ["renames", "2"], run.stdout

    want = before if expected == "before" else after
    for labels, reviewed in _store_pairs(case, store):
        assert np.array_equal(labels, want[0]) and reviewed == want[1], (kill_at, reviewed)

    case_dir = store / case.case_id
    leftovers = [p for p in case_dir.iterdir() if p.name.startswith(".")]
    assert bool(leftovers) == killed, leftovers  # a kill leaves hidden files; a finished save none
    session = AnnotationSession(case.source, case.images, store)
    labels = session.open_labels()
    session.save(session.snapshot(labels))  # the next save finishes or drops what the kill left ...
    assert not [p for p in case_dir.iterdir() if p.name.startswith(".")]
    for labels, reviewed in _store_pairs(case, store):  # ... and keeps the pair it found
        assert np.array_equal(labels, want[0]) and reviewed == want[1]


def test_every_file_a_save_renames_into_place_is_on_disk_first(dataset_factory, tmp_path, monkeypatch):
    """A rename can reach the disk before the data it names (XFS, btrfs): after a power cut the
    store would hold an empty segmentation or record under its final name."""
    import napari_unet.atomic as atomic
    from napari_unet.modelfile import load_model, save_model
    from napari_unet.session import AnnotationSession

    synced, renamed = [], []
    real_sync, real_replace = atomic.sync_file, os.replace

    def sync_file(path):
        synced.append(Path(path))
        real_sync(path)

    def replace(src, dst):
        assert Path(src) in synced, f"{src} renamed onto {dst} before it was synced"
        renamed.append(Path(dst))
        real_replace(src, dst)

    monkeypatch.setattr(atomic, "sync_file", sync_file)
    monkeypatch.setattr(os, "replace", replace)
    case = read_case(dataset_factory("brats2021", cases=1)[0])
    session = AnnotationSession(case.source, case.images, tmp_path / "store")
    session.open_labels()
    session.reviewed = {3}
    session.save(session.snapshot(case.labels))
    save_model(load_model(None).model, load_model(None).metadata, tmp_path / "model.safetensors")
    names = {p.name for p in renamed}
    assert {"corrections.json", "model.safetensors"} <= names and any(n.endswith("_seg.nii.gz") for n in names)


def test_in_a_decathlon_store_saving_one_case_keeps_another_case_s_interrupted_save(dataset_factory, tmp_path):
    """Decathlon cases share imagesTr/: a save of case B must not sweep away the hidden record that
    case A's killed save left, or A's new labels would be read with A's old review."""
    from napari_unet.session import AnnotationSession
    from napari_unet.store import case_location, read_store_case

    path_a, path_b = dataset_factory("msd", cases=2)
    case_a, case_b = read_case(path_a), read_case(path_b)
    store = tmp_path / "store"
    tumour = np.flatnonzero(case_a.labels.reshape(case_a.labels.shape[0], -1).any(axis=1))
    session = AnnotationSession(case_a.source, case_a.images, store)
    session.open_labels()
    session.reviewed = {int(tumour[0])}
    session.save(session.snapshot(case_a.labels))
    after_labels = case_a.labels.copy()
    after_labels[tumour[len(tumour) // 2]] = 0
    after_reviewed = {int(tumour[0]), int(tumour[len(tumour) // 2])}
    np.save(tmp_path / "after.npy", after_labels)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-c", _KILLED_SAVER, str(path_a), str(store), str(tmp_path / "after.npy"),
                          json.dumps(sorted(after_reviewed)), "2"], env=env, capture_output=True, text=True)
    assert run.returncode == 9, run.stderr  # killed after its commit, before its record's rename

    other = AnnotationSession(case_b.source, case_b.images, store)  # then another case is saved
    other.open_labels()
    other.save(other.snapshot(case_b.labels))

    reopened = AnnotationSession(case_a.source, case_a.images, store)
    assert np.array_equal(reopened.open_labels(), after_labels) and reopened.reviewed == after_reviewed
    images, _, _ = case_location(store, case_a.source)
    stored, corrections = read_store_case(next(iter(images.values())))
    assert np.array_equal(stored.labels, after_labels) and corrections.reviewed == after_reviewed


def test_training_never_pairs_labels_with_the_review_of_a_save_that_committed_while_it_read(
        dataset_factory, tmp_path, monkeypatch):
    """Training reads a store case's segmentation, then its record: an annotator's save landing
    between the two reads must not give old labels with the new review (or the reverse)."""
    import napari_unet.cases as cases
    from napari_unet.session import AnnotationSession
    from napari_unet.store import read_store_case

    case = read_case(dataset_factory("brats2021", cases=1)[0])
    store = tmp_path / "store"
    tumour = np.flatnonzero(case.labels.reshape(case.labels.shape[0], -1).any(axis=1))
    session = AnnotationSession(case.source, case.images, store)
    session.open_labels()
    session.reviewed = {int(tumour[0])}
    session.save(session.snapshot(case.labels))
    erased = case.labels.copy()
    erased[tumour[1]] = 0

    real_read_case, saves = cases.read_case, []

    def read_then_someone_saves(path, **kwargs):
        result = real_read_case(path, **kwargs)
        if not saves:  # the annotator saves once, just after training read the labels
            saves.append(1)
            session.reviewed = {int(tumour[0]), int(tumour[1])}
            session.save(session.snapshot(erased))
        return result

    monkeypatch.setattr(cases, "read_case", read_then_someone_saves)
    stored, corrections = read_store_case(store / case.case_id)
    assert saves, "the save did not happen during the read"
    assert corrections.reviewed == {int(tumour[0]), int(tumour[1])}
    assert np.array_equal(stored.labels, erased)  # the new review with its labels, read again


def test_a_hand_written_or_hand_edited_store_is_trusted(dataset_factory, tmp_path):
    """corrections.json without segmentation_sha256 (ITK-SNAP users write it), or a segmentation
    edited by hand after a save, keeps its corrections.json, even beside a never-committed record."""
    from napari_unet.session import AnnotationSession

    case = read_case(dataset_factory("brats2021", cases=1)[0])
    store = tmp_path / "store"
    session = AnnotationSession(case.source, case.images, store)
    session.open_labels()
    session.set_reviewed(5)
    session.save(session.snapshot(case.labels))
    case_dir = store / case.case_id
    seg = next(case_dir.glob("*_seg.nii.gz"))
    edited = np.asarray(nib.load(seg).dataobj).copy()
    edited[..., 7] = 2  # an ITK-SNAP user paints a slice and lists it
    nib.save(nib.Nifti1Image(edited, nib.load(seg).affine, nib.load(seg).header), seg)
    record = json.loads((case_dir / "corrections.json").read_text())
    (case_dir / ".corrections.json.partial-0badc0de").write_text(
        json.dumps({**record, "reviewed_slices": [1], "segmentation_sha256": "0" * 64}))
    (case_dir / "corrections.json").write_text(json.dumps({"reviewed_slices": [5, 7]}))
    for labels, reviewed in _store_pairs(case, store):
        assert reviewed == {case.source.file_to_axial_index(z) for z in (5, 7)}
        assert (labels[case.source.file_to_axial_index(7)] == 2).all()
