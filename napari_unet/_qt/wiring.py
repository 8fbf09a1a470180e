"""What the annotation widget connects, and how it lets go: the bridge that brings worker
threads' news to the GUI thread, and the release of every connection, key and thread."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from qtpy.QtCore import QObject, Signal


class Bridge(QObject):
    """Carries progress and messages from worker threads to the GUI thread (queued signals)."""

    progress = Signal(int, int, object)
    saved = Signal(str, bool, object)  # text, is_error, the session saved
    failed = Signal(str)  # a background task that nobody waits on went wrong


def display_ready(result):
    """Uncertainty as 8 bits for display, converted in the worker: a quarter of the bytes to copy
    on the GUI thread (the slice ranking uses the float scores, taken before)."""
    prediction, warning = result
    if prediction.uncertainty is not None:
        prediction.uncertainty = np.round(prediction.uncertainty * 255).astype(np.uint8)
    return prediction, warning


def emit(bridge: Bridge, signal: str, *args) -> None:
    """Emit from a worker thread; after the widget is gone there is no one to tell."""
    try:
        getattr(bridge, signal).emit(*args)
    except RuntimeError:
        pass


def unwrapped(obj):
    """The napari object behind the proxy that napari hands plugin widgets."""
    return getattr(obj, "__wrapped__", obj)


def disconnect(emitter, callback) -> None:
    try:
        emitter.disconnect(callback)
    except (RuntimeError, TypeError, ValueError):
        pass  # its layer is already gone


def release(viewer, connections: list, key_handlers: list, saver: ThreadPoolExecutor,
             warmer: ThreadPoolExecutor, cancel: threading.Event, store) -> None:
    """Undo what the widget connected. A plain function: it also runs from `destroyed`, when
    napari deletes the widget with its window without closing it first."""
    from napari.utils.key_bindings import coerce_keybinding

    cancel.set()
    while connections:
        disconnect(*connections.pop()[:2])
    while key_handlers:
        key, handler = key_handlers.pop()
        try:
            # Only while the key is still ours: a widget docked since may have bound it anew.
            if unwrapped(viewer.keymap.get(coerce_keybinding(key))) is handler:
                viewer.bind_key(key, None)
        except (KeyError, ValueError, RuntimeError):
            pass
    warmer.shutdown(wait=False, cancel_futures=True)  # nothing needs the model any more
    saver.shutdown(wait=True)  # the last save finishes
    store.release()  # only then may another window write the store
