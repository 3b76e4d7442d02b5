"""The writer lock under races, with real processes: a lock is never seen without its content, an unreadable one is
never taken over, and processes racing to take over a stale lock end with exactly one holder."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stores.location import Location
from stores.lock import LOCK_FILE, StoreLockedError, acquire, release

REPO = Path(__file__).resolve().parents[1]

RACER = """
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from stores.location import Location
from stores.lock import LOCK_FILE, StoreLockedError, acquire
store, go = Location.of(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    pass
try:
    acquire(store)
except StoreLockedError:
    print("lost")
    sys.exit(0)
time.sleep(1.0)  # hold it while the others try
holder = json.loads((Path(sys.argv[1]) / LOCK_FILE).read_text())
print("won" if holder["pid"] == os.getpid() else "stolen")
"""


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_an_empty_or_unreadable_lock_is_never_taken_over(tmp_path):
    store = Location.of(tmp_path / "s")
    (tmp_path / "s").mkdir()
    for content in ("", '{"pid": 12'):  # what an exclusive create followed by a write could show mid-way
        (tmp_path / "s" / LOCK_FILE).write_text(content)
        with pytest.raises(StoreLockedError, match="cannot be read"):
            acquire(store)
        assert (tmp_path / "s" / LOCK_FILE).read_text() == content


def test_a_lock_is_created_with_its_content_and_released_by_its_holder_only(tmp_path):
    store = Location.of(tmp_path / "s")
    acquire(store)
    holder = json.loads((tmp_path / "s" / LOCK_FILE).read_text())
    assert holder["pid"] > 0 and holder["host"] == socket.gethostname()
    assert [p.name for p in (tmp_path / "s").iterdir()] == [LOCK_FILE]  # no temporary file left beside it
    with pytest.raises(StoreLockedError, match=f"pid {holder['pid']}"):
        acquire(store)
    release(store)
    assert not (tmp_path / "s" / LOCK_FILE).exists()


@pytest.mark.parametrize("racers", [6])
def test_processes_racing_to_take_over_a_stale_lock_leave_exactly_one_holder(tmp_path, racers):
    store = tmp_path / "s"
    store.mkdir()
    (store / LOCK_FILE).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(),
                                               "started": "then"}))
    script = tmp_path / "racer.py"
    script.write_text(RACER.format(repo=str(REPO)))
    go = tmp_path / "go"
    processes = [subprocess.Popen([sys.executable, str(script), str(store), str(go)], stdout=subprocess.PIPE,
                                  text=True) for _ in range(racers)]
    time.sleep(3)  # let every racer start and wait at the gate (not an assertion: a late racer just loses)
    go.touch()
    outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in processes)
    assert outcomes.count("won") == 1 and "stolen" not in outcomes, outcomes
