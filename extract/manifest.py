"""Manifests: JSONL files that list the items of one modality (format in ``docs/manifest.md``).

One JSON object per line::

    {"id": "img-1", "path": "images/1.jpg", "label": "cat"}
    {"id": 7, "text": "a cat on a mat", "ref": "img-1"}

``id`` (string or integer, stored as a string) is required and unique; each item has exactly one of ``path``
(media file; a relative path resolves against the manifest's folder) or ``text``; ``label`` (string or integer)
and ``ref`` (the id of the paired item in another modality) are optional. Blank lines are skipped and unknown
keys are ignored. ``read_manifest`` checks every line before any model is loaded and reports all problems
at once (up to :data:`MAX_REPORTED`), each with the file and line number.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stores import OneEncoderError

__all__ = ["Item", "ManifestError", "MAX_REPORTED", "escape_surrogates", "manifest_sha256", "read_manifest",
           "unicode_problem", "write_manifest"]

MAX_REPORTED = 20


class ManifestError(OneEncoderError, ValueError):
    """A manifest is unreadable or invalid. ``problems`` holds every ``(line, reason)`` found."""

    def __init__(self, path: str | os.PathLike[str], problems: list[tuple[int, str]]) -> None:
        self.path = str(path)
        self.problems = list(problems)
        shown = [f"{self.path}:{line}: {reason}" if line else f"{self.path}: {reason}" for line, reason in problems]
        more = len(shown) - MAX_REPORTED
        head = f"invalid manifest {self.path} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"
        lines = [head, *("  " + s for s in shown[:MAX_REPORTED])]
        if more > 0:
            lines.append(f"  ... and {more} more")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # keep it picklable (DataLoader workers and multiprocessing re-raise errors)
        return (type(self), (self.path, self.problems))


@dataclass(frozen=True)
class Item:
    """One manifest entry. ``path`` is already resolved against the manifest's folder; ``line`` is 1-based.

    ``source_id`` is set only on a part of an item (an audio segment or a video clip, see :meth:`part`): the id
    of the manifest item it came from.
    """

    id: str
    path: str | None
    text: str | None
    label: str | int | None
    ref: str | None
    line: int
    source_id: str | None = None

    def meta(self) -> dict[str, Any]:
        """The per-item metadata a store records: id plus whichever of label/ref/path/text/source_id are set."""
        out: dict[str, Any] = {"id": self.id}
        for key in ("label", "ref", "path", "text", "source_id"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def part(self, kind: str, k: int) -> Item:
        """Part ``k`` of this item stored as its own item: id ``"{id}#{kind}{k}"`` (e.g. ``"a#seg0"``), with the
        same path, label, ref and line, and ``source_id`` = this item's id (pairing via ``ref`` still works)."""
        return replace(self, id=f"{self.id}#{kind}{k}", source_id=self.source_id or self.id)


def _as_id(value: Any) -> str | None:
    """Ids may be strings or integers (bools are not integers here: ``true`` as an id is surely a mistake)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    return None


def unicode_problem(text: str) -> str | None:
    """Why ``text`` cannot be written as UTF-8 (a lone surrogate, which a JSON ``\\udcff`` escape can carry), or
    None when it can."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}"
    return None


def escape_surrogates(text: str | None) -> str | None:
    """``text`` with every lone surrogate written as a ``\\udcff`` escape, so that it can be stored as UTF-8."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _parse_line(obj: Any, base: str) -> tuple[dict[str, Any] | None, list[str]]:
    """Validate one decoded JSON value; return the Item fields (without line) or the reasons it is invalid."""
    if not isinstance(obj, dict):
        return None, [f"expected a JSON object, got {type(obj).__name__}"]
    reasons: list[str] = []
    if "id" not in obj or obj["id"] is None:
        reasons.append("missing 'id'")
        item_id = None
    else:
        item_id = _as_id(obj["id"])
        if item_id is None:
            reasons.append(f"'id' must be a string or an integer, got {type(obj['id']).__name__}")
        elif not item_id.strip():
            reasons.append("empty 'id'")
    has_path = obj.get("path") is not None
    has_text = obj.get("text") is not None
    path = text = None
    if has_path and has_text:
        reasons.append("has both 'path' and 'text' (exactly one is allowed)")
    elif not has_path and not has_text:
        reasons.append("has neither 'path' nor 'text'")
    elif has_path:
        if not isinstance(obj["path"], str) or not obj["path"]:
            reasons.append("'path' must be a non-empty string")
        else:
            # Relative media paths are relative to the manifest, so a dataset folder can be moved as a whole.
            path = os.path.join(base, obj["path"])
    elif not isinstance(obj["text"], str):
        reasons.append(f"'text' must be a string, got {type(obj['text']).__name__}")
    else:
        text = obj["text"]  # empty text is a per-item failure at encode time, not a manifest error
    label = obj.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
        reasons.append(f"'label' must be a string or an integer, got {type(label).__name__}")
    ref = obj.get("ref")
    if ref is not None:
        ref = _as_id(ref)
        if ref is None:
            reasons.append(f"'ref' must be a string or an integer, got {type(obj['ref']).__name__}")
    for key, value in (("id", item_id), ("ref", ref), ("label", label), ("path", obj.get("path"))):
        # JSON may escape a lone surrogate (\\udcff) that no UTF-8 file can hold: the item table could not be written.
        # Text is checked per item at encoding time instead, so one caption does not stop a dataset.
        if isinstance(value, str) and (problem := unicode_problem(value)):
            reasons.append(f"{key!r} is not valid Unicode ({problem})")
    if reasons:
        return None, reasons
    return {"id": item_id, "path": path, "text": text, "label": label, "ref": ref}, []


def read_manifest(path: str | os.PathLike[str]) -> list[Item]:
    """Read and validate a JSONL manifest; raise :class:`ManifestError` listing every problem with its line."""
    path = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ManifestError(path, [(0, f"cannot read: {exc.strerror or exc}")]) from exc
    if data.startswith(b"\xef\xbb\xbf"):  # tolerate a UTF-8 BOM written by some editors
        data = data[3:]
    base = os.path.dirname(os.path.abspath(path))
    items: list[Item] = []
    problems: list[tuple[int, str]] = []
    first_line: dict[str, int] = {}
    # Split on b"\n" only: str.splitlines would also split on U+2028 etc. which JSON strings may contain raw.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            problems.append((lineno, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"))
            continue
        except json.JSONDecodeError as exc:
            problems.append((lineno, f"invalid JSON: {exc.msg} (column {exc.colno})"))
            continue
        fields, reasons = _parse_line(obj, base)
        if fields is None:
            problems.extend((lineno, r) for r in reasons)
            continue
        if fields["id"] in first_line:
            problems.append((lineno, f"duplicate id {fields['id']!r} (first on line {first_line[fields['id']]})"))
            continue
        first_line[fields["id"]] = lineno
        items.append(Item(line=lineno, **fields))
    if not problems and not items:
        problems.append((0, "no items"))
    if problems:
        raise ManifestError(path, problems)
    return items


def _record(record: Item | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(record, Item):
        return record.meta()
    return {k: v for k, v in record.items() if v is not None}


def write_manifest(path: str | os.PathLike[str], records: Iterable[Item | Mapping[str, Any]]) -> str:
    """Write records (dicts or Items) as JSONL, atomically; return the path. Values are written as given."""
    lines = []
    for record in records:
        line = json.dumps(_record(record), ensure_ascii=False)
        if unicode_problem(line):  # a lone surrogate: JSON's escape carries it, UTF-8 cannot
            line = json.dumps(_record(record))
        lines.append(line + "\n")
    # Atomic, so a reader never sees a half-written manifest (its hash is the cache key).
    return write_text_file(path, "".join(lines))


def write_text_file(path: str | os.PathLike[str], text: str) -> str:
    """Write ``text`` (UTF-8) to ``path`` atomically: a temp file beside it renamed into place; return the path."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".write-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def manifest_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 (hex) of the manifest's bytes: any edit, even reordering, makes a different extraction."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
