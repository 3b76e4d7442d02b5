"""One writer per store: an exclusive lock object naming its holder, with stale-lock detection.

Local stores create the lock with ``O_EXCL``; object stores with a conditional PUT (see :mod:`stores.location`).
"""

from __future__ import annotations

import json
import os
import socket
import time

from stores.errors import StoreError
from stores.location import Location

LOCK_FILE = ".writer.lock"


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


def acquire(store: Location) -> Location:
    """Take the store's writer lock or raise :class:`StoreLockedError` naming the holder.

    A lock left by a process that no longer runs on this host is stale and is taken over. A lock from another host
    cannot be checked, so it is honoured: remove the lock file by hand if that host's writer is known to be dead.
    """
    path = store / LOCK_FILE
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(2):
        if path.create_exclusive(json.dumps(holder).encode()):
            return path
        check(store)
        path.remove()  # stale: its writer is gone
    raise StoreLockedError(f"could not take the writer lock of {store}: another writer keeps taking it")


def check(store: Location) -> None:
    """Raise :class:`StoreLockedError` naming the holder when a live writer holds the store's lock (no-op otherwise).

    For a fast, early refusal; :func:`acquire` is what actually excludes a second writer.
    """
    path = store / LOCK_FILE
    try:
        other = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        return  # half-written by a writer killed mid-way: stale by construction
    same_host = other.get("host") == socket.gethostname()
    if other and (not same_host or _alive(int(other.get("pid", -1)))):
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
