"""Writing feature stores: whole-shard appends, a manifest entry per shard that commits its rows and item records.

Rows (items for fixed/pooled layouts, tokens for the ragged layout) are buffered in memory and written to zarr only
as whole shards, on a background thread so the encoder never waits on the disk. After a shard is written its object
is made durable and hashed, and a manifest entry ``_shards/<array>/<index>.json`` is written atomically (locally:
temp file, fsync, rename; on an object store: one PUT). The entry also carries the item records (and the error
records before them) that this shard completes, so rows and records are committed together by one atomic write and
an object store never needs an append. ``items.jsonl`` and ``errors.jsonl`` are written whole by
:meth:`StoreWriter.finish`, which alone marks a store ``complete``. Between whole shards, what was appended is made
durable every ``commit_seconds`` as a staging part (``_staging/``), so a killed writer loses minutes, not a shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import zarr

from stores import lock
from stores.commit import PendingRecords, final_records, record_shard, write_entry
from stores.dtypes import STORAGE_DTYPE, as_torch_dtype
from stores.errors import StoreError, StoreExistsError, StoreMismatchError
from stores.files import read_jsonl
from stores.identity import identity_differences, identity_key
from stores.integrity import committed_entries, entry_records, shard_entries
from stores.layout import (
    ATTRS_KEY,
    CHUNK_ROWS,
    ERRORS_FILE,
    ITEMS_FILE,
    LAYOUTS,
    SHARD_MANIFEST_DIR,
    STAGING_DIR,
    WRITE_CONFIG,
    StoreMeta,
    is_feature_store,
    read_meta,
    shard_file,
    shard_rows_for,
    token_array_name,
)
from stores.location import LocalLocation, Location

# zarr's LocalStore writes each object to "<name>.<32 hex>.partial" and renames it into place; ours use ".<name>.tmpPID".
_ZARR_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


def remove_killed_writes(store: Location) -> None:
    """Delete the temporary files of writes that a killed writer left half-done (ours and zarr's own): a resumed
    store must hold exactly what an uninterrupted run would. Object stores have none: an unfinished upload is
    never visible."""
    if store.remote:
        return
    for leftover, _ in list(store.files()):
        if leftover.name.startswith(".") and ".tmp" in leftover.name or _ZARR_PARTIAL.search(leftover.name):
            leftover.remove()


def store_status(path: Location | str | os.PathLike[str], identity: dict, *, overwrite: bool = False) -> str:
    """``"absent"``, ``"complete"`` or ``"incomplete"`` for a store made with ``identity``.

    A store made another way at ``path`` raises :class:`StoreMismatchError`, or gives ``"mismatch"`` when the caller
    means to ``overwrite`` it. A path holding something that is not a feature store raises :class:`StoreError`.
    Reads one small JSON file: fast enough for a no-op check.
    """
    path = Location.of(path)
    if path.is_empty_or_absent():
        return "absent"
    meta = read_meta(path)
    if meta is None:
        raise StoreError(f"{path} exists and is not a feature store; choose another --store path")
    if meta.key != identity_key(identity):
        if overwrite:
            return "mismatch"
        raise StoreMismatchError(path, identity_differences(meta.identity, identity) or ["identity key differs"])
    if meta.complete:
        return "complete"
    lock.check(path)  # unfinished because another process is writing it right now: refuse early, naming it
    return "incomplete"


def _json_safe(value: dict) -> dict:
    """Paths and other objects as strings: store attributes must be plain JSON."""
    return json.loads(json.dumps(value, default=str))


def _jsonl(records: Iterable[dict]) -> Iterable[str]:
    return (json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)


def _drop_shards_from(store: Location, name: str, first: int) -> None:
    """Delete shard objects and manifest entries of shard ``first`` and after (they are redone)."""
    for entry in (store / SHARD_MANIFEST_DIR / name).children():
        stem = entry.name.removesuffix(".json")
        if stem.isdigit() and int(stem) >= first:
            entry.remove()
    for shard_dir in (store / name / "c").children():
        if shard_dir.name.isdigit() and int(shard_dir.name) >= first:
            shard_dir.remove_tree()


def _staged(store: Location, array: zarr.Array, name: str, start: int, remove_rest: bool = False
            ) -> tuple[np.ndarray, list[list], list[tuple[int, int]]]:
    """What the staging parts of an interrupted run hold durably after the stored shards end at row ``start``: the
    rows from ``start`` on, the logged records of every part up to the first gap (in order), and the parts kept as
    ``(number, end row)``. A part is kept only while every row before its end is durable and its object matches
    its entry. ``remove_rest`` deletes every other file of the staging folder (a resume redoes their work)."""
    folder = store / STAGING_DIR / name
    entries: dict[int, dict] = {}
    for child in folder.children():
        stem = child.name.removesuffix(".json")
        if child.name.endswith(".json") and stem.isdigit():
            try:
                entries[int(stem)] = json.loads(child.read_text())
            except ValueError:
                continue  # a torn entry: the part was never committed
    end, pieces, log, kept = start, [], [], []
    for number in sorted(entries):
        entry = entries[number]
        try:
            first, last = (int(r) for r in entry["rows"])
            if first > end:
                break
            data = (folder / f"{number}.npy").read_bytes()
            if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                break
            rows = np.load(io.BytesIO(data), allow_pickle=False)
        except (OSError, KeyError, TypeError, ValueError):
            break
        if rows.shape != (last - first, *array.shape[1:]) or rows.dtype != array.dtype:
            break
        if last > end:
            pieces.append(rows[end - first:])
            end = last
        log.extend(entry.get("records", []))
        kept.append((number, last))
    if remove_rest:
        keep = {f"{n}{suffix}" for n, _ in kept for suffix in (".json", ".npy")}
        for child in folder.children():
            if child.name not in keep:
                child.remove_tree()
    rows = np.concatenate(pieces) if pieces else np.empty((0, *array.shape[1:]), array.dtype)
    return rows, log, kept


def _new_records(log: list[list], entries: list[dict]) -> list[list]:
    """The staged records that no stored shard's entry commits yet, in order."""
    done = {PendingRecords.key(kind, r) for kind in ("items", "errors") for r in entry_records(entries, kind)}
    return [[kind, record, rows] for kind, record, rows in log if PendingRecords.key(kind, record) not in done]


class _ShardAppender:
    """Appends rows to one zarr array along axis 0, writing whole shards only."""

    def __init__(self, store: Location, array: zarr.Array, name: str, shard_rows: int, pool: ThreadPoolExecutor,
                 start_rows: int = 0, skip_rows: int = 0, records: PendingRecords | None = None):
        self.store, self.array, self.name, self.shard_rows = store, array, name, shard_rows
        self.row_shape = tuple(array.shape[1:])
        self._pool = pool
        self._records = records  # committed by this array's manifest entries (the token array's only)
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._queued_rows = start_rows  # rows handed to the writer thread (after a resume: rows already stored)
        self._skip = skip_rows  # re-extracted rows that are already stored, byte-identical: drop them
        self._futures: list[Future] = []
        self.bytes_written = sum(e["bytes"] for e in shard_entries(store, name).values()) if start_rows else 0
        # Staging parts (see StoreWriter): rows below _staged_end are durable, in shards or in the parts listed.
        self._staged_end = start_rows
        self._parts: list[tuple[int, int]] = []  # (part number, end row) of the parts on disk, in order
        self._next_part = 0

    def preload(self, rows: np.ndarray, parts: list[tuple[int, int]]) -> None:
        """Rows kept by staging parts of an interrupted run (they follow the stored shards): pending again."""
        if len(rows):
            self._pending.append(rows)
            self._pending_rows += len(rows)
        self._staged_end = self._queued_rows + self._pending_rows
        self._parts = list(parts)
        self._next_part = max((n for n, _ in parts), default=-1) + 1

    def stage(self, log: list[list]) -> None:
        """Make the rows not yet durable and the records ``log`` durable as one staging part (on the writer thread,
        in order with the shards)."""
        end = self._queued_rows + self._pending_rows
        first = max(self._staged_end, self._queued_rows)
        if first >= end and not log:
            return
        data = np.concatenate(self._pending)[first - self._queued_rows:] if self._pending else \
            np.empty((0, *self.row_shape), self.array.dtype)
        self._staged_end = end
        number, self._next_part = self._next_part, self._next_part + 1
        self._drain(1)
        self._futures.append(self._pool.submit(self._write_part, number, first, np.ascontiguousarray(data), log))

    def _write_part(self, number: int, first: int, data: np.ndarray, log: list[list]) -> None:
        folder = self.store / STAGING_DIR / self.name
        buffer = io.BytesIO()
        np.save(buffer, data, allow_pickle=False)
        rows_object = buffer.getvalue()
        (folder / f"{number}.npy").write_bytes(rows_object)  # durable before the entry that commits it
        entry = {"part": number, "rows": [first, first + len(data)], "sha256": hashlib.sha256(rows_object).hexdigest(),
                 "bytes": len(rows_object), "records": log}
        (folder / f"{number}.json").write_text(json.dumps(entry, ensure_ascii=False))
        self._parts.append((number, first + len(data)))

    def append(self, rows: np.ndarray) -> None:
        if rows.shape[1:] != self.row_shape:
            raise StoreError(f"{self.name}: rows of shape {rows.shape[1:]} do not fit the store's {self.row_shape}")
        if self._skip:
            dropped = min(self._skip, len(rows))
            rows, self._skip = rows[dropped:], self._skip - dropped
        if len(rows) == 0:
            return
        self._pending.append(rows)
        self._pending_rows += len(rows)
        while self._pending_rows >= self.shard_rows:
            self._queue_shard(self._take(self.shard_rows))

    def close(self) -> None:
        """Write the last, partial shard and wait for every write."""
        if self._skip:
            raise StoreError(f"{self.name}: resumed extraction produced fewer rows than were already stored")
        if self._pending_rows:
            self._queue_shard(self._take(self._pending_rows))
        self._drain(0)

    def _take(self, n: int) -> np.ndarray:
        data = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        head, tail = data[:n], data[n:]
        self._pending = [tail] if len(tail) else []
        self._pending_rows = len(tail)
        return np.ascontiguousarray(head)

    def _queue_shard(self, data: np.ndarray) -> None:
        start = self._queued_rows
        self._queued_rows += len(data)
        # At most two shards in flight bounds memory; the single worker keeps writes in order.
        self._drain(1)
        self._futures.append(self._pool.submit(self._write_shard, start, data))

    def _drain(self, keep: int) -> None:
        while len(self._futures) > keep:
            self._futures.pop(0).result()  # re-raises a failed write here, in the caller's thread

    def _write_shard(self, start: int, data: np.ndarray) -> None:
        end = start + len(data)
        self.array.resize((end, *self.row_shape))
        self.array[start:end] = data
        records = self._records.take_through(end) if self._records is not None else None
        entry = record_shard(self.store, self.name, start // self.shard_rows, (start, end), self.array.ndim, records)
        self.bytes_written += entry["bytes"]
        if len(data) == self.shard_rows:  # a whole shard: staging parts it covers are no longer needed
            # (a final partial shard is redone on resume, so the parts covering it stay until finish)
            while self._parts and self._parts[0][1] <= end:
                number = self._parts.pop(0)[0]
                (self.store / STAGING_DIR / self.name / f"{number}.json").remove()
                (self.store / STAGING_DIR / self.name / f"{number}.npy").remove()


def open_group(store: Location, mode: str = "r", **kwargs) -> zarr.Group:
    """The store's zarr group, local or remote."""
    return zarr.open_group(store.zarr_store(read_only=mode == "r"), mode=mode, **kwargs)


def _encoded_shard(store: Location, array_name: str, array: zarr.Array, index: int, data: np.ndarray) -> bytes:
    """The bytes zarr writes for shard ``index`` of ``array`` holding ``data``, encoded in a scratch copy of the
    array (same metadata, no data) so that nothing in the store changes before they are checked."""
    with tempfile.TemporaryDirectory(prefix="shard-") as scratch:
        aside = LocalLocation(Path(scratch))
        (aside / array_name / "zarr.json").write_bytes((store / array_name / "zarr.json").read_bytes())
        copy = zarr.open_array(aside.path / array_name, mode="r+").with_config(WRITE_CONFIG)
        start = index * array.shards[0]
        copy[start : start + len(data)] = data
        return shard_file(aside, array_name, index, array.ndim).read_bytes()


def rewrite_shard(store: Location | str | os.PathLike[str], array_name: str, index: int,
                  data: np.ndarray | torch.Tensor, expected_sha256: str | None = None,
                  records: dict[str, list[dict]] | None = None) -> str:
    """Write one whole shard again (repair) and record its manifest entry; returns what was fixed: ``"shard"``
    (its object was rewritten) or ``"entry"`` (the object was right, its manifest entry was not).

    ``data`` must be exactly the shard's rows. The new object is encoded aside and checked before anything in the
    store changes, then replaces the old one in one atomic write: no bytes are removed before their replacement
    is known good. With ``expected_sha256`` (the hash recorded when the shard was first written) the new bytes
    must hash the same, proving the repair restores the original bytes. When they do not, but they equal the
    object already in the store, the recorded entry is what got corrupted and only the entry is rewritten;
    otherwise :class:`StoreError` is raised and nothing is changed. The item and error records the old entry
    committed are kept (``records`` gives them when the entry itself is lost).
    """
    store = Location.of(store)
    meta = read_meta(store)
    array = open_group(store)[array_name]
    shard_rows = array.shards[0]
    start, end = index * shard_rows, min(array.shape[0], (index + 1) * shard_rows)
    if isinstance(data, torch.Tensor):
        tensor = data.detach().cpu()
        if meta is not None and meta.dtype == "bfloat16" and tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.uint16)
        data = tensor.numpy()
    if data.shape != (end - start, *array.shape[1:]):
        raise StoreError(f"shard {index} of {store}/{array_name} holds rows {start}-{end - 1} of shape "
                         f"{tuple(array.shape[1:])}; got {data.shape}")
    data = np.ascontiguousarray(data, dtype=array.dtype)
    old = shard_entries(store, array_name).get(index, {})
    kept = {kind: old[kind] for kind in ("items", "errors") if kind in old} if old else (records or {})
    new = _encoded_shard(store, array_name, array, index, data)
    digest = hashlib.sha256(new).hexdigest()
    path = shard_file(store, array_name, index, array.ndim)
    fixed = "shard"
    if expected_sha256 is not None and digest != expected_sha256:
        try:
            on_disk = path.sha256()
        except (FileNotFoundError, IsADirectoryError):
            on_disk = None
        if on_disk != digest:
            raise StoreError(f"re-extracted shard {index} of {store}/{array_name} differs from the bytes recorded "
                             "when it was written and from the bytes stored now (source media or encoder "
                             "changed?); nothing was changed")
        fixed = "entry"  # re-extraction reproduces the stored object: the recorded hash is what went wrong
    try:
        if fixed == "shard":
            path.write_bytes(new)
        write_entry(store, array_name, index, (start, end), digest, len(new), kept)
    except OSError as error:  # a read-only or full disk: the old object is still in place
        raise StoreError(f"cannot write shard {index} of {store}/{array_name}: {error.strerror or error}") from None
    return fixed


class StoreWriter:
    """Creates (or reopens) a store and appends batches of encoder outputs. Use :meth:`create` or :meth:`reopen`.

    Holds the store's writer lock from creation to :meth:`finish` / :meth:`abort`, so two processes never write
    one store. Item and error records are committed with the shards (see the module docstring) and written out as
    ``items.jsonl`` / ``errors.jsonl`` by :meth:`finish`.
    """

    def __init__(self, path: Location, group: zarr.Group, meta: StoreMeta, shard_mb: float, *, start_rows: int = 0,
                 skip_rows: int = 0, committed: list[dict] | None = None, skip_records: set[tuple] | None = None,
                 commit_seconds: float | None = None, staged: tuple[np.ndarray, list[list], list] | None = None):
        self.path, self._group, self.meta, self._shard_mb = path, group, meta, shard_mb
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._torch_dtype = as_torch_dtype(meta.dtype)
        committed = committed or []
        self._lengths: list[int] = [int(it["length"]) for it in entry_records(committed, "items")]
        self._n_errors = sum(1 for _ in entry_records(committed, "errors"))
        committed_rows = sum(_item_rows(meta, it) for it in entry_records(committed, "items"))
        self._records = PendingRecords(end_row=int(committed_rows))
        for kind, record, rows in staged[1] if staged else ():  # staged by the interrupted run: waiting again
            self._records.add(kind, record, rows)
            if kind == "items":
                self._lengths.append(int(record["length"]))
            else:
                self._n_errors += 1
        self._records = PendingRecords.continuing(self._records, skip_records)
        self._commit_seconds = commit_seconds
        self._last_commit = time.monotonic()
        if commit_seconds is not None:
            self._records.take_log()  # from now on, accepted records are logged for staging parts
        name = token_array_name(meta.layout)
        if start_rows or name in group:
            array = group[name].with_config(WRITE_CONFIG)  # runtime setting, not stored: give it on every open
            self._tokens = _ShardAppender(path, array, name, array.shards[0], self._pool, start_rows, skip_rows,
                                          self._records)
        else:
            shape = (0, meta.tokens_per_item, meta.dim) if meta.layout == "fixed" else (0, meta.dim)
            row_bytes = int(np.prod(shape[1:])) * np.dtype(STORAGE_DTYPE[meta.dtype]).itemsize
            self._tokens = self._appender(name, shape, STORAGE_DTYPE[meta.dtype], row_bytes, self._records)
        if staged:
            self._tokens.preload(staged[0], staged[2])
        self._started = time.perf_counter()
        self._finished = False

    @classmethod
    def create(
        cls,
        path: Location | str | os.PathLike[str],
        *,
        modality: str,
        layout: str,
        dim: int,
        tokens_per_item: int | None,
        dtype: str,
        identity: dict,
        shard_mb: float = 64,
        overwrite: bool = False,
        extraction: dict | None = None,
        commit_seconds: float | None = None,
    ) -> StoreWriter:
        """Create an empty store at ``path`` (a local path or an fsspec URL). ``overwrite`` replaces an existing
        feature store (never other data).

        ``extraction`` is recorded from the start and kept in the final summary: ``expected_items`` (the manifest's
        length) lets an unfinished store say how much is missing; ``batch_size`` and ``manifest`` let a resume or
        a repair re-run exactly the original batches.

        ``commit_seconds``: make the rows and records added since the last shard durable at least this often, as a
        staging part (``_staging/``), so an interrupted run loses at most about that much work; None: only whole
        shards are durable. The finished store is the same either way."""
        path = Location.of(path)
        if layout not in LAYOUTS:
            raise StoreError(f"layout must be one of {LAYOUTS}, not {layout!r}")
        if dtype not in STORAGE_DTYPE:
            raise StoreError(f"dtype must be one of {sorted(STORAGE_DTYPE)}, not {dtype!r}")
        if layout == "fixed" and not tokens_per_item:
            raise StoreError("a fixed-layout store needs tokens_per_item")
        if not path.is_empty_or_absent():
            if not overwrite:
                raise StoreExistsError(f"{path} already exists; pass overwrite to replace it")
            if not is_feature_store(path):
                raise StoreExistsError(f"{path} holds something that is not a feature store; not deleting it")
            _take_lock(path)  # never delete a store another process is writing
            for child in path.children():  # the lock last: it keeps other writers out until then
                if child.name != lock.LOCK_FILE:
                    child.remove_tree()
        else:
            _take_lock(path)
        identity = _json_safe(identity)
        meta = StoreMeta(
            modality=modality,
            layout=layout,
            dim=int(dim),
            tokens_per_item=int(tokens_per_item) if layout == "fixed" else None,
            dtype=dtype,
            identity=identity,
            key=identity_key(identity),
            summary=_json_safe(extraction or {}),
        )
        try:
            # mode "a", not "w": "w" would wipe the directory, lock file included
            group = open_group(path, mode="a", attributes={ATTRS_KEY: meta.to_attrs()})
            return cls(path, group, meta, shard_mb, commit_seconds=commit_seconds)
        except BaseException:
            lock.release(path)
            raise

    @classmethod
    def reopen(cls, path: Location | str | os.PathLike[str], restart_line: int | None = None,
               shard_mb: float = 64, commit_seconds: float | None = None) -> StoreWriter:
        """Continue an unfinished store (same identity: check with :func:`store_status` first).

        Shards whose objects match their manifest entries are kept, with the records those entries commit; anything
        after them (a shard killed mid-write, a corrupt or truncated one) is removed. Items from manifest line
        ``restart_line`` on will be extracted again and appended: their rows and records that are already stored
        are dropped as they arrive (the extraction is deterministic per batch, so they are byte-identical), and the
        store ends identical to an uninterrupted run. ``restart_line=None`` appends after every committed item.
        The rows and records of staging parts that follow the kept shards count as stored (see :meth:`create`).
        """
        path = Location.of(path)
        if read_meta(path) is None:
            raise StoreError(f"{path} is not a feature store")
        _take_lock(path, "write the store")
        try:
            meta = read_meta(path)  # again under the lock: another writer may have finished it meanwhile
            if meta is None or meta.complete:
                raise StoreError(f"{path} is complete; there is nothing to resume")
            return cls._reopen_locked(path, meta, restart_line, shard_mb, commit_seconds)
        except BaseException:
            lock.release(path)
            raise

    @classmethod
    def _reopen_locked(cls, path: Location, meta: StoreMeta, restart_line: int | None,
                       shard_mb: float, commit_seconds: float | None) -> StoreWriter:
        group = open_group(path, mode="r+")
        name = token_array_name(meta.layout)
        array = group[name]
        shard_rows = array.shards[0]
        rows, shards, entries = committed_entries(path, name, array.ndim)
        if rows % shard_rows:  # a final partial shard from a finish() that did not complete: redo it
            rows, shards, entries = rows - rows % shard_rows, shards - 1, entries[:-1]
        _drop_shards_from(path, name, shards)
        array.resize((rows, *array.shape[1:]))
        _drop_outputs(path, group)
        remove_killed_writes(path)
        staged_rows, log, parts = _staged(path, array, name, rows, remove_rest=True)
        staged = _new_records(log, entries)
        durable = {kind: [*entry_records(entries, kind), *(r for k, r, _ in staged if k == kind)]
                   for kind in ("items", "errors")}
        if restart_line is not None and any("line" not in r for r in durable["items"]):
            raise StoreError(f"{path}: its item records carry no manifest line numbers, so the resume point cannot "
                             "be found; extract it again with --overwrite")
        # Records the re-extraction will produce again, already durable: dropped when they arrive.
        again = set() if restart_line is None else {
            PendingRecords.key(kind, r) for kind in ("items", "errors") for r in durable[kind]
            if int(r.get("line") or 0) >= restart_line}
        rows_before = sum(_item_rows(meta, it) for it in durable["items"]
                          if restart_line is None or int(it["line"]) < restart_line)
        end = rows + len(staged_rows)
        writer = cls(path, group, meta, shard_mb, start_rows=rows, skip_rows=end - rows_before,
                     committed=entries, skip_records=again, commit_seconds=commit_seconds,
                     staged=(staged_rows, staged, parts))
        writer.resumed = {"items": len(writer._lengths), "rows": end, "shards": shards,
                          "rows_to_skip": end - rows_before}
        return writer

    @classmethod
    def reopen_parts(cls, path: Location | str | os.PathLike[str], shard_mb: float = 64) -> StoreWriter:
        """Continue an unfinished *distributed* extraction (``summary.distributed``; see :mod:`stores.parts`).

        Its finished parts and verified final shards stay; the item and error tables and the offsets, written only
        when the parts are assembled, are cleared and will be written again.
        """
        path = Location.of(path)
        _take_lock(path, "write the store")
        try:
            meta = read_meta(path)  # under the lock: another writer may have finished it meanwhile
            if meta is None or meta.complete or "distributed" not in (meta.summary or {}):
                raise StoreError(f"{path} is not an unfinished distributed extraction")
            group = open_group(path, mode="r+")
            _drop_outputs(path, group)
            remove_killed_writes(path)
            return cls(path, group, meta, shard_mb)
        except BaseException:
            lock.release(path)
            raise

    def adopt_parts(self, parts: list[Location]) -> None:
        """Take the item and error records of finished part stores, in order, as this store's own. Their token rows
        must already be in this store's shards (:func:`stores.parts.write_owned_shards` on every rank, whose
        manifest entries commit the records as a single process would); then call :meth:`finish`. The staging plan
        is dropped from the summary, so the metadata reads as a one-process run's."""
        if self.items_written:
            raise StoreError(f"{self.path}: adopt_parts on a writer that already holds items")
        array = open_group(self.path)[self._tokens.name]  # as the ranks resized and filled it, not as first opened
        plan, tail = final_records([Location.of(p) for p in parts], array.shards[0], array.shape[0])
        self._lengths = [int(it["length"]) for records in plan for it in records["items"]]
        self._n_errors = sum(len(records["errors"]) for records in plan) + len(tail)
        for error in tail:  # no entry commits them: they end the error table
            self._records.add("errors", error)
        self._tokens.bytes_written = sum(e["bytes"] for e in shard_entries(self.path, self._tokens.name).values())
        summary = {k: v for k, v in (self.meta.summary or {}).items() if k != "distributed"}
        self.meta = StoreMeta(**{**self.meta.__dict__, "summary": summary})

    @staticmethod
    def progress(path: Location | str | os.PathLike[str]) -> dict:
        """What an unfinished store holds durably, in its shards and staging parts: ``{"last_line": manifest line
        of the last durable item or 0, "items": durable items}``; used to decide where a resumed extraction
        restarts."""
        items = durable_items(path)
        return {"last_line": int(items[-1].get("line", 0)) if items else 0, "items": len(items)}

    def _appender(self, name: str, shape: tuple[int, ...], dtype: str, row_bytes: int,
                  records: PendingRecords | None = None) -> _ShardAppender:
        chunk_rows = CHUNK_ROWS["ragged" if name == "offsets" else self.meta.layout]
        shard_rows = shard_rows_for(row_bytes, self._shard_mb, chunk_rows)
        array = self._group.create_array(
            name,
            shape=shape,
            dtype=dtype,
            shards=(shard_rows, *shape[1:]),
            chunks=(chunk_rows, *shape[1:]),
            compressors=None,  # fp16 activations compress by under 10 % and read slower (storage notes)
            fill_value=0,
            # Every shard must exist on disk, even one that is all zeros: a missing shard reads back as zeros
            # silently, so "absent" has to mean "never written" for verify and resume to be sound.
            config=WRITE_CONFIG,
        )
        return _ShardAppender(self.path, array, name, shard_rows, self._pool, records=records)

    def add_batch(self, metas: list[dict], tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Append one batch. ``tokens``: fixed [B,L,D]; ragged [B,Lmax,D] padded (first ``lengths[b]`` rows kept);
        pooled [B,D]. ``metas``: one dict per item with ``id`` and optional ``label``, ``ref``, ``path``, ``text``."""
        if self._finished:
            raise StoreError(f"{self.path}: add_batch after finish")
        if tokens.shape[0] != len(metas):
            raise StoreError(f"{self.path}: {tokens.shape[0]} token rows for {len(metas)} items")
        if tokens.shape[-1] != self.meta.dim:
            raise StoreError(f"{self.path}: token width {tokens.shape[-1]} but the store holds {self.meta.dim}")
        data = self._to_storage(tokens)
        layout = self.meta.layout
        if layout == "ragged":
            if lengths is None:
                raise StoreError("a ragged store needs the lengths of each item")
            lens = [int(n) for n in lengths.tolist()]
            if min(lens, default=1) < 1 or max(lens, default=0) > data.shape[1]:
                raise StoreError(f"{self.path}: item lengths {lens} do not fit tokens of shape {tuple(tokens.shape)}")
            rows = np.concatenate([data[b, :n] for b, n in enumerate(lens)])
        else:
            if layout == "fixed" and data.shape[1] != self.meta.tokens_per_item:
                raise StoreError(
                    f"{self.path}: {data.shape[1]} tokens per item but the store holds {self.meta.tokens_per_item}"
                )
            lens = [self.meta.tokens_per_item or 1] * len(metas)
            rows = data
        rows_per_item = lens if layout == "ragged" else [1] * len(metas)
        # Records first: the shard that completes an item's rows then always finds its record waiting.
        for meta, n, item_rows in zip(metas, lens, rows_per_item, strict=True):
            record = {k: meta[k] for k in ("id", "label", "ref", "source_id", "line") if meta.get(k) is not None}
            record["length"] = n
            if self._records.add("items", record, item_rows):
                self._lengths.append(n)
        self._tokens.append(rows)
        if self._commit_seconds is not None and time.monotonic() - self._last_commit >= self._commit_seconds:
            self._tokens.stage(self._records.take_log())
            self._last_commit = time.monotonic()

    @property
    def items_written(self) -> int:
        """Items stored so far (after a resume: the kept ones included)."""
        return len(self._lengths)

    def add_errors(self, errors: list[dict]) -> None:
        """Record items left out (id, path or text, line, reason); they are listed by ``stores errors``."""
        for error in errors:
            if self._records.add("errors", _json_safe(error)):
                self._n_errors += 1

    def _to_storage(self, tokens: torch.Tensor) -> np.ndarray:
        cpu = tokens.detach().to("cpu", dtype=self._torch_dtype)
        if self.meta.dtype == "bfloat16":
            cpu = cpu.view(torch.uint16)
        return cpu.contiguous().numpy()

    def finish(self, extra: dict | None = None) -> dict:
        """Write the last shards, offsets and item table, then mark the store complete. Returns the summary."""
        if self._finished:
            raise StoreError(f"{self.path}: finish called twice")
        try:
            return self._finish(extra)
        except BaseException:
            self.abort()  # a finish that fails (a full disk, ...) releases the lock; the store stays incomplete
            raise

    def _finish(self, extra: dict | None) -> dict:
        try:
            self._tokens.close()
            tail = self._records.take_all()  # error records after the last item
            if tail["items"]:
                raise StoreError(f"{self.path}: {len(tail['items'])} item records have no stored rows")
            total_bytes = self._tokens.bytes_written
            if self.meta.layout == "ragged":
                offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
                np.cumsum(self._lengths, out=offsets[1:])
                appender = self._appender("offsets", (0,), "int64", 8)
                appender.append(offsets)
                appender.close()
                total_bytes += appender.bytes_written
        finally:
            self._pool.shutdown(wait=True)
        entries = shard_entries(self.path, self._tokens.name)  # written by this writer and its predecessors
        entries = [entries[i] for i in sorted(entries)]
        n_items = 0
        with (self.path / ITEMS_FILE).atomic_writer() as handle:
            for line in _jsonl(entry_records(entries, "items")):
                handle.write(line)
                n_items += 1
        with (self.path / ERRORS_FILE).atomic_writer() as handle:
            handle.writelines(_jsonl([*entry_records(entries, "errors"), *tail["errors"]]))
        if n_items != len(self._lengths):
            raise StoreError(f"{self.path}: the manifest entries commit {n_items} items, the writer stored "
                             f"{len(self._lengths)}; the store stays incomplete")
        total_tokens = int(sum(self._lengths))
        summary = _json_safe({
            "items": len(self._lengths),
            "failed": self._n_errors,
            "tokens": total_tokens,
            "bytes": int(total_bytes),
            "seconds": round(time.perf_counter() - self._started, 3),
            **(self.meta.summary or {}),
            **(extra or {}),
        })
        self.meta = StoreMeta(
            **{**self.meta.__dict__, "complete": True, "count": len(self._lengths), "total_tokens": total_tokens,
               "summary": summary}
        )
        (self.path / STAGING_DIR).remove_tree()  # every staged row and record is in the shards and tables now
        self._group.attrs.update({ATTRS_KEY: self.meta.to_attrs()})
        (self.path / "zarr.json").make_durable()
        self._finished = True
        lock.release(self.path)
        return summary

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def abort(self) -> None:
        """Stop without marking the store complete (what was written stays for inspection)."""
        if not self._finished:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._finished = True
            lock.release(self.path)


def _take_lock(path: Location, doing: str = "create a store") -> None:
    """The store's writer lock; a place that cannot be written (missing, read-only, no permission) is one clear
    error."""
    try:
        lock.acquire(path)
    except OSError as error:
        raise StoreError(f"cannot {doing} at {path}: {error.strerror or error}") from None


def _item_rows(meta: StoreMeta, item: dict) -> int:
    """Rows an item takes along axis 0 of the token array: its tokens in a ragged store, else one."""
    return int(item["length"]) if meta.layout == "ragged" else 1


def _drop_outputs(path: Location, group: zarr.Group) -> None:
    """Remove what only :meth:`StoreWriter.finish` writes (offsets, item and error tables): it is written again."""
    if "offsets" in group:
        del group["offsets"]
        (path / SHARD_MANIFEST_DIR / "offsets").remove_tree()
    (path / ITEMS_FILE).remove()
    (path / ERRORS_FILE).remove()


def committed_records(path: Location | str | os.PathLike[str], kinds: tuple[str, ...] = ("items",),
                      full_hash: bool = True) -> dict[str, list[dict]]:
    """The item and/or error records (``kinds``) a store holds durably: its tables once complete, otherwise the
    records of the shards that match their manifest entries (never records that ran ahead of a shard that was not
    written). ``full_hash=False`` trusts shards whose size matches (a quick description, not a resume point)."""
    path = Location.of(path)
    meta = read_meta(path)
    if meta is None:
        raise StoreError(f"{path} is not a feature store")
    if meta.complete:
        return {kind: read_jsonl(path / (ITEMS_FILE if kind == "items" else ERRORS_FILE)) for kind in kinds}
    name = token_array_name(meta.layout)
    group = open_group(path)
    if name not in group:
        return {kind: [] for kind in kinds}
    array = group[name]
    rows, _, entries = committed_entries(path, name, array.ndim, full_hash)
    if rows % array.shards[0]:  # a final partial shard of an unfinished finish(): redone on resume
        entries = entries[:-1]
    return {kind: list(entry_records(entries, kind)) for kind in kinds}


def durable_items(path: Location | str | os.PathLike[str]) -> list[dict]:
    """The item records a store holds durably: :func:`committed_records`, and for an unfinished store also those of
    its staging parts that follow the verified shards (their rows are not in the token array yet: a reader never
    sees them, a resumed extraction keeps them)."""
    path = Location.of(path)
    meta = read_meta(path)
    if meta is None or meta.complete:
        return committed_records(path)["items"]
    name = token_array_name(meta.layout)
    group = open_group(path)
    if name not in group:
        return []
    array = group[name]
    rows, _, entries = committed_entries(path, name, array.ndim)
    if rows % array.shards[0]:  # a final partial shard of an unfinished finish(): redone on resume
        entries = entries[:-1]
        rows = entries[-1]["rows"][1] if entries else 0
    _, log, _ = _staged(path, array, name, rows)
    return [*entry_records(entries, "items"),
            *(record for kind, record, _ in _new_records(log, entries) if kind == "items")]
