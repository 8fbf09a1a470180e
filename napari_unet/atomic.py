"""Atomic file writes: write beside the target under a hidden temporary name, then rename.

A crash, a kill or a cancel in the middle leaves the previous file intact and no partial file.
Also the checksum of a file's bytes, by which the store, the training cache and model records
tell a file written whole from one changed or damaged since.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Temporary files are hidden and carry this mark, so no reader takes them for data.
PARTIAL_MARK = ".partial-"
# In a folder several runs may write into at once, a temporary file younger than this may be
# another run's write in progress, not a killed one's leftover.
SHARED_FOLDER_GRACE_S = 3600.0


@contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `final` (ending in `suffix`); rename it to `final` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final, suffix)
    try:
        yield tmp
        commit(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def commit(tmp: Path, final: Path) -> None:
    """Rename a finished temporary file onto `final`, its bytes on disk first. Without the syncs,
    a power cut soon after a save can leave `final` empty or cut short on filesystems that may
    persist a rename before the data (XFS, btrfs; ext4 only partly orders them)."""
    sync_file(tmp)
    os.replace(tmp, final)
    sync_folder(final.parent)


def sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX; Windows has no handle on a folder to sync)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (network mounts) refuse it; the rename stands
    finally:
        os.close(fd)


def partial_path(final: str | os.PathLike, suffix: str = "") -> Path:
    """A new hidden temporary name beside `final` (ending in `suffix`, which nibabel reads)."""
    final = Path(final)
    stem = final.name[: -len(suffix)] if suffix and final.name.endswith(suffix) else final.name
    return final.with_name(f".{stem}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}{suffix}")


def partials_of(final: str | os.PathLike, suffix: str = "") -> list[Path]:
    """The temporary files left beside `final` by writes of it that did not finish (`suffix`: as
    given to `partial_path`)."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    stem = final.name[: -len(suffix)] if suffix and final.name.endswith(suffix) else final.name
    return sorted(p for p in final.parent.glob(f".{stem}{PARTIAL_MARK}*{suffix}") if p.is_file())


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_stale_partials(folder: str | os.PathLike, min_age_s: float = 0.0) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder`; returns them. `min_age_s`:
    only those older than that, where another process may be writing into the same folder now
    (two runs of `predict` into one --out, two trainings on one cache)."""
    folder = Path(folder)
    stale = [p for p in folder.glob(f".*{PARTIAL_MARK}*") if p.is_file()] if folder.is_dir() else []
    removed = []
    for path in stale:
        try:
            if min_age_s and time.time() - path.stat().st_mtime < min_age_s:
                continue
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in blocks (hashlib lets other threads run meanwhile)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
