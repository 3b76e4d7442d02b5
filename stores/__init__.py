"""Feature stores: the only room that knows Zarr. See docs/store-format.md.

Public API (imported lazily, so ``import stores`` or a light helper such as ``stores.files`` does not import zarr
or torch; the other rooms import these names from ``stores`` only)::

    from stores import FeatureStore, StoreWriter, store_status, identity_key, identity_differences
    from stores import OneEncoderError, StoreError, StoreExistsError, StoreIncompleteError, StoreMismatchError
    from stores import read_meta, StoreMeta, describe, find_stores, verify          # metadata, catalog, integrity
    from stores import DTYPES, STORAGE_DTYPE, as_torch_dtype                         # the one dtype table
    from stores import atomic_write_text, sha256_file, read_jsonl, Location, is_url  # file helpers (no zarr)
    from stores import parts                                                         # distributed extraction
"""

from __future__ import annotations

from stores.lazy import lazy_exports

_EXPORTS = {
    "OneEncoderError": "errors",
    "lazy_exports": "lazy",
    "StoreError": "errors",
    "StoreExistsError": "errors",
    "StoreIncompleteError": "errors",
    "StoreMismatchError": "errors",
    "StoreLockedError": "lock",
    "identity_differences": "identity",
    "identity_key": "identity",
    "DTYPES": "dtypes",
    "STORAGE_DTYPE": "dtypes",
    "as_torch_dtype": "dtypes",
    "atomic_write_text": "files",
    "read_jsonl": "files",
    "sha256_file": "files",
    "Location": "location",
    "fsync_path": "location",
    "is_url": "location",
    "ERRORS_FILE": "layout",
    "ITEMS_FILE": "layout",
    "StoreMeta": "layout",
    "read_meta": "layout",
    "token_array_name": "layout",
    "commit_plan": "commit",
    "describe": "catalog",
    "find_stores": "catalog",
    "format_info": "catalog",
    "shard_entries": "integrity",
    "verify": "integrity",
    "DEFAULT_RAM_BUDGET_GB": "reader",
    "FeatureStore": "reader",
    "StoreWriter": "writer",
    "open_group": "writer",
    "rewrite_shard": "writer",
    "store_status": "writer",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
