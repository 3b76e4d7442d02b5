"""What every dataset adapter shares: the error type, relative media paths, split manifests, tabular reading.

Adapters write media paths relative to the manifest's folder when possible, so a dataset folder and its manifests
can be moved together (``docs/manifest.md``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from stores import OneEncoderError

from ..manifest import write_manifest

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".au", ".aiff", ".aif"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg"})

PathLike = str | os.PathLike[str]


class DatasetError(OneEncoderError, ValueError):
    """A dataset's files are missing or malformed; the message names the file (and line or row) and the reason."""


def rel_path(target: PathLike, out_dir: PathLike) -> str:
    """``target`` relative to ``out_dir`` (posix separators) or absolute where no relative path exists."""
    target = os.path.abspath(target)
    try:
        return Path(os.path.relpath(target, os.path.abspath(out_dir))).as_posix()
    except ValueError:  # different drives on Windows
        return target


def write_splits(out_dir: PathLike, splits: Mapping[str, Sequence[Mapping[str, Any]]], kind: str | None = None,
                 ) -> list[str]:
    """Write ``OUT/{split}.jsonl`` (or ``OUT/{split}.{kind}.jsonl``) per split, in the mapping's order.

    Records carry absolute media paths under the key ``path``; they are rewritten relative to ``out_dir`` here.
    An empty split is not written. Returns the written paths.
    """
    out = os.fspath(out_dir)
    written = []
    for split, records in splits.items():
        if not records:
            continue
        rows = [{**r, "path": rel_path(r["path"], out)} if r.get("path") else dict(r) for r in records]
        name = f"{split}.{kind}.jsonl" if kind else f"{split}.jsonl"
        written.append(write_manifest(os.path.join(out, name), rows))
    return written


def require_file(path: PathLike, what: str) -> Path:
    """``path`` as a Path, or a :class:`DatasetError` saying which file of the dataset is missing."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: {what} not found")
    return path


def require_dir(path: PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} not found (expected a folder)")
    return path


def load_json(path: PathLike, expected: str | None = None) -> Any:
    """A JSON file, or a :class:`DatasetError` with the file, line and column of the syntax error; a file that is
    not JSON at all (a CSV given for the JSON file) is named as such, with the ``expected`` format when given."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        if expected and exc.pos == len(exc.doc) - len(exc.doc.lstrip()):  # fails at its first character
            raise DatasetError(f"{path}: not a JSON file; expected {expected}") from exc
        raise DatasetError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def read_text_lines(path: PathLike) -> list[str]:
    """Lines of a text file: UTF-8, else Latin-1 (some classic datasets, e.g. TREC, are not UTF-8)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.splitlines()


def read_table(path: PathLike, delimiter: str, required: Sequence[str], quoting: int = csv.QUOTE_MINIMAL,
               ) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a CSV/TSV file with a header, as ``(line number, row)``; checks the header has ``required``.

    A row with more or fewer fields than the header is an error naming its line.
    """
    try:
        handle = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - closed below, generator
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    with handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        try:
            header = next(reader, None)
            if header is None:
                raise DatasetError(f"{path}: empty file (expected a header line)")
            header = [h.strip() for h in header]
            missing = [c for c in required if c not in header]
            if missing:
                raise DatasetError(f"{path}:1: header has no column {', '.join(map(repr, missing))} "
                                   f"(columns: {', '.join(header)})")
            for fields in reader:
                line = reader.line_num
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue
                if len(fields) != len(header):
                    raise DatasetError(f"{path}:{line}: {len(fields)} fields, the header has {len(header)}")
                yield line, dict(zip(header, fields, strict=True))
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}: not valid UTF-8 ({exc.reason})") from exc
        except csv.Error as exc:
            raise DatasetError(f"{path}:{reader.line_num}: malformed row: {exc}") from exc


def check_some_exist(paths: Sequence[str], source: PathLike, folder: PathLike) -> None:
    """Raise when none of the listed media exist: the media folder is surely wrong. Single missing files are left
    to extraction, which records each as a failed item (``stores errors``)."""
    if paths and not any(os.path.exists(p) for p in paths):  # stops at the first that exists
        raise DatasetError(f"{source}: none of the {len(paths)} media files it lists exist under {folder} "
                           f"(first: {paths[0]}); is the media folder right?")


def files_with(root: Path, extensions: frozenset[str]) -> list[Path]:
    """Files under ``root`` (recursively, sorted, hidden ones skipped) whose suffix is in ``extensions``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # in place: sorted, deterministic walk
        found.extend(Path(dirpath, n) for n in sorted(filenames)
                     if not n.startswith(".") and os.path.splitext(n)[1].lower() in extensions)
    return found


def folds_to_splits(records: list[dict[str, Any]], folds: list[int], test_fold: int | None, source: PathLike,
                    ) -> dict[str, list[dict[str, Any]]]:
    """Per-fold manifests ``fold{k}`` or, with ``test_fold``, ``train`` (every other fold) and ``test``."""
    if test_fold is None:
        splits: dict[str, list[dict[str, Any]]] = {f"fold{k}": [] for k in sorted(set(folds))}
        for record, fold in zip(records, folds, strict=True):
            splits[f"fold{fold}"].append(record)
        return splits
    if test_fold not in set(folds):
        raise DatasetError(f"{source}: no fold {test_fold} (folds: {', '.join(map(str, sorted(set(folds))))})")
    return {"train": [r for r, f in zip(records, folds, strict=True) if f != test_fold],
            "test": [r for r, f in zip(records, folds, strict=True) if f == test_fold]}
