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
                  required=None, normalisation: dict | None = None, training: dict | None = None) -> dict:
    """`required`: the modalities the model cannot do without (default all; a model trained with
    modality dropout needs none in particular, only one at least)."""
    from napari_unet.preprocess import Normalisation

    labels = (
        {str(k): v for k, v in LABEL_NAMES.items()} if task == "multiclass" else {"0": "background", "1": "tumour"}
    )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": {"name": "unet", **config.to_dict()},
        "task": task,
        **modality_spec(modalities, required),
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


# A model of the widest allowed configuration is a few GB; a file that unpacks to more is not one.
MAX_UNPACKED_BYTES = 4 * 2**30
_MODALITY_NAMES = ("t1", "t1ce", "t2", "flair", "image")


def _validate(metadata, path: Path):
    """Check the metadata against the format's schema and bounds before anything is built."""
    from napari_unet.unet import UNetConfig

    def bad(what: str):
        return NapariUnetError(f"{path}: invalid model metadata: {what}")

    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise NapariUnetError(f"{path}: not a napari-unet model (no napari-unet metadata)")
    version = metadata.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad(f"format_version must be a whole number, not {version!r}")
    if version > FORMAT_VERSION:
        raise NapariUnetError(f"{path}: made by a newer napari-unet (model format {version}); upgrade napari-unet")
    arch = metadata.get("architecture")
    if not isinstance(arch, dict):
        raise bad("'architecture' must be an object")
    arch = dict(arch)
    if arch.pop("name", None) != "unet":
        raise NapariUnetError(f"{path}: unknown architecture {str(metadata.get('architecture'))[:80]}")
    try:
        config = UNetConfig(**arch)
    except (TypeError, ValueError) as err:
        raise bad(f"architecture: {err}") from None
    task = metadata.get("task")
    if task not in TASKS or config.out_channels != TASKS[task]:
        raise NapariUnetError(f"{path}: task {str(task)[:40]!r} does not match {config.out_channels} output channels")
    modalities = metadata.get("modalities")
    if not isinstance(modalities, list) or not all(m in _MODALITY_NAMES for m in modalities) \
            or len(set(modalities)) != len(modalities):
        raise bad(f"'modalities' must list distinct names among {', '.join(_MODALITY_NAMES)}")
    if len(modalities) != config.in_channels:
        raise NapariUnetError(f"{path}: {len(modalities)} modalities for {config.in_channels} input channels")
    required = metadata.get("required_modalities", modalities)
    if not isinstance(required, list) or not set(required) <= set(modalities):
        raise bad("'required_modalities' must list some of 'modalities'")
    if not isinstance(metadata.get("label_convention"), str):
        raise bad("'label_convention' is missing")
    if not isinstance(metadata.get("training", {}), dict):
        raise bad("'training' must be an object")
    norm = metadata.get("normalisation")
    if not isinstance(norm, dict):
        raise bad("'normalisation' must be an object")
    from napari_unet.preprocess import Normalisation

    try:
        Normalisation.from_dict(norm)
    except NapariUnetError as err:
        raise bad(str(err)) from None
    return config


def _parse_metadata(raw, path: Path) -> dict:
    if isinstance(raw, dict):
        return raw
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        raise NapariUnetError(f"{path}: its metadata is not valid JSON") from None
    except (RecursionError, ValueError) as err:  # absurd nesting, 5000-digit numbers
        raise NapariUnetError(f"{path}: its metadata is not a model's ({type(err).__name__})") from None


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise NapariUnetError(f"{path}: is a folder, not a model file")
    if path.stat().st_size == 0:
        raise NapariUnetError(f"{path}: the file is empty")


def _check_unpacked_size(path: Path) -> None:
    """A .pt file is a zip: refuse one that would unpack to more than any model needs."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        return  # torch.load names what is wrong
    if unpacked > MAX_UNPACKED_BYTES:
        raise NapariUnetError(f"{path}: refused: it unpacks to {unpacked / 2**30:.1f} GB, more than any "
                              "napari-unet model")


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
    _check_file(path)
    if path.suffix in (".pt", ".pth", ".ckpt"):
        _check_unpacked_size(path)
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
        if not isinstance(payload["state_dict"], dict):
            raise NapariUnetError(f"{path}: not a napari-unet model ('state_dict' is not a set of tensors)")
        return _build(_parse_metadata(payload["metadata"], path), payload["state_dict"], path)
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise NapariUnetError(f"{path}: not a safetensors model file ({err})") from None
    if raw is None:
        raise NapariUnetError(f"{path}: not a napari-unet model (no napari-unet metadata)")
    return _build(_parse_metadata(raw, path), state, path)


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


def required_modalities(metadata: dict) -> list[str]:
    """The modalities a model cannot do without (files from before this field: all of them)."""
    return list(metadata.get("required_modalities", metadata["modalities"]))


def check_modalities(metadata: dict, available, where: str) -> list[str]:
    """Refuse data lacking a modality the model cannot do without; returns the optional ones missing."""
    missing = [m for m in metadata["modalities"] if m not in available]
    lacking = [m for m in required_modalities(metadata) if m in missing]
    if lacking or len(missing) == len(metadata["modalities"]):
        needs = required_modalities(metadata) or ["at least one of " + ", ".join(metadata["modalities"])]
        raise NapariUnetError(
            f"{where}: the model needs {', '.join(needs)}; "
            f"missing {', '.join(lacking or missing)} (found {', '.join(available) or 'none'})"
        )
    return missing


def modality_spec(modalities, required=None) -> dict:
    """The modality part of a model's metadata, for data prepared before there is a model."""
    return {"modalities": list(modalities), "required_modalities": list(modalities if required is None else required)}


def input_stack(metadata: dict, images: dict, where: str):
    """(C, Z, Y, X) float32 in the model's modality order; a missing optional modality is zeros,
    which is how modality dropout showed it to the model in training."""
    import numpy as np

    missing = check_modalities(metadata, list(images), where)
    shape = next(iter(images.values())).shape
    return np.stack([np.zeros(shape, np.float32) if m in missing else np.asarray(images[m], np.float32)
                     for m in metadata["modalities"]])


def describe(metadata: dict, path: Path | None = None) -> str:
    arch = metadata["architecture"]
    train = metadata.get("training", {})
    lines = [
        f"model:         {path}" if path else None,
        f"architecture:  U-Net {arch['spatial_dims']}D, {arch['base_channels']} base channels, depth {arch['depth']}, "
        f"padding {arch['padding']}, norm {arch['norm']}",
        f"task:          {metadata['task']} ({metadata['label_convention']})",
        f"modalities:    {', '.join(metadata['modalities'])} "
        f"(required: {', '.join(required_modalities(metadata)) or 'any one'})",
        f"normalisation: {metadata['normalisation']}",
        f"created:       {metadata.get('created')} by napari-unet {metadata.get('napari_unet_version')}",
    ]
    for key, value in train.items():
        if key in ("corrections",):
            value = f"{len(value)} case(s)"
        lines.append(f"training.{key}: {value}")
    return "\n".join(l for l in lines if l)
