"""The layers the widget makes for the case being annotated: its annotation (Labels, on top)
and its uncertainty (an image under it).

When the dataset panel switches cases, the case left is closed anyway, so its layers take the
new case's data instead of being removed and made again: on two busy cores napari takes about
1 s to make a case's six layers and 1.5-2 s to remove them, while new data in a layer takes a
few milliseconds. (A case opened otherwise, File > Open, leaves the earlier case's layers alone:
it can be shown again.)
"""

from __future__ import annotations

import numpy as np

from napari_unet.layers import META_KEY, labels_layer_kwargs, source_of
from napari_unet._qt.wiring import disconnect, unwrapped


def give_new_data(layer, data, kwargs: dict) -> None:
    """Make `layer` (of a case being left) the layer that napari's add_* would make from
    (data, kwargs); only what differs between cases is set."""
    layer.metadata = kwargs["metadata"]  # first: the layer is the new case's from now on
    layer.data = data
    layer.name = kwargs["name"]
    if not np.allclose(layer.scale, kwargs["scale"]):  # (a scale set anew makes napari redo every layer's extent)
        layer.scale = kwargs["scale"]
    if "contrast_limits" in kwargs:
        layer.reset_contrast_limits_range()
        layer.contrast_limits = kwargs["contrast_limits"]


def edit_events(layer) -> tuple:
    """Strokes, undo/redo and `data[...] = ...; refresh()` on a Labels layer all end in one of these."""
    return layer.events.paint, layer.events.set_data, layer.events.data


def show_annotation(w, labels: np.ndarray) -> None:
    """The session's Labels layer on top, visible and selected; its case's uncertainty under it."""
    w.grid.close()  # its copies show the annotation being replaced
    source = w.session.source
    name = f"{source.case_id} annotation"
    if name in w.viewer.layers:
        w.viewer.layers.remove(name)
    kwargs = labels_layer_kwargs(source.case_id, source, name=name, role="annotation")
    layer = w.cases.layer_of_case_left("annotation")
    if layer is None:
        layer = w.viewer.add_labels(labels, **kwargs)
    else:
        # Read-only since its case was saved, which cleared its undo history: nothing of the
        # case left can be undone into this one.
        _forget_connections(w, layer)
        give_new_data(layer, labels, kwargs)
        layer.editable = True
    layer.opacity = 0.6
    w.session.track(layer.data)
    for event in edit_events(layer):
        w._connect(event, w._edits_maybe, layer)
    w._connect(layer.events.selected_label, lambda e: w.review.check_label(layer), layer)
    w._connect(layer.events.selected_label, w.review.show_paint_label, layer)
    w._connect(layer.events.mode, w.review.show_paint_label, layer)
    w._annotation = layer
    for other in w.viewer.layers:  # a reference segmentation would hide what is edited
        if other is not layer and w.session.owns(source_of(other.metadata)) \
                and other.metadata[META_KEY].get("role") == "labels":
            other.visible = False
    uncertainty_layer(w)
    w._bring_to_top()
    w.review.show_paint_label()


def uncertainty_layer(w):
    """The per-voxel uncertainty as an image layer (filled by proposals)."""
    name = f"{w.session.case_id} uncertainty"
    shape = w.session.shape
    if name in w.viewer.layers and w.viewer.layers[name].data.shape == shape:
        return w.viewer.layers[name]
    if name in w.viewer.layers:
        w.viewer.layers.remove(name)
    data = np.zeros(shape, np.uint8)
    kwargs = {"name": name, "scale": w.session.source.spacing, "contrast_limits": (0, 255),
              "metadata": {META_KEY: {"source": w.session.source.to_dict(), "role": "uncertainty"}}}
    layer = w.cases.layer_of_case_left("uncertainty")
    if layer is None:
        return w.viewer.add_image(data, colormap="inferno", blending="additive",
                                  visible=w.show_uncertainty.isChecked(), **kwargs)
    give_new_data(layer, data, kwargs)
    layer.visible = w.show_uncertainty.isChecked()
    return layer


def _forget_connections(w, layer) -> None:
    """The widget's connections to a layer, made for the case it showed before."""
    real = unwrapped(layer)
    for entry in [c for c in w._connections if c[2] is real]:
        w._connections.remove(entry)
        disconnect(*entry[:2])
