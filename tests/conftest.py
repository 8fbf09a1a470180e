"""Shared fixtures: small synthetic datasets in every layout, made once per test session."""

from __future__ import annotations

import numpy as np
import pytest

from napari_unet.synth import write_dataset

# A coarse grid (5 mm x 5 mm x ~5 mm voxels) keeps the suite fast; geometry, labels and
# conventions are those of full-size cases.
SMALL = (48, 48, 32)
LAYOUTS = ("brats2020", "brats2021", "brats2023", "msd")


@pytest.fixture(scope="session")
def dataset_factory(tmp_path_factory):
    """make(layout, cases=2, shift=0.0, seed=0, shape=SMALL) -> list of case paths (cached)."""
    cache: dict = {}

    def make(layout="brats2021", cases=2, shift=0.0, seed=0, shape=SMALL):
        key = (layout, cases, shift, seed, tuple(shape))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{layout}_{seed}_{shift}")
            cache[key] = write_dataset(root, cases, seed=seed, layout=layout, shift=shift, shape=shape)
        return cache[key]

    return make


@pytest.fixture(params=LAYOUTS)
def layout(request):
    return request.param


# Some of the generator's gliomas do not enhance (seed 0's first case among them); the tests of
# label conversion need a case that holds all three tissues: this seed's first case does.
ALL_TISSUES_SEED = 2


@pytest.fixture
def case_path(dataset_factory, layout):
    """A case holding all three tissues, in `layout`."""
    return dataset_factory(layout, cases=1, seed=ALL_TISSUES_SEED)[0]


def copied_cases(cases, root) -> list:
    """Copies of the case folders `cases` in the folder `root` (a dataset a test may write in)."""
    import shutil

    copies = []
    for path in cases:
        shutil.copytree(path, root / path.name)
        copies.append(root / path.name)
    return copies


def expected_labels(seed: int, index: int, shape=SMALL) -> np.ndarray:
    """The canonical labels the generator made for case `index` (1-based) in file voxel order."""
    from napari_unet.synth import generate

    return generate(np.random.default_rng([seed, index]), shape, 0.0).labels


# A model trained in seconds on coarse synthetic cases: the real network, the real loop.
TRAIN_SHAPE = (96, 96, 62)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, dataset_factory):
    """(path, Result) of a small U-Net trained on 8 standard-appearance cases (500 steps: with the
    generator's healthy-tissue detail, 300 left its necrosis too weak to test forgetting on)."""
    from napari_unet.unet import UNetConfig
    from training.loop import Settings, train

    cases = dataset_factory("brats2021", cases=8, seed=11, shape=TRAIN_SHAPE)
    out = tmp_path_factory.mktemp("tiny_model") / "tiny.safetensors"
    result = train(
        cases[0].parent, out,
        settings=Settings(steps=500, batch_size=8, patch=64, lr=3e-3, seed=0, device="cpu", val_every=0),
        config=UNetConfig(base_channels=8, depth=3, padding="same", norm="batch"),
        val_fraction=0.0,
    )
    return out, result


# --------------------------------------------------------------------------- the Qt tests (tests/_qt)
# Here rather than in tests/_qt/conftest.py: two modules named conftest would shadow each other
# for `from conftest import ...`. Qt is imported only inside the fixtures.
MEDIUM = (96, 96, 62)  # big enough for the shipped model to see the tumour, small enough to be quick
WAIT = 120_000  # ms; generous for a loaded 2-core CI machine


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
