"""What the annotator sees: helpers for the Qt tests (a module of its own: tests import it)."""

from __future__ import annotations

import numpy as np



def shown_label_pixels(viewer) -> int:
    """Canvas pixels tinted by the tumour colours (green edema, red core, yellow rim) as rendered."""
    shot = viewer.screenshot(canvas_only=True, flash=False).astype(int)
    r, g, b = shot[..., 0], shot[..., 1], shot[..., 2]
    coloured = ((g - b > 60) & (g - r > 60)) | ((r - g > 60) & (r - b > 60)) | ((r - b > 60) & (g - b > 60))
    return int(coloured.sum())


def tumour_slice(labels) -> int:
    return int(np.argmax((np.asarray(labels) > 0).sum(axis=(1, 2))))
