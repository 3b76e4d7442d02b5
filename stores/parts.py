"""Distributed extraction, store side: part stores in a staging area, assembled into the final store's shards.

Under torchrun the manifest's batches are grouped into *parts* (runs of whole batches); part ``i`` is extracted by
rank ``i mod world`` into its own small feature store ``STORE/_parts/<i>`` through the ordinary
:class:`~stores.writer.StoreWriter`. Once every part is finished, the row counts of the parts fix where each row
of the final store lies (for a ragged store this is the only way to know: token counts come out of the encoder),
and each rank writes the final shards it owns (shard ``s`` by rank ``s mod world``, never two ranks one shard),
reading their rows from the parts. Rank 0 holds the store's writer lock throughout and alone writes the item and
error tables, the offsets and the metadata. See docs/store-format.md, "Distributed extraction".
"""

from __future__ import annotations

import os

import numpy as np
import zarr

from stores.commit import final_records, record_shard
from stores.errors import StoreError
from stores.integrity import check_shard, shard_entries
from stores.layout import WRITE_CONFIG, read_meta, shard_file, token_array_name
from stores.location import Location
from stores.writer import open_group

PARTS_DIR = "_parts"
Where = Location | str | os.PathLike[str]


def part_path(store: Where, index: int) -> Location:
    """Where part ``index`` of a distributed extraction is staged."""
    return Location.of(store) / PARTS_DIR / f"{index:06d}"


def part_rows(part: Location) -> int:
    """Rows a finished part holds along axis 0 of its token array (tokens for ragged, items otherwise)."""
    meta = read_meta(part)
    if meta is None or not meta.complete:
        raise StoreError(f"part {part} is not a finished feature store")
    return meta.total_tokens if meta.layout == "ragged" else meta.count


def _writable(store: Location, name: str) -> zarr.Array:
    # write_empty_chunks is a runtime setting, not stored: without it an all-zero inner chunk would be left out
    # and the shard's bytes would differ from a single-process run's.
    return open_group(store, mode="r+")[name].with_config(WRITE_CONFIG)


def size_final(store: Where, parts: list[Location]) -> int:
    """Resize the final token array to hold every part's rows (rank 0, before any rank writes a shard)."""
    store = Location.of(store)
    meta = read_meta(store)
    if meta is None:
        raise StoreError(f"{store} is not a feature store")
    total = int(sum(part_rows(p) for p in parts))
    array = _writable(store, token_array_name(meta.layout))
    array.resize((total, *array.shape[1:]))
    return total


def write_owned_shards(store: Where, parts: list[Location], rank: int, world: int) -> list[int]:
    """Write every final shard ``s`` with ``s % world == rank`` from the parts' rows; return their indices.

    A shard whose file already matches a manifest entry for the same rows (written before a crash) is kept. Each
    written shard is fsynced, hashed and recorded exactly as :class:`~stores.writer.StoreWriter` records its own.
    """
    store = Location.of(store)
    meta = read_meta(store)
    if meta is None:
        raise StoreError(f"{store} is not a feature store")
    name = token_array_name(meta.layout)
    array = _writable(store, name)
    shard_rows, total = array.shards[0], array.shape[0]
    ends = np.cumsum([part_rows(p) for p in parts])
    starts = ends - np.asarray([part_rows(p) for p in parts])
    if total != (int(ends[-1]) if len(ends) else 0):
        raise StoreError(f"{store}: the parts hold {int(ends[-1]) if len(ends) else 0} rows, the array {total}")
    sources: dict[int, zarr.Array] = {}
    plan, _ = final_records(parts, shard_rows, total)
    entries = shard_entries(store, name)
    written = []
    for index in range(rank, -(-total // shard_rows), world):
        start, end = index * shard_rows, min(total, (index + 1) * shard_rows)
        entry = entries.get(index)
        if entry and entry["rows"] == [start, end] and check_shard(store, name, entry, array.ndim) is None:
            continue  # finished before an interruption: same rows, verified bytes
        pieces = []
        for i in np.nonzero((starts < end) & (ends > start))[0].tolist():
            if i not in sources:
                sources[i] = open_group(parts[i])[name]
            lo, hi = max(start, int(starts[i])) - int(starts[i]), min(end, int(ends[i])) - int(starts[i])
            pieces.append(sources[i][lo:hi])
        data = np.ascontiguousarray(np.concatenate(pieces))
        shard_file(store, name, index, array.ndim).remove()  # never a read-modify-write of a torn shard
        array[start:end] = data
        record_shard(store, name, index, (start, end), array.ndim, plan[index])
        written.append(index)
    return written


def remove_parts(store: Where) -> None:
    """Delete the staging area once the store is complete."""
    (Location.of(store) / PARTS_DIR).remove_tree()
