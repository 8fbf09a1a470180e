"""The corrections store's files: where a case's `corrections.json` lives, and reading it back
with validation. The annotation session writes it; training reads it through here.
"""

from __future__ import annotations

import json
from pathlib import Path

from napari_unet import NapariUnetError

CORRECTIONS_FILE = "corrections.json"


def corrections_path(case_dir_or_file: Path) -> Path:
    """Where a store case keeps its corrections.json (Decathlon cases: one file per case)."""
    p = Path(case_dir_or_file)
    if p.is_dir() or not p.name.lower().endswith((".nii", ".nii.gz")):
        return p / CORRECTIONS_FILE
    stem = p.name.split(".nii")[0]
    return p.with_name(f"{stem}.{CORRECTIONS_FILE}")


def read_corrections(case_dir: Path, n_axial: int) -> list[int] | None:
    """The reviewed file-axial indices of a store case (None: no corrections.json)."""
    path = corrections_path(case_dir)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NapariUnetError(f"{path}: not valid JSON ({err})") from None
    slices = data.get("reviewed_slices") if isinstance(data, dict) else None
    if not isinstance(slices, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in slices):
        raise NapariUnetError(f'{path}: expected {{"reviewed_slices": [axial indices as integers]}}')
    bad = [s for s in slices if not 0 <= s < n_axial]
    if bad:
        raise NapariUnetError(f"{path}: reviewed slices {bad[:5]} are outside the volume (0..{n_axial - 1})")
    return slices
