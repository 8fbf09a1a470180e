"""`napari-unet annotate`: napari with a case open and the annotation widget docked."""

from __future__ import annotations


def is_dataset(path) -> bool:
    """A dataset root (a BraTS root, a Decathlon task, a folder of case folders) rather than one case."""
    from pathlib import Path

    from napari_unet.cases import find_cases

    path = Path(path)
    return path.is_dir() and find_cases(path) != [path]


def _quiet_pyqt5_banner() -> None:
    """napari 0.9 greets every start on PyQt5 with its deprecation; the README tells our users
    about it once, with the Qt 6 install (napari-unet[pyqt6]). A private flag: if napari renames
    it, the banner simply comes back."""
    try:
        from napari._qt import qt_main_window
    except ImportError:
        return
    if hasattr(qt_main_window, "SHOW_QT_WARNING"):
        qt_main_window.SHOW_QT_WARNING = False


def open_viewer(case=None, *, model=None, device: str = "auto", show: bool = True):
    """A viewer with the case (or the sample case of File > Open Sample) and the docked widget;
    returns (viewer, widget). A dataset root opens as the widget's case list, no case open yet."""
    import napari

    from napari_unet._qt.widget import WIDGET_NAME, AnnotationWidget
    from napari_unet._sample_data import sample_case
    from napari_unet.cases import read_case
    from napari_unet.layers import case_layer_data

    _quiet_pyqt5_banner()
    viewer = napari.Viewer(title="napari-unet", show=show)
    dataset = case if case and is_dataset(case) else None
    if dataset is None:
        loaded = read_case(case) if case else sample_case()
        for data, kwargs, kind in case_layer_data(loaded):
            getattr(viewer, f"add_{kind}")(data, **kwargs)
    widget = AnnotationWidget(viewer)  # finds the open case at once
    viewer.window.add_dock_widget(widget, name=WIDGET_NAME, area="right")
    if dataset is not None:
        widget.cases.open_dataset(dataset)
    if model:
        widget.set_model(model)
    widget.device_combo.setCurrentText(device)
    return viewer, widget


def run_app(case=None, *, model=None, device: str = "auto") -> int:
    import napari

    from napari_unet.cases import read_case

    if case and not is_dataset(case):  # (a dataset root without cases fails in is_dataset, as clearly)
        read_case(case)  # a bad case fails here with a clear message, before any window opens
    open_viewer(case, model=model, device=device)
    napari.run()
    return 0
