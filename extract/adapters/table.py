"""Any media + caption table: a CSV/TSV file or a Parquet file with a column of image, audio or video paths and,
optionally, a caption column (the layout clip-retrieval and img2dataset read with ``--csv_img_key``).

The row reader is shared with ``extract --inputs`` (:mod:`extract.sources`), which reads the same tables, and Hugging
Face ``save_to_disk`` folders, without a manifest step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .common import DatasetError, PathLike, check_some_exist, read_table, require_file, write_splits

MEDIA_KINDS = {"image": "images", "audio": "audio", "video": "videos"}
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")


def read_rows(path: PathLike, columns: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for every row of a CSV, TSV or Parquet file, checking it has ``columns``.

    ``where`` is ``file:line`` (CSV, TSV) or ``file row N`` (Parquet, from 0). Parquet values come as pyarrow
    gives them (str, int, bytes, or a dict for a struct such as Hugging Face's ``{"bytes", "path"}`` image).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        for line, row in read_table(path, "\t" if suffix == ".tsv" else ",", columns):
            yield f"{path}:{line}", row
    elif suffix == ".parquet":
        yield from _parquet_rows(path, columns)
    else:
        raise DatasetError(f"{path}: expected a table file ({', '.join(TABLE_SUFFIXES)})")


def _parquet_rows(path: Path, columns: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: not a Parquet file ({exc})") from None
    names = table.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise DatasetError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(names)})")
    row = 0
    for batch in table.iter_batches(columns=list(dict.fromkeys(columns)), batch_size=1024):
        for values in batch.to_pylist():
            yield f"{path} row {row}", values
            row += 1


def media_value(value: Any, where: str, column: str) -> tuple[str | None, bytes | None]:
    """A media cell as ``(path, bytes)``: a path string, raw bytes, or a ``{"bytes", "path"}`` struct (Hugging Face
    Image/Audio/Video features keep the file's bytes and its original name there)."""
    if isinstance(value, str) and value.strip():
        return value.strip(), None
    if isinstance(value, (bytes, bytearray)) and value:
        return None, bytes(value)
    if isinstance(value, dict):
        data, name = value.get("bytes"), value.get("path")
        if isinstance(data, (bytes, bytearray)) and data:
            return (name if isinstance(name, str) and name else None), bytes(data)
        if isinstance(name, str) and name.strip():
            return name.strip(), None
    raise DatasetError(f"{where}: column {column!r} holds no media path or bytes (got {type(value).__name__})")


def cell_id(value: Any, where: str, column: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise DatasetError(f"{where}: column {column!r} must hold a non-empty string or integer id, got {value!r}")
    return str(value).strip()


def table_to_manifests(table: PathLike, out_dir: PathLike, *, modality: str = "image", path_column: str,
                       text_column: str | None = None, id_column: str | None = None,
                       label_column: str | None = None, media_root: PathLike | None = None,
                       split: str | None = None) -> list[str]:
    """A CSV/TSV/Parquet table -> ``{split}.{images|audio|videos}.jsonl`` and, with ``text_column``,
    ``{split}.captions.jsonl``.

    Media item id = the ``id_column`` value, else the path as written in the table; rows repeating a media item
    (several captions per image) list it once, and a repeated id with another path is an error. Relative paths
    resolve against ``media_root`` (default: the table's folder). Caption ids are ``{media id}_{k}`` (k-th caption
    of that item), ``ref`` = the media item. ``label_column`` labels the media items. ``split`` defaults to the
    table's file name without extension. Cells must hold paths (a column of embedded bytes is read by
    ``extract --inputs`` instead).
    """
    if modality not in MEDIA_KINDS:
        raise DatasetError(f"modality must be one of {', '.join(MEDIA_KINDS)}, not {modality!r}")
    source = require_file(table, "table")
    root = Path(media_root) if media_root is not None else source.parent
    split = split or source.stem
    columns = [c for c in (path_column, text_column, id_column, label_column) if c]
    media: dict[str, dict[str, Any]] = {}
    media_where: dict[str, str] = {}
    captions: list[dict[str, Any]] = []
    per_item: dict[str, int] = {}
    for where, row in read_rows(source, columns):
        path, data = media_value(row[path_column], where, path_column)
        if path is None or data is not None:
            raise DatasetError(f"{where}: column {path_column!r} holds file bytes, not a path; extract them with "
                               "`extract --inputs TABLE` (no manifest step) instead")
        item_id = cell_id(row[id_column], where, id_column) if id_column else Path(path).as_posix()
        full = os.path.abspath(root / path)
        if item_id in media:
            if media[item_id]["path"] != full:
                raise DatasetError(f"{where}: id {item_id} names {path}, but {media_where[item_id]} names another file")
        else:
            record: dict[str, Any] = {"id": item_id, "path": full}
            if label_column and row[label_column] not in (None, ""):
                record["label"] = row[label_column] if isinstance(row[label_column], int) else str(row[label_column])
            media[item_id], media_where[item_id] = record, where
        if text_column:
            text = row[text_column]
            if not isinstance(text, str) or not text.strip():
                raise DatasetError(f"{where}: empty caption in column {text_column!r}")
            k = per_item[item_id] = per_item.get(item_id, -1) + 1
            captions.append({"id": f"{item_id}_{k}", "text": text.strip(), "ref": item_id})
    if not media:
        raise DatasetError(f"{source}: no rows")
    check_some_exist([r["path"] for r in media.values()], source, root)
    written = write_splits(out_dir, {split: list(media.values())}, MEDIA_KINDS[modality])
    if text_column:
        written += write_splits(out_dir, {split: captions}, "captions")
    return written
