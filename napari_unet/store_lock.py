"""The store's lock: one napari window writes a corrections store at a time.

Two windows saving the same case overwrite each other's corrections without a word, so a window
takes the store before it annotates there: `STORE/.napari-unet.lock` holds who took it (user,
host, process, its start time, when). The file is created with O_EXCL, so of two windows racing
for a store exactly one gets it.

A lock whose process is gone (killed, crashed, the machine restarted) is stale: the next window
takes the store over and says so. Its process is judged only on the same host (by its id and
start time, so a reused process id is not mistaken for the holder); a lock from another host is
honoured until the user removes it, because that window may still be saving over the network.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from napari_unet import NapariUnetError

LOCK_FILE = ".napari-unet.lock"
# A lock file still empty this long after it was made lost its writer between create and write.
EMPTY_LOCK_GRACE_S = 10.0

# Locks this process holds, by store: a second window of the same napari is refused as well.
_held: dict[Path, str] = {}
_held_guard = threading.Lock()


class StoreInUse(NapariUnetError):
    """Another window (or another machine) annotates in this store."""


@dataclass
class StoreLock:
    store: Path
    token: str
    taken_over: str | None = None  # who held the stale lock this one replaced, if any

    @property
    def path(self) -> Path:
        return self.store / LOCK_FILE

    def release(self) -> None:
        """Give the store back (only if the lock is still this one's)."""
        with _held_guard:
            if _held.get(self.store) == self.token:
                del _held[self.store]
        record = _read(self.path)
        if record is not None and record.get("token") == self.token:
            self.path.unlink(missing_ok=True)


class StoreHolder:
    """The one store a window annotates in: taking another gives the first back."""

    def __init__(self) -> None:
        self.lock: StoreLock | None = None

    def hold(self, store: str | os.PathLike) -> str | None:
        """Take STORE's lock unless held already (StoreInUse if another window has it); returns
        what the user should know: whose stale lock was taken over, if one was."""
        if self.lock is not None and self.lock.store == Path(store).expanduser().resolve():
            return None
        lock = lock_store(store)
        self.release()
        self.lock = lock
        return f"{lock.store}: taken over from {lock.taken_over}, whose window is gone" if lock.taken_over else None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def lock_store(store: str | os.PathLike) -> StoreLock:
    """Take STORE for this window, or raise StoreInUse naming who holds it."""
    store = Path(store).expanduser().resolve()
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise NapariUnetError(f"{store}: cannot make the corrections store ({err.strerror or err})") from None
    path = store / LOCK_FILE
    taken_over = None
    for _ in range(5):  # a stale lock removed, then another window may win the race: try again
        record = _new_record()
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if not _is_stale(path, holder):
                raise StoreInUse(_in_use_message(store, holder)) from None
            taken_over = _describe(holder) if holder else "an unfinished lock"
            _remove_stale(path)
            continue
        except OSError as err:
            raise NapariUnetError(f"{store}: cannot write its lock file ({err.strerror or err})") from None
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        with _held_guard:
            _held[store] = record["token"]
        return StoreLock(store, record["token"], taken_over)
    raise StoreInUse(f"{store}: another window keeps taking this store; try again")


def _new_record() -> dict:
    return {"user": _user(), "host": socket.gethostname(), "pid": os.getpid(),
            "process_started": _process_started(os.getpid()), "token": uuid.uuid4().hex,
            "since": _dt.datetime.now().isoformat(timespec="seconds")}


def _read(path: Path) -> dict | None:
    """The lock's record; {} for a lock file that is there but empty or unreadable; None when gone."""
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_stale(path: Path, holder: dict | None) -> bool:
    if holder is None:
        return True  # released in the meantime
    if not holder.get("token"):
        try:
            age = _dt.datetime.now().timestamp() - path.stat().st_mtime
        except OSError:
            return True
        return age > EMPTY_LOCK_GRACE_S
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        # This process: held while one of its windows has it; otherwise a window that ended
        # without giving the store back.
        with _held_guard:
            return holder["token"] not in _held.values()
    return not _process_alive(pid, holder.get("process_started"))


def _process_started(pid: int) -> float | None:
    """When process PID started (seconds since the epoch); None if unknown."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _process_alive(pid: int, started: float | None) -> bool:
    """Whether process PID is still the one that started at STARTED (when that is known)."""
    import psutil

    try:
        now_started = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # there, but not ours to inspect
    return started is None or abs(now_started - started) <= 1.0


def _remove_stale(path: Path) -> None:
    # Renamed aside first, so that of two windows clearing the same stale lock only one removes
    # it, and neither removes a fresh lock the other has just made.
    aside = path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, aside)
    except OSError:
        return
    aside.unlink(missing_ok=True)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown user"


def _describe(holder: dict) -> str:
    who = f"{holder.get('user', 'unknown user')}@{holder.get('host', 'unknown host')}"
    return f"{who} (process {holder.get('pid', '?')}, since {holder.get('since', '?')})"


def _in_use_message(store: Path, holder: dict | None) -> str:
    where = _describe(holder) if holder else "another window"
    same_process = bool(holder) and holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()
    if same_process:
        return (f"{store}: another napari-unet window of this napari annotates in this store (since "
                f"{holder.get('since', '?')}); close that window's napari-unet panel, or choose another store")
    return (f"{store}: in use by {where}; two windows saving one store would overwrite each other's "
            f"corrections. Close that window, or choose another store; if that window is gone for good, "
            f"delete {store / LOCK_FILE}")
