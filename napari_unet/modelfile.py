"""Model files: safetensors weights + JSON metadata; safe loading; the shipped default model.

A model file says everything needed to use it: the architecture and its parameters, the task,
the modalities and their order, the label convention, the normalisation, what it was trained
on and for how long. Loading never unpickles: safetensors holds only tensors, and a `.pt` file
is read with `torch.load(weights_only=True)` or refused.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from napari_unet import NapariUnetError, __version__
from napari_unet.labels import LABEL_NAMES

FORMAT = "napari-unet"
FORMAT_VERSION = 1
META_KEY = "napari_unet"
TASKS = {"multiclass": 4, "binary": 2}


def default_model_path() -> Path:
    """The small model shipped in the package (see README: what it is and is not for)."""
    return Path(str(resources.files("napari_unet") / "models" / "default.safetensors"))


def make_metadata(config, *, task: str = "multiclass", modalities=("t1", "t1ce", "t2", "flair"),
                  normalisation: dict | None = None, training: dict | None = None) -> dict:
    from napari_unet.preprocess import Normalisation

    labels = (
        {str(k): v for k, v in LABEL_NAMES.items()} if task == "multiclass" else {"0": "background", "1": "tumour"}
    )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": {"name": "unet", **config.to_dict()},
        "task": task,
        "modalities": list(modalities),
        "labels": labels,
        "label_convention": "canonical: 0 background, 1 necrotic core, 2 edema, 3 enhancing tumour"
        if task == "multiclass" else "binary: 0 background, 1 whole tumour",
        "normalisation": normalisation or Normalisation().to_dict(),
        "training": training or {},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "napari_unet_version": __version__,
    }


@dataclass
class LoadedModel:
    model: "object"  # napari_unet.unet.UNet
    metadata: dict
    path: Path

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.metadata["modalities"])


def _validate(metadata: dict, path: Path):
    from napari_unet.unet import UNetConfig

    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise NapariUnetError(f"{path}: not a napari-unet model (no napari-unet metadata)")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise NapariUnetError(
            f"{path}: made by a newer napari-unet (model format {metadata['format_version']}); upgrade napari-unet"
        )
    arch = dict(metadata.get("architecture", {}))
    if arch.pop("name", None) != "unet":
        raise NapariUnetError(f"{path}: unknown architecture {metadata.get('architecture')}")
    try:
        config = UNetConfig(**arch)
    except (TypeError, ValueError) as err:
        raise NapariUnetError(f"{path}: invalid architecture in the metadata ({err})") from None
    task = metadata.get("task")
    if task not in TASKS or config.out_channels != TASKS[task]:
        raise NapariUnetError(f"{path}: task {task!r} does not match {config.out_channels} output channels")
    if len(metadata.get("modalities", [])) != config.in_channels:
        raise NapariUnetError(f"{path}: {len(metadata.get('modalities', []))} modalities for "
                              f"{config.in_channels} input channels")
    return config


def _build(metadata: dict, state: dict, path: Path) -> LoadedModel:
    from napari_unet.unet import UNet

    config = _validate(metadata, path)
    model = UNet(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise NapariUnetError(f"{path}: the weights do not fit the architecture in its metadata ({first})") from None
    model.eval()
    return LoadedModel(model, metadata, path)


def load_model(path: str | os.PathLike | None = None) -> LoadedModel:
    """Load a model file (.safetensors, or a plain-data .pt); None loads the shipped default."""
    import torch

    path = Path(path) if path is not None else default_model_path()
    if not path.exists():
        if path == default_model_path():
            raise NapariUnetError(
                f"{path}: the default model is not installed; train one with `napari-unet train` "
                "or pass --model FILE"
            )
        raise NapariUnetError(f"{path}: no such model file")
    if path.suffix in (".pt", ".pth", ".ckpt"):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # any unpickling failure is a refusal, never a fallback
            raise NapariUnetError(
                f"{path}: refused: this file holds Python objects beyond plain tensors and data, and "
                f"loading it would run code from the file ({type(err).__name__}). Convert it to safetensors "
                "where it was made."
            ) from None
        if not isinstance(payload, dict) or "state_dict" not in payload or "metadata" not in payload:
            raise NapariUnetError(f"{path}: not a napari-unet model (expected 'state_dict' and 'metadata')")
        metadata = payload["metadata"]
        if isinstance(metadata, str):
            metadata = json.loads(metadata)
        return _build(metadata, payload["state_dict"], path)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise NapariUnetError(f"{path}: not a safetensors model file ({err})") from None
    if raw is None:
        raise NapariUnetError(f"{path}: not a napari-unet model (no napari-unet metadata)")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError:
        raise NapariUnetError(f"{path}: its metadata is not valid JSON") from None
    return _build(metadata, state, path)


def read_metadata(path: str | os.PathLike | None = None) -> dict:
    return load_model(path).metadata


def save_model(model, metadata: dict, path: str | os.PathLike) -> Path:
    """Write weights + metadata atomically (a temporary file, then rename)."""
    from safetensors.torch import save_file

    from napari_unet.atomic import atomic_path

    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={META_KEY: json.dumps(metadata)})
        os.chmod(tmp, 0o644)  # a model file is for sharing, not a secret
    return path


def check_modalities(metadata: dict, available, where: str) -> None:
    """Refuse data that lacks a modality the model needs."""
    missing = [m for m in metadata["modalities"] if m not in available]
    if missing:
        raise NapariUnetError(
            f"{where}: the model needs {', '.join(metadata['modalities'])}; "
            f"missing {', '.join(missing)} (found {', '.join(available) or 'none'})"
        )


def describe(metadata: dict, path: Path | None = None) -> str:
    arch = metadata["architecture"]
    train = metadata.get("training", {})
    lines = [
        f"model:         {path}" if path else None,
        f"architecture:  U-Net {arch['spatial_dims']}D, {arch['base_channels']} base channels, depth {arch['depth']}, "
        f"padding {arch['padding']}, norm {arch['norm']}",
        f"task:          {metadata['task']} ({metadata['label_convention']})",
        f"modalities:    {', '.join(metadata['modalities'])}",
        f"normalisation: {metadata['normalisation']}",
        f"created:       {metadata.get('created')} by napari-unet {metadata.get('napari_unet_version')}",
    ]
    for key, value in train.items():
        if key in ("corrections",):
            value = f"{len(value)} case(s)"
        lines.append(f"training.{key}: {value}")
    return "\n".join(l for l in lines if l)
