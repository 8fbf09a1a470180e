"""Atomic file writes: write beside the target under a hidden temporary name, then rename.

A crash, a kill or a cancel in the middle leaves the previous file intact and no partial file.
Also the checksum of a file's bytes, by which the store, the training cache and model records
tell a file written whole from one changed or damaged since.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Temporary files are hidden and carry this mark, so no reader takes them for data.
PARTIAL_MARK = ".partial-"


@contextmanager
def atomic_path(final: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `final` (ending in `suffix`); rename it to `final` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final, suffix)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def partial_path(final: str | os.PathLike, suffix: str = "") -> Path:
    """A new hidden temporary name beside `final` (ending in `suffix`, which nibabel reads)."""
    final = Path(final)
    stem = final.name[: -len(suffix)] if suffix and final.name.endswith(suffix) else final.name
    return final.with_name(f".{stem}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}{suffix}")


def partials_of(final: str | os.PathLike) -> list[Path]:
    """The temporary files left beside `final` by writes of it that did not finish."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    return sorted(p for p in final.parent.glob(f".{final.name}{PARTIAL_MARK}*") if p.is_file())


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def remove_stale_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left in `folder`; returns them."""
    folder = Path(folder)
    stale = [p for p in folder.glob(f".*{PARTIAL_MARK}*") if p.is_file()] if folder.is_dir() else []
    for path in stale:
        try:
            path.unlink()
        except OSError:
            pass
    return stale


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in blocks (hashlib lets other threads run meanwhile)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
