"""npe2 writer: a Labels layer -> NIfTI in the source case's orientation, affine and convention."""

from __future__ import annotations

from napari_unet import NapariUnetError


def write_labels(path: str, data, meta: dict) -> list[str]:
    import numpy as np

    from napari_unet.cases import write_labels as write_case_labels
    from napari_unet.layers import source_of

    source = source_of(meta.get("metadata"))
    if source is None:
        raise NapariUnetError(
            f"{path}: the layer '{meta.get('name')}' was not made from a case opened with "
            "napari-unet, so its orientation and label convention are unknown; paint on the "
            "labels layer of an opened case, or open the case with napari-unet first"
        )
    return [str(write_case_labels(np.asarray(data), source, path))]
