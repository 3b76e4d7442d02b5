"""Committing rows and records together: which item and error records each shard's manifest entry commits, and the
entry itself.

A store's item and error records travel in the manifest entries of the shards that complete them (see
:mod:`stores.writer` and docs/store-format.md), so the rows and the records of a shard are committed by one atomic
write. The rule that assigns records to shards lives here once, for the writer, the assembly of a distributed
extraction (:mod:`stores.parts`) and repair. No zarr here: entries are JSON objects beside the shards.
"""

from __future__ import annotations

import json
import threading

from stores.files import read_jsonl
from stores.layout import ERRORS_FILE, ITEMS_FILE, SHARD_MANIFEST_DIR, read_meta, shard_file
from stores.location import Location

__all__ = ["PendingRecords", "commit_plan", "final_records", "record_shard", "write_entry"]


class PendingRecords:
    """Item and error records waiting for the shard that commits them.

    The shard holding an item's last row commits the item; with it go the waiting error records whose manifest
    line comes before the last item it commits (the extraction adds a batch's errors before its items, so those
    have always arrived). The rule depends only on rows and lines, never on timing, so a resumed or distributed
    extraction commits exactly the records an uninterrupted one does. Filled by the caller's thread, emptied by
    the writer thread.
    """

    def __init__(self, end_row: int = 0, skip: set[tuple] | None = None):
        self._lock = threading.Lock()
        self._items: list[tuple[dict, int]] = []  # (record, row after the item's last row), in arrival order
        self._errors: list[dict] = []
        self._end_row = end_row
        self._skip = skip or set()  # records a resumed extraction produces again that an entry already commits
        self._log: list[list] | None = None  # [kind, record, rows] accepted since the last staging part, if staging

    @classmethod
    def continuing(cls, records: PendingRecords, skip: set[tuple] | None) -> PendingRecords:
        """``records`` (already waiting) now dropping the records in ``skip`` as they arrive again."""
        records._skip = skip or set()
        return records

    @staticmethod
    def key(kind: str, record: dict) -> tuple:
        return kind, record.get("line"), str(record.get("id"))

    def add(self, kind: str, record: dict, rows: int = 0) -> bool:
        """Queue one record; False if it was dropped as already committed."""
        with self._lock:
            key = self.key(kind, record)
            if key in self._skip:
                self._skip.discard(key)
                return False
            if kind == "items":
                self._end_row += rows
                self._items.append((record, self._end_row))
            else:
                self._errors.append(record)
            if self._log is not None:
                self._log.append([kind, record, rows])
            return True

    def take_log(self) -> list[list]:
        """The records accepted since the last call, in arrival order (for a staging part); from the first call on,
        accepted records are logged."""
        with self._lock:
            log, self._log = self._log or [], []
        return log

    def take_through(self, row: int) -> dict[str, list[dict]]:
        """Pop the records committed once rows ``[0, row)`` are stored."""
        with self._lock:
            n = 0
            while n < len(self._items) and self._items[n][1] <= row:
                n += 1
            if n == 0:
                return {"items": [], "errors": []}
            items, self._items = [r for r, _ in self._items[:n]], self._items[n:]
            last = items[-1].get("line")
            before = [last is None or _line(e) < int(last) for e in self._errors]
            errors = [e for e, b in zip(self._errors, before, strict=True) if b]
            self._errors = [e for e, b in zip(self._errors, before, strict=True) if not b]
        return {"items": items, "errors": sorted(errors, key=_line)}

    def take_all(self) -> dict[str, list[dict]]:
        with self._lock:
            items, errors = [r for r, _ in self._items], self._errors
            self._items, self._errors = [], []
        return {"items": items, "errors": sorted(errors, key=_line)}


def _line(record: dict) -> int:
    """A record's manifest line (0 if it has none). Error records are committed in line order, not arrival order:
    a batch reports its failures in the order its stages found them, and a distributed extraction must commit
    them exactly as one process does."""
    return int(record.get("line") or 0)


def commit_plan(items: list[dict], errors: list[dict], rows_per_item: list[int],
                shard_ends: list[int]) -> tuple[list[dict[str, list[dict]]], list[dict]]:
    """The records each shard's entry commits when ``items`` and ``errors`` (all of them, in order) fill shards
    ending at ``shard_ends``, by the rule of :class:`PendingRecords`; and the error records left for the final table."""
    records = PendingRecords()
    for error in errors:
        records.add("errors", error)
    for item, rows in zip(items, rows_per_item, strict=True):
        records.add("items", item, rows)
    plan = [records.take_through(end) for end in shard_ends]
    return plan, records.take_all()["errors"]


def final_records(parts: list[Location], shard_rows: int, total: int) -> tuple[list[dict], list[dict]]:
    """The records each final shard's manifest entry commits when the finished part stores ``parts`` of a
    distributed extraction are assembled (exactly as one process writing the store would), and the error records
    no entry commits, from the parts' tables."""
    items = [it for part in parts for it in read_jsonl(part / ITEMS_FILE)]
    errors = [e for part in parts for e in read_jsonl(part / ERRORS_FILE)]
    ragged = bool(parts) and read_meta(parts[0]).layout == "ragged"
    rows = [int(it["length"]) if ragged else 1 for it in items]
    ends = [min(total, (s + 1) * shard_rows) for s in range(-(-total // shard_rows))]
    return commit_plan(items, errors, rows, ends)


def record_shard(store: Location, name: str, index: int, rows: tuple[int, int], ndim: int,
                 records: dict[str, list[dict]] | None = None) -> dict:
    """Make a just-written shard durable, hash it and commit it with its manifest entry (one atomic write)."""
    path = shard_file(store, name, index, ndim)
    path.make_durable()
    return write_entry(store, name, index, rows, path.sha256(), path.size(), records)


def write_entry(store: Location, name: str, index: int, rows: tuple[int, int], sha256: str, size: int,
                records: dict[str, list[dict]] | None) -> dict:
    """Write shard ``index``'s manifest entry: its rows, hash and size, and the records it commits."""
    entry = {"array": name, "shard": index, "rows": [int(rows[0]), int(rows[1])], "sha256": sha256,
             "bytes": int(size), **(records or {})}
    (store / SHARD_MANIFEST_DIR / name / f"{index}.json").write_text(json.dumps(entry, ensure_ascii=False))
    return entry
