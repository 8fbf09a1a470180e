"""The store's lock: a second window on a store is refused with who holds it; a lock whose
window is gone is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from napari_unet.store_lock import LOCK_FILE, StoreHolder, StoreInUse, lock_store

HOLD_AND_WAIT = """
import sys, time
from napari_unet.store_lock import lock_store
lock_store(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def _lock_record(store) -> dict:
    return json.loads((store / LOCK_FILE).read_text())


def test_a_second_window_of_this_napari_is_refused_until_the_first_lets_go(tmp_path):
    first = lock_store(tmp_path / "store")
    with pytest.raises(StoreInUse, match="another napari-unet window of this napari"):
        lock_store(tmp_path / "store")
    first.release()
    assert not (tmp_path / "store" / LOCK_FILE).exists()
    lock_store(tmp_path / "store").release()


def test_a_window_of_another_process_is_named_and_its_lock_taken_over_once_it_is_killed(tmp_path):
    store = tmp_path / "store"
    other = subprocess.Popen([sys.executable, "-c", HOLD_AND_WAIT, str(store)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(StoreInUse) as refused:
            lock_store(store)
        assert f"process {other.pid}" in str(refused.value) and str(store / LOCK_FILE) in str(refused.value)
    finally:
        other.kill()
        other.wait()
    lock = lock_store(store)  # the killed window's lock is stale
    assert f"process {other.pid}" in lock.taken_over
    assert _lock_record(store)["pid"] == os.getpid()
    lock.release()


def _write_lock(store, **record) -> None:
    store.mkdir(parents=True, exist_ok=True)
    base = {"user": "someone", "host": socket.gethostname(), "pid": os.getppid(), "since": "2026-01-01T00:00:00",
            "token": "f" * 32}
    (store / LOCK_FILE).write_text(json.dumps({**base, **record}))


def test_a_reused_process_id_is_not_taken_for_the_holder(tmp_path):
    import psutil

    parent_started = psutil.Process(os.getppid()).create_time()
    _write_lock(tmp_path / "alive", process_started=parent_started)
    with pytest.raises(StoreInUse, match="someone@"):
        lock_store(tmp_path / "alive")
    # The same process id, started at another time: the holder is gone and its id was reused.
    _write_lock(tmp_path / "reused", process_started=parent_started - 3600)
    assert lock_store(tmp_path / "reused").taken_over.startswith("someone@")


def test_a_lock_from_another_machine_is_kept_and_says_how_to_clear_it(tmp_path):
    _write_lock(tmp_path / "store", host="another-host", pid=1)
    with pytest.raises(StoreInUse, match="someone@another-host") as refused:
        lock_store(tmp_path / "store")
    assert "delete" in str(refused.value) and LOCK_FILE in str(refused.value)


def test_an_empty_lock_file_is_stale_only_once_its_writer_had_time(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / LOCK_FILE).write_text("")
    with pytest.raises(StoreInUse):
        lock_store(store)  # just made: its writer may be writing it now
    old = time.time() - 60
    os.utime(store / LOCK_FILE, (old, old))
    assert lock_store(store).taken_over == "an unfinished lock"


def test_a_window_taking_another_store_gives_the_first_back(tmp_path):
    holder = StoreHolder()
    holder.hold(tmp_path / "a")
    first = holder.lock
    holder.hold(tmp_path / "a")
    assert holder.lock is first
    holder.hold(tmp_path / "b")
    lock_store(tmp_path / "a").release()  # free again
    with pytest.raises(StoreInUse):
        lock_store(tmp_path / "b")
    holder.release()
    assert not (tmp_path / "b" / LOCK_FILE).exists()
