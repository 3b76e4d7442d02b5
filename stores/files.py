"""File helpers every room uses: atomic text writes, sha256 of a file, JSON-lines reads that stop at a torn line.

No zarr here: computing an encoder's identity (sha256 of its files) or writing a run's JSON must not import the
store format.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from stores.location import LocalLocation, Location

__all__ = ["atomic_write_text", "read_jsonl", "sha256_file"]


def atomic_write_text(path: Path | Location, text: str) -> None:
    """Write ``text`` so that readers see either the old file or the whole new one, even after a crash."""
    (path if isinstance(path, Location) else LocalLocation(path)).write_text(text)


def sha256_file(path: Path) -> str:
    return LocalLocation(path).sha256()


def read_jsonl(path: Location | str | os.PathLike[str]) -> list[dict]:
    """Complete JSON lines only: a line torn by a killed writer ends the list."""
    out = []
    for line in (Location.of(path).read_text_or_none() or "").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out
