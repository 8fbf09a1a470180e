"""The training cache: what training reads equals what preprocessing made, preparing resumes,
a cache made for another model is refused, DataLoader workers change nothing, roots as they come."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_unet import NapariUnetError
from napari_unet.cases import MODALITIES, read_case
from napari_unet.cli import main
from napari_unet.modelfile import load_model, make_metadata
from napari_unet.predict import Cancelled
from napari_unet.preprocess import Normalisation, prepare
from napari_unet.unet import UNet, UNetConfig
from training.cache import open_cache, prepare_cache
from training.data import PatchDataset, load_root
from training.loop import Settings, run

NORM = Normalisation()
SMALL_NET = UNetConfig(base_channels=4, depth=2, padding="same", norm="batch")


@pytest.fixture(scope="module")
def root(dataset_factory):
    return dataset_factory("brats2021", cases=3, seed=31)[0].parent


@pytest.fixture(scope="module")
def cached(root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, prepare_cache(root, cache, MODALITIES, NORM, workers=2)


def test_what_training_reads_equals_what_preprocessing_made(root, cached):
    cache, cases = cached
    assert [c.case_id for c in cases] == sorted(p.name for p in root.iterdir())
    for cc in cases:
        case = read_case(cc.record["source"])
        crop, box, mask = prepare(case.stack(MODALITIES), NORM)
        image, labels = cc.volume()
        assert image.shape == crop.shape
        np.testing.assert_array_equal(labels, case.labels[box])
        np.testing.assert_array_equal(image[:, ~mask], 0)  # outside the brain: exactly 0
        for c, step in enumerate(cc.record["steps"]):
            assert np.abs(image[c] - crop[c]).max() <= step / 2 + 1e-5
        z = int(cc.tumour_slices[0])
        slice_image, slice_labels = cc.read_slice(z)
        np.testing.assert_array_equal(slice_image, image[:, z])
        np.testing.assert_array_equal(slice_labels, labels[z])
    assert sum(f.stat().st_size for f in (cache / "cases").iterdir()) < 3 * crop.size  # compressed, 8-bit


def test_patches_from_the_cache_match_patches_from_memory(root, cached):
    _, cases = cached
    in_memory = load_root(root, MODALITIES, NORM)
    from_disk = PatchDataset(cases, patch=32, seed=5)
    from_memory = PatchDataset(in_memory, patch=32, seed=5)
    step = max(max(c.record["steps"]) for c in cases)
    for i in range(40):
        (xd, yd), (xm, ym) = from_disk[i], from_memory[i]
        np.testing.assert_array_equal(yd, ym)
        assert np.abs(xd - xm).max() <= step / 2 + 0.01  # float16 in memory, 8-bit on disk


def test_an_interrupted_prepare_goes_on_where_it_stopped(root, tmp_path, monkeypatch):
    """Cancelled after the first case, then killed while writing the second case's array: the
    first case stays cached, no record is ever written before its array, and running again
    prepares only what is missing."""
    import blosc2

    import training.cache as cache_module

    class Killed(BaseException):  # as a kill: nothing catches it
        pass

    cache = tmp_path / "cache"
    real_asarray, real_write_text, writes = blosc2.asarray, cache_module.write_text, []

    def dying_asarray(data, urlpath=None, **kwargs):
        writes.append(urlpath)
        if len(writes) == 1:  # the second case: half an array, then the process dies
            Path(urlpath).write_bytes(b"half a file")
            raise Killed()
        return real_asarray(data, urlpath=urlpath, **kwargs)

    def checked_write_text(path, text):
        path = Path(path)
        if path.parent.name == "cases":  # a case's record: its array must be whole already
            assert path.with_suffix(".b2nd").is_file(), f"{path.name} written before its array"
        real_write_text(path, text)

    monkeypatch.setattr(cache_module, "write_text", checked_write_text)
    seen = []
    with pytest.raises(Cancelled, match="cancelled after 1 of 3"):
        prepare_cache(root, cache, MODALITIES, NORM, workers=1, progress=lambda d, t: seen.append(d),
                      cancel=lambda: len(seen) >= 2)
    monkeypatch.setattr(blosc2, "asarray", dying_asarray)
    with pytest.raises(Killed):
        prepare_cache(root, cache, MODALITIES, NORM, workers=1)
    assert len(writes) == 1 and "00002" in writes[0]  # it died on the second case
    records = sorted((cache / "cases").glob("*.json"))
    assert len(records) == 1 and all(r.with_suffix(".b2nd").is_file() for r in records)
    mtime = records[0].stat().st_mtime_ns
    monkeypatch.setattr(blosc2, "asarray", real_asarray)
    progress = []
    cases = prepare_cache(root, cache, MODALITIES, NORM, workers=1, progress=lambda d, t: progress.append((d, t)))
    assert progress[0] == (1, 3) and progress[-1] == (3, 3)  # the cached case was not done again
    assert records[0].stat().st_mtime_ns == mtime
    assert len(cases) == 3 and len(open_cache(cache, MODALITIES, NORM)) == 3
    assert sorted(p.name for p in (cache / "cases").iterdir()) == sorted(
        f"{c.case_id}{ext}" for c in cases for ext in (".b2nd", ".json"))  # no partial file left


def test_a_cache_made_for_another_model_is_refused(cached, tmp_path):
    cache, _ = cached
    with pytest.raises(NapariUnetError, match="modalities"):
        open_cache(cache, ("t1", "flair"), NORM)
    with pytest.raises(NapariUnetError, match="normalisation"):
        open_cache(cache, MODALITIES, Normalisation(margin=8))
    with pytest.raises(NapariUnetError, match="not a training cache"):
        open_cache(tmp_path, MODALITIES, NORM)


def test_dataloader_workers_draw_the_same_batches(cached):
    _, cases = cached
    weights = []
    for workers in (0, 2):
        torch.manual_seed(0)
        model = UNet(SMALL_NET)
        run(model, make_metadata(SMALL_NET), cases,
            Settings(steps=3, batch_size=4, patch=32, seed=1, device="cpu", warmup=1, workers=workers))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_nested_roots_several_roots_and_duplicates(root, tmp_path, capsys):
    # Kaggle's BraTS 2020 mount: two folder levels above the cases, CSV files beside them.
    nested = tmp_path / "BraTS2020_TrainingData" / "MICCAI_BraTS2020_TrainingData"
    shutil.copytree(root, nested)
    (nested / "name_mapping.csv").write_text("Grade,BraTS_2020_subject_ID\nHGG,x\n")
    # The same patient again under another name in a second root: used once.
    second = tmp_path / "other"
    (second / "BraTS2021_09999").mkdir(parents=True)
    for f in (root / "BraTS2021_00001").iterdir():
        shutil.copy(f, second / "BraTS2021_09999" / f.name.replace("00001", "09999"))
    code = main(["prepare", str(tmp_path / "BraTS2020_TrainingData"), str(second), "--cache", str(tmp_path / "c"),
                 "--workers", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "3 case(s) ready" in captured.out
    assert "BraTS2021_09999: the same images as BraTS2021_00001; used once" in captured.err


@pytest.mark.parametrize("csv_name, header, used", [
    ("BraTS21-17_Mapping.csv", "BraTS2021,BraTS2020", {"BraTS2021_00001", "BraTS2021_00002"}),
    ("name_mapping.csv", "Grade,BraTS_2017_subject_ID,BraTS_2020_subject_ID", None),  # 2017 ids: tells nothing
])
def test_a_mapping_csv_keeps_a_brats_2020_patient_also_in_2021_once(dataset_factory, tmp_path, csv_name, header,
                                                                      used):
    """BraTS 2021 re-released 2020's patients under new ids: a mapping with a 2020 and a 2021
    column beside the data drops the 2020 copy, though its voxels differ (re-processed)."""
    from training.cache import case_key, dataset_cases

    r2020 = dataset_factory("brats2020", cases=2, seed=41)[0].parent
    r2021 = dataset_factory("brats2021", cases=2, seed=42)[0].parent
    ids2020 = sorted(case_key(p) for p in dataset_cases([r2020]))
    first2020 = ids2020[0]
    data2020 = tmp_path / "MICCAI_BraTS2020_TrainingData"
    shutil.copytree(r2020, data2020)
    if "2021" in header:
        row = f"BraTS2021_00001,{first2020}\n"
    else:
        row = f"HGG,Brats17_CBICA_AAA_1,{first2020}\n"
    (data2020 / csv_name).write_text(f"{header}\n{row}")
    found = {case_key(p) for p in dataset_cases([data2020, r2021])}
    expected = set(ids2020) | {"BraTS2021_00001", "BraTS2021_00002"}
    if used is not None:
        expected = (expected - {first2020}) | used
    assert found == expected


@pytest.mark.parametrize("damage, message", [("no labels", "segmentation"), ("NaN voxels", "NaN")])
def test_a_case_without_labels_or_with_nan_voxels_is_skipped_with_a_message(root, tmp_path, capsys, damage,
                                                                            message):
    import nibabel as nib

    data = tmp_path / "data"
    shutil.copytree(root, data)
    case = data / "BraTS2021_00002"
    if damage == "no labels":
        next(case.glob("*_seg.nii.gz")).unlink()
    else:
        path = next(case.glob("*_t1.nii.gz"))
        img = nib.load(path)
        values = np.asarray(img.dataobj, np.float32)
        values[values.shape[0] // 2, values.shape[1] // 2, values.shape[2] // 2] = np.nan
        nib.save(nib.Nifti1Image(values, img.affine), path)
    assert main(["prepare", str(data), "--cache", str(tmp_path / "c"), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "2 case(s) ready" in captured.out
    assert "skipped:" in captured.err and "BraTS2021_00002" in captured.err and message in captured.err


def test_a_case_missing_a_modality_is_skipped_with_a_message(root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(root, data)
    next((data / "BraTS2021_00002").glob("*_t2.nii.gz")).unlink()
    assert main(["prepare", str(data), "--cache", str(tmp_path / "c"), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "2 case(s) ready" in captured.out
    assert "skipped:" in captured.err and "BraTS2021_00002" in captured.err and "T2" in captured.err.upper()


def test_train_reads_from_the_cache_and_records_the_best_validation(root, tmp_path):
    out = tmp_path / "m.safetensors"
    code = main(["train", str(root), "--out", str(out), "--cache", str(tmp_path / "cache"), "--steps", "4",
                 "--val-every", "2", "--batch-size", "2", "--patch", "32", "--base-channels", "4", "--depth", "2",
                 "--device", "cpu", "--val-fraction", "0.34", "--workers", "1", "--prepare-workers", "1"])
    assert code == 0
    meta = load_model(out).metadata["training"]
    assert meta["validation_cases"] and set(meta["validation_dice"]) == {"WT", "TC", "ET"}
    assert meta["selected"].startswith("best validation Dice, at step ")
    settings = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert settings["modalities"] == list(MODALITIES)


@pytest.mark.parametrize("val_every, validated_steps", [("0", []), ("2", [2, 4]), (None, [1, 2, 3, 4])])
def test_val_every_zero_validates_only_once_at_the_end(root, tmp_path, val_every, validated_steps):
    """--val-every 0 means what its help says: no validation while training, one at the end;
    unset, a tenth of the steps (here every step)."""
    out = tmp_path / "m.safetensors"
    args = ["train", str(root), "--out", str(out), "--cache", str(tmp_path / "cache"), "--steps", "4",
            "--batch-size", "2", "--patch", "32", "--base-channels", "4", "--depth", "2", "--device", "cpu",
            "--val-fraction", "0.34", "--workers", "0", "--prepare-workers", "1"]
    assert main(args + (["--val-every", val_every] if val_every is not None else [])) == 0
    state = torch.load(out.with_name("m.checkpoint.pt"), weights_only=True)
    assert [h["step"] for h in state["history"] if "val_dice" in h] == validated_steps
    meta = load_model(out).metadata["training"]
    assert set(meta["validation_dice"]) == {"WT", "TC", "ET"}  # validated at the end all the same


def test_precision_follows_the_gpu_generation(monkeypatch):
    from training.loop import autocast_dtype

    assert autocast_dtype(torch.device("cpu")) is None  # the CPU trains in fp32 (deterministic)
    # A T4 (7.5) says bf16 is supported, through emulation: it gets fp16 with loss scaling.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert autocast_dtype(torch.device("cuda", 0)) is torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert autocast_dtype(torch.device("cuda", 0)) is torch.bfloat16
    assert autocast_dtype(torch.device("cuda", 0), "fp32") is None
    with pytest.raises(NapariUnetError, match="unknown precision"):
        autocast_dtype(torch.device("cuda", 0), "fp8")


def test_train_from_a_prepared_cache_alone(cached, tmp_path):
    cache, _ = cached
    out = tmp_path / "m.safetensors"
    assert main(["train", "--cache", str(cache), "--out", str(out), "--steps", "2", "--batch-size", "2",
                 "--patch", "32", "--base-channels", "4", "--depth", "2", "--device", "cpu", "--val-fraction", "0"]) == 0
    assert load_model(out).metadata["training"]["cases"] == 3
    assert main(["train", "--out", str(out), "--steps", "2"]) == 2  # neither data nor cache: a message


def test_ctrl_c_stops_training_with_a_message_and_no_half_written_model(cached, tmp_path):
    """Ctrl-C (SIGINT) during `train`: exit status 130, one line saying so, no traceback, and no
    model file nor temporary file left where the model was to go."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    cache, _ = cached
    out = tmp_path / "model" / "m.safetensors"
    out.parent.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "napari_unet", "train", "--cache", str(cache), "--out", str(out),
                             "--steps", "100000", "--batch-size", "2", "--patch", "32", "--base-channels", "4",
                             "--depth", "2", "--device", "cpu", "--val-fraction", "0"],
                            env=env, stderr=subprocess.PIPE, text=True)
    seen = ""
    deadline = time.monotonic() + 120
    while "step/s" not in seen and time.monotonic() < deadline:  # the progress bar runs
        seen += proc.stderr.read(1)
    assert "step/s" in seen, seen
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[1]
    err = seen + rest
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == "napari-unet train: cancelled"
    assert [p.name for p in out.parent.iterdir() if not p.name.endswith(".checkpoint.pt")] == []



# --------------------------------------------------------------------------- a damaged cache
# The module's cache is copied first: these tests damage their copy.

DAMAGED = "BraTS2021_00002"
TINY_TRAIN = ["--steps", "2", "--batch-size", "2", "--patch", "32", "--base-channels", "4", "--depth", "2",
              "--device", "cpu", "--val-fraction", "0", "--workers", "0"]


@pytest.fixture
def cache_copy(cached, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(cached[0], copy)
    return copy


def _decoded(array_path) -> np.ndarray:
    import blosc2

    return blosc2.open(str(array_path), mode="r")[:]


def _truncate(array_path) -> None:
    """A partial copy: the first half of the file."""
    data = array_path.read_bytes()
    array_path.write_bytes(data[: len(data) // 2])


def _flip_inner_bytes(array_path) -> None:
    """A bad disk: bytes inverted in the middle of the compressed slices, the header left whole."""
    data = bytearray(array_path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    array_path.write_bytes(bytes(data))


def test_a_truncated_case_array_is_skipped_and_training_goes_on(cache_copy, tmp_path, capsys):
    array_path = cache_copy / "cases" / f"{DAMAGED}.b2nd"
    _truncate(array_path)
    out = tmp_path / "m.safetensors"
    code = main(["train", "--cache", str(cache_copy), "--out", str(out), *TINY_TRAIN])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err
    assert f"skipped {DAMAGED}: {array_path}: " in err and "--verify" in err
    assert load_model(out).metadata["training"]["cases"] == 2


def test_a_cache_whose_every_case_is_damaged_is_a_clear_error(cache_copy):
    for array_path in (cache_copy / "cases").glob("*.b2nd"):
        _truncate(array_path)
    with pytest.raises(NapariUnetError, match="every cached case is damaged"):
        open_cache(cache_copy, MODALITIES, NORM)


def test_flipped_bytes_inside_a_case_array_are_found_and_not_trained_on(cache_copy):
    array_path = cache_copy / "cases" / f"{DAMAGED}.b2nd"
    whole = _decoded(array_path)
    _flip_inner_bytes(array_path)
    assert not np.array_equal(_decoded(array_path), whole)  # blosc2 itself decodes the garbage without a word
    messages = []
    cases = open_cache(cache_copy, MODALITIES, NORM, log=messages.append)
    assert DAMAGED not in [c.case_id for c in cases] and len(cases) == 2
    assert any(DAMAGED in m and str(array_path) in m and "sha256 mismatch" in m for m in messages), messages


def test_prepare_verify_prepares_a_damaged_case_again(root, cache_copy, capsys):
    array_path = cache_copy / "cases" / f"{DAMAGED}.b2nd"
    whole = _decoded(array_path)
    _flip_inner_bytes(array_path)
    code = main(["prepare", str(root), "--cache", str(cache_copy), "--verify", "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"damaged: {DAMAGED}: {array_path}: " in out and "re-prepared from" in out
    assert "verified 3 cases: 1 damaged, re-prepared" in out
    messages = []
    assert len(open_cache(cache_copy, MODALITIES, NORM, log=messages.append)) == 3 and not messages
    np.testing.assert_array_equal(_decoded(array_path), whole)


def test_prepare_verify_fails_when_a_damaged_case_has_no_data_left(root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(root, data)
    cache = tmp_path / "cache"
    prepare_cache(data, cache, MODALITIES, NORM, workers=1)
    _truncate(cache / "cases" / f"{DAMAGED}.b2nd")
    shutil.rmtree(data / DAMAGED)
    code = main(["prepare", str(data), "--cache", str(cache), "--verify", "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"damaged: {DAMAGED}: " in out and "NOT repaired: its data is gone" in out
    assert "verified 3 cases: 1 damaged, 0 re-prepared, 1 not repaired" in out


def test_prepare_removes_a_killed_runs_half_written_array_and_leaves_another_runs_alone(root, cache_copy):
    """Two trainings may prepare one cache at once: a temporary array written now belongs to the
    other run, one two hours old to a run that was killed."""
    stale = cache_copy / "cases" / ".BraTS2021_00001.partial-0badc0de.b2nd"  # as atomic_path names them
    stale.write_bytes(b"half an array")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    running = cache_copy / "cases" / ".BraTS2021_00002.partial-0000beef.b2nd"
    running.write_bytes(b"being written")
    assert len(prepare_cache(root, cache_copy, MODALITIES, NORM, workers=1)) == 3
    assert not stale.exists()
    assert running.exists()


def test_a_cache_from_before_checksums_still_opens(cache_copy):
    for record_path in (cache_copy / "cases").glob("*.json"):
        record = json.loads(record_path.read_text())
        del record["array_sha256"]
        record_path.write_text(json.dumps(record))
    cases = open_cache(cache_copy, MODALITIES, NORM)
    assert len(cases) == 3
    image, labels = cases[0].volume()
    assert image.shape[1:] == labels.shape
    # Without a checksum the header is still checked: a truncated case is skipped, not a traceback.
    _truncate(cache_copy / "cases" / f"{DAMAGED}.b2nd")
    messages = []
    assert len(open_cache(cache_copy, MODALITIES, NORM, log=messages.append)) == 2
    assert any(DAMAGED in m and "cannot be read as a blosc2 array" in m for m in messages), messages
