"""One writer per store: an exclusive lock object naming its holder, with stale-lock detection.

Local stores create the lock as a hard link to a finished temporary file (exclusive and atomic with its content);
object stores with a conditional PUT (see :mod:`stores.location`).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time

from stores.errors import StoreError
from stores.location import Location

LOCK_FILE = ".writer.lock"
TAKEOVER_FILE = ".writer.lock.takeover"


class StoreLockedError(StoreError):
    """Another live process is writing this store."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder() -> bytes:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "token": secrets.token_hex(8)}).encode()


def acquire(store: Location) -> Location:
    """Take the store's writer lock or raise :class:`StoreLockedError` naming the holder.

    The lock object is created exclusively and atomically with its content, so a lock is never seen empty. A lock
    left by a process that no longer runs on this host is stale and is taken over; the takeover runs under a
    short-lived second lock (``.writer.lock.takeover``), which re-judges the lock and replaces it, so two processes
    that both found it stale can never remove each other's fresh lock. A lock from another host cannot be checked,
    so it is honoured: remove the lock file by hand if that host's writer is known to be dead.
    """
    path = store / LOCK_FILE
    holder = _holder()
    for _ in range(3):
        if path.create_exclusive(holder):
            return path
        check(store)  # raises while a live writer holds it
        if _take_over(store, holder):
            return path
    raise StoreLockedError(f"could not take the writer lock of {store}: another writer keeps taking it")


def _take_over(store: Location, holder: bytes) -> bool:
    """Replace a stale lock by ours, atomically with respect to every other process doing the same."""
    path, guard = store / LOCK_FILE, store / TAKEOVER_FILE
    if not guard.create_exclusive(holder):
        other = _read(guard)
        if other is not None and other.get("unreadable"):
            raise StoreLockedError(f"store {store} has a takeover lock that cannot be read ({guard}); if no writer "
                                   "is running, delete that file")
        if other is not None and _live(other):
            raise StoreLockedError(f"another process (pid {other.get('pid')} on {other.get('host')}) is taking "
                                   f"over the writer lock of {store} right now")
        # its taker died within the takeover: remove that guard only if it is still the one judged dead
        if _read(guard) == other:
            guard.remove()
        return False
    try:
        check(store)  # judged again under the guard: someone may have taken over and be writing by now
        path.remove()
        return path.create_exclusive(holder)
    finally:
        guard.remove()


def _read(path: Location) -> dict | None:
    """A lock object's holder; None when absent. An unreadable one is reported as such: this module never
    writes a lock that could be read half-written."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"unreadable": True}
    return holder if isinstance(holder, dict) else {"unreadable": True}


def _live(holder: dict) -> bool:
    if holder.get("unreadable"):
        return True  # cannot be judged: never taken over
    same_host = holder.get("host") == socket.gethostname()
    try:
        return not same_host or _alive(int(holder.get("pid", -1)))
    except (TypeError, ValueError):
        return True


def check(store: Location) -> None:
    """Raise :class:`StoreLockedError` naming the holder when a live writer holds the store's lock (no-op otherwise).

    For a fast, early refusal; :func:`acquire` is what actually excludes a second writer.
    """
    path = store / LOCK_FILE
    other = _read(path)
    if other is None or not _live(other):
        return
    if other.get("unreadable"):
        raise StoreLockedError(f"store {store} has a writer lock that cannot be read ({path}); if no writer is "
                               "running, delete that file")
    raise StoreLockedError(
        f"store {store} is being written by pid {other.get('pid')} on {other.get('host')} since "
        f"{other.get('started')}; wait for it to finish (if that process is dead on another host, "
        f"delete {path})"
    )


def release(store: Location) -> None:
    path = store / LOCK_FILE
    try:
        holder = json.loads(path.read_text())
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            path.remove()
    except (OSError, ValueError):
        pass
