"""``stores verify --repair``: re-extract exactly the shards that verify found missing, truncated or altered.

The items covering a bad shard are re-extracted in exactly their original batches (the store records the manifest
and batch size), through the normal ``run_extraction`` path into a scratch store, and the shard is rewritten from
those rows. The rewritten file must hash to the sha256 recorded when the shard was first written, which proves the
repair restored the original bytes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from extract.manifest import manifest_sha256, read_manifest, write_manifest
from extract.run import ExtractionError, run_extraction, settings_from_identity


def repair_store(store: str | os.PathLike[str], *, trust_plugins: bool = False) -> list[str]:
    """Repair every bad shard of ``store``; returns what was fixed, one line per shard. A plugin encoder recorded
    in the store runs only with ``trust_plugins`` (the store may come from someone else).

    Nothing is removed before its replacement is verified: a shard whose re-extraction matches neither its recorded
    hash nor the object in the store is left as it is, and the other shards are still repaired before the error."""
    from extract.encoders import check_recorded_spec
    from stores import (
        ERRORS_FILE,
        ITEMS_FILE,
        FeatureStore,
        Location,
        StoreError,
        as_torch_dtype,
        commit_plan,
        open_group,
        read_jsonl,
        read_meta,
        rewrite_shard,
        shard_entries,
        token_array_name,
        verify,
    )

    store = Location.of(store)
    meta = read_meta(store)
    problems = verify(store)
    if meta is None or not problems:
        return []
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
    # Rows each item takes along axis 0 of the token array: its tokens in a ragged store, one row otherwise.
    rows_per_item = [int(it["length"]) if meta.layout == "ragged" else 1 for it in items]
    starts = np.concatenate([[0], np.cumsum(rows_per_item)]).astype(np.int64)
    token_starts = np.concatenate([[0], np.cumsum([int(it["length"]) for it in items])]).astype(np.int64)
    entries = shard_entries(store, name)
    manifest_items = read_manifest(manifest)
    index_of_line = {item.line: i for i, item in enumerate(manifest_items)}
    repaired: list[str] = []
    refused: list[str] = []
    for problem in problems:
        if problem.array == "offsets" and problem.rows is not None:  # derived from the item table
            lo, hi = problem.rows
            fixed = rewrite_shard(store, "offsets", problem.shard, token_starts[lo:hi])
            repaired.append(_what(f"offsets shard {problem.shard}", fixed))
            continue
        if problem.array != name or problem.rows is None:
            raise ExtractionError(f"cannot repair {problem}")
        lo, hi = problem.rows
        first = int(np.searchsorted(starts, lo, side="right")) - 1  # item holding row lo
        last = int(np.searchsorted(starts, hi, side="left"))  # one past the item holding row hi-1
        batches = sorted({index_of_line[int(it["line"])] // batch_size for it in items[first:last]})
        subset = [manifest_items[i] for b in batches for i in range(b * batch_size,
                                                                      min(len(manifest_items), (b + 1) * batch_size))]
        with tempfile.TemporaryDirectory(prefix="repair-") as tmp:
            sub_manifest = Path(tmp) / "items.jsonl"
            write_manifest(sub_manifest, [_manifest_record(item, manifest) for item in subset])
            run_extraction(sub_manifest, meta.modality, spec, Path(tmp) / "store", batch_size=batch_size,
                           progress=False, **settings_from_identity(meta.identity))
            scratch = FeatureStore.open(Path(tmp) / "store")
            ids = [it["id"] for it in items[first:last]]
            missing = sorted(set(ids) - set(scratch.ids))
            if missing:
                refused.append(f"items {missing[:5]} of {name} shard {problem.shard} no longer extract (source "
                               "media gone or changed)")
                continue
            # Read back in the stored dtype: exact, so the rows are the re-extracted bytes.
            tokens, mask = scratch.get_batch([scratch.index_of(i) for i in ids], dtype=as_torch_dtype(meta.dtype))
        rows = tokens[:, 0] if meta.layout == "pooled" else tokens if meta.layout == "fixed" else tokens[mask]
        data = rows[lo - int(starts[first]) : hi - int(starts[first])]
        recorded = entries.get(problem.shard)
        records = None
        if recorded is None:  # a lost entry: the records it committed follow from the tables, as they did
            total, shard_rows = int(starts[-1]), open_group(store)[name].shards[0]
            ends = [min(total, (s + 1) * shard_rows) for s in range(-(-total // shard_rows))]
            records = commit_plan(items, read_jsonl(store / ERRORS_FILE), rows_per_item, ends)[0][problem.shard]
        try:
            fixed = rewrite_shard(store, name, problem.shard, data, recorded["sha256"] if recorded else None,
                                  records=records)
        except StoreError as error:
            refused.append(str(error))
            continue
        repaired.append(_what(f"{name} shard {problem.shard}", fixed))
    if refused:
        done = f"repaired {', '.join(repaired)}; " if repaired else ""
        raise ExtractionError(f"{store}: {done}could not repair: {'; '.join(refused)}")
    return repaired


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
