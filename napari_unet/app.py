"""`napari-unet annotate`: napari with the annotation widget docked and a case open."""

from __future__ import annotations


def open_viewer(case=None, *, model=None, device: str = "auto", show: bool = True):
    """A viewer with the case (or the synthetic sample) and the docked widget; returns (viewer, widget)."""
    import napari

    from napari_unet._qt.widget import AnnotationWidget
    from napari_unet.cases import read_case
    from napari_unet.layers import case_layer_data
    from napari_unet.synth import synthetic_case

    viewer = napari.Viewer(title="napari-unet", show=show)
    widget = AnnotationWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Tumour annotation (U-Net)", area="right")
    loaded = read_case(case) if case else synthetic_case(seed=0, shift=0.6)
    if not case:
        widget.case = loaded  # the sample lives in memory; the store gets its images on saving
    for data, kwargs, kind in case_layer_data(loaded):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    if model:
        widget.set_model(model)
    widget.device_combo.setCurrentText(device)
    widget._attach()
    return viewer, widget


def run_app(case=None, *, model=None, device: str = "auto") -> int:
    import napari

    from napari_unet.cases import read_case

    if case:
        read_case(case)  # a bad case fails here with a clear message, before any window opens
    open_viewer(case, model=model, device=device)
    napari.run()
    return 0
