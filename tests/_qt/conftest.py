"""Fixtures for driving the real dock widget in a real viewer: cases, the three ways in, waiting."""

from __future__ import annotations

import numpy as np
import pytest

WAIT = 120_000  # ms; generous for a loaded 2-core CI machine
# Big enough for the shipped model to see the tumour, small enough to propose in a blink.
MEDIUM = (96, 96, 62)


@pytest.fixture
def case_a(dataset_factory):
    return dataset_factory("brats2021", cases=2, seed=5, shape=MEDIUM)[0]


@pytest.fixture
def case_b(dataset_factory):
    return dataset_factory("brats2021", cases=2, seed=5, shape=MEDIUM)[1]


@pytest.fixture
def wait_idle(qtbot):
    def wait(widget):
        qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT)
        qtbot.wait(20)  # queued signals (messages, edits) land

    return wait


@pytest.fixture
def dock_from_plugins_menu():
    """What Plugins > Tumour annotation (U-Net) does."""
    from napari_unet._qt.widget import WIDGET_NAME

    def dock(viewer):
        _, widget = viewer.window.add_plugin_dock_widget("napari-unet", WIDGET_NAME)
        return widget

    return dock


@pytest.fixture
def press(qtbot):
    """A key press on the viewer's canvas, as the annotator types it."""
    from qtpy.QtCore import Qt

    def press(viewer, key: str, modifier=Qt.ShiftModifier):
        canvas = viewer.window._qt_viewer.canvas.native
        canvas.setFocus()
        qtbot.keyClick(canvas, getattr(Qt, f"Key_{key}"), modifier)

    return press


def shown_label_pixels(viewer) -> int:
    """Canvas pixels tinted by the tumour colours (green edema, red core, yellow rim) as rendered."""
    shot = viewer.screenshot(canvas_only=True, flash=False).astype(int)
    r, g, b = shot[..., 0], shot[..., 1], shot[..., 2]
    coloured = ((g - b > 60) & (g - r > 60)) | ((r - g > 60) & (r - b > 60)) | ((r - b > 60) & (g - b > 60))
    return int(coloured.sum())


def tumour_slice(labels) -> int:
    return int(np.argmax((np.asarray(labels) > 0).sum(axis=(1, 2))))
