"""Describe stores for ``cli.py stores ls|info``: what a store holds and how it was made."""

from __future__ import annotations

import json
import os

from stores.errors import StoreError
from stores.layout import read_meta
from stores.location import Location


def disk_bytes(path: Location | str | os.PathLike[str]) -> int:
    return sum(size for _, size in Location.of(path).files())


def describe(path: Location | str | os.PathLike[str]) -> dict:
    """Everything ``stores info`` prints, as a dict. Raises :class:`~stores.errors.StoreError` if ``path`` is not a
    feature store."""
    from stores.writer import committed_records

    path = Location.of(path)
    meta = read_meta(path)
    if meta is None:
        raise StoreError(f"{path} is not a feature store")
    records = committed_records(path, ("errors",) if meta.complete else ("items", "errors"), full_hash=False)
    return {
        "path": str(path),
        "modality": meta.modality,
        "layout": meta.layout,
        "complete": meta.complete,
        # an unfinished store: the items its verified-size shards commit so far
        "items": meta.count if meta.complete else len(records["items"]),
        "tokens": meta.total_tokens,
        "dim": meta.dim,
        "tokens_per_item": meta.tokens_per_item,
        "dtype": meta.dtype,
        "disk_bytes": disk_bytes(path),
        "failed_items": len(records["errors"]),
        "key": meta.key,
        "identity": meta.identity,
        "summary": meta.summary,
    }


def find_stores(root: Location | str | os.PathLike[str]) -> list[Location]:
    """Feature stores at or below ``root`` (a store's own sub-arrays are not searched). Each folder is visited once,
    however many symbolic links lead to it, so links that loop end the walk instead of recursing forever."""
    found: list[Location] = []
    seen: set[str] = set()
    pending = [Location.of(root)]
    while pending:
        folder = pending.pop()
        key = folder.url if folder.remote else os.path.realpath(folder.url)
        if key in seen:
            continue
        seen.add(key)
        try:
            meta = read_meta(folder)
        except (OSError, ValueError):  # unreadable, or a link that loops: not a store we can list
            continue
        if meta is not None:
            found.append(folder)
            continue
        try:
            pending.extend(reversed(folder.child_folders()))
        except OSError:
            continue
    return found


def format_info(info: dict) -> str:
    lines = [f"{k:>16}: {v}" for k, v in info.items() if k not in ("identity", "summary")]
    lines.append(f"{'summary':>16}: {json.dumps(info['summary'])}")
    lines.append(f"{'identity':>16}: " + json.dumps(info["identity"], indent=2).replace("\n", "\n" + " " * 18))
    return "\n".join(lines)
