"""The synthetic replay bank: training patches of the base model's own distribution, mixed into
every fine-tuning batch so that corrections on one case do not cost the cases nobody touched.

Fine-tuned on one case alone, a model learns that case's class balance: corrections with little
necrosis taught the earlier models to stop proposing necrosis anywhere, and every tumour shrank.
Self-replay (the base model's labels on the corrected case's own unreviewed slices) does not
protect what the model knew about other cases. The bank does: a few hundred patches drawn once
from the synthetic generator the shipped model is trained on (every class, every look, healthy
slices too), quantised to 8 bits and shipped beside the default model, so fine-tuning needs no
data but the corrections.

This module is the one that writes and reads the bank file (`.npz`): `images` (N, C, P, P) uint8
(0 outside the brain, levels 1-255 between each patch-channel's `lo` and `hi`), `lo`/`hi` (N, C)
float32, `labels` (N, P, P) uint8 canonical, `modalities`, and a JSON `record` of how it was made.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from napari_unet import NapariUnetError
from napari_unet.cases import MODALITIES

BANK_FORMAT = "napari-unet replay bank"
LEVELS = 254  # brain values map to 1..255; 0 stays "outside the brain"


# A model's metadata names the bank of its own training distribution under training.replay_bank;
# fine-tuned models inherit it through their base model's record.
SHIPPED = "shipped"


def shipped_bank_path() -> Path:
    """The bank made with the shipped default model's generator recipe (scripts/make_replay_bank.py)."""
    return Path(str(resources.files("napari_unet") / "models" / "synthetic_replay.npz"))


@dataclass
class ReplayBank:
    """Patches as a training source (`trusted`, `tumour_slices`, `read_slice`), like a TrainCase."""

    images: np.ndarray  # (N, C, P, P) uint8
    lo: np.ndarray  # (N, C) float32
    hi: np.ndarray  # (N, C) float32
    labels: np.ndarray  # (N, P, P) uint8, canonical
    modalities: tuple[str, ...]
    record: dict
    channels: tuple[int | None, ...] = ()  # bank channel per model modality (None: zeros)
    case_id: str = "synthetic replay bank"

    def __post_init__(self):
        self.trusted = np.arange(len(self.labels))
        has = self.labels.reshape(len(self.labels), -1).any(axis=1)
        self.tumour_slices = self.trusted[has]
        if not self.channels:
            self.channels = tuple(range(len(self.modalities)))
        self.provenance = {"case": self.case_id, "patches": int(len(self.labels)), **self.record}

    def for_modalities(self, modalities) -> "ReplayBank":
        """The bank as seen by a model with these modalities (one the bank lacks is zeros)."""
        channels = tuple(self.modalities.index(m) if m in self.modalities else None for m in modalities)
        if all(c is None for c in channels):
            raise NapariUnetError(f"the replay bank holds {', '.join(self.modalities)}: "
                                  f"none of the model's modalities ({', '.join(modalities)})")
        return ReplayBank(self.images, self.lo, self.hi, self.labels, self.modalities, self.record, channels)

    def read_slice(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = self.images[k].astype(np.float32)
        values = self.lo[k, :, None, None] + (q - 1) / LEVELS * (self.hi[k] - self.lo[k])[:, None, None]
        values = np.where(q > 0, values, 0.0).astype(np.float32)
        out = np.zeros((len(self.channels),) + values.shape[1:], np.float32)
        for i, c in enumerate(self.channels):
            if c is not None:
                out[i] = values[c]
        return out, self.labels[k]


def quantise(patch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(C, P, P) float (0 outside the brain) -> uint8 levels, lo, hi per channel."""
    q = np.zeros(patch.shape, np.uint8)
    lo = np.zeros(patch.shape[0], np.float32)
    hi = np.zeros(patch.shape[0], np.float32)
    for c, channel in enumerate(patch):
        inside = channel != 0
        if not inside.any():
            continue
        lo[c], hi[c] = float(channel[inside].min()), float(channel[inside].max())
        span = max(hi[c] - lo[c], 1e-6)
        q[c][inside] = 1 + np.round((channel[inside] - lo[c]) / span * LEVELS).astype(np.uint8)
    return q, lo, hi


def save_bank(path: str | Path, images, lo, hi, labels, modalities, record: dict) -> Path:
    from napari_unet.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, images=images, lo=lo, hi=hi, labels=labels,
                                modalities=np.array(list(modalities)),
                                record=np.array(json.dumps({"format": BANK_FORMAT, **record})))
    return path


def load_bank(path: str | Path | None = None) -> ReplayBank:
    """Read and check a bank file (default: the shipped one)."""
    path = Path(path) if path is not None else shipped_bank_path()
    if not path.is_file():
        raise NapariUnetError(f"{path}: no replay bank there")
    try:
        with np.load(path, allow_pickle=False) as z:
            images, lo, hi, labels = z["images"], z["lo"], z["hi"], z["labels"]
            modalities = tuple(str(m) for m in z["modalities"])
            record = json.loads(str(z["record"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:  # JSONDecodeError is a ValueError
        raise NapariUnetError(f"{path}: not a readable replay bank ({err})") from None
    n = len(labels)
    ok = (
        record.get("format") == BANK_FORMAT and images.dtype == np.uint8 and labels.dtype == np.uint8
        and images.ndim == 4 and labels.ndim == 3 and images.shape[0] == n and n > 0
        and images.shape[1] == len(modalities) and images.shape[2:] == labels.shape[1:]
        and lo.shape == hi.shape == images.shape[:2] and set(modalities) <= set(MODALITIES)
        and int(labels.max()) <= 3
    )
    if not ok:
        raise NapariUnetError(f"{path}: the replay bank's arrays do not fit together")
    return ReplayBank(images, lo.astype(np.float32), hi.astype(np.float32), labels, modalities, record)


def make_bank(
    cases: int,
    *,
    seed: int,
    patches_per_case: int = 12,
    patch: int = 128,
    appearance: str = "random",
    tumour_fraction: float = 0.75,
    shape=None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict]:
    """Patches from `cases` freshly generated synthetic cases: (images, lo, hi, labels, record)."""
    from napari_unet.preprocess import Normalisation
    from napari_unet.synth import BRATS_SHAPE, synthetic_case
    from training.data import _random_point, crop_patch, train_case

    norm = Normalisation()
    rng = np.random.default_rng([seed, 1])
    images, los, his, labels = [], [], [], []
    for i in range(cases):
        case = synthetic_case(seed=seed * 1000 + i, appearance=appearance, shape=shape or BRATS_SHAPE)
        tc = train_case(case, MODALITIES, norm)
        tumour = tc.tumour_slices
        for _ in range(patches_per_case):
            on_tumour = len(tumour) and rng.random() < tumour_fraction
            z = int(rng.choice(tumour if on_tumour else tc.trusted))
            image, lab = tc.read_slice(z)
            plane = lab > 0 if on_tumour else image[0] != 0
            img, lab = crop_patch(image, lab, _random_point(plane, rng), patch)
            q, lo, hi = quantise(img)
            images.append(q), los.append(lo), his.append(hi), labels.append(lab.astype(np.uint8))
        if progress:
            progress(i + 1, cases)
    record = {"cases": cases, "seed": seed, "appearance": appearance, "patch": patch,
              "patches_per_case": patches_per_case, "tumour_fraction": tumour_fraction,
              "shape": list(shape or BRATS_SHAPE)}
    return np.stack(images), np.stack(los), np.stack(his), np.stack(labels), record


def bank_for_model(metadata: dict) -> Path | None:
    """The bank of the training distribution a model comes from (None: none is known).

    A fine-tuned model's record holds its base model's, so the root of the chain decides.
    """
    training = metadata.get("training", {})
    for _ in range(64):  # a chain of fine-tunes; bounded, whatever a file claims
        base = training.get("base_model")
        if not isinstance(base, dict) or not isinstance(base.get("training"), dict):
            break
        training = base["training"]
    return shipped_bank_path() if training.get("replay_bank") == SHIPPED else None


def mark_model(model_path: str | Path) -> Path:
    """Record in a model file that the shipped bank is drawn from its training distribution."""
    from napari_unet.modelfile import load_model, save_model

    loaded = load_model(model_path)
    metadata = dict(loaded.metadata)
    metadata["training"] = {**metadata.get("training", {}), "replay_bank": SHIPPED}
    return save_model(loaded.model, metadata, model_path)
