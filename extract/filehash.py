"""sha256 of files with a small persistent cache, so the no-op check of a re-run does not re-read weights.

The cache is a JSON file, ``$ONEENCODER_CACHE_DIR/file-hashes.json`` (default ``~/.cache/oneencoder``), keyed by
absolute path and validated by size and ``mtime_ns``: a file that changed in any way that touches either is
hashed again. Writes are atomic (temp file + rename) and merge with what is on disk, so concurrent runs at worst
hash a file twice.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from stores import sha256_file

__all__ = ["cache_dir", "file_sha256", "files_sha256"]

_CACHE_NAME = "file-hashes.json"


def cache_dir() -> Path:
    """Folder for small caches: ``$ONEENCODER_CACHE_DIR`` or ``~/.cache/oneencoder``."""
    env = os.environ.get("ONEENCODER_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "oneencoder"


def _load(cache_file: Path) -> dict[str, dict]:
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # a missing or corrupt cache only costs a re-hash


def _save(cache_file: Path, new: dict[str, dict]) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        merged = _load(cache_file)
        merged.update(new)
        fd, tmp = tempfile.mkstemp(prefix=".file-hashes-", suffix=".tmp", dir=cache_file.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(merged, f, indent=0, sort_keys=True)
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only home must not break extraction; hashing just is not cached


def files_sha256(paths: list[str | os.PathLike[str]]) -> dict[str, str]:
    """sha256 for each path (keys as given, stringified), reusing cached hashes where size and mtime match."""
    cache_file = cache_dir() / _CACHE_NAME
    cache = _load(cache_file)
    out: dict[str, str] = {}
    new: dict[str, dict] = {}
    for p in paths:
        key = os.path.abspath(os.path.realpath(p))  # hub snapshots are symlinks to blobs: cache the blob
        st = os.stat(key)
        hit = cache.get(key)
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            out[os.fspath(p)] = hit["sha256"]
            continue
        digest = sha256_file(key)
        out[os.fspath(p)] = digest
        new[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    if new:
        _save(cache_file, new)
    return out


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Cached sha256 of one file."""
    return files_sha256([path])[os.fspath(path)]
