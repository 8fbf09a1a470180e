"""npe2 sample data: one synthetic BraTS-like case, made on the spot (nothing is downloaded)."""

from __future__ import annotations


def synthetic_case():
    from napari_unet.layers import case_layer_data
    from napari_unet.synth import synthetic_case as make

    return case_layer_data(make(seed=0))
