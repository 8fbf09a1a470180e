"""One background task at a time for the widget: a napari worker thread, its progress on the
widget's bar and napari's, Cancel, and expected outcomes (done, cancelled, a clear error) as values."""

from __future__ import annotations

import threading
from collections.abc import Callable

from napari_unet import NapariUnetError


class TaskRunner:
    def __init__(self, progress_bar, cancel_btn, message: Callable[[str], None], error: Callable[[str], None],
                 on_info: Callable[[dict], None]):
        self.progress_bar, self.cancel_btn = progress_bar, cancel_btn
        self.message, self.error, self.on_info = message, error, on_info
        self.cancel_event = threading.Event()
        self.worker = None
        self._connected: list[tuple] = []  # (signal, slot) of the running task
        self.what = ""
        self.napari_bar = None

    def refuse_if_busy(self) -> bool:
        if self.worker is not None:
            self.message("busy: wait, or press Cancel")
            return True
        return False

    def start(self, func, on_done, what: str, napari_bar: bool = True):
        from napari.qt.threading import create_worker
        from napari.utils import progress as napari_progress

        from napari_unet.predict import Cancelled

        def guarded():
            # Expected outcomes come back as values; only real bugs travel as exceptions.
            try:
                return "done", func()
            except Cancelled:
                return "cancelled", None
            except NapariUnetError as err:
                return "error", err

        def returned(outcome):
            self.finish(worker)  # before on_done, which may start the next task
            kind, value = outcome
            if kind == "done":
                on_done(value)
            elif kind == "cancelled":
                self.message(f"{what} cancelled; nothing was changed")
            else:
                self.error(str(value))

        self.cancel_event.clear()
        self.what = what
        self.napari_bar = napari_progress(total=0, desc=what) if napari_bar else None
        worker = create_worker(guarded)
        self._connected = [(worker.returned, returned), (worker.errored, self.on_error),
                           (worker.finished, lambda: self.finish(worker))]
        for signal, slot in self._connected:
            signal.connect(slot)
        self.worker = worker
        self.cancel_btn.setEnabled(True)
        self.progress_bar.setFormat(f"{what} %p%")
        # Busy until the first piece of work is done: fine-tuning reads the store and self-replays
        # for seconds before its first step, and "0%" would say nothing is happening.
        self.progress_bar.setRange(0, 0)
        self.message(f"{what}…")  # not the previous action's result while this one runs
        worker.start()
        return worker

    def on_progress(self, done: int, total: int, info) -> None:
        if done > 0 or total <= 0:
            self.progress_bar.setRange(0, max(total, 1))
            self.progress_bar.setValue(done)
        bar = self.napari_bar
        if bar is not None:
            if bar.total != total:
                bar.total = total
            bar.n = done
            bar.refresh()
        if info:
            self.on_info(info)

    def on_error(self, err) -> None:
        self.error(f"{self.what} failed: {type(err).__name__}: {err}")

    def finish(self, worker) -> None:
        """Forget a finished task (once; a later task may already have started)."""
        if self.worker is not worker:
            return
        self.worker = None
        self.cancel_btn.setEnabled(False)
        self.progress_bar.setFormat("")
        self.progress_bar.setRange(0, 1)
        self.progress_bar.setValue(0)
        if self.napari_bar is not None:
            self.napari_bar.close()
            self.napari_bar = None

    def abandon(self) -> None:
        """The widget is going: cancel the task and let its outcome go nowhere."""
        self.cancel_event.set()
        worker, self.worker = self.worker, None
        if worker is not None:
            for signal, slot in self._connected:  # (napari's own connections stay)
                try:
                    signal.disconnect(slot)
                except (RuntimeError, TypeError):
                    pass
            worker.quit()
        if self.napari_bar is not None:
            self.napari_bar.close()
            self.napari_bar = None

    def cancel(self) -> None:
        self.cancel_event.set()
        self.message(f"cancelling {self.what}…")
