"""Cases as napari layer data (plain tuples; napari itself is not imported here).

The `CaseSource` record rides in each layer's metadata under the key "napari_unet", so the
writer, the widget and the CLI never need to guess a case's layout, affine or convention.
"""

from __future__ import annotations

import numpy as np

from napari_unet.cases import MODALITIES, Case, CaseSource
from napari_unet.labels import BACKGROUND, LABEL_COLORS, napari_features

META_KEY = "napari_unet"


def label_colormap() -> dict:
    """The conventional colours as a dict napari's Labels layer accepts."""
    return {None: (0, 0, 0, 0), BACKGROUND: (0, 0, 0, 0), **LABEL_COLORS}


def contrast_limits(image: np.ndarray) -> tuple[float, float]:
    """Robust display range: 0.5th-99.5th percentile of the brain (non-zero) voxels."""
    inside = image[image != 0]
    if inside.size == 0:
        return 0.0, 1.0
    # A subsample is enough for percentiles and keeps opening a case fast.
    sample = inside[:: max(1, inside.size // 200_000)]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def labels_layer_kwargs(case_id: str, source: CaseSource, name: str | None = None, role: str = "labels") -> dict:
    """A Labels layer of the case: its reference segmentation ("labels") or the one annotated."""
    return {
        "name": name or f"{case_id} tumour",
        "scale": source.spacing,
        "features": napari_features(),
        "colormap": label_colormap(),
        "opacity": 0.5,
        "metadata": {META_KEY: {"source": source.to_dict(), "role": role}},
    }


def case_layer_data(case: Case) -> list[tuple]:
    """One image layer per modality (FLAIR shown), and the tumour labels if the case has them."""
    layers = []
    for modality in MODALITIES + tuple(m for m in case.images if m not in MODALITIES):
        if modality not in case.images:
            continue
        image = case.images[modality]
        layers.append(
            (
                image,
                {
                    "name": modality.upper() if modality in MODALITIES else modality,
                    "scale": case.source.spacing,
                    "contrast_limits": contrast_limits(image),
                    "colormap": "gray",
                    "visible": modality in ("flair", "image"),
                    "metadata": {
                        META_KEY: {"source": case.source.to_dict(), "role": "image", "modality": modality}
                    },
                },
                "image",
            )
        )
    if case.labels is not None:
        layers.append((case.labels, labels_layer_kwargs(case.case_id, case.source), "labels"))
    return layers


def source_of(metadata: dict | None) -> CaseSource | None:
    """The source record stored in a layer's metadata, if any."""
    record = (metadata or {}).get(META_KEY, {}).get("source")
    return CaseSource.from_dict(record) if record else None
