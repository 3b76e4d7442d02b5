"""Sources without a manifest step (``extract --inputs``): WebDataset tar shards, a Hugging Face ``save_to_disk``
folder, a Parquet file, or a glob / list of media files.

Each source becomes the manifest that lists the same items (its *equivalent manifest*), written once into a folder of
its own, and extraction runs on that manifest unchanged: ids, the cache identity (the manifest's sha256), resume,
``stores errors`` and ``stores repair`` are exactly those of a manifest extraction (``docs/manifest.md``). Media
held inside the source (tar members, bytes in a table) are written beside that manifest, because the decoders read
files; the manifest names them relative to its folder, so its bytes, and the store's key, do not depend on where the
folder is. The folder is named by a digest of the source files (names, sizes, modification times) and the options,
so running the same command again reuses it, and a changed source gets a new one.

WebDataset shards are read with the standard library's streaming ``tarfile`` through ``fsspec`` (local paths and
any fsspec URL): a shard is a plain tar whose members are grouped into samples by key, and that is all extraction
needs. The ``webdataset`` package adds shuffling, decoding and a torch ``IterableDataset`` that do not apply here
(items become a manifest read in order by the extraction's own DataLoader), so it is not a dependency. Hugging Face
``save_to_disk`` folders are Arrow IPC streams listed in ``state.json``: ``pyarrow`` reads them without the heavy
``datasets`` package.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .adapters.common import DatasetError
from .adapters.table import cell_id, media_value, read_rows
from .manifest import write_manifest

__all__ = ["MEDIA_EXTENSIONS", "default_inputs_dir", "inputs_manifest"]

# WebDataset member extensions tried, in order, for each modality when --path-column does not name one.
MEDIA_EXTENSIONS = {
    "image": ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"),
    "audio": ("flac", "wav", "mp3", "ogg", "opus", "m4a"),
    "video": ("mp4", "webm", "mkv", "avi", "mov", "m4v"),
    "text": ("txt", "text", "caption"),
}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MANIFEST_NAME = "manifest.jsonl"


def default_inputs_dir() -> Path:
    """Where equivalent manifests (and media unpacked from shards or tables) go unless ``--inputs-dir`` is given."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "oneencoder-cache" / "inputs"


def inputs_manifest(inputs: Sequence[str], modality: str, *, path_column: str | None = None,
                    text_column: str | None = None, id_column: str | None = None,
                    inputs_dir: str | os.PathLike[str] | None = None) -> str:
    """The equivalent manifest of ``inputs`` for ``modality`` (written on first use, then reused); its path.

    ``inputs``: WebDataset shards (``*.tar``, globs, fsspec URLs), one ``save_to_disk`` folder, one ``.parquet``
    file, or media files (globs such as ``videos/*.mp4``, or ``@list.txt`` naming one file per line). Columns: for
    shards the member extension (``jpg``, ``txt``; by default the first of :data:`MEDIA_EXTENSIONS` present), for
    tables the column names (default: the modality's name, ``image``/``audio``/``video``, or ``text``/``caption``).
    """
    kind, files = _resolve(inputs)
    column = text_column if modality == "text" else path_column
    if column is not None and kind == "files":
        raise DatasetError("--path-column/--text-column choose a column of a table or a member of a shard; "
                           f"the inputs are plain media files ({files[0]}, ...)")
    digest = _digest(kind, files, modality, column, id_column)
    folder = Path(inputs_dir) if inputs_dir is not None else default_inputs_dir()
    folder = folder / digest
    manifest = folder / MANIFEST_NAME
    if manifest.is_file():  # written last, atomically: the folder is complete
        return str(manifest)
    if kind == "webdataset":
        records = _shard_records(files, modality, column, folder)
    elif kind == "files":
        records = _file_records(files)
    else:
        rows = _hf_rows(files[0]) if kind == "hf" else None
        records = _table_records(files[0], rows, modality, column, id_column, folder)
    if not records:
        raise DatasetError(f"{', '.join(inputs)}: no items")
    _check_unique(records)
    source = {"inputs": list(inputs), "kind": kind, "modality": modality, "column": column, "id_column": id_column}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "source.json").write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
    return write_manifest(manifest, records)


# ---- what the inputs are -----------------------------------------------------------------------------------------
def _is_url(spec: str) -> bool:
    return "://" in spec and not spec.startswith("file://")


def _resolve(inputs: Sequence[str]) -> tuple[str, list[str]]:
    """``(kind, files)``: kind is ``webdataset``, ``hf``, ``parquet`` or ``files``; files sorted per input."""
    if not inputs:
        raise DatasetError("no --inputs given")
    files: list[str] = []
    for spec in inputs:
        if spec.startswith("@"):
            files += _list_file(Path(spec[1:]))
        elif _is_url(spec):
            import fsspec

            found = [f.full_name if hasattr(f, "full_name") else f.path for f in fsspec.open_files(spec)]
            protocol = spec.split("://", 1)[0]
            found = [f if "://" in f else f"{protocol}://{f}" for f in found]
            if not found:
                raise DatasetError(f"{spec}: matches no file")
            files += sorted(found)
        else:
            spec = spec.removeprefix("file://")
            found = sorted(glob.glob(spec, recursive=True)) if glob.has_magic(spec) else [spec]
            if not found or not all(os.path.exists(f) for f in found):
                raise DatasetError(f"{spec}: no such file or folder" if not glob.has_magic(spec)
                                   else f"{spec}: matches no file")
            files += [os.path.abspath(f) for f in found]
    lowered = [f.lower() for f in files]
    if all(f.endswith(TAR_SUFFIXES) for f in lowered):
        return "webdataset", files
    if any(f.endswith(TAR_SUFFIXES) for f in lowered):
        raise DatasetError("--inputs mixes tar shards with other files; give shards only, or media files only")
    if len(files) == 1 and os.path.isdir(files[0]):
        return "hf", files
    if len(files) == 1 and lowered[0].endswith(".parquet"):
        return "parquet", files
    folders = [f for f in files if os.path.isdir(f)]
    if folders:
        raise DatasetError(f"{folders[0]}: a folder; --inputs takes one Hugging Face save_to_disk folder, "
                           "or media files (a glob such as 'videos/*.mp4')")
    return "files", files


def _list_file(path: Path) -> list[str]:
    """``@list.txt``: one media path per line (relative to the list's folder); blank lines and ``#`` lines skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read the file list ({exc})") from None
    files = []
    for lineno, line in enumerate(lines, start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        full = os.path.abspath(path.parent / name)
        if not os.path.isfile(full):
            raise DatasetError(f"{path}:{lineno}: no such file {name}")
        files.append(full)
    return files


def _digest(kind: str, files: list[str], modality: str, column: str | None, id_column: str | None) -> str:
    """Names the inputs folder: the files with their sizes and modification times, and the options."""
    stats = []
    for name in files:
        if _is_url(name):
            import fsspec

            fs, path = fsspec.core.url_to_fs(name)
            info = fs.info(path)
            stats.append([name, info.get("size"), str(info.get("mtime") or info.get("LastModified") or
                                                      info.get("ETag") or info.get("etag") or "")])
        else:
            parts = [Path(name)] if not os.path.isdir(name) else sorted(p for p in Path(name).iterdir() if p.is_file())
            stats += [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in parts]
    blob = json.dumps({"kind": kind, "files": stats, "modality": modality, "column": column, "id": id_column})
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _check_unique(records: list[dict[str, Any]]) -> None:
    where: dict[str, str] = {}
    for record in records:
        if record["id"] in where:
            raise DatasetError(f"item id {record['id']!r} of {record['_from']} repeats {where[record['id']]}; each "
                               "sample or row is one item")
        where[record["id"]] = record["_from"]
    for record in records:
        del record["_from"]


def _save(data: bytes, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)  # atomic: a parallel run (torchrun ranks) writes the same bytes


# ---- plain media files -------------------------------------------------------------------------------------------
def _file_records(files: list[str]) -> list[dict[str, Any]]:
    """Id = the path relative to the files' common folder (``a.mp4``, ``cat/1.jpg``); paths absolute."""
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    return [{"id": Path(os.path.relpath(f, root)).as_posix(), "path": f, "_from": f} for f in files]


# ---- WebDataset shards -------------------------------------------------------------------------------------------
def _samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` per sample of a shard, in tar order: consecutive members sharing the key (the
    path up to the first dot of the file name) form one sample, as WebDataset defines it."""
    import fsspec

    key: str | None = None
    sample: dict[str, bytes] = {}
    try:
        with fsspec.open(url, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = posixpath.split(member.name)
                stem, dot, ext = base.partition(".")
                if not dot or not stem or base.startswith("."):
                    continue
                this = posixpath.join(folder, stem) if folder else stem
                if this != key:
                    if key is not None:
                        yield key, sample
                    key, sample = this, {}
                reader = tar.extractfile(member)
                sample[ext.lower()] = reader.read() if reader is not None else b""
    except (tarfile.TarError, EOFError) as exc:
        raise DatasetError(f"{url}: not a readable tar shard ({exc})") from None
    if key is not None:
        yield key, sample


def _shard_records(shards: list[str], modality: str, column: str | None, folder: Path) -> list[dict[str, Any]]:
    """Item id = the sample's key; media members are written to ``media/<shard>/<key>.<ext>`` under ``folder``."""
    wanted = (column,) if column else MEDIA_EXTENSIONS[modality]
    records: list[dict[str, Any]] = []
    for shard in shards:
        name = posixpath.basename(shard.rstrip("/"))
        for key, sample in _samples(shard):
            where = f"{shard}: sample {key}"
            ext = next((e for e in wanted if e in sample), None)
            if ext is None:
                raise DatasetError(f"{where} has no {' or '.join('.' + e for e in wanted)} member (members: "
                                   f"{', '.join(sorted(sample))}); name the member with "
                                   f"{'--text-column' if modality == 'text' else '--path-column'}")
            if modality == "text":
                try:
                    text = sample[ext].decode("utf-8")
                except UnicodeDecodeError:
                    raise DatasetError(f"{where}: .{ext} is not UTF-8 text") from None
                records.append({"id": key, "text": text.strip(), "_from": where})
                continue
            if key.startswith("/") or ".." in key.split("/"):
                raise DatasetError(f"{where}: the key is not a relative path inside the shard")
            relative = f"media/{name}/{key}.{ext}"
            _save(sample[ext], folder / relative)
            records.append({"id": key, "path": relative, "_from": where})
    return records


# ---- tables: Parquet files and Hugging Face save_to_disk folders ---------------------------------------------------
def _hf_rows(path: str) -> tuple[list[str], Iterator[tuple[str, dict[str, Any]]]]:
    """Column names and ``(where, row)`` of a ``save_to_disk`` folder (Arrow IPC streams listed in state.json)."""
    import pyarrow as pa

    folder = Path(path)
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file())
        raise DatasetError(f"{folder}: a DatasetDict with splits {', '.join(splits)}; give one split's folder "
                           f"(--inputs {folder / (splits[0] if splits else 'SPLIT')})")
    state_path = folder / "state.json"
    if not state_path.is_file():
        raise DatasetError(f"{folder}: not a Hugging Face save_to_disk folder (no state.json); for a folder of media "
                           f"files give a glob (--inputs '{folder}/**/*.jpg')")
    try:
        files = [folder / entry["filename"] for entry in json.loads(state_path.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{state_path}: no '_data_files' list ({exc})") from None

    def batches(name: Path) -> Iterator[Any]:
        try:
            source = pa.memory_map(str(name))
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
                return
            yield from reader
        except (pa.ArrowException, OSError) as exc:
            raise DatasetError(f"{name}: not an Arrow file of a save_to_disk folder ({exc})") from None

    columns: list[str] = []
    if files:
        first = next(batches(files[0]), None)
        columns = list(first.schema.names) if first is not None else []

    def rows() -> Iterator[tuple[str, dict[str, Any]]]:
        row = 0
        for name in files:
            for batch in batches(name):
                for values in batch.to_pylist():
                    yield f"{folder} row {row}", values
                    row += 1

    return columns, rows()


def _parquet_columns(path: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return list(pq.ParquetFile(path).schema_arrow.names)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{path}: not a Parquet file ({exc})") from None


def _default_column(columns: list[str], modality: str, given: str | None, source: str) -> str:
    if given is not None:
        if given not in columns:
            raise DatasetError(f"{source}: no column {given!r} (columns: {', '.join(columns)})")
        return given
    candidates = ("text", "caption", "sentence") if modality == "text" else (modality,)
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        flag = "--text-column" if modality == "text" else "--path-column"
        raise DatasetError(f"{source}: no {' or '.join(map(repr, candidates))} column; name it with {flag} "
                           f"(columns: {', '.join(columns)})")
    return found


def _table_records(path: str, hf: tuple[list[str], Iterator[tuple[str, dict[str, Any]]]] | None, modality: str,
                   column: str | None, id_column: str | None, folder: Path) -> list[dict[str, Any]]:
    """One item per row: id = ``id_column`` or the row number (from 0); media bytes go to
    ``media/<row><suffix>`` under ``folder``, media paths resolve against the table's folder."""
    columns, rows = hf if hf is not None else (_parquet_columns(path), None)
    column = _default_column(columns, modality, column, path)
    if id_column is not None and id_column not in columns:
        raise DatasetError(f"{path}: no column {id_column!r} (columns: {', '.join(columns)})")
    if rows is None:
        rows = read_rows(path, [c for c in (column, id_column) if c])
    base = Path(path) if hf is not None else Path(path).parent
    records: list[dict[str, Any]] = []
    for row_number, (where, row) in enumerate(rows):
        item_id = cell_id(row[id_column], where, id_column) if id_column else str(row_number)
        value = row[column]
        if modality == "text":
            if not isinstance(value, str):
                raise DatasetError(f"{where}: column {column!r} holds no text (got {type(value).__name__})")
            records.append({"id": item_id, "text": value.strip(), "_from": where})
            continue
        name, data = media_value(value, where, column)
        if data is None:
            records.append({"id": item_id, "path": os.path.abspath(base / name), "_from": where})  # type: ignore[operator]
            continue
        relative = f"media/{row_number:08d}{Path(name).suffix.lower() if name else ''}"
        _save(data, folder / relative)
        records.append({"id": item_id, "path": relative, "_from": where})
    return records
