"""The canonical tumour labels, the BraTS regions, and conversions per dataset layout.

Inside the project every label volume uses one convention, the one of BraTS 2023:

    0 background, 1 necrotic / non-enhancing core (NCR), 2 peritumoral edema (ED),
    3 enhancing tumour (ET).

Each dataset layout stores its own values; `to_canonical` and `from_canonical` convert
at the edges (reading and writing), so nothing downstream knows where a case came from.
"""

from __future__ import annotations

import numpy as np

from napari_unet import NapariUnetError

BACKGROUND, NECROTIC, EDEMA, ENHANCING = 0, 1, 2, 3

LABEL_NAMES: dict[int, str] = {
    BACKGROUND: "background",
    NECROTIC: "necrotic core",
    EDEMA: "edema",
    ENHANCING: "enhancing tumour",
}

# The colours of ITK-SNAP's BraTS palette, which annotators know: red core, green edema,
# yellow enhancing rim.
LABEL_COLORS: dict[int, tuple[float, float, float, float]] = {
    NECROTIC: (1.0, 0.0, 0.0, 1.0),
    EDEMA: (0.0, 0.85, 0.0, 1.0),
    ENHANCING: (1.0, 0.9, 0.0, 1.0),
}

# The evaluation regions of the BraTS challenge, as sets of canonical labels.
REGIONS: dict[str, tuple[int, ...]] = {
    "WT": (NECROTIC, EDEMA, ENHANCING),  # whole tumour
    "TC": (NECROTIC, ENHANCING),  # tumour core
    "ET": (ENHANCING,),  # enhancing tumour
}

# file value -> canonical value, per layout
_CONVENTIONS: dict[str, dict[int, int]] = {
    "brats2020": {0: 0, 1: NECROTIC, 2: EDEMA, 4: ENHANCING},
    "brats2021": {0: 0, 1: NECROTIC, 2: EDEMA, 4: ENHANCING},
    "brats2023": {0: 0, 1: NECROTIC, 2: EDEMA, 3: ENHANCING},
    # BraTS 2013-2015: 1 necrosis, 2 edema, 3 non-enhancing tumour, 4 enhancing. Non-enhancing
    # tumour is part of the core (TC = 1, 3, 4): canonical 1. Written back, canonical 1 is 1, except
    # where the source file held 3 (`cases.labels_to_nifti`), so an unchanged case round-trips.
    "brats2015": {0: 0, 1: NECROTIC, 2: EDEMA, 3: NECROTIC, 4: ENHANCING},
    # Medical Segmentation Decathlon Task01: 1 edema, 2 non-enhancing tumour, 3 enhancing.
    "msd": {0: 0, 1: EDEMA, 2: NECROTIC, 3: ENHANCING},
    "canonical": {0: 0, 1: NECROTIC, 2: EDEMA, 3: ENHANCING},
}
LAYOUT_CONVENTION = {name: name for name in _CONVENTIONS}
LAYOUT_CONVENTION["single"] = "canonical"


def _lookup(mapping: dict[int, int]) -> np.ndarray:
    table = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for src, dst in mapping.items():
        table[src] = dst
    return table


def to_canonical(values: np.ndarray, convention: str, source: str = "labels") -> np.ndarray:
    """Map a label volume stored in `convention` to canonical uint8 labels.

    Raises NapariUnetError naming `source` when a value is not part of the convention.
    """
    mapping = _CONVENTIONS[convention]
    arr = np.asarray(values)
    if arr.dtype.kind == "f":
        rounded = np.rint(arr)
        if not np.array_equal(rounded, arr):
            raise NapariUnetError(f"{source}: label values must be whole numbers")
        arr = rounded
    found = np.unique(arr)
    unknown = [v for v in found.tolist() if v not in mapping]
    if unknown:
        allowed = ", ".join(str(v) for v in sorted(mapping))
        shown = ", ".join(str(int(v)) if float(v).is_integer() else str(v) for v in unknown[:8])
        raise NapariUnetError(
            f"{source}: label values {shown} are not part of the {convention} convention "
            f"(allowed: {allowed})"
        )
    return _lookup(mapping)[arr.astype(np.int64)]


def from_canonical(labels: np.ndarray, convention: str) -> np.ndarray:
    """Map canonical labels to the values of `convention` (uint8)."""
    inverse: dict[int, int] = {}
    for src, dst in _CONVENTIONS[convention].items():
        inverse.setdefault(dst, src)  # the first file value of a canonical label writes it
    arr = np.asarray(labels)
    bad = np.setdiff1d(np.unique(arr), list(inverse))
    if bad.size:
        raise NapariUnetError(
            f"labels hold values {bad.tolist()} that are not canonical tumour labels (0-3)"
        )
    return _lookup(inverse)[arr.astype(np.int64)]


def region_mask(labels: np.ndarray, region: str) -> np.ndarray:
    """Boolean mask of a BraTS region ("WT", "TC" or "ET") from canonical labels."""
    return np.isin(labels, REGIONS[region])


def napari_features() -> dict[str, list]:
    """The Labels layer's feature table: hovering a voxel shows its name."""
    return {"index": list(LABEL_NAMES), "name": list(LABEL_NAMES.values())}


# The volumes a case reports, in this order: each tissue, then each BraTS region.
VOLUME_KEYS: tuple[str, ...] = (*(LABEL_NAMES[v] for v in (NECROTIC, EDEMA, ENHANCING)), *REGIONS)


def volumes_ml(labels: np.ndarray, voxel_ml: float) -> dict[str, float]:
    """Millilitres of each tissue and each BraTS region in canonical labels (`VOLUME_KEYS`)."""
    labels = np.asarray(labels)
    # One comparison per tissue: several times faster than a bincount of the whole volume (the
    # widget recounts as the annotator paints).
    counts = {v: int(np.count_nonzero(labels == v)) for v in (NECROTIC, EDEMA, ENHANCING)}
    volumes = {LABEL_NAMES[v]: counts[v] * voxel_ml for v in (NECROTIC, EDEMA, ENHANCING)}
    volumes |= {name: sum(counts[v] for v in values) * voxel_ml for name, values in REGIONS.items()}
    return volumes
