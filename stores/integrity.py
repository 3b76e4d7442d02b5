"""Shard integrity: which shards on disk match their manifest entries, and ``stores verify``.

Zarr reads a missing shard back as zeros without an error and does not checksum shard data, so a store is trusted
only as far as its per-shard manifest entries (row range, sha256 of the file, size) say.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from stores.layout import SHARD_MANIFEST_DIR, read_meta, shard_file, token_array_name
from stores.location import Location


@dataclass(frozen=True)
class ShardProblem:
    array: str
    shard: int
    rows: tuple[int, int] | None
    reason: str

    def __str__(self) -> str:
        where = f"rows {self.rows[0]}-{self.rows[1] - 1}" if self.rows else "rows unknown"
        return f"{self.array} shard {self.shard} ({where}): {self.reason}"


def shard_entries(store: Location | str | os.PathLike[str], array: str) -> dict[int, dict]:
    out = {}
    for path in (Location.of(store) / SHARD_MANIFEST_DIR / array).children():
        if not path.name.endswith(".json"):
            continue
        try:
            entry = json.loads(path.read_text())
            out[int(entry["shard"])] = entry
        except (OSError, ValueError, KeyError):
            continue  # a torn entry counts as missing
    return out


def check_shard(store: Location | str | os.PathLike[str], array: str, entry: dict, ndim: int, full_hash: bool = True) -> str | None:
    """None when the shard's object matches its entry, else the reason it does not."""
    path = shard_file(store, array, int(entry["shard"]), ndim)
    try:
        size = path.size()
    except (FileNotFoundError, IsADirectoryError):
        return "shard file is missing"
    if size != entry["bytes"]:
        return f"shard file is {size} bytes, its manifest entry says {entry['bytes']} (truncated or rewritten)"
    if full_hash and path.sha256() != entry["sha256"]:
        return "content differs from the sha256 recorded when it was written (altered or corrupted)"
    return None


def committed_entries(store: Location | str | os.PathLike[str], array: str, ndim: int, full_hash: bool = True
                      ) -> tuple[int, int, list[dict]]:
    """``(rows, shards, entries)`` of the longest run of shards from 0 whose objects match their entries
    (``full_hash=False``: whose sizes match, for a quick description; a resume re-hashes every shard)."""
    store = Location.of(store)
    entries = shard_entries(store, array)
    rows = shards = 0
    kept = []
    while shards in entries and entries[shards]["rows"][0] == rows:
        if check_shard(store, array, entries[shards], ndim, full_hash) is not None:
            break
        kept.append(entries[shards])
        rows = entries[shards]["rows"][1]
        shards += 1
    return rows, shards, kept


def entry_records(entries: list[dict], kind: str) -> Iterator[dict]:
    """The item (``kind="items"``) or error records the given manifest entries commit, in order."""
    for entry in entries:
        yield from entry.get(kind, ())


def verify(store: Location | str | os.PathLike[str]) -> list[ShardProblem]:
    """Re-hash every shard of a store against its manifest; name each missing, truncated or altered one."""
    import zarr

    store = Location.of(store)
    meta = read_meta(store)
    if meta is None:
        return [ShardProblem("-", -1, None, f"{store} is not a feature store")]
    group = zarr.open_group(store.zarr_store(read_only=True), mode="r")
    arrays = [token_array_name(meta.layout)] + (["offsets"] if meta.layout == "ragged" and meta.complete else [])
    problems: list[ShardProblem] = []
    for name in arrays:
        if name not in group:
            problems.append(ShardProblem(name, -1, None, "array is missing"))
            continue
        problems.extend(array_problems(store, name, group[name]))
    return problems


def array_problems(store: Location, name: str, array, full_hash: bool = True) -> list[ShardProblem]:
    """Each shard of ``array`` (the zarr array ``name`` of ``store``) that does not match its manifest entry.
    ``full_hash=False`` checks presence and sizes only (what opening a store for reading can afford)."""
    shard_rows = array.shards[0]
    total = array.shape[0]
    entries = shard_entries(store, name)
    problems = []
    for index in range(-(-total // shard_rows)):
        expected = (index * shard_rows, min(total, (index + 1) * shard_rows))
        entry = entries.get(index)
        try:
            if entry is None:
                reason = "no manifest entry (never finished writing)"
            elif tuple(entry["rows"]) != expected:
                reason = f"manifest entry covers rows {entry['rows']}, the array expects {list(expected)}"
            else:
                reason = check_shard(store, name, entry, array.ndim, full_hash)
        except (KeyError, TypeError, ValueError):
            reason = "manifest entry is unreadable (a field is missing or of the wrong kind)"
        if reason:
            problems.append(ShardProblem(name, index, expected, reason))
    return problems
