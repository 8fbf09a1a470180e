"""The inference engine and the predict/evaluate/info commands, with a really trained model."""

from __future__ import annotations

import json
import os
import time

import nibabel as nib
import numpy as np
import pytest
from conftest import TRAIN_SHAPE

from napari_unet import NapariUnetError
from napari_unet.cases import find_case, read_case
from napari_unet.cli import main
from napari_unet.metrics import region_scores
from napari_unet.modelfile import load_model
from napari_unet.predict import Cancelled, Predictor, resolve_device


@pytest.fixture(scope="module")
def predictor(tiny_model):
    return Predictor(load_model(tiny_model[0]), "cpu")


def test_auto_device_is_the_gpu_if_there_is_one_and_unknown_devices_are_refused():
    import torch

    if torch.cuda.is_available():  # a CUDA build of torch on a machine with a GPU (make setup TORCH=torch)
        assert resolve_device("auto").type == "cuda" and resolve_device("cuda").type == "cuda"
    else:
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(NapariUnetError, match="CUDA"):
            resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(NapariUnetError, match="unknown device 'gpu7'"):
        resolve_device("gpu7")


def test_predicted_labels_match_the_truth(predictor, dataset_factory):
    case = read_case(dataset_factory("brats2021", cases=2, seed=13, shape=TRAIN_SHAPE)[0])
    prediction = predictor.predict_case(case, with_uncertainty=True)
    scores = region_scores(prediction.labels, case.labels, case.spacing)
    assert scores["WT"]["dice"] > 0.85 and scores["TC"]["dice"] > 0.6
    assert prediction.labels.shape == case.shape
    # Nothing is proposed outside the brain, and slices without brain are never computed.
    brain = case.stack().any(axis=0)
    assert not prediction.labels[~brain].any()
    assert set(prediction.computed_slices) == set(np.flatnonzero(brain.any(axis=(1, 2))))
    assert 0 <= prediction.uncertainty.min() and prediction.uncertainty.max() <= 1


def test_single_slice_proposal_equals_the_full_volume_on_that_slice(predictor, dataset_factory):
    case = read_case(dataset_factory("brats2021", cases=2, seed=13, shape=TRAIN_SHAPE)[0])
    volume = predictor.prepare_case(case)
    full = predictor.predict(volume).labels
    z = int(np.argmax((case.labels > 0).sum(axis=(1, 2))))
    one = predictor.predict(volume, slices=[z])
    assert list(one.computed_slices) == [z]
    np.testing.assert_array_equal(one.labels[z], full[z])
    assert not one.labels[np.arange(len(full)) != z].any()


def test_bf16_proposals_agree_with_fp32(tiny_model, dataset_factory):
    case = read_case(dataset_factory("brats2021", cases=2, seed=13, shape=TRAIN_SHAPE)[0])
    fp32 = Predictor(load_model(tiny_model[0]), "cpu", precision="fp32").predict_case(case).labels
    bf16 = Predictor(load_model(tiny_model[0]), "cpu", precision="bf16").predict_case(case).labels
    assert (fp32 != bf16).mean() < 1e-3
    with pytest.raises(NapariUnetError, match="unknown precision"):
        Predictor(load_model(tiny_model[0]), "cpu", precision="fp8")


def test_flip_tta_is_close_to_the_plain_prediction(tiny_model, dataset_factory):
    case = read_case(dataset_factory("brats2021", cases=2, seed=13, shape=TRAIN_SHAPE)[0])
    model = load_model(tiny_model[0])
    plain = Predictor(model, "cpu").predict_case(case, with_uncertainty=True)
    tta = Predictor(model, "cpu", tta=True).predict_case(case, with_uncertainty=True)
    assert region_scores(tta.labels, case.labels)["WT"]["dice"] > 0.85
    # Averaged over the flips, the labels move at the tumour's margins only (WT 0.94 against the
    # plain labels when this was written) ...
    assert region_scores(tta.labels, plain.labels)["WT"]["dice"] > 0.9
    assert (tta.labels != plain.labels).any()  # ... but they do move: the flips were run


def test_cancel_stops_within_one_batch(tiny_model, dataset_factory):
    case = read_case(dataset_factory("brats2021", cases=2, seed=13, shape=TRAIN_SHAPE)[0])
    predictor = Predictor(load_model(tiny_model[0]), "cpu", batch_size=4)
    seen = []
    with pytest.raises(Cancelled):
        predictor.predict_case(case, progress=lambda done, total: seen.append(done), cancel=lambda: len(seen) >= 2)
    assert seen == [0, 4]  # the first batch ran, the second never started


def test_predict_writes_aligned_files_for_every_layout(tiny_model, dataset_factory, layout, tmp_path):
    case_path = dataset_factory(layout, cases=1, seed=13, shape=TRAIN_SHAPE)[0]
    assert main(["predict", str(case_path), "--out", str(tmp_path), "--model", str(tiny_model[0])]) == 0
    case = read_case(case_path)
    out = tmp_path / f"{case.case_id}.nii.gz"
    written, seg = nib.load(out), nib.load(find_case(case_path).seg)
    np.testing.assert_allclose(written.affine, seg.affine)
    assert written.shape == seg.shape
    values = set(np.unique(np.asarray(written.dataobj)).tolist())
    assert values <= set(np.unique(np.asarray(seg.dataobj)).tolist())  # the layout's own values
    # Aligned: the written file scores well against the layout's own segmentation file.
    assert main(["evaluate", str(out), str(find_case(case_path).seg), "--json", str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    assert scores["mean"]["WT"]["dice"] > 0.85


def test_predict_a_folder_of_cases_and_evaluate_folders(tiny_model, dataset_factory, tmp_path, capsys):
    cases = dataset_factory("brats2023", cases=2, seed=13, shape=TRAIN_SHAPE)
    (tmp_path / "pred").mkdir()
    stale = tmp_path / "pred" / f".{cases[0].name}.partial-0badc0de.nii.gz"  # a killed run's half file
    stale.write_bytes(b"half a file")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))
    running = tmp_path / "pred" / f".{cases[1].name}.partial-0000beef.nii.gz"  # another run writing now
    running.write_bytes(b"being written")
    assert main(["predict", str(cases[0].parent), "--out", str(tmp_path / "pred"), "--model", str(tiny_model[0])]) == 0
    assert not stale.exists()
    assert running.exists()  # another run's write in progress is left alone
    running.unlink()
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [f"{c.name}.nii.gz" for c in cases]
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "pred"), str(cases[0].parent), "--json", str(tmp_path / "e.json")]) == 0
    table = capsys.readouterr().out
    assert "WT Dice" in table and cases[0].name in table and "mean" in table
    result = json.loads((tmp_path / "e.json").read_text())
    assert set(result["cases"]) == {c.name for c in cases}
    assert set(result["mean"]) == {"WT", "TC", "ET"} and set(result["mean"]["ET"]) == {"dice", "hd95"}


def test_predict_on_a_bad_case_is_a_clear_error(tiny_model, tmp_path, capsys):
    (tmp_path / "BraTS2021_00009").mkdir()
    (tmp_path / "BraTS2021_00009" / "BraTS2021_00009_flair.nii.gz").write_bytes(b"junk")
    code = main(["predict", str(tmp_path / "BraTS2021_00009"), "--out", str(tmp_path / "o"), "--model", str(tiny_model[0])])
    err = capsys.readouterr().err
    assert code == 2 and "BraTS2021_00009" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_info_prints_the_metadata(tiny_model, capsys):
    assert main(["info", str(tiny_model[0])]) == 0
    out = capsys.readouterr().out
    assert "8 base channels" in out and "t1, t1ce, t2, flair" in out and "parameters:" in out


def test_an_isa_cap_below_bf16_makes_the_cpu_precision_fp32(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 turns this machine into an AVX2 one: emulated bf16 would be 3-4x
    slower than fp32, so 'auto' must not pick it."""
    import torch

    from napari_unet.predict import resolve_precision

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"  # asked for explicitly


def test_torch_s_libraries_are_read_before_torch_is_imported():
    import subprocess
    import sys

    # A fresh interpreter: this one imported torch long ago (then nothing is read).
    script = ("import sys, importlib.util, pathlib\n"
              "from napari_unet.predict import read_torch_libraries\n"
              "lib = pathlib.Path(importlib.util.find_spec('torch').submodule_search_locations[0]) / 'lib'\n"
              "size = sum(p.stat().st_size for p in lib.glob('*.so*'))\n"
              "n = read_torch_libraries()\n"
              "assert 'torch' not in sys.modules\n"
              "import torch\n"
              "print(n, size, read_torch_libraries())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    read, size, again = map(int, out.split())
    assert read == size > 100 << 20  # every library, before the import
    assert again == 0  # once torch is in, nothing to warm
