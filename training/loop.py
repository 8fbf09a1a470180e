"""One training loop for `train` (from scratch on a BraTS root) and `finetune` (on corrections).

Flat and readable in the manner of nanoGPT's train.py: DDP is detected from torchrun's
environment (only rank 0 logs, validates and saves), mixed precision on CUDA, a seeded and
deterministic CPU path, checkpoints of plain data written atomically, resume.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from napari_unet import NapariUnetError
from napari_unet.atomic import atomic_path
from napari_unet.metrics import dice
from napari_unet.modelfile import LoadedModel, load_model, make_metadata, save_model
from napari_unet.predict import Cancelled, Predictor, PreparedVolume, resolve_device
from napari_unet.preprocess import Normalisation
from napari_unet.unet import UNet, UNetConfig
from training.data import SliceSampler, TrainCase, augment, load_root, load_store, split_validation
from training.losses import REGION_CLASSES, region_dice_ce


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
    val_every: int = 0  # steps between validations (0: only at the end)
    checkpoint_every: int = 0  # steps between checkpoints (0: only at the end)
    early_stop_patience: int = 0  # stop after this many steps without improvement (0: never)
    freeze_batchnorm: bool = False  # fine-tuning keeps the statistics of the base model
    replay_fraction: float = 0.0  # share of each batch drawn from earlier data
    augment: bool = True
    tumour_fraction: float = 0.5  # share of patches centred on tumour
    trainable: str = "all"  # "all", or "input": only the first level (adapts to a new scanner's contrasts)
    optimizer: str = "adamw"  # "adamw" (training) or "sgd" (fine-tuning: steps shrink with the error)


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
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True, rank, world, device


# --------------------------------------------------------------------------- pieces


def _lr_at(step: int, s: Settings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def validate(model: UNet, metadata: dict, cases: list[TrainCase], device) -> dict[str, float]:
    """Mean Dice per region over whole validation volumes, through the inference engine."""
    was_training = model.training
    predictor = Predictor(LoadedModel(model, metadata, Path("<training>")), str(device))
    model.train(was_training)
    scores = {r: [] for r in (("WT",) if metadata["task"] == "binary" else REGION_CLASSES)}
    for case in cases:
        crop = case.image.astype(np.float32)
        mask = np.any(crop != 0, axis=0)
        z, h, w = case.labels.shape
        vol = PreparedVolume(crop, (slice(0, z), slice(0, h), slice(0, w)), mask, (z, h, w))
        pred = predictor.predict(vol).labels
        for region in scores:
            classes = (1,) if metadata["task"] == "binary" else REGION_CLASSES[region]
            truth = np.isin(case.labels, REGION_CLASSES["WT"] if metadata["task"] == "binary" else classes)
            scores[region].append(dice(np.isin(pred, classes), truth))
    return {r: float(np.mean(v)) for r, v in scores.items()}


def _checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".checkpoint.pt")


def _save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _plain(obj):
    """numpy's generator state as plain Python data (loadable with weights_only=True)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj


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
    rng = np.random.default_rng([s.seed, rank])
    gen = torch.Generator().manual_seed(s.seed * 1000 + rank)
    sampler = SliceSampler(train_cases, s.patch, s.tumour_fraction)
    replay = SliceSampler(list(replay_cases), s.patch, s.tumour_fraction) if replay_cases else None
    model.to(device).to(memory_format=torch.channels_last)
    if is_ddp and device.type == "cuda" and model.config.norm == "batch":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if is_ddp else model
    params = list(model.parameters()) if s.trainable == "all" else list(model.inc.parameters())
    if s.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=s.lr, momentum=0.9, nesterov=True, weight_decay=s.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    step, history = 0, []
    ckpt = _checkpoint_path(out) if (out is not None and (checkpoints or resume)) else None
    if resume:
        if ckpt is None or not ckpt.exists():
            raise NapariUnetError(f"{ckpt}: no checkpoint to resume from")
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        rng.bit_generator.state = state["numpy_rng"]
        gen.set_state(state["torch_rng"])
        if master and log:
            log(f"resumed from {ckpt} at step {step}")

    def save_checkpoint():
        if master and ckpt is not None:
            _save_checkpoint(ckpt, {
                "step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "numpy_rng": _plain(rng.bit_generator.state), "torch_rng": gen.get_state(),
                "history": history, "settings": asdict(s),
            })

    best, since_best, ema, stopped_early = math.inf, 0, None, False
    net.train()
    if s.freeze_batchnorm:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    while step < s.steps:
        if cancel is not None and cancel():
            raise Cancelled("cancelled; no model was written")
        n_replay = int(round(s.batch_size * s.replay_fraction)) if replay else 0
        x, y = sampler.sample(s.batch_size - n_replay, rng)
        if n_replay:
            xr, yr = replay.sample(n_replay, rng)
            x, y = np.concatenate([x, xr]), np.concatenate([y, yr])
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        if s.augment:
            x, y = augment(x, y, gen)
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, s)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            loss = region_dice_ce(net(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        step += 1
        value = float(loss.detach())
        ema = value if ema is None else 0.9 * ema + 0.1 * value
        record = {"step": step, "loss": round(value, 5)}
        if s.early_stop_patience and step > s.warmup + 10:  # the first losses say little
            if ema < best * 0.99:
                best, since_best = ema, 0
            else:
                since_best += 1
        if master and s.val_every and step % s.val_every == 0 and val_cases:
            record["val_dice"] = validate(model, metadata, list(val_cases), device)
            if log:
                log(f"step {step}: loss {ema:.4f}, validation Dice {record['val_dice']}")
        history.append(record)
        if master and progress:
            progress(step, s.steps, loss=round(ema, 4), **{k: round(v, 3) for k, v in record.get("val_dice", {}).items()})
        if s.checkpoint_every and step % s.checkpoint_every == 0:
            save_checkpoint()
        if s.early_stop_patience and since_best >= s.early_stop_patience:
            stopped_early = True
            break
    model.eval()
    final_val = validate(model, metadata, list(val_cases), device) if (master and val_cases) else None
    metadata = dict(metadata)
    metadata["training"] = dict(metadata.get("training", {}))
    metadata["training"].update({
        "steps": step, "batch_size": s.batch_size * world, "patch": s.patch, "seed": s.seed,
        "final_loss": round(ema, 5) if ema is not None else None,
        "seconds": round(time.perf_counter() - start_time, 1), "device": str(device), "processes": world,
    })
    if final_val:
        metadata["training"]["validation_dice"] = {k: round(v, 4) for k, v in final_val.items()}
    written = None
    if master and out is not None:
        written = save_model(model, metadata, out)
        save_checkpoint()
    if is_ddp:
        import torch.distributed as dist

        dist.barrier()
    return Result(model, metadata, step, history, stopped_early, time.perf_counter() - start_time, written)


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


def train(
    data,
    out,
    *,
    settings: Settings,
    config: UNetConfig | None = None,
    task: str = "multiclass",
    val_fraction: float = 0.1,
    resume: bool = False,
    progress=None,
    load_progress=None,
    cancel=None,
    log=None,
) -> Result:
    """Train a new model on a BraTS root (any layout); writes `out` and `<out>.checkpoint.pt`."""
    config = config or UNetConfig(base_channels=16, padding="same", norm="batch")
    if task == "binary":
        config = UNetConfig(**{**config.to_dict(), "out_channels": 2})
    norm = Normalisation()
    metadata = make_metadata(config, task=task, normalisation=norm.to_dict(),
                             training={"data": str(data), "kind": "from scratch"})
    cases = load_root(data, metadata["modalities"], norm, progress=load_progress)
    train_cases, val_cases = split_validation(cases, val_fraction, settings.seed)
    metadata["training"]["cases"] = len(train_cases)
    metadata["training"]["validation_cases"] = [c.case_id for c in val_cases]
    torch.manual_seed(settings.seed)  # the initial weights too come from the seed
    model = UNet(config)
    return run(model, metadata, train_cases, settings, out=Path(out), val_cases=val_cases,
               resume=resume, progress=progress, cancel=cancel, log=log)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


FINETUNE_DEFAULTS = dict(steps=60, batch_size=8, patch=128, lr=3e-4, warmup=5, early_stop_patience=25, replay_fraction=0.5,
                         freeze_batchnorm=True)


def finetune(
    store,
    base,
    out,
    *,
    settings: Settings | None = None,
    replay=None,
    progress=None,
    cancel=None,
    log=None,
) -> Result:
    """Fine-tune BASE on the reviewed slices of a corrections store; BASE is never modified."""
    settings = settings or Settings(**FINETUNE_DEFAULTS)
    out = Path(out)
    base_path = Path(base) if base is not None else None
    loaded = load_model(base_path)
    if out.resolve() == loaded.path.resolve():
        raise NapariUnetError(f"{out}: the new model must not overwrite the base model")
    norm = Normalisation.from_dict(loaded.metadata["normalisation"])
    cases = load_store(store, loaded.modalities, norm)
    if replay:
        replay_cases = load_root(replay, loaded.modalities, norm)
    else:
        replay_cases = self_replay(loaded, cases, settings.device)
    if replay_cases and not settings.replay_fraction:
        settings.replay_fraction = 0.5
    metadata = dict(loaded.metadata)
    metadata["training"] = {
        "kind": "fine-tuned",
        "base_model": {"file": loaded.path.name, "sha256": file_sha256(loaded.path),
                       "training": loaded.metadata.get("training", {})},
        "corrections": [c.provenance for c in cases],
        "replay": str(replay) if replay else "self (the base model's labels on unreviewed slices)",
    }
    return run(loaded.model, metadata, cases, settings, out=out, replay_cases=replay_cases, checkpoints=False,
               progress=progress, cancel=cancel, log=log)
