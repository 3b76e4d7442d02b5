"""The on-disk layout of a feature store (see docs/store-format.md); shared by writer, reader and tools."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from stores.dtypes import STORAGE_DTYPE
from stores.location import Location

FORMAT_NAME = "oneencoder-feature-store"
FORMAT_VERSION = 1
ATTRS_KEY = "feature_store"  # group attribute holding everything below

LAYOUTS = ("fixed", "ragged", "pooled")
ITEMS_FILE = "items.jsonl"
ERRORS_FILE = "errors.jsonl"
SHARD_MANIFEST_DIR = "_shards"
STAGING_DIR = "_staging"  # rows and records made durable between shards (docs/store-format.md)


# Every inner chunk is written, all-zero ones included: a shard's bytes then depend only on its rows, so a resumed or
# repaired shard is byte-identical to the original (zarr skips empty chunks by default and does not store the setting,
# so it is given as the array config on every open for writing).
WRITE_CONFIG = {"write_empty_chunks": True}

# Inner chunk sizes (rows): one item for fixed token stores (random reads touch one sample), small runs of tokens
# for ragged stores and of vectors for pooled ones. A random read fetches whole inner chunks: with 256-vector
# chunks a batch of 256 random pooled items read 32x the bytes it needed (docs/benchmarks.md, P1b disk mode).
CHUNK_ROWS = {"fixed": 1, "ragged": 32, "pooled": 32}
# Zarr writes a shard's full index (16 bytes per inner chunk) whatever the shard holds: cap it at 64 KiB.
MAX_CHUNKS_PER_SHARD = 4096


def token_array_name(layout: str) -> str:
    return "pooled" if layout == "pooled" else "tokens"


def shard_file(store: Location | str | os.PathLike[str], array: str, shard_index: int, ndim: int) -> Location:
    """One shard's object under zarr's default '/'-separated chunk keys ('c/<i>/0/0')."""
    location = Location.of(store) / array / "c" / str(shard_index)
    for _ in range(ndim - 1):
        location = location / "0"
    return location


def shard_rows_for(row_bytes: int, shard_mb: float, chunk_rows: int) -> int:
    """Rows per shard: about ``shard_mb`` MiB, a whole number of inner chunks."""
    rows = max(1, int(shard_mb * (1 << 20)) // max(1, row_bytes))
    rows = min(rows, MAX_CHUNKS_PER_SHARD * chunk_rows)
    return max(chunk_rows, rows // chunk_rows * chunk_rows)


@dataclass(frozen=True)
class StoreMeta:
    """What the group attribute ``feature_store`` holds."""

    modality: str
    layout: str
    dim: int
    tokens_per_item: int | None
    dtype: str
    identity: dict
    key: str
    complete: bool = False
    count: int = 0
    total_tokens: int = 0
    summary: dict | None = None

    def to_attrs(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "modality": self.modality,
            "layout": self.layout,
            "dim": self.dim,
            "tokens_per_item": self.tokens_per_item,
            "dtype": self.dtype,
            "storage_dtype": STORAGE_DTYPE[self.dtype],
            "identity": self.identity,
            "key": self.key,
            "complete": self.complete,
            "count": self.count,
            "total_tokens": self.total_tokens,
            "summary": self.summary or {},
        }

    @classmethod
    def from_attrs(cls, attrs: dict) -> StoreMeta:
        return cls(
            modality=attrs["modality"],
            layout=attrs["layout"],
            dim=int(attrs["dim"]),
            tokens_per_item=attrs.get("tokens_per_item"),
            dtype=attrs["dtype"],
            identity=attrs["identity"],
            key=attrs["key"],
            complete=bool(attrs.get("complete", False)),
            count=int(attrs.get("count", 0)),
            total_tokens=int(attrs.get("total_tokens", 0)),
            summary=attrs.get("summary") or {},
        )


def read_meta(store: Location | str | os.PathLike[str]) -> StoreMeta | None:
    """The store's metadata straight from ``zarr.json`` (no zarr import: this is the fast no-op path)."""
    try:
        text = (Location.of(store) / "zarr.json").read_text()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    attrs = json.loads(text).get("attributes", {}).get(ATTRS_KEY)
    if not attrs or attrs.get("format") != FORMAT_NAME:
        return None
    return StoreMeta.from_attrs(attrs)


def is_feature_store(path: Location | str | os.PathLike[str]) -> bool:
    try:
        return read_meta(path) is not None
    except (OSError, ValueError):
        return False

