"""One training loop for `train` (from scratch on a BraTS root) and `finetune` (on corrections).

Flat and readable in the manner of nanoGPT's train.py: DDP is detected from torchrun's
environment (only rank 0 logs, validates and saves), mixed precision on CUDA, a seeded and
deterministic CPU path, checkpoints of plain data written atomically, resume.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from napari_unet import NapariUnetError
from napari_unet.atomic import atomic_path, commit, file_sha256
from napari_unet.labels import REGIONS, region_mask
from napari_unet.metrics import dice
from napari_unet.modelfile import LoadedModel, load_model, make_metadata, required_modalities, save_model
from napari_unet.predict import Cancelled, Predictor, PreparedVolume, resolve_device
from napari_unet.preprocess import Normalisation
from napari_unet.unet import UNet, UNetConfig
from training.cache import case_key, dataset_cases, open_cache, prepare_cache
from training.data import PatchDataset, TrainCase, augment, drop_modalities, load_root, load_store, split_validation
from training.losses import region_dice_ce


@dataclass
class Settings:
    steps: int = 1000
    batch_size: int = 8
    patch: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: int = 20
    seed: int = 0
    device: str = "auto"
    val_every: int = 0  # steps between validations (0: only once, at the end)
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    early_stop_patience: int = 0  # stop after this many steps without improvement (0: never)
    freeze_batchnorm: bool = False  # fine-tuning keeps the statistics of the base model
    replay_fraction: float = 0.0  # share of each batch from earlier data (--replay DATA, or self-replay)
    bank_fraction: float = 0.0  # share of each batch from the synthetic replay bank (training.replay)
    anchor: float = 0.0  # L2-SP: pull of every weight towards its starting value (fine-tuning)
    # The model written is start + blend * (trained - start): weight-space ensembling of the base
    # and the fine-tuned model (WiSE-FT, Wortsman et al. 2022). 1 writes the trained weights.
    blend: float = 1.0
    augment: bool = True
    tumour_fraction: float = 0.5  # share of patches centred on tumour
    workers: int = 0  # DataLoader worker processes making patches (0: in the training process)
    precision: str = "auto"  # "auto" (fp16 + loss scaling on pre-Ampere GPUs, bf16 on newer ones, fp32 on CPU), "fp32"
    # Chance of hiding each optional modality of a patch (any set then works). None: 0 in training;
    # in fine-tuning, a third of the base model's.
    modality_dropout: float | None = None

    def updated(self, **overrides) -> "Settings":
        """A copy with the values given (None keeps this one's; names not settings are ignored)."""
        names = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in overrides.items() if k in names and v is not None})


@dataclass
class Result:
    model: UNet
    metadata: dict
    steps: int
    history: list = field(default_factory=list)
    stopped_early: bool = False
    seconds: float = 0.0
    path: Path | None = None


# --------------------------------------------------------------------------- distributed


def ddp_info() -> tuple[bool, int, int, int]:
    """(is_ddp, rank, local_rank, world_size) from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False, 0, 0, 1
    return True, int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world


def _setup_ddp(device_name: str):
    import torch.distributed as dist

    is_ddp, rank, local_rank, world = ddp_info()
    if not is_ddp:
        return False, 0, 1, resolve_device(device_name)
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        import datetime

        # Rank 0 may spend a while preparing the cache before the first collective.
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(hours=3))
    return True, rank, world, device


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """The mixed-precision type for training on `device` (None: fp32).

    Chosen by compute capability, not `torch.cuda.is_bf16_supported()`, which says True on a
    T4 (7.5) where bf16 is only emulated and slower than fp16.
    """
    if precision == "fp32" or device.type != "cuda":
        return None
    if precision not in ("auto", "fp16", "bf16"):
        raise NapariUnetError(f"unknown precision {precision!r} (auto, fp32, fp16, bf16)")
    if precision == "auto":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float16 if precision == "fp16" else torch.bfloat16


def _loader_worker_init(_worker_id: int) -> None:
    # Each worker makes whole patches on its own; threads within it would only contend.
    torch.set_num_threads(1)
    try:
        import blosc2

        blosc2.set_nthreads(1)
    except ImportError:
        pass


class _Batches:
    """Batch k of a PatchDataset, made whole in one worker: one transfer a batch, not one a patch."""

    def __init__(self, patches: PatchDataset, batch_size: int):
        self.patches, self.batch_size = patches, batch_size

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.patches[k * self.batch_size + j] for j in range(self.batch_size)]
        images = np.stack([image for image, _ in items])
        labels = np.stack([labels for _, labels in items]).astype(np.uint8)  # 8x less to move than int64
        return torch.from_numpy(images), torch.from_numpy(labels)


def patch_loader(dataset: PatchDataset, first_step: int, steps: int, batch_size: int, workers: int, pin: bool):
    """Batches of patches for steps `first_step`..`steps - 1`; batch k holds patches k*B .. k*B + B - 1,
    so what a step sees depends neither on the number of workers nor on a resume."""
    from torch.utils.data import DataLoader

    return DataLoader(_Batches(dataset, batch_size), batch_size=None, sampler=range(first_step, steps),
                      num_workers=workers, pin_memory=pin, worker_init_fn=_loader_worker_init if workers else None,
                      prefetch_factor=4 if workers else None, persistent_workers=False)


# --------------------------------------------------------------------------- pieces


def _lr_at(step: int, s: Settings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def validate(model: UNet, metadata: dict, cases, device) -> dict[str, float]:
    """Mean Dice per region over whole validation volumes, through the inference engine."""
    was_training = model.training
    predictor = Predictor(LoadedModel(model, metadata, Path("<training>")), str(device))
    model.train(was_training)
    binary = metadata["task"] == "binary"
    regions = ("WT",) if binary else tuple(REGIONS)
    scores = {r: [] for r in regions}
    for case in cases:
        crop, labels = case.volume()
        mask = np.any(crop != 0, axis=0)
        z, h, w = labels.shape
        vol = PreparedVolume(crop, (slice(0, z), slice(0, h), slice(0, w)), mask, (z, h, w))
        pred = predictor.predict(vol).labels
        for region in regions:
            truth = region_mask(labels, region)
            scores[region].append(dice(pred > 0 if binary else region_mask(pred, region), truth))
    return {r: float(np.mean(v)) for r, v in scores.items()}


def _checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".checkpoint.pt")


def _save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _best_path(out: Path) -> Path:
    """The hidden file beside `out` that holds the best validated model while training runs:
    `out` itself is written only when training finishes, so a cancel, a divergence or a crash
    leaves the model that was there before."""
    return out.with_name("." + out.name.removesuffix(".safetensors") + ".best.safetensors")


def _selected_step(path: Path) -> int | None:
    """The step whose weights a model file written by `run` holds (None: not one of those)."""
    import json

    from safetensors import safe_open

    from napari_unet.modelfile import META_KEY

    try:
        with safe_open(str(path), framework="pt") as f:
            selected = json.loads((f.metadata() or {})[META_KEY])["training"]["selected"]
        return int(selected.rsplit(" ", 1)[-1])
    except Exception:  # missing, unreadable, or no record of a selection: not the file wanted
        return None


# --------------------------------------------------------------------------- the loop


def run(
    model: UNet,
    metadata: dict,
    train_cases: list[TrainCase],
    s: Settings,
    *,
    out: Path | None = None,
    val_cases: list[TrainCase] = (),
    replay_cases: list[TrainCase] = (),
    bank=None,
    resume: bool = False,
    checkpoints: bool = True,
    progress: Callable | None = None,
    cancel: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> Result:
    """Train `model` in place for `s.steps` steps; rank 0 writes `out` (if given) at the end.

    With `checkpoints`, a resumable checkpoint is kept beside `out` (fine-tuning, a matter of
    seconds, keeps none).
    """
    start_time = time.perf_counter()
    is_ddp, rank, world, device = _setup_ddp(s.device)
    master = rank == 0
    torch.manual_seed(s.seed + rank)
    gen = torch.Generator().manual_seed(s.seed * 1000 + rank)
    replay = [(list(replay_cases), int(round(s.batch_size * s.replay_fraction))),
              ([bank] if bank is not None else [], int(round(s.batch_size * s.bank_fraction)))]
    dataset = PatchDataset(train_cases, s.patch, s.tumour_fraction, seed=s.seed, rank=rank,
                           replay=replay, batch_size=s.batch_size)
    model.to(device).to(memory_format=torch.channels_last)
    if is_ddp and device.type == "cuda" and model.config.norm == "batch":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if is_ddp else model
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    if not 0 < s.blend <= 1:
        raise NapariUnetError(f"blend must be in (0, 1], not {s.blend}")
    if s.blend < 1 and val_cases:
        raise NapariUnetError("blend is for fine-tuning, which keeps no validation cases")
    # The starting weights, for L2-SP (Li et al. 2018: the prior is the start, not zero) and the blend.
    start_state = ({k: v.detach().clone() for k, v in model.state_dict().items()}
                   if s.anchor > 0 or s.blend < 1 else {})
    start_weights = [start_state[name] for name, _ in model.named_parameters()] if s.anchor > 0 else []
    amp_dtype = autocast_dtype(device, s.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    step, history = 0, []
    best = None  # {"step": N, "dice": {region: Dice}} of the weights the best-so-far file holds
    ckpt = _checkpoint_path(out) if (out is not None and (checkpoints or resume)) else None
    best_file = _best_path(out) if out is not None else None
    if resume:
        if ckpt is None or not ckpt.exists():
            raise NapariUnetError(f"{ckpt}: no checkpoint to resume from")
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        best = state.get("best")
        gen.set_state(state["torch_rng"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if master and log:
            log(f"resumed from {ckpt} at step {step}")
    if master and best is not None and _selected_step(best_file) != best["step"]:
        # The checkpoint is written right after each best-so-far file, so they agree unless the
        # run was killed between the two writes, or the run had finished and moved the file onto
        # `out` (resumed to train longer): then `out` holds those weights.
        if _selected_step(out) == best["step"]:
            import shutil

            with atomic_path(best_file) as tmp:
                shutil.copyfile(out, tmp)
        else:
            if log:
                log(f"the best validated model of step {best['step']} is gone; choosing the best again from here")
            best = None
    if master and best is None and best_file is not None and best_file.exists():
        best_file.unlink()  # left by an earlier run that did not finish

    def save_checkpoint():
        if master and ckpt is not None:
            _save_checkpoint(ckpt, {
                "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "torch_rng": gen.get_state(), "scaler": scaler.state_dict(),
                "history": history, "settings": asdict(s), "best": best,
            })

    def finished_metadata(val: dict | None) -> dict:
        meta = dict(metadata)
        meta["training"] = dict(metadata.get("training", {}))
        meta["training"].update({
            "steps": step, "batch_size": s.batch_size * world, "patch": s.patch, "seed": s.seed,
            "final_loss": round(ema, 5) if ema is not None else None,
            "seconds": round(time.perf_counter() - start_time, 1), "device": str(device), "processes": world,
            "precision": str(amp_dtype).removeprefix("torch.") if amp_dtype else "float32",
        })
        if val:
            meta["training"]["validation_dice"] = {k: round(v, 4) for k, v in val.items()}
        return meta

    def validate_and_keep_best() -> dict:
        """Validation Dice now; the best-so-far file holds the best weights seen so far."""
        nonlocal best, improved
        val = validate(model, metadata, list(val_cases), device)
        if out is not None and (best is None or np.mean(list(val.values())) > np.mean(list(best["dice"].values()))):
            best = {"step": step, "dice": val}
            meta = finished_metadata(val)
            meta["training"]["selected"] = f"best validation Dice, at step {step}"
            save_model(model, meta, best_file)
            improved = True  # the checkpoint follows, so that its record of `best` matches the file
        return val

    def abandon() -> None:
        """Training stops without a model: `out` was never touched; with no checkpoint to resume
        from, the best-so-far file is of no more use."""
        if master and ckpt is None and best_file is not None and best_file.exists():
            best_file.unlink()

    ema, stopped_early, improved = None, False, False
    lowest_ema, since_lowest = math.inf, 0
    net.train()
    if s.freeze_batchnorm:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    droppable = [i for i, m in enumerate(metadata["modalities"]) if m not in required_modalities(metadata)]
    loader = patch_loader(dataset, step, s.steps, s.batch_size, s.workers, pin=device.type == "cuda")
    batches = iter(loader)
    while step < s.steps:
        if cancel is not None and cancel():
            del batches
            abandon()
            raise Cancelled("cancelled; no model was written")
        x, y = next(batches)
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True).long()
        if s.augment:
            x, y = augment(x, y, gen)
        x = drop_modalities(x, s.modality_dropout or 0.0, droppable, gen)
        x = x.contiguous(memory_format=torch.channels_last)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, s)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = region_dice_ce(net(x), y)
        if start_weights:
            loss = loss + s.anchor * sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), start_weights))
        if not torch.isfinite(loss):
            abandon()
            raise NapariUnetError(f"training diverged at step {step + 1} (the loss is {float(loss)}); "
                                  "no model was written: check the data for bad values, or lower --lr")
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        step += 1
        value = float(loss.detach())
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        record = {"step": step, "loss": round(value, 5)}
        if s.early_stop_patience and step > s.warmup + 10:  # the first losses say little
            if ema < lowest_ema * 0.99:
                lowest_ema, since_lowest = ema, 0
            else:
                since_lowest += 1
        if master and s.val_every and step % s.val_every == 0 and val_cases:
            record["val_dice"] = validate_and_keep_best()
            if log:
                log(f"step {step}: loss {ema:.4f}, validation Dice {record['val_dice']}")
        history.append(record)
        if master and progress:
            progress(step, s.steps, loss=round(ema, 4), **{k: round(v, 3) for k, v in record.get("val_dice", {}).items()})
        if (s.checkpoint_every and step % s.checkpoint_every == 0) or improved:
            save_checkpoint()
            improved = False
        if s.early_stop_patience and since_lowest >= s.early_stop_patience:
            stopped_early = True
            break
    del batches
    model.eval()
    if s.blend < 1:
        with torch.no_grad():
            for name, value in model.state_dict().items():
                if value.is_floating_point():
                    value.copy_(start_state[name] + s.blend * (value - start_state[name]))
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        abandon()
        raise NapariUnetError("training produced non-finite weights; no model was written")
    written, final_val = None, None
    if master and val_cases:
        last = history[-1].get("val_dice") if history else None
        final_val = last or validate_and_keep_best()
    meta = finished_metadata(final_val)
    if master and out is not None:
        save_checkpoint()
        if best is not None:  # the best-so-far file holds the best validated weights: now they are the model
            commit(best_file, out)
            written = out
            meta["training"]["selected"] = f"best validation Dice, at step {best['step']}"
            meta["training"]["validation_dice"] = {k: round(v, 4) for k, v in best["dice"].items()}
        else:
            written = save_model(model, meta, out)
    if is_ddp:
        import torch.distributed as dist

        dist.barrier()
    return Result(model, meta, step, history, stopped_early, time.perf_counter() - start_time, written)


def warm_up() -> None:
    """One tiny training step: torch registers operators lazily, holding the GIL as it does;
    a GUI calls this in the background so that its first fine-tune does not stutter."""
    model = UNet(UNetConfig(base_channels=2, depth=2, padding="same", norm="batch"))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(2, 4, 16, 16).contiguous(memory_format=torch.channels_last)
    x, y = augment(x, torch.zeros(2, 16, 16, dtype=torch.long), torch.Generator().manual_seed(0))
    region_dice_ce(model(x), y).backward()
    opt.step()


# --------------------------------------------------------------------------- entry points


def default_cache_dir(out: str | os.PathLike) -> Path:
    """Where `train` keeps its cache when given none: beside the model file."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + ".cache")


def train(
    data,
    out,
    *,
    settings: Settings,
    config: UNetConfig | None = None,
    task: str = "multiclass",
    val_fraction: float = 0.1,
    resume: bool = False,
    cache=None,
    prepare_workers: int | None = None,
    progress=None,
    load_progress=None,
    cancel=None,
    log=None,
) -> Result:
    """Train a new model on one or more BraTS roots (any layout); writes `out` and `<out>.checkpoint.pt`.

    With no roots (`data` empty), every case of an already prepared `cache` is used.

    The cases are preprocessed once into `cache` (default: `<out>.cache` beside the model) and
    read from there slice by slice, so memory does not grow with the number of cases. Under
    torchrun, rank 0 prepares the cache while the other ranks wait.
    """
    config = config or UNetConfig(base_channels=16, padding="same", norm="batch")
    if task == "binary":
        config = UNetConfig(**{**config.to_dict(), "out_channels": 2})
    roots = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    norm = Normalisation()
    metadata = make_metadata(config, task=task, normalisation=norm.to_dict(),
                             required=[] if (settings.modality_dropout or 0) > 0 else None,
                             training={"data": [str(r) for r in roots], "kind": "from scratch",
                                       "modality_dropout": settings.modality_dropout or 0.0})
    cache = Path(cache) if cache is not None else default_cache_dir(out)
    is_ddp, rank, _, _ = _setup_ddp(settings.device)
    if not roots:  # every case of a prepared cache; the data itself may be gone
        cases = open_cache(cache, metadata["modalities"], norm, log=log if rank == 0 else None)
        if not cases:
            raise NapariUnetError(f"{cache}: the cache holds no cases; give the data to prepare it")
    else:
        if rank == 0:
            cases = prepare_cache(roots, cache, metadata["modalities"], norm, workers=prepare_workers,
                                  progress=load_progress, cancel=cancel, log=log)
        if is_ddp:
            import torch.distributed as dist

            dist.barrier()
        if rank != 0:
            cases = open_cache(cache, metadata["modalities"], norm, ids=[case_key(p) for p in dataset_cases(roots)])
    train_cases, val_cases = split_validation(cases, val_fraction, settings.seed)
    metadata["training"]["cases"] = len(train_cases)
    metadata["training"]["validation_cases"] = [c.case_id for c in val_cases]
    torch.manual_seed(settings.seed)  # the initial weights too come from the seed
    model = UNet(config)
    return run(model, metadata, train_cases, settings, out=Path(out), val_cases=val_cases,
               resume=resume, progress=progress, cancel=cancel, log=log)


def self_replay(loaded: LoadedModel, cases: list[TrainCase], device: str = "cpu") -> list[TrainCase]:
    """The base model's own labels on the slices nobody reviewed, to mix into fine-tuning.

    Reviewed slices are usually tumour slices; trained on them alone a model learns that
    every slice holds tumour. Replaying what the base model said elsewhere (where the user
    corrected nothing) keeps its knowledge of healthy slices without needing its old data.
    """
    predictor = Predictor(loaded, device)
    replay = []
    for case in cases:
        crop = case.image.astype(np.float32)
        mask = np.any(crop != 0, axis=0)
        z, h, w = case.labels.shape
        volume = PreparedVolume(crop, (slice(0, z), slice(0, h), slice(0, w)), mask, (z, h, w))
        others = np.setdiff1d(volume.brain_slices(), case.trusted)
        if not len(others):
            continue
        labels = predictor.predict(volume, slices=others).labels
        replay.append(TrainCase(case.case_id, case.image, labels, others, {"case": case.case_id, "self_replay": True}))
    return replay


# Fine-tuning on a few reviewed slices: short, gentle, stopping early, and each batch half
# corrections, a quarter the base model's labels elsewhere in the corrected cases, a quarter the
# synthetic bank (so what the base model knew about other cases stays; see training.replay).
FINETUNE = Settings(steps=60, batch_size=8, patch=128, lr=3e-4, warmup=5, early_stop_patience=25,
                    replay_fraction=0.25, bank_fraction=0.25, freeze_batchnorm=True, blend=0.5)


def finetune(
    store,
    base,
    out,
    *,
    settings: Settings | None = None,
    replay=None,
    bank=None,
    progress=None,
    cancel=None,
    log=None,
) -> Result:
    """Fine-tune BASE on the reviewed slices of a corrections store; BASE is never modified.

    Mixed into every batch: `replay` (a BraTS root) or else the base model's own labels on the
    store's unreviewed slices, and a replay bank of the base model's training distribution
    (`bank`: a file; by default the one the model's record names, the shipped bank for the
    shipped model and its fine-tunes; none for other models, whose self-replay then takes the
    bank's share of the batch).
    """
    from training.replay import bank_for_model, load_bank

    settings = replace(settings or FINETUNE)  # a copy: the defaults are shared
    out = Path(out)
    base_path = Path(base) if base is not None else None
    loaded = load_model(base_path)
    if out.resolve() == loaded.path.resolve():
        raise NapariUnetError(f"{out}: the new model must not overwrite the base model")
    norm = Normalisation.from_dict(loaded.metadata["normalisation"])
    cases = load_store(store, loaded.modalities, norm, required=required_modalities(loaded.metadata))
    if replay:
        replay_cases = load_root(replay, loaded.modalities, norm)
    else:
        replay_cases = self_replay(loaded, cases, settings.device)
    bank = bank if bank is not None else bank_for_model(loaded.metadata)
    replay_bank = load_bank(bank).for_modalities(loaded.modalities) if bank and settings.bank_fraction > 0 else None
    # One kind of earlier data missing, the other takes its share of the batch: no bank of the
    # base model's own data, or no unreviewed slices to self-replay (a store of whole cases).
    if replay_bank is None:
        settings.replay_fraction, settings.bank_fraction = settings.replay_fraction + settings.bank_fraction, 0.0
    elif not replay_cases:
        settings.replay_fraction, settings.bank_fraction = 0.0, settings.replay_fraction + settings.bank_fraction
    base_training = loaded.metadata.get("training", {})
    if settings.modality_dropout is None:
        # Some of the base model's dropout, or a few corrected four-modality slices teach it to
        # lean on modalities that other cases lack; a third of it, so most steps still learn from
        # the corrections as they were seen (bench_real: the other real cases keep their Dice; the
        # new-scanner fine-tune test: WT 0.60 -> 0.68 at a third, 0.59 at the full dropout).
        settings.modality_dropout = round(float(base_training.get("modality_dropout") or 0.0) / 3, 4)
    metadata = dict(loaded.metadata)
    metadata["training"] = {
        "kind": "fine-tuned",
        "base_model": {"file": loaded.path.name, "sha256": file_sha256(loaded.path), "training": base_training},
        "modality_dropout": settings.modality_dropout,
        "corrections": [c.provenance for c in cases],
        "replay": str(replay) if replay else "self (the base model's labels on unreviewed slices)",
        "replay_fraction": settings.replay_fraction,
        "bank": replay_bank.provenance if replay_bank is not None else None,
        "bank_fraction": settings.bank_fraction,
        "anchor": settings.anchor,
        "blend": settings.blend,
    }
    return run(loaded.model, metadata, cases, settings, out=out, replay_cases=replay_cases, bank=replay_bank,
               checkpoints=False, progress=progress, cancel=cancel, log=log)
