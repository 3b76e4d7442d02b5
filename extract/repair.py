"""``stores verify --repair``: re-extract exactly the shards that verify found missing, truncated or altered.

The items covering a bad shard are re-extracted in exactly their original batches (the store records the manifest
and batch size), through the normal extraction flow (:func:`extract.run.run_spec`) into a scratch store, and the
shard is rewritten from those rows. The rewritten file must hash to the sha256 recorded when the shard was first written, which proves the
repair restored the original bytes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.manifest import Item, manifest_sha256, read_manifest, write_manifest
from extract.run import ExtractionError, ExtractionSpec, run_spec


@dataclass
class _StoreRows:
    """Where each item of a finished store lies along its arrays, and what its manifest recorded."""

    manifest: str
    batch_size: int
    spec: str
    name: str  # the token array
    items: list[dict[str, Any]]  # the store's item table
    rows_per_item: list[int]  # rows along axis 0 of the token array: tokens in a ragged store, one row otherwise
    starts: np.ndarray  # first row of each item (and the total)
    token_starts: np.ndarray  # first token of each item (the offsets array)
    entries: dict[int, dict]  # the shards' manifest entries
    manifest_items: list[Item]


def repair_store(store: str | os.PathLike[str], *, trust_plugins: bool = False) -> list[str]:
    """Repair every bad shard of ``store``; returns what was fixed, one line per shard. A plugin encoder recorded
    in the store runs only with ``trust_plugins`` (the store may come from someone else).

    Nothing is removed before its replacement is verified: a shard whose re-extraction matches neither its recorded
    hash nor the object in the store is left as it is, and the other shards are still repaired before the error."""
    from stores import Location, read_meta, rewrite_shard, verify

    store = Location.of(store)
    meta = read_meta(store)
    problems = verify(store)
    if meta is None or not problems:
        return []
    rows = _store_rows(store, meta, trust_plugins)
    repaired: list[str] = []
    refused: list[str] = []
    for problem in problems:
        if problem.array == "offsets" and problem.rows is not None:  # derived from the item table
            lo, hi = problem.rows
            fixed = rewrite_shard(store, "offsets", problem.shard, rows.token_starts[lo:hi])
            repaired.append(_what(f"offsets shard {problem.shard}", fixed))
            continue
        if problem.array != rows.name or problem.rows is None:
            raise ExtractionError(f"cannot repair {problem}")
        fixed, reason = _repair_token_shard(store, meta, problem, rows)
        if reason is not None:
            refused.append(reason)
        else:
            repaired.append(_what(f"{rows.name} shard {problem.shard}", fixed))
    if refused:
        done = f"repaired {', '.join(repaired)}; " if repaired else ""
        raise ExtractionError(f"{store}: {done}could not repair: {'; '.join(refused)}")
    return repaired


def _store_rows(store: Any, meta: Any, trust_plugins: bool) -> _StoreRows:
    """The store's tables and source, once it is known to be repairable (complete, its manifest unchanged)."""
    from extract.encoders import check_recorded_spec
    from stores import ITEMS_FILE, read_jsonl, shard_entries, token_array_name

    if not meta.complete:
        raise ExtractionError(f"{store} is incomplete: run the same extract command again to resume it (resuming "
                              "re-checks every shard and redoes the bad ones)")
    summary = meta.summary or {}
    manifest, batch_size, spec = summary.get("manifest"), summary.get("batch_size"), summary.get("encoder_spec")
    if not (manifest and batch_size and spec):
        raise ExtractionError(f"{store} does not record its manifest, batch size and encoder; it cannot be repaired")
    check_recorded_spec(spec, f"store {store}", trust_plugins=trust_plugins)
    if not Path(manifest).is_file() or manifest_sha256(manifest) != meta.identity.get("manifest_sha256"):
        raise ExtractionError(f"the source manifest {manifest} is gone or changed since {store} was made")
    name = token_array_name(meta.layout)
    items = read_jsonl(store / ITEMS_FILE)
    rows_per_item = [int(it["length"]) if meta.layout == "ragged" else 1 for it in items]
    starts = np.concatenate([[0], np.cumsum(rows_per_item)]).astype(np.int64)
    token_starts = np.concatenate([[0], np.cumsum([int(it["length"]) for it in items])]).astype(np.int64)
    return _StoreRows(manifest, batch_size, spec, name, items, rows_per_item, starts, token_starts,
                      shard_entries(store, name), read_manifest(manifest))


def _repair_token_shard(store: Any, meta: Any, problem: Any, rows: _StoreRows) -> tuple[str | None, str | None]:
    """Re-extract the items of one bad token shard and rewrite it: (what was fixed, None) or (None, why not)."""
    from stores import ERRORS_FILE, StoreError, commit_plan, open_group, read_jsonl, rewrite_shard

    lo, hi = problem.rows
    first = int(np.searchsorted(rows.starts, lo, side="right")) - 1  # item holding row lo
    last = int(np.searchsorted(rows.starts, hi, side="left"))  # one past the item holding row hi-1
    ids = [it["id"] for it in rows.items[first:last]]
    extracted, missing = _reextract(meta, rows, first, last, ids)
    if extracted is None:
        return None, (f"items {missing} of {rows.name} shard {problem.shard} no longer extract (source media gone "
                      "or changed)")
    tokens, mask = extracted
    data = tokens[:, 0] if meta.layout == "pooled" else tokens if meta.layout == "fixed" else tokens[mask]
    data = data[lo - int(rows.starts[first]) : hi - int(rows.starts[first])]
    recorded = rows.entries.get(problem.shard)
    records = None
    if recorded is None:  # a lost entry: the records it committed follow from the tables, as they did
        total, shard_rows = int(rows.starts[-1]), open_group(store)[rows.name].shards[0]
        ends = [min(total, (s + 1) * shard_rows) for s in range(-(-total // shard_rows))]
        records = commit_plan(rows.items, read_jsonl(store / ERRORS_FILE), rows.rows_per_item, ends)[0][problem.shard]
    try:
        return rewrite_shard(store, rows.name, problem.shard, data, recorded["sha256"] if recorded else None,
                             records=records), None
    except StoreError as error:
        return None, str(error)


def _reextract(meta: Any, rows: _StoreRows, first: int, last: int, ids: list[str]
               ) -> tuple[tuple[Any, Any] | None, list[str]]:
    """(tokens and mask of items ``first:last`` re-extracted in exactly their original batches, in the stored
    dtype: exact, so the rows are the re-extracted bytes; the first few ids that no longer extract). The tokens
    are None when an id is missing."""
    from stores import FeatureStore, as_torch_dtype

    index_of_line = {item.line: i for i, item in enumerate(rows.manifest_items)}
    size, everything = rows.batch_size, rows.manifest_items
    batches = sorted({index_of_line[int(it["line"])] // size for it in rows.items[first:last]})
    subset = [everything[i] for b in batches for i in range(b * size, min(len(everything), (b + 1) * size))]
    with tempfile.TemporaryDirectory(prefix="repair-") as tmp:
        sub_manifest = Path(tmp) / "items.jsonl"
        write_manifest(sub_manifest, [_manifest_record(item, rows.manifest) for item in subset])
        run_spec(ExtractionSpec.like_store(meta.identity, sub_manifest, meta.modality, rows.spec,
                                           Path(tmp) / "store", batch_size=size, progress=False))
        scratch = FeatureStore.open(Path(tmp) / "store")
        missing = sorted(set(ids) - set(scratch.ids))
        if missing:
            return None, missing[:5]
        return scratch.get_batch([scratch.index_of(i) for i in ids], dtype=as_torch_dtype(meta.dtype)), []


def _what(shard: str, fixed: str) -> str:
    return f"{shard}: its manifest entry (the stored bytes were right)" if fixed == "entry" else f"{shard}: rewritten"


def _manifest_record(item, manifest: str) -> dict:
    """The item as a manifest record with an absolute path (the scratch manifest lives elsewhere)."""
    record = {"id": item.id, "label": item.label, "ref": item.ref}
    if item.text is not None:
        record["text"] = item.text
    if item.path is not None:
        record["path"] = str((Path(manifest).parent / item.path).resolve())
    return {k: v for k, v in record.items() if v is not None}
