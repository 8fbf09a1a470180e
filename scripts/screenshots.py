"""Screenshots for the README, taken from the real viewer (run under a display or xvfb-run)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np


def open_case_screenshot(out: Path) -> None:
    import napari

    from napari_unet.layers import case_layer_data
    from napari_unet.synth import synthetic_case

    case = synthetic_case(seed=3)
    viewer = napari.Viewer(show=True)
    for data, kwargs, kind in case_layer_data(case):
        getattr(viewer, f"add_{kind}")(data, **kwargs)
    z = int(np.argmax((case.labels > 0).sum(axis=(1, 2))))
    viewer.dims.set_current_step(0, z)
    viewer.window._qt_window.resize(1300, 850)
    viewer.reset_view()
    napari.qt.get_qapp().processEvents()
    viewer.screenshot(str(out), canvas_only=False)
    viewer.close()


def _wait(widget, app) -> None:
    import time

    while widget.busy:
        app.processEvents()
        time.sleep(0.01)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.01)


def widget_screenshots(docs: Path) -> None:
    """The widget in use: a proposal with review-next and uncertainty, then a fine-tune."""
    import tempfile

    import napari

    from napari_unet.app import open_viewer
    from napari_unet.synth import write_dataset

    import os

    tmp = Path(tempfile.mkdtemp())
    os.chdir(tmp)  # relative paths: the pictures show no machine's folders
    case_path = write_dataset("data", 1, seed=52, shift=1.0)[0]
    viewer, widget = open_viewer(case_path)
    widget.set_store("corrections")
    viewer.window._qt_window.resize(1500, 950)
    app = napari.qt.get_qapp()
    _wait(widget, app)  # the model loads in the background
    widget.propose()
    _wait(widget, app)
    widget.show_uncertainty.setChecked(True)
    widget.review_next()
    _wait(widget, app)
    viewer.reset_view()
    viewer.screenshot(str(docs / "widget_proposal.png"), canvas_only=False)

    truth = np.asarray(viewer.layers[f"{widget.session.case_id} tumour"].data)
    tumour = np.flatnonzero((truth > 0).any(axis=(1, 2)))
    layer = widget.annotation_layer
    for z in tumour[:: max(1, len(tumour) // 10)][:10]:  # the annotator fixes 10 slices
        plane = np.unravel_index(np.arange(truth[z].size), truth[z].shape)
        layer.data_setitem((np.full(truth[z].size, z),) + plane, truth[z].ravel())
    _wait(widget, app)  # the edits are noticed
    widget.show_uncertainty.setChecked(False)
    widget.finetune()
    _wait(widget, app)
    _wait(widget, app)  # the re-proposal
    widget.go_to_slice(int(tumour[len(tumour) // 2]))
    app.processEvents()
    viewer.screenshot(str(docs / "widget_finetune.png"), canvas_only=False)
    viewer.close()


def _proposed_real_case(case_dir: Path):
    """napari with a real case and the widget, its proposal made (the store in a temporary
    folder, not beside the real case; no machine paths shown); (viewer, widget, app, reference,
    the regions it scores)."""
    import os
    import tempfile

    import napari

    from napari_unet.app import open_viewer
    from napari_unet.cases import read_case

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_real import reference  # the one reader of the dev cases' references (_seg or _wt)

    case_dir = case_dir.resolve()
    os.chdir(tempfile.mkdtemp())
    viewer, widget = open_viewer(case_dir)
    widget.set_store("corrections")
    viewer.window._qt_window.resize(1500, 950)
    app = napari.qt.get_qapp()
    _wait(widget, app)
    widget.propose()
    _wait(widget, app)
    truth, regions = reference(case_dir, read_case(case_dir))
    return viewer, widget, app, truth, regions


def real_case_screenshot(case_dir: Path, out: Path) -> None:
    """A real case: the default model's proposal (filled) beside its reference (outline)."""
    viewer, widget, app, truth, _ = _proposed_real_case(case_dir)
    _reference_outline(viewer, truth)
    z = int(np.argmax((truth > 0).sum(axis=(1, 2))))
    widget.go_to_slice(z)
    viewer.reset_view()
    app.processEvents()
    viewer.screenshot(str(out), canvas_only=False)
    viewer.close()


def _reference_outline(viewer, truth: np.ndarray) -> None:
    from napari.utils.colormaps import DirectLabelColormap

    layer = viewer.add_labels((truth > 0).astype(np.uint8), name="reference WT (outline)", opacity=1.0)
    layer.colormap = DirectLabelColormap(color_dict={None: (0, 0, 0, 0), 0: (0, 0, 0, 0), 1: (1, 1, 1, 1)})
    layer.contour = 1


def real_click_screenshot(case_dir: Path, out: Path, clicks: int = 5) -> None:
    """A real case after a few clicks of the simulated clicker (bench_clicks.py's), made through
    the widget's click prompts; the clicks as points, the reference's whole tumour outlined."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_clicks import next_click

    viewer, widget, app, truth, regions = _proposed_real_case(case_dir)
    first = None
    for _ in range(clicks):
        click = next_click(np.asarray(widget.annotation_layer.data), truth, "TC" not in regions)
        if click is None:
            break
        first = first or click
        widget.click_prompts.click(click.point, click.label)
        _wait(widget, app)
    _reference_outline(viewer, truth)
    widget.go_to_slice(int(first.point[0]) if first else int(np.argmax((truth > 0).sum(axis=(1, 2)))))
    viewer.layers.selection.active = widget.annotation_layer
    viewer.reset_view()
    app.processEvents()
    viewer.screenshot(str(out), canvas_only=False)
    viewer.close()


def real_grid_screenshot(case_dir: Path, out: Path) -> None:
    """A real case in the contrast grid (Shift-G) at 1366x768: its contrasts side by side, the
    proposal over each, on the slice with the most reference tumour."""
    viewer, widget, app, truth, _ = _proposed_real_case(case_dir)
    viewer.window._qt_window.resize(1366, 768)
    widget.go_to_slice(int(np.argmax((truth > 0).sum(axis=(1, 2)))))
    widget.grid.toggle()
    for _ in range(20):  # the copies are redrawn a moment after
        app.processEvents()
        time.sleep(0.05)
    viewer.reset_view()
    app.processEvents()
    viewer.screenshot(str(out), canvas_only=False)
    viewer.close()


def case_list_screenshot(out: Path) -> None:
    """`napari-unet annotate DATASET`: the Dataset panel on 12 synthetic cases, two of them
    annotated (one done), the next case open with its proposal."""
    import os
    import tempfile

    import napari

    from napari_unet.app import open_viewer
    from napari_unet.synth import write_dataset

    os.chdir(tempfile.mkdtemp())
    write_dataset("BraTS-site", 12, seed=61, shift=0.5)
    viewer, widget = open_viewer(Path("BraTS-site"))
    viewer.window._qt_window.resize(1500, 950)
    app = napari.qt.get_qapp()
    _wait(widget, app)
    for done in (True, False):  # two cases annotated: one whole, one with a few reviewed slices
        widget.cases.open_next()
        _wait(widget, app)
        widget.propose()
        _wait(widget, app)
        for z in sorted(np.flatnonzero(np.asarray(widget.annotation_layer.data).any(axis=(1, 2))))[:4]:
            widget.go_to_slice(int(z))
            widget.toggle_reviewed()
        if done:
            widget.cases.toggle_done()
        _wait(widget, app)
    widget.cases.open_next()
    _wait(widget, app)
    widget.propose()
    _wait(widget, app)
    widget.go_to_slice(int(np.argmax((np.asarray(widget.annotation_layer.data) > 0).sum(axis=(1, 2)))))
    viewer.reset_view()
    app.processEvents()
    viewer.screenshot(str(out), canvas_only=False)
    viewer.close()


if __name__ == "__main__":
    import os

    # Toasts (napari's PyQt5 deprecation notice) would cover the canvas; this run only, not saved.
    os.environ["NAPARI_APPLICATION_GUI_NOTIFICATION_LEVEL"] = "error"
    # screenshots.py [DOCS] [REAL_CASE | --case-list | --grid REAL_CASE]: REAL_CASE makes the real-MRI pictures
    # (not the repo's synthetic pictures; the real cases' licences allow showing them, not
    # training on them); --case-list the Dataset panel's picture only.
    docs = Path(sys.argv[1] if len(sys.argv) > 1 else "docs").resolve()
    docs.mkdir(exist_ok=True)
    if len(sys.argv) > 2 and sys.argv[2] == "--case-list":
        case_list_screenshot(docs / "case_list.png")
        sys.exit(0)
    if len(sys.argv) > 3 and sys.argv[2] == "--grid":
        real_grid_screenshot(Path(sys.argv[3]).resolve(), docs / "real_grid.png")
        sys.exit(0)
    if len(sys.argv) > 2:
        real = Path(sys.argv[2]).resolve()  # (each picture works in a folder of its own)
        real_case_screenshot(real, docs / "real_case.png")
        real_click_screenshot(real, docs / "real_clicks.png")
        sys.exit(0)
    open_case_screenshot(docs / "viewer_case.png")
    widget_screenshots(docs)
