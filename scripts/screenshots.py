"""Screenshots for the README, taken from the real viewer (run under a display or xvfb-run)."""

from __future__ import annotations

import sys
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


if __name__ == "__main__":
    docs = Path(sys.argv[1] if len(sys.argv) > 1 else "docs")
    docs.mkdir(exist_ok=True)
    open_case_screenshot(docs / "viewer_case.png")
