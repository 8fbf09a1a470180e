"""The dependency rules of the design, checked on the running interpreter."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return {name.split(".")[0] for name in out.split()}


def test_training_never_imports_qt_or_napari():
    loaded = _modules_after("import training.loop, training.data, training.losses")
    assert not loaded & {"napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy"}
    assert "torch" in loaded  # (the check above is not vacuous)


def test_what_napari_loads_at_start_up_does_not_import_torch():
    loaded = _modules_after(
        "import napari_unet, napari_unet._reader, napari_unet._writer, napari_unet._sample_data, napari_unet.layers"
    )
    assert "torch" not in loaded and "napari_unet" in loaded
