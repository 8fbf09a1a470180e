"""The annotation session and the corrections store, without Qt, on small cases."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from napari_unet import NapariUnetError
from napari_unet import store as store_format
from napari_unet.cases import read_case
from napari_unet.labels import EDEMA, ENHANCING, NECROTIC
from napari_unet.predict import Prediction
from napari_unet.session import AnnotationSession
from napari_unet.synth import synthetic_case


def _session(case, store) -> AnnotationSession:
    return AnnotationSession(case.source, case.images, store)


def _tumour_slices(case) -> np.ndarray:
    return np.flatnonzero((case.labels > 0).any(axis=(1, 2)))


def _proposal(labels: np.ndarray, scores=None) -> Prediction:
    computed = np.arange(labels.shape[0])
    scores = np.arange(labels.shape[0], dtype=np.float32) if scores is None else scores
    return Prediction(labels, None, computed, 0.0, scores)


@pytest.fixture
def small_case(dataset_factory):
    return read_case(dataset_factory("brats2021", cases=1)[0])


@pytest.fixture
def reoriented_case(dataset_factory, tmp_path):
    """The small case rewritten with the head's axis first and running inferior (not BraTS's order)."""
    src = dataset_factory("brats2021", cases=1)[0]
    dst = tmp_path / "data" / src.name
    dst.mkdir(parents=True)
    ornt = np.array([[2, 1], [1, 1], [0, -1]])  # file axes: z running inferior, y, x
    for f in src.iterdir():
        nib.save(nib.load(f).as_reoriented(ornt), dst / f.name)
    return read_case(dst)


def test_edits_are_found_marked_and_kept_from_proposals(small_case, tmp_path):
    session = _session(small_case, tmp_path / "store")
    labels = session.open_labels()
    assert not labels.any() and not session.reviewed
    z1, z2 = _tumour_slices(small_case)[[1, 3]]
    labels[z1] = small_case.labels[z1]
    changed, note = session.collect_edits(labels)
    assert changed == [z1] and note is None
    assert session.edited == {z1} and session.reviewed == {z1}
    session.set_reviewed(z2)  # looked at, left as it was

    proposal = np.full_like(labels, EDEMA)
    written = session.merge_proposal(labels, _proposal(proposal))
    assert z1 not in written and z2 not in written
    np.testing.assert_array_equal(labels[z1], small_case.labels[z1])
    assert not labels[z2].any() and (labels[z1 + 1] == EDEMA).all()
    assert session.collect_edits(labels) == ([], None)  # a proposal is not an edit

    # Unmarking an edited slice gives it back to the model.
    session.set_reviewed(z1, False)
    assert z1 not in session.edited
    session.merge_proposal(labels, _proposal(proposal))
    assert (labels[z1] == EDEMA).all()


def test_undoing_an_edit_unreviews_the_slice_unless_it_was_reviewed_or_marked_by_hand(small_case, tmp_path):
    """Undo brings a slice back to what it was before its first edit: a slice that was not
    reviewed then takes proposals again; one reviewed before the edit, or marked reviewed after
    it, stays reviewed (and is no longer edited)."""
    session = _session(small_case, tmp_path / "store")
    labels = session.open_labels()
    fresh, reviewed_first, marked_after = _tumour_slices(small_case)[[0, 2, 4]]
    session.set_reviewed(reviewed_first)
    for z in (fresh, reviewed_first, marked_after):
        labels[z] = small_case.labels[z]
    session.collect_edits(labels)
    assert session.edited == {fresh, reviewed_first, marked_after}
    session.set_reviewed(marked_after)  # pressed Mark reviewed on the edited slice

    for z in (fresh, reviewed_first, marked_after):
        labels[z] = 0  # undo: back to the empty start
    changed, _ = session.collect_edits(labels)
    assert sorted(changed) == sorted([fresh, reviewed_first, marked_after])
    assert not session.edited
    assert session.reviewed == {reviewed_first, marked_after}
    proposal = np.full_like(labels, EDEMA)
    assert session.merge_proposal(labels, _proposal(proposal)).count(fresh) == 1


def test_label_4_is_painted_as_enhancing_and_other_values_are_undone(small_case, tmp_path):
    session = _session(small_case, tmp_path / "store")
    labels = session.open_labels()
    labels[5, 10:12, 10:12] = 4  # BraTS 2017-2021's enhancing
    changed, note = session.collect_edits(labels)
    assert changed == [5] and "enhancing" in note
    assert (labels[5, 10:12, 10:12] == ENHANCING).all()
    labels[6, 3, 3] = 9
    labels[6, 4, 4] = NECROTIC
    _, note = session.collect_edits(labels)
    assert labels[6, 3, 3] == 0 and labels[6, 4, 4] == NECROTIC and "undone" in note
    path = session.save(session.snapshot(labels))  # never fails over a stray value
    assert read_case(path).labels[5, 10, 10] == ENHANCING


def test_review_next_walks_down_the_ranking(small_case, tmp_path):
    session = _session(small_case, tmp_path / "store")
    labels = session.open_labels()
    scores = np.full(labels.shape[0], np.nan, np.float32)
    scores[[4, 9, 12]] = [5.0, 30.0, 10.0]
    session.merge_proposal(labels, _proposal(np.zeros_like(labels), scores))
    assert session.next_to_review() == 9
    assert session.next_to_review(current=9) == 12  # asked again on that slice: the next one
    assert session.next_to_review(current=12) == 4
    session.set_reviewed(9)
    assert session.next_to_review() == 12
    for z in (4, 12):
        session.set_reviewed(z)
    assert session.next_to_review() is None


@pytest.mark.parametrize("layout", ["brats2021", "brats2023", "msd"])
def test_save_and_reopen_restore_labels_review_and_model(dataset_factory, tmp_path, layout):
    small_case = read_case(dataset_factory(layout, cases=1)[0])
    store = tmp_path / "store"
    session = _session(small_case, store)
    labels = session.open_labels()
    tumour = _tumour_slices(small_case)
    labels[tumour[:3]] = small_case.labels[tumour[:3]]
    session.collect_edits(labels)
    session.set_reviewed(int(tumour[5]))
    saved = session.save(session.snapshot(labels))
    if layout == "brats2021":
        assert saved == store / small_case.case_id
        assert sorted(p.name for p in saved.iterdir()) == sorted([store_format.CORRECTIONS_FILE] + [
            f"{small_case.case_id}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")])

    again = _session(small_case, store)
    restored = again.open_labels()
    np.testing.assert_array_equal(restored, labels)
    assert again.reviewed == {*tumour[:3].tolist(), int(tumour[5])}
    assert again.edited == set(tumour[:3].tolist())


def test_a_case_made_in_memory_fills_the_store_with_its_images(tmp_path):
    case = synthetic_case(seed=3, shape=(48, 48, 32), case_id="sample")
    session = _session(case, tmp_path / "store")
    labels = session.open_labels()
    labels[10] = case.labels[10]
    session.collect_edits(labels)
    stored = read_case(session.save(session.snapshot(labels)))
    np.testing.assert_allclose(stored.images["flair"], case.images["flair"])
    np.testing.assert_array_equal(stored.labels[10], case.labels[10])


def test_slice_numbers_in_the_store_follow_the_files_head_axis(reoriented_case, tmp_path):
    """A file whose first voxel axis runs inferior: the store numbers slices along that axis."""
    case = reoriented_case
    store = tmp_path / "store"
    session = _session(case, store)
    labels = session.open_labels()
    z = int(_tumour_slices(case)[2])
    labels[z] = case.labels[z]
    session.collect_edits(labels)
    case_dir = session.save(session.snapshot(labels))
    record = json.loads((case_dir / store_format.CORRECTIONS_FILE).read_text())
    file_index = case.source.shape[0] - 1 - z
    assert record["reviewed_slices"] == [file_index]
    seg = np.asarray(nib.load(next(case_dir.glob("*_seg.nii.gz"))).dataobj)
    assert (seg[file_index] > 0).sum() == (case.labels[z] > 0).sum()

    from napari_unet.cases import MODALITIES
    from napari_unet.preprocess import Normalisation
    from training.data import load_store

    taught = load_store(store, MODALITIES, Normalisation())
    assert taught[0].provenance["slices"] == [file_index]


@pytest.mark.parametrize("content, message", [
    ('{"reviewed_slices": [' + "9" * 5000 + "]}", "not a corrections file"),
    ("[" * 100_000 + "]" * 100_000, "not a corrections file"),
    ('{"reviewed_slices": "all"}', "axial indices as integers"),
    ('{"reviewed_slices": [1], "edited_slices": [true]}', "axial indices as integers"),
    ('{"reviewed_slices": [999]}', "outside the volume"),
    ('{"reviewed_slices": [1], "model": 5}', "'model'"),
    ("\xff\xfe", "not valid JSON"),
])
def test_a_bad_corrections_file_is_named_and_refused(small_case, tmp_path, content, message):
    session = _session(small_case, tmp_path / "store")
    labels = session.open_labels()
    case_dir = session.save(session.snapshot(labels))
    (case_dir / store_format.CORRECTIONS_FILE).write_text(content)
    with pytest.raises(NapariUnetError, match=message) as err:
        _session(small_case, tmp_path / "store").open_labels()
    assert str(case_dir) in str(err.value)


def test_a_corrections_file_that_is_a_folder_is_refused(small_case, tmp_path):
    session = _session(small_case, tmp_path / "store")
    case_dir = session.save(session.snapshot(session.open_labels()))
    (case_dir / store_format.CORRECTIONS_FILE).unlink()
    (case_dir / store_format.CORRECTIONS_FILE).mkdir()
    with pytest.raises(NapariUnetError, match="is a folder"):
        _session(small_case, tmp_path / "store").open_labels()


def test_stale_temporary_files_are_removed_and_never_read(small_case, tmp_path):
    session = _session(small_case, tmp_path / "store")
    labels = session.open_labels()
    case_dir = session.save(session.snapshot(labels))
    stale = case_dir / f".{small_case.case_id}_seg.nii.gz.partial-deadbeef.nii.gz"
    stale.write_bytes(b"truncated")
    assert read_case(case_dir).labels is not None  # the reader ignores it
    session.save(session.snapshot(labels))
    assert not stale.exists()


def test_predict_keeps_reviewed_slices_and_ranks_slices(small_case, tmp_path):
    """The real shipped model through the session: proposals never touch reviewed slices."""
    session = _session(small_case, tmp_path / "store")
    labels = session.open_labels()
    z = int(_tumour_slices(small_case)[2])
    session.set_reviewed(z)
    prediction, warning = session.predict(device="cpu")
    written = session.merge_proposal(labels, prediction)
    assert warning is None and z not in written and len(written) > 10
    assert not labels[z].any()
    assert session.proposal_model == "default"
    # Review next walks the unreviewed slices with brain from the least sure down, each once.
    scores = np.asarray(prediction.slice_scores, float)
    offered = np.flatnonzero(~np.isnan(scores))
    walk = [session.next_to_review()]
    while len(walk) < len(offered) - 1:
        walk.append(session.next_to_review(walk[-1]))
    assert sorted(walk) == sorted(set(offered.tolist()) - {z})  # never the reviewed one, never one without brain
    assert np.all(np.diff(scores[walk]) <= 0)
    assert scores[walk[0]] > 2 * np.median(scores[offered])  # a ranking that tells slices apart
    assert walk[0] in _tumour_slices(small_case)  # the model is least sure where the tumour is


def test_out_of_gpu_memory_the_proposal_is_made_on_the_cpu(small_case, tmp_path, monkeypatch):
    """The README's promise: a GPU that runs out of memory costs a warning, not the proposal."""
    import torch

    session = _session(small_case, tmp_path / "store")
    session.open_labels()
    on_cpu, _ = session.predict(device="cpu")
    cpu_predictor = session.predictor("cpu")

    class FullGPU:
        """The same model on a GPU whose memory is taken: every proposal fails as CUDA's does."""

        def __getattr__(self, name):
            return getattr(cpu_predictor, name)

        def predict(self, *args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with a GPU
    real = session.predictor
    monkeypatch.setattr(session, "predictor",
                        lambda device="auto", tta=False: FullGPU() if device == "cuda" else real(device, tta))
    prediction, warning = session.predict(device="cuda")
    assert warning == "GPU out of memory: ran on the CPU"
    np.testing.assert_array_equal(prediction.labels, on_cpu.labels)


def test_a_fine_tune_says_what_taught_it_across_the_store(dataset_factory, tiny_model, tmp_path):
    """A store of two cases, one with two reviewed slices and one marked done: the fine-tune of
    either case learns from both, and says so."""
    from napari_unet.session import taught_by

    paths = dataset_factory("brats2021", cases=2, seed=3)
    store = tmp_path / "store"
    sessions = []
    for path in paths:
        case = read_case(path)
        session = AnnotationSession(case.source, case.images, store, model=tiny_model[0])
        labels = session.open_labels()
        labels[:] = case.labels
        sessions.append((session, labels))
    first, second = sessions
    first[0].reviewed = {10, 12}
    first[0].save(first[0].snapshot(first[1]))
    second[0].set_done(True)
    second[0].save(second[0].snapshot(second[1]))
    result = first[0].finetune(steps=1, device="cpu")
    assert taught_by(result.metadata) == "2 reviewed slices of 1 case and 1 whole case"
