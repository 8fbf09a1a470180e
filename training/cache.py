"""The preprocessed training cache: one pass over the data, then slices read lazily from disk.

Training's memory must not grow with the number of cases (BraTS 2021 holds 1251), so each case
is normalised and cropped once, in the manner of nnU-Net v2's preprocessing, and written as one
compressed array that training reads one axial slice at a time:

    CACHE/cache.json        what every case was made with: modalities, normalisation, quantisation
    CACHE/cases/ID.b2nd     (C + 1, Z, H, W) uint8 blosc2 array, one chunk per axial slice:
                            C quantised image channels, then the canonical labels
    CACHE/cases/ID.json     the case's record: source, crop box, dequantisation, brain and
                            tumour slices, a fingerprint of its voxels, the sha256 of ID.b2nd;
                            written last, so a case counts as cached only once both files are whole

A case array damaged later (a partial copy, a bad disk) no longer matches its checksum: opening
the cache skips it with a message, and `napari-unet prepare --verify` prepares it again.

Images are stored in 8 bits: 0 outside the brain (decoded as exactly 0, as the z-score leaves
it), and inside 255 levels between the channel's minimum and maximum, so a decoded value is
within half a level (`step / 2`) of what preprocessing made.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from itertools import repeat
from pathlib import Path

import numpy as np

from napari_unet import NapariUnetError
from napari_unet.atomic import SHARED_FOLDER_GRACE_S, atomic_path, file_sha256, remove_stale_partials, write_text
from napari_unet.cases import find_cases, read_case
from napari_unet.modelfile import input_stack, modality_spec
from napari_unet.preprocess import Normalisation, prepare

CACHE_FORMAT = "napari-unet-cache"
CACHE_VERSION = 1
QUANTISATION = "uint8: 0 outside the brain, 1..255 spanning each channel's brain minimum..maximum"
LEVELS = 254  # steps between code 1 and code 255
CHECKSUM = "array_sha256"  # the record's key for the sha256 of the case's .b2nd file


# --------------------------------------------------------------------------- quantisation


def quantise(crop: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, list[float], list[float]]:
    """(C, Z, H, W) float32 z-scored crop and its brain mask -> (uint8 codes, lows, steps)."""
    codes = np.zeros(crop.shape, np.uint8)
    lows, steps = [], []
    for c in range(crop.shape[0]):
        values = crop[c][mask]
        lo = float(values.min()) if values.size else 0.0
        hi = float(values.max()) if values.size else 0.0
        step = (hi - lo) / LEVELS or 1.0
        codes[c][mask] = (1 + np.rint((values - lo) / step)).clip(1, 255).astype(np.uint8)
        lows.append(lo)
        steps.append(step)
    return codes, lows, steps


def dequantise(codes: np.ndarray, lows: Sequence[float], steps: Sequence[float]) -> np.ndarray:
    """(C, ...) uint8 codes -> float32 values (0 where the code is 0)."""
    shape = (len(lows),) + (1,) * (codes.ndim - 1)
    lo = np.asarray(lows, np.float32).reshape(shape)
    step = np.asarray(steps, np.float32).reshape(shape)
    values = lo + (codes.astype(np.float32) - 1) * step
    return np.where(codes == 0, np.float32(0), values)


# --------------------------------------------------------------------------- finding the data


def _mapping_duplicates(roots: Sequence[Path]) -> set[str]:
    """BraTS 2020 case ids that a mapping file beside the data says are also BraTS 2021 cases.

    BraTS 2021 re-released BraTS 2020's patients under new ids. A mapping CSV with a 2020 and
    a 2021 column (the challenge's `BraTS21-17_Mapping.csv` is one) tells which; BraTS 2020's own
    `name_mapping.csv` maps only to 2017-2019 ids and cannot.
    """
    duplicates: set[str] = set()
    for root in roots:
        for folder in (root, root.parent):
            for path in folder.glob("*.csv"):
                if "mapping" not in path.name.lower():
                    continue
                try:
                    with open(path, newline="") as f:
                        rows = list(csv.DictReader(f))
                except (OSError, UnicodeDecodeError, csv.Error):
                    continue
                if not rows:
                    continue
                col20 = next((k for k in rows[0] if k and "2020" in k), None)
                col21 = next((k for k in rows[0] if k and "2021" in k), None)
                if col20 and col21:
                    duplicates |= {r[col20].strip() for r in rows if r.get(col20) and r.get(col21)}
    return duplicates


def dataset_cases(roots: Sequence[str | os.PathLike]) -> list[Path]:
    """Case paths under one or more dataset roots, each patient once (see `_mapping_duplicates`)."""
    roots = [Path(r) for r in roots]
    seen: dict[str, Path] = {}
    skip = _mapping_duplicates(roots)
    for root in roots:
        for path in find_cases(root):
            case_id = case_key(path)
            if case_id in skip or case_id in seen:
                continue
            seen[case_id] = path
    return list(seen.values())


def case_key(path: Path) -> str:
    """A case's id in the cache: its folder or file name without the NIfTI suffix."""
    return re.sub(r"\.nii(\.gz)?$", "", path.name, flags=re.IGNORECASE)


# --------------------------------------------------------------------------- writing the cache


def _settings_record(modalities: Sequence[str], norm: Normalisation) -> dict:
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "modalities": list(modalities),
            "normalisation": norm.to_dict(), "quantisation": QUANTISATION}


def open_settings(cache: Path, modalities: Sequence[str], norm: Normalisation, *, create: bool) -> dict:
    """The cache's settings, checked against what the model needs (created when `create`)."""
    wanted = _settings_record(modalities, norm)
    path = cache / "cache.json"
    if not path.exists():
        if not create:
            raise NapariUnetError(f"{cache}: not a training cache (no cache.json); make one with `napari-unet prepare`")
        write_text(path, json.dumps(wanted, indent=2))
        return wanted
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NapariUnetError(f"{path}: unreadable cache settings ({err}); delete the cache folder to rebuild it") from None
    if not isinstance(found, dict) or found.get("format") != CACHE_FORMAT:
        raise NapariUnetError(f"{path}: not a napari-unet training cache")
    for key in ("version", "modalities", "normalisation", "quantisation"):
        if found.get(key) != wanted[key]:
            raise NapariUnetError(
                f"{cache}: the cache was made with {key} {found.get(key)!r}, but this model needs {wanted[key]!r}; "
                "give another --cache folder, or delete this one to rebuild it"
            )
    return found


def _case_files(cache: Path, case_id: str) -> tuple[Path, Path]:
    return cache / "cases" / f"{case_id}.b2nd", cache / "cases" / f"{case_id}.json"


def _fingerprint(stack: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(stack).tobytes()).hexdigest()[:24]


def prepare_case(path: str | os.PathLike, cache: str | os.PathLike, modalities: Sequence[str], norm_dict: dict) -> dict:
    """Read, normalise, crop, quantise and write one case; returns its record."""
    import blosc2

    path, cache = Path(path), Path(cache)
    case = read_case(path)
    if case.labels is None:
        raise NapariUnetError(f"{path}: the case has no segmentation to learn from")
    stack = input_stack(modality_spec(modalities), case.images, str(path))
    if not np.isfinite(stack).all():
        raise NapariUnetError(f"{path}: the images hold NaN or infinite voxels")
    crop, box, mask = prepare(stack, Normalisation.from_dict(norm_dict))
    if crop.size == 0:
        raise NapariUnetError(f"{path}: no brain found (every voxel is 0)")
    codes, lows, steps = quantise(crop, mask)
    labels = case.labels[box]
    data = np.concatenate([codes, labels[None].astype(np.uint8)])
    array_path, record_path = _case_files(cache, case_key(path))
    with atomic_path(array_path, suffix=".b2nd") as tmp:
        blosc2.asarray(
            data, urlpath=str(tmp), mode="w", chunks=(data.shape[0], 1) + data.shape[2:],
            cparams=blosc2.CParams(codec=blosc2.Codec.ZSTD, clevel=3, filters=[blosc2.Filter.SHUFFLE], nthreads=1),
        )
        # The file's bytes, not the decoded voxels (`_fingerprint` is of the float input, and kept
        # for finding duplicates): hashing them needs no decompression, and catches damage
        # anywhere in the file, header and index included.
        checksum = file_sha256(tmp)
    brain = np.flatnonzero(mask.any(axis=(1, 2)))
    tumour = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    record = {
        "case": case.case_id, "source": str(path), "shape": list(labels.shape),
        "box": [[int(s.start), int(s.stop)] for s in box], "volume_shape": list(case.shape),
        "lows": lows, "steps": steps, "brain_slices": brain.tolist(), "tumour_slices": tumour.tolist(),
        "fingerprint": _fingerprint(stack), CHECKSUM: checksum,
    }
    write_text(record_path, json.dumps(record))
    return record


def _prepare_or_message(path: Path, cache: Path, modalities: Sequence[str], norm_dict: dict) -> str | None:
    """`prepare_case`, with a case that cannot be used turned into its message (None: cached)."""
    try:
        prepare_case(path, cache, modalities, norm_dict)
    except NapariUnetError as err:
        return str(err)
    return None


def _worker_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"


def prepare_cache(
    roots: str | os.PathLike | Sequence[str | os.PathLike],
    cache: str | os.PathLike,
    modalities: Sequence[str],
    norm: Normalisation,
    *,
    workers: int | None = None,
    progress: Callable | None = None,
    cancel: Callable[[], bool] | None = None,
    log: Callable[[str], None] | None = None,
) -> list["CachedCase"]:
    """Cache every case under `roots` that is not cached yet; returns all of them, opened.

    Resumable: a case whose record exists is kept, so an interrupted run goes on where it
    stopped. A case that cannot be used (a missing modality, no labels, bad values) is skipped
    with a message rather than ending an hour-long run.
    """
    roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
    cache = Path(cache)
    if cache.exists() and not cache.is_dir():
        raise NapariUnetError(f"{cache}: the cache must be a folder, and this is a file")
    (cache / "cases").mkdir(parents=True, exist_ok=True)
    open_settings(cache, modalities, norm, create=True)
    remove_stale_partials(cache / "cases", SHARED_FOLDER_GRACE_S)  # (another run may be preparing here)
    paths = dataset_cases(roots)
    todo = [p for p in paths if not _case_files(cache, case_key(p))[1].exists()]
    done, failures = len(paths) - len(todo), []
    if progress:
        progress(done, len(paths))
    cancelled = bool(todo) and cancel is not None and cancel()
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) if workers > 1 and not cancelled else nullcontext() as pool:
        args = (repeat(cache), repeat(tuple(modalities)), repeat(norm.to_dict()))
        # One message (or None) per case, as each finishes; without a pool, prepared as asked for.
        messages = map(_prepare_or_message, todo, *args) if pool is None else (
            f.result() for f in as_completed([pool.submit(_prepare_or_message, p, *a) for p, *a in zip(todo, *args)]))
        for message in [] if cancelled else messages:
            if message:
                failures.append(message)
            done += 1
            if progress:
                progress(done, len(paths))
            if cancel is not None and done < len(paths) and cancel():
                cancelled = True
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
                break
    if log:
        for message in failures:
            log(f"skipped: {message}")
    if cancelled:
        from napari_unet.predict import Cancelled

        raise Cancelled(f"cancelled after {done} of {len(paths)} case(s); the cached ones are kept, run again to go on")
    cached = open_cache(cache, modalities, norm, ids=[case_key(p) for p in paths], log=log)
    if not cached:
        raise NapariUnetError(f"{cache}: no usable cases" + (f" ({failures[0]})" if failures else ""))
    return cached


# --------------------------------------------------------------------------- reading the cache


@lru_cache(maxsize=64)
def _open_array(path: str):
    """blosc2 arrays opened once per process (each DataLoader worker has its own)."""
    import blosc2

    return blosc2.open(path, mode="r")


@dataclass
class CachedCase:
    """One cached case; its voxels stay on disk until a slice is asked for."""

    case_id: str
    path: Path
    record: dict
    trusted: np.ndarray  # crop-relative axial indices whose labels are trusted
    tumour_slices: np.ndarray

    def read_slice(self, z: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (C, H, W) float32, labels (H, W) uint8) of crop slice z."""
        data = self._read((slice(None), int(z)))
        return dequantise(data[:-1], self.record["lows"], self.record["steps"]), data[-1]

    def volume(self) -> tuple[np.ndarray, np.ndarray]:
        """(image (C, Z, H, W) float32, labels (Z, H, W) uint8): the whole crop, for validation."""
        data = self._read(slice(None))
        return dequantise(data[:-1], self.record["lows"], self.record["steps"]), data[-1]

    def _read(self, index) -> np.ndarray:
        try:
            return _open_array(str(self.path))[index]
        except Exception as err:  # blosc2 raises RuntimeError and others; only a case without a checksum gets here
            raise NapariUnetError(f"{self.path}: case {self.case_id} cannot be read ({type(err).__name__}: {err}); "
                                  "check the cache with `napari-unet prepare DATA --cache CACHE --verify`") from None


# --------------------------------------------------------------------------- checking the cache


@dataclass(frozen=True)
class Damage:
    """A cached case that must not be trained on: its file at fault and what is wrong with it."""

    case_id: str
    path: Path
    problem: str
    source: Path | None = None  # the case's data as its record names it (None: the record is unreadable)

    def __str__(self) -> str:
        return f"{self.case_id}: {self.path}: {self.problem}"


def _read_record(record_path: Path) -> dict:
    """A case's JSON record; ValueError saying what is wrong when it cannot be used."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"unreadable case record ({err})") from None
    if not isinstance(record, dict) or not {"shape", "lows", "fingerprint"} <= record.keys():
        raise ValueError("not a case record (fields missing)")
    return record


def _header_problem(array_path: Path, record: dict, *, decode: bool) -> str | None:
    """What is wrong with an array that has no checksum (cached before checksums), as far as
    can be told without one: its header must open and agree with its record; with `decode`,
    every chunk must decompress too."""
    import blosc2

    try:
        array = blosc2.open(str(array_path), mode="r")
        wanted = (len(record["lows"]) + 1, *record["shape"])
        if tuple(array.shape) != wanted:
            return f"holds an array of shape {tuple(array.shape)}, its record says {wanted}"
        if decode:
            array[:]
    except Exception as err:  # blosc2 raises RuntimeError for a truncated frame; a bad disk may raise anything
        return f"cannot be read as a blosc2 array ({type(err).__name__}: {err})"
    return None


def array_problem(array_path: Path, record: dict, *, decode: bool = False) -> str | None:
    """What is wrong with a case's array file, or None when it is whole (or, without a checksum
    in its record, when its header at least is sound; `decode`: and every chunk decompresses)."""
    if not array_path.is_file():
        return "missing"
    expected = record.get(CHECKSUM)
    if expected is None:
        return _header_problem(array_path, record, decode=decode)
    try:
        found = file_sha256(array_path)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if found != expected:
        return "damaged: its bytes differ from those written when it was prepared (sha256 mismatch)"
    return None


def _array_problems(checks: Sequence[tuple[Path, dict]], *, decode: bool = False) -> list[str | None]:
    """`array_problem` of each (array path, record), hashed by several threads.

    Every byte is hashed at each open because that is cheap next to training (measured on 2
    cores: `open_cache` of 50 small cases 9 ms instead of 2, of 50 full-size BraTS cases, 6.5 MB
    each, 0.3 s, so all 1251 (8 GB) about 7 s from the page cache; from a cold disk, one read of
    what the first epoch reads anyway). Checking later, at a case's first read in a DataLoader
    worker, would find damage after the case was drawn, in one worker's copy only, with no way
    to drop it from the epoch; checked here, a damaged case is left out before the cases are
    split, and every rank of a torchrun finds the same cases.
    """
    if not checks:
        return []
    with ThreadPoolExecutor(min(8, len(checks), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda check: array_problem(*check, decode=decode), checks))


def _record_paths(cache: Path, ids: Sequence[str] | None) -> list[Path]:
    if ids is None:
        return sorted((cache / "cases").glob("*.json"))
    return [path for path in (_case_files(cache, i)[1] for i in ids) if path.exists()]


@dataclass
class Verification:
    """What `verify_cache` found: every case checked, those damaged, those without a checksum."""

    checked: int
    damaged: list[Damage]
    unchecksummed: list[str]


def verify_cache(cache: str | os.PathLike, modalities: Sequence[str], norm: Normalisation) -> Verification:
    """Every cached case checked against its checksum; a case without one (cached before
    checksums) decompressed whole instead. An unreadable record is damage too (its case, from
    the data, can be prepared again). An empty or new cache folder has nothing to check."""
    cache = Path(cache)
    if not (cache / "cache.json").exists():
        return Verification(0, [], [])
    open_settings(cache, modalities, norm, create=False)
    damaged, checks = [], []
    record_paths = _record_paths(cache, None)
    for record_path in record_paths:
        try:
            checks.append((record_path, _read_record(record_path)))
        except ValueError as err:
            damaged.append(Damage(record_path.stem, record_path, str(err)))
    problems = _array_problems([(p.with_suffix(".b2nd"), r) for p, r in checks], decode=True)
    for (record_path, record), problem in zip(checks, problems):
        if problem:
            source = Path(record["source"]) if record.get("source") else None
            damaged.append(Damage(record_path.stem, record_path.with_suffix(".b2nd"), problem, source))
    unchecksummed = [p.stem for (p, r), problem in zip(checks, problems) if CHECKSUM not in r and not problem]
    return Verification(len(record_paths), sorted(damaged, key=lambda d: d.case_id), unchecksummed)


def discard_case(cache: str | os.PathLike, case_id: str) -> None:
    """Remove a case from the cache, so that `prepare_cache` prepares it again."""
    array_path, record_path = _case_files(Path(cache), case_id)
    record_path.unlink(missing_ok=True)  # first: without its record the case no longer counts as cached
    array_path.unlink(missing_ok=True)


def repair_sources(damaged: Sequence[Damage], roots: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """Where each damaged case can be prepared again from: the data its record names, else the
    case of the same id under `roots`; a case with neither is left out."""
    if not damaged:
        return {}
    under_roots = {case_key(p): p for p in dataset_cases(roots)}
    sources = {}
    for damage in damaged:
        recorded = damage.source if damage.source is not None and damage.source.exists() else None
        source = recorded or under_roots.get(damage.case_id)
        if source is not None:
            sources[damage.case_id] = source
    return sources


def open_cache(
    cache: str | os.PathLike,
    modalities: Sequence[str],
    norm: Normalisation,
    *,
    ids: Sequence[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[CachedCase]:
    """The cached cases (those in `ids`, or all), each patient once (same voxels: kept once).

    A case whose array is damaged or missing is left out with a message (see `_array_problems`
    for why every byte is checked here); when every case is, that is an error.
    """
    cache = Path(cache)
    open_settings(cache, modalities, norm, create=False)
    records = []
    for record_path in _record_paths(cache, ids):
        try:
            records.append((record_path, _read_record(record_path)))
        except ValueError as err:
            raise NapariUnetError(f"{record_path}: {err}; delete it to prepare the case again") from None
    problems = _array_problems([(p.with_suffix(".b2nd"), r) for p, r in records])
    out, fingerprints, damaged = [], {}, []
    for (record_path, record), problem in zip(records, problems):
        array_path = record_path.with_suffix(".b2nd")
        if problem:
            damaged.append(Damage(record_path.stem, array_path, problem))
            if log:
                log(f"skipped {damaged[-1]}; `napari-unet prepare DATA --cache {cache} --verify` prepares it again")
            continue
        first = fingerprints.setdefault(record["fingerprint"], record_path.stem)
        if first != record_path.stem:
            if log:
                log(f"{record_path.stem}: the same images as {first}; used once")
            continue
        out.append(CachedCase(record_path.stem, array_path, record, np.asarray(record["brain_slices"], int),
                              np.asarray(record["tumour_slices"], int)))
    if damaged and not out:
        raise NapariUnetError(f"{cache}: every cached case is damaged, nothing to train on (first: {damaged[0]}); "
                              f"`napari-unet prepare DATA --cache {cache} --verify` prepares them again")
    return out
