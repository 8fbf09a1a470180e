"""Training and fine-tuning: loss goes down, runs are reproducible and resumable, DDP runs,
fine-tuning on a few reviewed slices helps on a new scanner and never touches the base model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAIN_SHAPE

from napari_unet import NapariUnetError
from napari_unet.cases import read_case
from napari_unet.cli import main
from napari_unet.metrics import region_scores
from napari_unet.modelfile import load_model, make_metadata
from napari_unet.predict import Cancelled, Predictor
from napari_unet.preprocess import Normalisation
from napari_unet.unet import UNet, UNetConfig
from training.data import load_root, load_store
from training.loop import Settings, file_sha256, finetune, run
from training.losses import region_dice_ce

SMALL_NET = UNetConfig(base_channels=4, depth=2, padding="same", norm="batch")
QUICK = dict(batch_size=4, patch=48, seed=3, device="cpu", warmup=2)


def test_short_training_lowers_the_loss_and_writes_a_loadable_model(tiny_model):
    path, result = tiny_model
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    loaded = load_model(path)
    assert loaded.metadata["training"]["steps"] == 500
    assert loaded.metadata["training"]["kind"] == "from scratch"


@pytest.fixture(scope="module")
def small_cases(dataset_factory):
    paths = dataset_factory("brats2021", cases=8, seed=11, shape=TRAIN_SHAPE)
    return load_root(paths[0].parent, ("t1", "t1ce", "t2", "flair"), Normalisation())[:3]


def _fresh(seed=0):
    torch.manual_seed(seed)
    model = UNet(SMALL_NET)
    return model, make_metadata(SMALL_NET)


def test_cpu_training_is_deterministic(small_cases):
    weights = []
    for _ in range(2):
        model, meta = _fresh()
        run(model, meta, small_cases, Settings(steps=4, **QUICK))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_resume_continues_exactly_where_it_stopped(small_cases, tmp_path):
    straight, meta = _fresh()
    run(straight, meta, small_cases, Settings(steps=8, **QUICK), out=tmp_path / "a.safetensors")

    interrupted, meta = _fresh()
    steps_seen = []
    with pytest.raises(Cancelled):  # a kill after step 4, when the checkpoint was written
        run(interrupted, meta, small_cases, Settings(steps=8, checkpoint_every=4, **QUICK),
            out=tmp_path / "b.safetensors", progress=lambda step, total, **_: steps_seen.append(step),
            cancel=lambda: len(steps_seen) >= 4)
    assert not (tmp_path / "b.safetensors").exists() and (tmp_path / "b.checkpoint.pt").exists()
    resumed, meta = _fresh(seed=99)  # different initial weights: everything must come from the checkpoint
    result = run(resumed, meta, small_cases, Settings(steps=8, checkpoint_every=4, **QUICK),
                 out=tmp_path / "b.safetensors", resume=True)
    assert result.steps == 8
    for p, q in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q)


def test_resume_without_a_checkpoint_is_a_clear_error(small_cases, tmp_path):
    model, meta = _fresh()
    with pytest.raises(NapariUnetError, match="no checkpoint"):
        run(model, meta, small_cases, Settings(steps=2, **QUICK), out=tmp_path / "m.safetensors", resume=True)


def test_loss_ignores_untrusted_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    target = torch.randint(0, 4, (2, 8, 8))
    weight = torch.ones(2, 8, 8)
    weight[1] = 0  # the second slice was not reviewed
    changed = logits.clone()
    changed[1] = torch.randn(4, 8, 8) * 10
    assert torch.allclose(region_dice_ce(logits, target, weight), region_dice_ce(changed, target, weight))
    assert not torch.allclose(region_dice_ce(logits, target), region_dice_ce(changed, target))


def test_two_process_ddp_on_the_cpu(dataset_factory, tmp_path):
    data = dataset_factory("brats2021", cases=3, seed=21, shape=(48, 48, 32))[0].parent
    out = tmp_path / "ddp.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "napari_unet", "train", str(data), "--out", str(out), "--steps", "3", "--batch-size", "2",
           "--patch", "32", "--base-channels", "4", "--depth", "2", "--device", "cpu", "--val-fraction", "0.34",
           "--cache", str(tmp_path / "cache"), "--workers", "1"]  # both ranks read the one cache rank 0 made
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = load_model(out).metadata["training"]
    assert meta["processes"] == 2 and meta["batch_size"] == 4
    assert meta["selected"].startswith("best validation Dice")  # the file holds the best validated weights
    assert torch.load(out.with_name("ddp.checkpoint.pt"), weights_only=True)["step"] == 3
    assert proc.stdout.count("wrote ") == 1  # only rank 0 reports and saves
    assert len(list((tmp_path / "cache" / "cases").glob("*.b2nd"))) == 3


# --------------------------------------------------------------------------- fine-tuning

def _make_store(dataset_factory, root: Path, per_case: int = 5, shape=TRAIN_SHAPE) -> Path:
    """Two cases of the shifted scanner, with `per_case` reviewed tumour slices each."""
    store = root / "store"
    for src in dataset_factory("brats2021", cases=2, seed=12, shape=shape, shift=1.0):
        dst = store / src.name
        shutil.copytree(src, dst)
        case = read_case(dst)
        tumour = np.flatnonzero(case.labels.any(axis=(1, 2)))
        picked = tumour[:: max(1, len(tumour) // per_case)][:per_case]
        slices = [int(case.source.axial_to_file_index(z)) for z in picked]
        (dst / "corrections.json").write_text(json.dumps({"reviewed_slices": slices}))
    return store


def _wt_dice(model_path, cases) -> float:
    predictor = Predictor(load_model(model_path), "cpu")
    scores = []
    for path in cases:
        case = read_case(path)
        scores.append(region_scores(predictor.predict_case(case).labels, case.labels)["WT"]["dice"])
    return float(np.mean(scores))


def test_finetune_on_reviewed_slices_helps_on_the_new_scanner(dataset_factory, tmp_path):
    """The shipped model on full-size cases of another scanner, 10 reviewed slices."""
    from napari_unet.modelfile import default_model_path
    from napari_unet.synth import BRATS_SHAPE

    base = tmp_path / "base.safetensors"
    shutil.copy(default_model_path(), base)
    before_hash = file_sha256(base)
    store = _make_store(dataset_factory, tmp_path, per_case=5, shape=BRATS_SHAPE)
    held_out = dataset_factory("brats2021", cases=2, seed=14, shape=BRATS_SHAPE, shift=1.0)
    out = tmp_path / "new.safetensors"
    assert main(["finetune", str(store), "--model", str(base), "--out", str(out), "--device", "cpu"]) == 0
    assert file_sha256(base) == before_hash  # BASE untouched
    before, after = _wt_dice(base, held_out), _wt_dice(out, held_out)
    assert after > before + 0.05, (before, after)
    meta = load_model(out).metadata["training"]
    assert meta["kind"] == "fine-tuned" and meta["base_model"]["sha256"] == before_hash
    taught = {c["case"]: c for c in meta["corrections"]}
    assert set(taught) == {p.name for p in store.iterdir()}
    for case_dir in store.iterdir():
        reviewed = json.loads((case_dir / "corrections.json").read_text())["reviewed_slices"]
        assert sorted(taught[case_dir.name]["slices"]) == sorted(reviewed)
        assert len(taught[case_dir.name]["sha256"]) == len(reviewed)


def test_finetune_refuses_to_overwrite_its_base(tiny_model, dataset_factory, tmp_path):
    store = _make_store(dataset_factory, tmp_path)
    with pytest.raises(NapariUnetError, match="must not overwrite"):
        finetune(store, tiny_model[0], tiny_model[0])


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "empty"),
        ("{not json", "not valid JSON"),
        ('{"reviewed": [1, 2]}', "reviewed_slices"),
        ('{"reviewed_slices": [1, "two"]}', "integers"),
        ('{"reviewed_slices": [5000]}', "outside the volume"),
        ('{"reviewed_slices": []}', "no reviewed slices"),
    ],
)
def test_bad_stores_are_refused_with_a_clear_message(dataset_factory, tmp_path, content, message):
    store = tmp_path / "store"
    store.mkdir()
    if content is not None:
        src = dataset_factory("brats2021", cases=1, seed=12, shape=TRAIN_SHAPE, shift=1.0)[0]
        shutil.copytree(src, store / src.name)
        (store / src.name / "corrections.json").write_text(content)
    with pytest.raises(NapariUnetError, match=message):
        load_store(store, ("t1", "t1ce", "t2", "flair"), Normalisation())


def test_cli_finetune_on_a_missing_store_exits_cleanly(tiny_model, tmp_path, capsys):
    code = main(["finetune", str(tmp_path / "nowhere"), "--model", str(tiny_model[0]), "--out", str(tmp_path / "x.safetensors")])
    assert code == 2 and "nowhere" in capsys.readouterr().err


def test_finetuning_on_a_case_without_necrosis_keeps_proposing_necrosis_elsewhere(tiny_model, dataset_factory,
                                                                                   tmp_path):
    """A whole case whose labels hold no necrosis (its core all enhancing) must not teach the model
    that necrosis does not exist: with the replay bank of the base model's own distribution in every
    batch, necrosis is still proposed on cases that have it; without the bank it is unlearned."""
    from napari_unet.cases import write_case_files
    from napari_unet.labels import ENHANCING, NECROTIC
    from napari_unet.synth import generate
    from training.loop import FINETUNE
    from training.replay import make_bank, save_bank

    base, _ = tiny_model
    made = generate(np.random.default_rng([11, 3]), TRAIN_SHAPE)
    assert (made.labels == NECROTIC).any()
    made.labels[made.labels == NECROTIC] = ENHANCING
    write_case_files(tmp_path / "store", "brats2021", "BraTS2021_00042", made.images, made.labels, made.affine)
    bank = save_bank(tmp_path / "bank.npz", *make_bank(3, seed=5, patches_per_case=12, patch=64,
                                                       appearance="standard", shape=TRAIN_SHAPE)[:4],
                     ("t1", "t1ce", "t2", "flair"), {"test": True})
    held_out = [read_case(p) for p in dataset_factory("brats2021", cases=3, seed=13, shape=TRAIN_SHAPE)]
    held_out = [c for c in held_out if (c.labels == NECROTIC).any()]
    assert held_out

    def necrosis(model) -> int:
        predictor = Predictor(load_model(model), "cpu")
        return sum(int((predictor.predict_case(c).labels == NECROTIC).sum()) for c in held_out)

    # A whole case (no unreviewed slices to self-replay) and a brisk learning rate: the corrections
    # would wipe necrosis out within 60 steps.
    quick = dict(device="cpu", patch=64, steps=60, early_stop_patience=0, lr=1e-3, blend=1.0)
    with_bank = finetune(tmp_path / "store", base, tmp_path / "bank.safetensors",
                         settings=FINETUNE.updated(**quick), bank=bank).path
    without = finetune(tmp_path / "store", base, tmp_path / "plain.safetensors",
                       settings=FINETUNE.updated(**quick, bank_fraction=0.0, replay_fraction=0.5)).path
    before, kept, lost = necrosis(base), necrosis(with_bank), necrosis(without)
    assert before > 50, before
    assert kept >= 0.5 * before, (before, kept, lost)
    assert lost < 0.5 * kept, (before, kept, lost)


def test_a_loss_that_turns_nan_writes_no_model(small_cases, tmp_path):
    """Training on data with a bad value stops with a message naming the step; nothing is written."""
    from training.data import TrainCase

    case = small_cases[0]
    bad = TrainCase(case.case_id, case.image.copy(), case.labels, case.trusted)
    bad.image[:, case.trusted] = np.nan
    model, meta = _fresh()
    out = tmp_path / "m.safetensors"
    with pytest.raises(NapariUnetError, match="diverged at step 1"):
        run(model, meta, [bad], Settings(steps=3, augment=False, **QUICK), out=out)
    assert not out.exists() and not list(tmp_path.iterdir())


def _scripted_validation(monkeypatch, means):
    """Validation that gives the scripted mean Dice at each call, in turn: the best step is chosen."""
    import training.loop as loop

    calls = []

    def scripted(model, metadata, cases, device):
        calls.append(1)
        value = means[len(calls) - 1]
        return {"WT": value, "TC": value, "ET": value}

    monkeypatch.setattr(loop, "validate", scripted)
    return calls


def test_the_model_file_holds_the_best_validated_weights(small_cases, tmp_path, monkeypatch):
    """Validated every step, the file holds the step with the best mean Dice (step 3 of 6 here,
    not the last), and says so."""
    _scripted_validation(monkeypatch, [0.2, 0.5, 0.9, 0.3, 0.4, 0.6])
    weights_at = {}

    def keep_weights(step, total, **_):
        weights_at[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    model, meta = _fresh()
    out = tmp_path / "m.safetensors"
    result = run(model, meta, small_cases[:2], Settings(steps=6, val_every=1, lr=3e-2, **QUICK), out=out,
                 val_cases=small_cases[2:], progress=keep_weights)
    saved = load_model(out)
    assert saved.metadata["training"]["selected"] == "best validation Dice, at step 3"
    assert saved.metadata["training"]["validation_dice"] == {"WT": 0.9, "TC": 0.9, "ET": 0.9}
    assert result.metadata["training"]["selected"] == "best validation Dice, at step 3"
    state = saved.model.state_dict()
    assert all(torch.equal(state[k], weights_at[3][k]) for k in state)
    assert not all(torch.equal(state[k], weights_at[6][k]) for k in state)  # the last step's are others


def _validation_run(**settings):
    model, meta = _fresh()
    kwargs = dict(steps=6, val_every=1, lr=3e-2, **QUICK)
    kwargs.update(settings)
    return model, meta, Settings(**kwargs)


def test_training_over_a_model_leaves_it_as_it_was_when_cancelled_and_resumes_to_the_best(small_cases, tmp_path,
                                                                                          monkeypatch):
    """`out` is written only when training finishes: cancelled after validations that improved,
    the model that was there is untouched; the best-so-far weights wait beside it with the
    checkpoint that records them, and the resumed run writes the best of both parts."""
    from training.loop import _best_path, _checkpoint_path, _selected_step

    # Steps 1-3, cancelled; resumed from the checkpoint of step 2: steps 3-6 again.
    _scripted_validation(monkeypatch, [0.2, 0.5, 0.4] + [0.4, 0.3, 0.9, 0.6])
    out = tmp_path / "m.safetensors"
    old, old_meta = _fresh(seed=7)
    from napari_unet.modelfile import save_model

    save_model(old, old_meta, out)
    before = out.read_bytes()
    model, meta, settings = _validation_run(checkpoint_every=100)  # no periodic checkpoint
    seen = []
    with pytest.raises(Cancelled, match="no model was written"):
        run(model, meta, small_cases[:2], settings, out=out, val_cases=small_cases[2:],
            progress=lambda step, total, **_: seen.append(step), cancel=lambda: len(seen) >= 3)
    assert out.read_bytes() == before
    assert _selected_step(_best_path(out)) == 2  # steps 1 and 2 improved
    state = torch.load(_checkpoint_path(out), weights_only=True)
    assert state["best"]["step"] == 2 and state["step"] == 2  # written with the best model, not later

    resumed, meta = _fresh(seed=99)
    result = run(resumed, meta, small_cases[:2], settings, out=out, val_cases=small_cases[2:], resume=True)
    assert result.path == out and out.read_bytes() != before
    assert load_model(out).metadata["training"]["selected"] == "best validation Dice, at step 5"
    assert not _best_path(out).exists()  # moved onto `out`


def test_a_loss_that_turns_nan_midway_leaves_the_previous_model(small_cases, tmp_path, monkeypatch):
    """Diverging after a validation improved: `out` keeps its old bytes, and with no checkpoint
    to resume from no best-so-far file is left either."""
    import training.loop as loop

    _scripted_validation(monkeypatch, [0.2, 0.5, 0.9, 0.3, 0.4, 0.6])
    real, calls = loop.region_dice_ce, []

    def turning_nan(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) >= 4 else loss

    monkeypatch.setattr(loop, "region_dice_ce", turning_nan)
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"the previous model")
    model, meta, settings = _validation_run()
    with pytest.raises(NapariUnetError, match="diverged at step 4.*no model was written"):
        run(model, meta, small_cases[:2], settings, out=out, val_cases=small_cases[2:], checkpoints=False)
    assert out.read_bytes() == b"the previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_finetuning_keeps_the_base_models_batchnorm_statistics_and_takes_replay_data(tiny_model, dataset_factory,
                                                                                      tmp_path, monkeypatch):
    store = _make_store(dataset_factory, tmp_path, per_case=2)
    replay_root = dataset_factory("brats2021", cases=2, seed=13, shape=TRAIN_SHAPE)[0].parent
    out = tmp_path / "new.safetensors"
    import training.loop as loop

    drawn = []  # (batch position's group, the source's path) of every patch trained on

    class Spy(loop.PatchDataset):
        def __getitem__(self, index):
            group = self.position_group[index % self.batch_size]
            rng = np.random.default_rng([self.seed, self.rank, int(index)])  # as PatchDataset picks the case
            source = self.groups[group].sources[int(rng.choice(len(self.groups[group].sources),
                                                               p=self.groups[group].case_p))]
            drawn.append((group, str(source.provenance.get("path"))))
            return super().__getitem__(index)

    monkeypatch.setattr(loop, "PatchDataset", Spy)
    assert main(["finetune", str(store), "--model", str(tiny_model[0]), "--out", str(out), "--steps", "4",
                 "--device", "cpu", "--replay", str(replay_root)]) == 0
    replayed = [path for group, path in drawn if group > 0]
    assert replayed and all(path.startswith(str(replay_root)) for path in replayed)  # replay data in the batches
    assert any(path.startswith(str(store)) for group, path in drawn if group == 0)  # and the corrections
    base, new = load_model(tiny_model[0]).model.state_dict(), load_model(out).model.state_dict()
    stats = [k for k in base if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(base[k], new[k]) for k in stats)
    assert any(not torch.equal(base[k], new[k]) for k in base if k.endswith(".weight"))  # it did learn
    meta = load_model(out).metadata["training"]
    assert meta["replay"] == str(replay_root) and meta["bank"] is None  # the tiny model has no bank


def test_blend_writes_weights_that_share_the_change_between_base_and_fine_tune(tiny_model, dataset_factory,
                                                                                tmp_path, capsys):
    """--blend 0.5 writes base + 0.5 x (fine-tuned - base): the same run's change, halved."""
    from training.loop import FINETUNE

    base, _ = tiny_model
    store = tmp_path / "store"
    shutil.copytree(dataset_factory("brats2021", cases=1, seed=15, shape=TRAIN_SHAPE)[0],
                    store / "BraTS2021_00001")
    quick = dict(device="cpu", patch=64, steps=4, early_stop_patience=0, lr=1e-3)
    full = finetune(store, base, tmp_path / "full.safetensors", settings=FINETUNE.updated(**quick, blend=1.0)).path
    half = finetune(store, base, tmp_path / "half.safetensors", settings=FINETUNE.updated(**quick)).path
    assert load_model(half).metadata["training"]["blend"] == 0.5  # the default
    start, end, mid = (load_model(p).model.state_dict() for p in (base, full, half))
    moved = 0
    for name, value in mid.items():
        if value.is_floating_point():
            assert torch.allclose(value, start[name] + 0.5 * (end[name] - start[name]), atol=1e-5), name
            moved += int(not torch.equal(end[name], start[name]))
    assert moved > 10  # the fine-tune changed the weights: the test compares something
    assert main(["finetune", str(store), "--model", str(base), "--out", str(tmp_path / "cli.safetensors"),
                 "--steps", "1", "--device", "cpu", "--blend", "1"]) == 0
    assert load_model(tmp_path / "cli.safetensors").metadata["training"]["blend"] == 1.0
    with pytest.raises(SystemExit):  # nothing of the fine-tune kept: refused by the parser
        main(["finetune", str(store), "--model", str(base), "--out", str(tmp_path / "x.safetensors"), "--blend", "0"])
    assert "--blend: must be above 0 and at most 1, not 0" in capsys.readouterr().err

