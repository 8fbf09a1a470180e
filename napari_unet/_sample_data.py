"""npe2 sample data: one synthetic BraTS-like case, made on the spot (nothing is downloaded)."""

from __future__ import annotations


def sample_case():
    """The sample case (the same images wherever it is opened, so one store entry fits it)."""
    from napari_unet.synth import synthetic_case as make

    return make(seed=0, case_id="synthetic_sample")


def synthetic_case():
    from napari_unet.layers import case_layer_data

    return case_layer_data(sample_case())
