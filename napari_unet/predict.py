"""The inference engine: one code path for the CLI, the napari widget and training's validation.

Slices of the brain's bounding box go through the network in batches under
`torch.inference_mode()`, on the chosen device, with mixed precision on CUDA. The normalised
crop is moved to the device once and the labels come back once, so a GPU runs a whole case
with no host round trips per slice. Memory is bounded by the batch size (never the whole
volume's activations). `progress(done, total)` and `cancel()` callbacks serve the tqdm bar and
Ctrl-C of the CLI as well as the widget's progress bar and Cancel button.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from napari_unet import NapariUnetError
from napari_unet.modelfile import LoadedModel, input_stack
from napari_unet.postprocess import DEFAULT as DEFAULT_POSTPROCESSING, PostProcessing
from napari_unet.preprocess import Normalisation, prepare

ProgressFn = Callable[[int, int], None]
CancelFn = Callable[[], bool]


class Cancelled(NapariUnetError):
    """The user cancelled; nothing was changed."""


def read_torch_libraries(chunk: int = 16 << 20) -> int:
    """Read torch's shared libraries once, so they are in the disk cache before `import torch`.

    The import loads them while holding Python's interpreter lock: from a cold disk cache that
    froze the viewer for 17.7 s on a 2-core machine (`import torch` 11 s cold, 2.4 s warm). File
    reads let go of the lock, so reading them first from a background thread keeps the viewer
    responsive. Returns the bytes read (0 if torch is already imported or not found)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.find_spec("torch") if "torch" not in sys.modules else None
    if spec is None or not spec.submodule_search_locations:
        return 0
    total = 0
    for folder in spec.submodule_search_locations:
        for path in sorted((Path(folder) / "lib").glob("*.so*")):
            try:
                with open(path, "rb", buffering=0) as f:
                    while data := f.read(chunk):
                        total += len(data)
            except OSError:
                continue  # a library that cannot be read fails in the import, with its own message
    return total


def resolve_device(name: str = "auto"):
    """'auto' picks CUDA, then Apple's MPS, then the CPU; a named device must exist."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise NapariUnetError(f"device {name!r}: no CUDA GPU is available (try --device auto or cpu)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise NapariUnetError("device 'mps': Apple's Metal backend is not available (try --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise NapariUnetError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from None


_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_bf16() -> bool:
    """Native bfloat16 arithmetic (AVX512-BF16 or AMX): there bf16 convolutions run 2-3x faster
    than fp32; elsewhere they are emulated and 3-4x slower. An instruction-set cap below
    AVX512_CORE_BF16 in ONEDNN_MAX_CPU_ISA (oneDNN's own switch) counts as no bf16."""
    import torch

    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ISAS_WITHOUT_BF16:
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(name: str, device) -> str:
    """'auto': fp16 autocast on CUDA, bf16 on CPUs with native bf16, else fp32."""
    name = (name or "auto").lower()
    if name not in ("auto", "fp32", "bf16", "fp16"):
        raise NapariUnetError(f"unknown precision {name!r} (use auto, fp32, bf16 or fp16)")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "fp16"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16"
    return "fp32"


@dataclass
class PreparedVolume:
    """A case normalised and cropped once, reusable for many (e.g. per-slice) proposals."""

    crop: np.ndarray  # (C, Zc, Yc, Xc) float32, z-scored
    box: tuple[slice, ...]  # where the crop lies in the volume (Z, Y, X)
    mask: np.ndarray  # brain mask of the crop
    shape: tuple[int, int, int]  # the full volume's (Z, Y, X)
    voxel_ml: float = 1e-3  # one voxel's volume (BraTS: 1 mm^3)

    def brain_slices(self) -> np.ndarray:
        """Absolute axial indices of the slices that hold brain."""
        return np.flatnonzero(self.mask.any(axis=(1, 2))) + self.box[0].start


@dataclass
class Prediction:
    labels: np.ndarray  # (Z, Y, X) uint8, canonical (binary task: 1 = tumour)
    uncertainty: np.ndarray | None  # (Z, Y, X) float32 in [0, 1], normalised entropy
    computed_slices: np.ndarray  # axial indices that went through the network
    seconds: float
    # Uncertainty per axial slice: the sum of its voxels' (in [0, 1] each), a soft count of the
    # voxels likely to be wrong, so that a slice with a large doubtful region ranks above one
    # with a few doubtful edge voxels. NaN where nothing was computed; None without uncertainty.
    slice_scores: np.ndarray | None = None
    # With `with_log_probs`: the network's log-probabilities on computed_slices, as
    # `Predictor.log_probabilities` gives them (what click prompts weigh, kept at no extra pass).
    log_probs: np.ndarray | None = None


def _masked_log(probs, outside):
    """Log-probabilities (N, C, Y, X) float16, background certain where `outside` (N, Y, X)."""
    import torch

    logp = torch.log(probs.float().clamp_min(1e-13))
    logp[:, 1:] = torch.where(outside[:, None], torch.full_like(logp[:, 1:], -30.0), logp[:, 1:])
    logp[:, 0] = torch.where(outside, torch.zeros_like(logp[:, 0]), logp[:, 0])
    return logp.to(torch.float16)


def _slice_scores(uncertainty: np.ndarray, computed: np.ndarray) -> np.ndarray:
    scores = np.full(uncertainty.shape[0], np.nan, np.float32)
    if computed.size:
        u = uncertainty[computed]
        scores[computed] = u.reshape(len(u), -1).sum(axis=1)
    return scores


class Predictor:
    """A loaded model on a device, ready to propose labels for cases."""

    def __init__(
        self,
        loaded: LoadedModel,
        device: str = "auto",
        *,
        tta: bool = False,
        batch_size: int | None = None,
        memory_budget_mb: float | None = None,
        precision: str = "auto",
        postprocess: PostProcessing | None = DEFAULT_POSTPROCESSING,
    ):
        import torch

        from napari_unet.unet import fuse_batchnorm

        self.metadata = loaded.metadata
        self.modalities = loaded.modalities
        self.device = resolve_device(device)
        self.norm = Normalisation.from_dict(self.metadata["normalisation"])
        self.tta = tta
        # Post-processing needs the whole tumour: it applies to whole-volume proposals only.
        self.postprocess = postprocess if self.metadata["task"] == "multiclass" else None
        # Inference works on a copy: BatchNorm is folded into the convolutions, the caller's
        # model (which fine-tuning may go on training) stays as it was.
        model = fuse_batchnorm(copy.deepcopy(loaded.model).eval())
        self.model = model.to(self.device).to(memory_format=torch.channels_last)
        self.base_channels = model.config.base_channels
        self.batch_size = batch_size
        self.precision = resolve_precision(precision, self.device)
        if memory_budget_mb is None:
            memory_budget_mb = 256.0
            if self.device.type == "cuda":
                free, _total = torch.cuda.mem_get_info(self.device)
                memory_budget_mb = free / 2**20 / 4
        self.memory_budget_mb = memory_budget_mb

    # ------------------------------------------------------------------ public API
    def prepare(self, stack: np.ndarray, voxel_ml: float = 1e-3) -> PreparedVolume:
        """Raw (C, Z, Y, X) intensities in the model's modality order -> normalised crop."""
        if stack.ndim != 4 or stack.shape[0] != len(self.modalities):
            raise NapariUnetError(
                f"expected {len(self.modalities)} modalities ({', '.join(self.modalities)}) as (C, Z, Y, X), "
                f"got an array of shape {stack.shape}"
            )
        crop, box, mask = prepare(stack, self.norm)
        return PreparedVolume(crop, box, mask, tuple(stack.shape[1:]), voxel_ml)

    def prepare_case(self, case) -> PreparedVolume:
        return self.prepare(input_stack(self.metadata, case.images, case.source.path or case.case_id),
                            voxel_ml=case.source.voxel_ml)

    def predict_case(self, case, **kwargs) -> Prediction:
        return self.predict(self.prepare_case(case), **kwargs)

    def predict(
        self,
        volume: PreparedVolume | np.ndarray,
        *,
        slices: Sequence[int] | None = None,
        progress: ProgressFn | None = None,
        cancel: CancelFn | None = None,
        with_uncertainty: bool = False,
        with_log_probs: bool = False,
    ) -> Prediction:
        """Labels for the whole volume, or only for `slices` (absolute axial indices)."""
        import torch

        start = time.perf_counter()
        if not isinstance(volume, PreparedVolume):
            volume = self.prepare(np.asarray(volume, dtype=np.float32))
        z0 = volume.box[0].start
        todo = volume.brain_slices()  # slices without brain are never computed
        if slices is not None:
            todo = np.intersect1d(todo, np.asarray(list(slices), dtype=int))
        labels = np.zeros(volume.shape, np.uint8)
        uncertainty = np.zeros(volume.shape, np.float32) if with_uncertainty else None
        total = len(todo)
        if progress:
            progress(0, total)
        if total == 0:
            scores = None if uncertainty is None else _slice_scores(uncertainty, todo)
            return Prediction(labels, uncertainty, todo, time.perf_counter() - start, scores)

        dev = self.device
        crop = torch.from_numpy(volume.crop).to(dev)  # once per case
        mask = torch.from_numpy(volume.mask).to(dev)
        rel = torch.as_tensor(todo - z0, device=dev)
        out_labels = torch.zeros((total,) + volume.crop.shape[2:], dtype=torch.uint8, device=dev)
        out_unc = torch.zeros((total,) + volume.crop.shape[2:], dtype=torch.float32, device=dev) if with_uncertainty else None
        log_parts = [] if with_log_probs else None
        batch = self._batch_size(volume.crop.shape[2:])
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        autocast = torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)
        with torch.inference_mode(), autocast:
            for first in range(0, total, batch):
                if cancel is not None and cancel():
                    raise Cancelled("cancelled; no labels were changed")
                idx = rel[first : first + batch]
                x = crop.index_select(1, idx).transpose(0, 1).contiguous(memory_format=torch.channels_last)
                probs = self._probabilities(x)
                lab = probs.argmax(1).to(torch.uint8)
                lab *= mask.index_select(0, idx)  # no tumour outside the brain
                out_labels[first : first + batch] = lab
                if out_unc is not None:
                    ent = -(probs * torch.log(probs.clamp_min(1e-8))).sum(1) / np.log(probs.shape[1])
                    out_unc[first : first + batch] = ent * mask.index_select(0, idx)
                if log_parts is not None:
                    log_parts.append(_masked_log(probs, mask.index_select(0, idx) == 0).cpu().numpy())
                if progress:
                    progress(min(first + batch, total), total)
        box_yx = volume.box[1:]
        labels[(todo,) + box_yx] = out_labels.cpu().numpy()  # one transfer back
        if slices is None and self.postprocess is not None:
            labels = self.postprocess.apply(labels, volume.voxel_ml)
        scores = None
        if uncertainty is not None:
            uncertainty[(todo,) + box_yx] = out_unc.cpu().numpy()
            scores = _slice_scores(uncertainty, todo)
        log_probs = np.concatenate(log_parts) if log_parts else None
        return Prediction(labels, uncertainty, todo, time.perf_counter() - start, scores, log_probs)

    def log_probabilities(self, volume: PreparedVolume, slices: Sequence[int]) -> np.ndarray:
        """The network's log-probabilities per class on `slices` (absolute axial indices, each
        holding brain), as (len(slices), classes, Yc, Xc) float16 over the crop's in-plane box;
        -30 for every class but background outside the brain. What click prompts weigh."""
        import torch

        zs = np.asarray(list(slices), dtype=int)
        rel = zs - volume.box[0].start
        if zs.size and (rel.min() < 0 or rel.max() >= volume.crop.shape[1]):
            raise NapariUnetError(f"slices {zs.min()}-{zs.max()} lie outside the brain's box")
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        autocast = torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)
        batch = self._batch_size(volume.crop.shape[2:])
        parts = []
        with torch.inference_mode(), autocast:
            for first in range(0, len(zs), batch):
                idx = rel[first : first + batch]
                x = torch.from_numpy(np.ascontiguousarray(volume.crop[:, idx].transpose(1, 0, 2, 3))).to(self.device)
                probs = self._probabilities(x.contiguous(memory_format=torch.channels_last))
                parts.append(_masked_log(probs, torch.from_numpy(~volume.mask[idx]).to(self.device)).cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, 0) + volume.crop.shape[2:], np.float16)

    # ------------------------------------------------------------------ internals
    def _probabilities(self, x):
        import torch

        from napari_unet.unet import forward_padded

        def run(inp):
            return torch.softmax(forward_padded(self.model, inp).float(), dim=1)

        if not self.tta:
            return run(x)
        # Test-time augmentation: average over the in-plane flips.
        total = run(x)
        for dims in ((3,), (2,), (2, 3)):
            total += run(x.flip(dims)).flip(dims)
        return total / 4

    def _batch_size(self, plane: tuple[int, int]) -> int:
        if self.batch_size:
            return self.batch_size
        # Activations of one slice: ~12 feature maps of the first level's size at once
        # (deeper levels add about as much again).
        per_slice_mb = plane[0] * plane[1] * self.base_channels * 4 * 24 / 2**20
        if self.tta:
            per_slice_mb *= 1.5
        return int(max(1, min(64, self.memory_budget_mb // per_slice_mb)))
