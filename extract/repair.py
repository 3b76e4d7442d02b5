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
from extract.run import _TORCH_DTYPES, ExtractionError, run_extraction, settings_from_identity


def repair_store(store: str | os.PathLike[str], *, trust_plugins: bool = False) -> list[int]:
    """Repair every bad shard of ``store``; returns the shard indices rewritten. A plugin encoder recorded in the
    store runs only with ``trust_plugins`` (the store may come from someone else)."""
    from extract.encoders import check_recorded_spec
    from stores import FeatureStore
    from stores.integrity import shard_entries, verify
    from stores.layout import read_meta, token_array_name
    from stores.location import Location
    from stores.writer import committed_records, rewrite_shard

    store = Location.of(store)
    meta = read_meta(store)
    problems = verify(store)
    if meta is None or not problems:
        return []
    summary = meta.summary or {}
    manifest, batch_size, spec = summary.get("manifest"), summary.get("batch_size"), summary.get("encoder_spec")
    if not (manifest and batch_size and spec):
        raise ExtractionError(f"{store} does not record its manifest, batch size and encoder; it cannot be repaired")
    check_recorded_spec(spec, f"store {store}", trust_plugins=trust_plugins)
    if not Path(manifest).is_file() or manifest_sha256(manifest) != meta.identity.get("manifest_sha256"):
        raise ExtractionError(f"the source manifest {manifest} is gone or changed since {store} was made")
    name = token_array_name(meta.layout)
    items = committed_records(store)["items"]
    lengths = np.array([int(it["length"]) for it in items])
    starts = np.concatenate([[0], np.cumsum(lengths)])
    manifest_items = read_manifest(manifest)
    index_of_line = {item.line: i for i, item in enumerate(manifest_items)}
    repaired = []
    for problem in problems:
        if problem.array == "offsets":  # derived from the item table: rewrite it from there
            lo, hi = problem.rows or (0, len(starts))
            rewrite_shard(store, "offsets", problem.shard, starts[lo:hi].astype(np.int64))
            repaired.append(problem.shard)
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
                raise ExtractionError(f"items {missing[:5]} of shard {problem.shard} no longer extract (source media "
                                      "gone or changed)")
            # Read back in the stored dtype: exact, so the rows are the re-extracted bytes.
            tokens, mask = scratch.get_batch([scratch.index_of(i) for i in ids], dtype=_TORCH_DTYPES[meta.dtype])
        rows = tokens[:, 0] if meta.layout == "pooled" else tokens if meta.layout == "fixed" else tokens[mask]
        data = rows[lo - int(starts[first]) : hi - int(starts[first])]
        recorded = shard_entries(store, name).get(problem.shard)
        rewrite_shard(store, name, problem.shard, data, recorded["sha256"] if recorded else None)
        repaired.append(problem.shard)
    return repaired


def _manifest_record(item, manifest: str) -> dict:
    """The item as a manifest record with an absolute path (the scratch manifest lives elsewhere)."""
    record = {"id": item.id, "label": item.label, "ref": item.ref}
    if item.text is not None:
        record["text"] = item.text
    if item.path is not None:
        record["path"] = str((Path(manifest).parent / item.path).resolve())
    return {k: v for k, v in record.items() if v is not None}
