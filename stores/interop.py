"""HDF5 and ``.npy`` interop: export a feature store for other tools, import an HDF5 file as a feature store.

Export (``docs/store-format.md``, "Interop") writes one HDF5 file, or a folder of ``.npy`` files with a
``meta.json`` sidecar, holding ``features`` (fixed: ``(N, L, D)``; ragged: flat ``(T, D)`` plus ``offsets``;
pooled: ``(N, D)``), ``lengths``, ``ids``, ``labels``, ``refs``, ``source_ids`` and the store's identity and
metadata. Import reads such a file (or a foreign one with at least ``features`` and ``ids``) and writes a real
store through :class:`~stores.writer.StoreWriter`; the new store's identity records the file's sha256.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from stores.dtypes import DTYPES, STORAGE_DTYPE
from stores.errors import StoreError
from stores.files import read_jsonl, sha256_file
from stores.layout import ITEMS_FILE, token_array_name
from stores.location import Location
from stores.reader import FeatureStore
from stores.writer import StoreWriter, open_group, store_status

HDF5_FORMAT = "oneencoder-features-hdf5"
NPY_FORMAT = "oneencoder-features-npy"
INTEROP_VERSION = 1
EXPORT_FORMATS = ("hdf5", "npy")
_BATCH_BYTES = 32 << 20  # rows copied per step: bounded memory whatever the store's size


# ---- export ----------------------------------------------------------------------------------------------------
class _HDF5Sink:
    """Datasets in one HDF5 file; metadata as root attributes (nested values as JSON strings)."""

    def __init__(self, path: Path) -> None:
        import h5py

        self._h5py = h5py
        self.file = h5py.File(path, "w")

    def array(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        chunk_rows = max(1, min(shape[0], (1 << 20) // max(1, row_bytes)))  # ~1 MiB chunks along axis 0
        return self.file.create_dataset(name, shape=shape, dtype=dtype,
                                        chunks=(chunk_rows, *shape[1:]) if shape[0] else None)

    def put(self, name: str, values: np.ndarray, encoding: str | None = None) -> None:
        if values.dtype.kind == "U":
            data = self.file.create_dataset(name, data=values.astype(object), dtype=self._h5py.string_dtype("utf-8"))
        else:
            data = self.file.create_dataset(name, data=values)
        if encoding:
            data.attrs["encoding"] = encoding

    def finish(self, meta: dict[str, Any]) -> None:
        for key, value in meta.items():
            if value is not None:
                self.file.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
        self.file.close()

    def abort(self) -> None:
        self.file.close()


class _NpySink:
    """One ``NAME.npy`` per array (plain numpy dtypes, no pickles) and ``meta.json``."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        self.folder, self.arrays = folder, {}

    def array(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        self.arrays[name] = {"file": f"{name}.npy", "shape": list(shape), "dtype": np.dtype(dtype).str}
        return np.lib.format.open_memmap(self.folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)

    def put(self, name: str, values: np.ndarray, encoding: str | None = None) -> None:
        np.save(self.folder / f"{name}.npy", values, allow_pickle=False)
        self.arrays[name] = {"file": f"{name}.npy", "shape": list(values.shape), "dtype": values.dtype.str}
        if encoding:
            self.arrays[name]["encoding"] = encoding

    def finish(self, meta: dict[str, Any]) -> None:
        meta = {**meta, "format": NPY_FORMAT, "arrays": self.arrays}
        (self.folder / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def abort(self) -> None:
        pass


def _encode_column(values: Sequence[Any]) -> tuple[np.ndarray, str, np.ndarray | None]:
    """A per-item column as an array: int64 when every value is an int, UTF-8 strings when every value is a string,
    else JSON text of each value (``encoding`` says which). Missing values (None) become 0 / "" and a presence mask."""
    present = np.asarray([v is not None for v in values], dtype=bool)
    given = [v for v in values if v is not None]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in given):
        encoding, data = "int", np.asarray([0 if v is None else v for v in values], dtype=np.int64)
    elif all(isinstance(v, str) for v in given):
        encoding, data = "str", _strings(["" if v is None else v for v in values])
    else:
        encoding, data = "json", _strings([json.dumps(v, ensure_ascii=False) for v in values])
    return data, encoding, None if present.all() else present


def _strings(values: Sequence[str]) -> np.ndarray:
    return np.asarray(values, dtype=str) if len(values) else np.zeros(0, dtype="<U1")


def _storage_to_export(rows: np.ndarray, dtype: str) -> np.ndarray:
    """bfloat16 rows (stored as uint16 bit patterns) become float32, exactly; other dtypes are kept."""
    if dtype == "bfloat16":
        return (rows.astype(np.uint32) << 16).view(np.float32)
    return rows


def _bar(total: int, unit: str, desc: str, progress: bool) -> tqdm:
    """A progress bar (rate, ETA) on stderr, only when asked for and stderr is a terminal (quiet in CI, in logs)."""
    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, dynamic_ncols=True,
                disable=not (progress and sys.stderr.isatty()))


def export_store(store: Location | str | os.PathLike[str], out: Path | str, fmt: str = "hdf5", *,
                 overwrite: bool = False, progress: bool = False) -> Path:
    """Write a finished store to ``out``: an HDF5 file (``fmt="hdf5"``) or a folder of ``.npy`` files (``"npy"``).

    bfloat16 stores are exported as float32 (exact; the logical dtype is recorded, so an import restores bf16).
    Writes to a temporary name and renames, so ``out`` is never half-written. Returns ``out``. ``progress`` shows
    a bar of the rows copied (items; tokens for a ragged store) on a terminal.
    """
    if fmt not in EXPORT_FORMATS:
        raise StoreError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
    store, out = Location.of(store), Path(out)
    source = FeatureStore.open(store, ram_budget_gb=0)  # checks the store is a finished feature store
    meta = source.meta
    if out.exists() and not overwrite:
        raise StoreError(f"{out} already exists; pass --overwrite to replace it")
    items = read_jsonl(store / ITEMS_FILE)
    array = open_group(store)[token_array_name(meta.layout)]
    feature_dtype = np.dtype("float32" if meta.dtype == "bfloat16" else STORAGE_DTYPE[meta.dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    _remove(tmp)
    sink: _HDF5Sink | _NpySink = _HDF5Sink(tmp) if fmt == "hdf5" else _NpySink(tmp)
    try:
        features = sink.array("features", tuple(int(n) for n in array.shape), feature_dtype)
        row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * feature_dtype.itemsize)
        step = max(1, _BATCH_BYTES // row_bytes)
        with _bar(int(array.shape[0]), "token" if meta.layout == "ragged" else "item", f"export {fmt}",
                  progress) as bar:
            for start in range(0, int(array.shape[0]), step):  # contiguous slices: zarr reads them whole-chunk
                stop = min(int(array.shape[0]), start + step)
                features[start:stop] = _storage_to_export(np.asarray(array[start:stop]), meta.dtype)
                bar.update(stop - start)
        if isinstance(features, np.memmap):
            features.flush()
        del features
        lengths = source.lengths.astype(np.int64)
        sink.put("lengths", lengths)
        if meta.layout == "ragged":
            sink.put("offsets", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        sink.put("ids", _strings(source.ids))
        for column, key in (("labels", "label"), ("refs", "ref"), ("source_ids", "source_id")):
            values = [item.get(key) for item in items]
            if any(v is not None for v in values):
                data, encoding, present = _encode_column(values)
                sink.put(column, data, encoding)
                if present is not None:
                    sink.put(f"{column}_present", present)
        sink.finish({
            "format": HDF5_FORMAT if fmt == "hdf5" else NPY_FORMAT,
            "format_version": INTEROP_VERSION,
            "modality": meta.modality,
            "layout": meta.layout,
            "dim": meta.dim,
            "tokens_per_item": meta.tokens_per_item,
            "dtype": meta.dtype,
            "count": meta.count,
            "total_tokens": meta.total_tokens,
            "identity": meta.identity,
            "key": meta.key,
            "summary": meta.summary or {},
            "source_store": str(store) if store.remote else str(store.path.resolve()),
        })
    except BaseException:
        sink.abort()
        _remove(tmp)
        raise
    _remove(out)
    os.replace(tmp, out)
    return out


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# ---- import ----------------------------------------------------------------------------------------------------
def _dataset_names(handle: Any) -> str:
    names: list[str] = []
    handle.visit(lambda name: names.append(name) if hasattr(handle[name], "shape") else None)
    return ", ".join(names) or "none"


def _decode_strings(data: np.ndarray) -> list[str]:
    if data.dtype.kind in "OS":
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in data.tolist()]
    if data.dtype.kind in "U":
        return [str(v) for v in data.tolist()]
    if data.dtype.kind in "iu":
        return [str(int(v)) for v in data.tolist()]
    raise ValueError(f"expected strings or integers, got {data.dtype}")


def _read_column(handle: Any, name: str, n: int, file: Path) -> list[Any] | None:
    """A per-item column (``labels``, ``refs``, ``source_ids``) as Python values, None where not present."""
    if name not in handle:
        return None
    dataset = handle[name]
    data = dataset[()]
    if getattr(data, "shape", None) != (n,):
        raise StoreError(f"{file}: '{name}' has shape {getattr(data, 'shape', ())}, expected ({n},) like 'ids'")
    encoding = dataset.attrs.get("encoding")
    encoding = encoding.decode() if isinstance(encoding, bytes) else encoding
    if data.dtype.kind == "b" or (data.dtype.kind == "f" and np.all(np.mod(data, 1) == 0)):
        data = data.astype(np.int64)  # e.g. labels saved as floats by another tool
    if data.dtype.kind in "iu":
        values: list[Any] = [int(v) for v in data.tolist()]
        if name != "labels":  # ids and refs are strings
            values = [str(v) for v in values]
    elif data.dtype.kind in "OSU":
        values = _decode_strings(data)
        if encoding == "json":
            values = [json.loads(v) for v in values]
    else:
        raise StoreError(f"{file}: '{name}' must hold integers or strings, not {data.dtype}")
    if f"{name}_present" in handle:
        present = np.asarray(handle[f"{name}_present"][()], dtype=bool)
        if present.shape != (n,):
            raise StoreError(f"{file}: '{name}_present' has shape {present.shape}, expected ({n},)")
        values = [v if p else None for v, p in zip(values, present.tolist(), strict=True)]
    return values


# deflate, the strongest HDF5 filter in common use, packs at most about 1032:1; a dataset declaring more bytes than
# that per stored byte holds mostly data that is not in the file
_MAX_PACKING = 1100


def _check_stored(handle: Any, file: Path) -> None:
    """Refuse a file whose datasets declare more data than it holds (a tiny file declaring a huge shape would
    otherwise be read as gigabytes of fill values); checked before anything is read."""
    file_size = file.stat().st_size
    for name in ("features", "ids", "lengths", "offsets", "labels", "refs", "source_ids"):
        dataset = handle.get(name)
        if dataset is None or not hasattr(dataset, "shape"):
            continue
        declared = int(dataset.size) * dataset.id.get_type().get_size()
        stored = int(dataset.id.get_storage_size())
        packed = dataset.id.get_create_plist().get_nfilters() > 0
        if stored > file_size:
            raise StoreError(f"{file}: '{name}' says it stores {stored} bytes but the file has {file_size} "
                             "(truncated?)")
        if (not packed and stored < declared) or declared > _MAX_PACKING * max(stored, 1):
            raise StoreError(f"{file}: '{name}' declares shape {tuple(dataset.shape)} ({declared} bytes) but the file "
                             f"holds {stored} bytes of it; refusing a file that does not contain its data")


def _plan(handle: Any, file: Path) -> dict[str, Any]:
    """Layout, sizes and per-item columns of an HDF5 file, checked; errors name the file and the dataset."""
    for required in ("features", "ids"):
        if required not in handle or not hasattr(handle[required], "shape"):
            raise StoreError(f"{file}: no '{required}' dataset (an importable file needs 'features' of shape (N, D), "
                             f"(N, L, D) or flat (T, D) with 'offsets', and 'ids' (N,)); found: {_dataset_names(handle)}")
    _check_stored(handle, file)
    features = handle["features"]
    try:
        ids = _decode_strings(handle["ids"][()].reshape(-1))
    except ValueError as err:
        raise StoreError(f"{file}: 'ids' {err}") from None
    n = len(ids)
    seen: dict[str, int] = {}
    for i, item_id in enumerate(ids):
        if not item_id:
            raise StoreError(f"{file}: ids[{i}] is empty")
        if item_id in seen:
            raise StoreError(f"{file}: ids[{i}] = {item_id!r} repeats ids[{seen[item_id]}]")
        seen[item_id] = i
    if features.dtype.kind not in "fiu":
        raise StoreError(f"{file}: 'features' must be numeric, not {features.dtype}")
    shape = tuple(int(s) for s in features.shape)
    lengths = np.asarray(handle["lengths"][()], dtype=np.int64) if "lengths" in handle else None
    if lengths is not None and lengths.shape != (n,):
        raise StoreError(f"{file}: 'lengths' has shape {lengths.shape}, expected ({n},) like 'ids'")
    if "offsets" in handle:
        offsets = np.asarray(handle["offsets"][()], dtype=np.int64)
        if len(shape) != 2:
            raise StoreError(f"{file}: with 'offsets', 'features' must be flat (T, D), not {shape}")
        if offsets.shape != (n + 1,) or offsets[0] != 0 or offsets[-1] != shape[0] or np.any(np.diff(offsets) < 1):
            raise StoreError(f"{file}: 'offsets' must be ({n + 1},), start at 0, end at {shape[0]} (the rows of "
                             "'features') and increase by at least 1 per item")
        if lengths is not None and not np.array_equal(lengths, np.diff(offsets)):
            raise StoreError(f"{file}: 'lengths' disagrees with 'offsets'")
        layout, lengths = "ragged", np.diff(offsets)
    elif len(shape) == 2:
        layout, offsets = "pooled", None
    elif len(shape) == 3:
        offsets = None
        if lengths is not None and (lengths.min(initial=shape[1]) < 1 or lengths.max(initial=1) > shape[1]):
            raise StoreError(f"{file}: 'lengths' must lie in 1..{shape[1]} (the padded length of 'features')")
        # padded tokens with shorter items: store them ragged, without the padding
        layout = "ragged" if lengths is not None and np.any(lengths < shape[1]) else "fixed"
    else:
        raise StoreError(f"{file}: 'features' must be (N, D), (N, L, D) or flat (T, D) with 'offsets'; got {shape}")
    if offsets is None and shape[0] != n:
        raise StoreError(f"{file}: 'features' has {shape[0]} rows but 'ids' has {n}")
    declared = handle.attrs.get("layout")
    declared = declared.decode() if isinstance(declared, bytes) else declared
    if declared is not None and declared != layout:
        raise StoreError(f"{file}: its 'layout' attribute says {declared!r} but its datasets make it {layout!r}")
    columns = {name: _read_column(handle, name, n, file) for name in ("labels", "refs", "source_ids")}
    return {"layout": layout, "shape": shape, "ids": ids, "lengths": lengths, "offsets": offsets, **columns}


def _attr(handle: Any, name: str, as_json: bool = False) -> Any:
    value = handle.attrs.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.generic):
        value = value.item()
    if as_json and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _store_dtype(requested: str | None, recorded: Any, features_dtype: np.dtype, file: Path) -> str:
    dtype = DTYPES.get(requested, requested) if requested else None
    if dtype is None and recorded in STORAGE_DTYPE:
        dtype = recorded
    if dtype is None:  # a foreign file: keep half and single precision, narrow anything else to float32
        dtype = "float16" if features_dtype == np.float16 else "float32"
    if dtype not in STORAGE_DTYPE:
        raise StoreError(f"{file}: dtype must be one of {', '.join(sorted(STORAGE_DTYPE))} (or fp16/fp32/bf16), "
                         f"not {dtype!r}")
    return dtype


def import_hdf5(file: Path | str, store: Location | str | os.PathLike[str], *, modality: str | None = None, dtype: str | None = None,
                overwrite: bool = False, shard_mb: float = 64.0, progress: bool = False) -> dict:
    """Write the HDF5 file ``file`` as a feature store at ``store``; returns the store's summary.

    ``modality`` is required unless the file records one (ours do). ``dtype`` defaults to the file's recorded
    logical dtype, else float16 for float16 features and float32 otherwise. The store's identity is
    ``{"import": {"format", "sha256"}, "modality", "layout", "dtype", "source_identity"}`` (the original store's
    identity, when the file is one of ours): importing the same file again is a no-op, a different file at the same
    path is refused unless ``overwrite``.
    """
    import h5py

    file, store = Path(file), Location.of(store)
    if not file.is_file():
        raise StoreError(f"{file}: no such file")
    digest = sha256_file(file)
    try:
        handle = h5py.File(file, "r")
    except OSError as err:
        raise StoreError(f"{file}: not a readable HDF5 file ({err})") from None
    with handle:
        plan = _plan(handle, file)
        modality = modality or _attr(handle, "modality")
        if not modality:
            raise StoreError(f"{file} records no modality; pass --modality (image, text, audio, video, ...)")
        features = handle["features"]
        shape, layout = plan["shape"], plan["layout"]
        store_dtype = _store_dtype(dtype, _attr(handle, "dtype"), features.dtype, file)
        ours = _attr(handle, "format") == HDF5_FORMAT
        identity = {
            "import": {"format": HDF5_FORMAT if ours else "hdf5", "sha256": digest},
            "modality": modality,
            "layout": layout,
            "dtype": store_dtype,
            "source_identity": _attr(handle, "identity", as_json=True) if ours else None,
        }
        status = store_status(store, identity, overwrite=overwrite)
        if status == "complete":
            return {"items": len(plan["ids"]), "skipped": True, "store": str(store)}
        tokens_per_item = shape[1] if layout == "fixed" else None
        writer = StoreWriter.create(
            store, modality=modality, layout=layout, dim=shape[-1], tokens_per_item=tokens_per_item,
            dtype=store_dtype, identity=identity, shard_mb=shard_mb, overwrite=overwrite or status == "incomplete",
            extraction={"imported_from": str(file.resolve()), "source_key": _attr(handle, "key")},
        )
        with writer, _bar(len(plan["ids"]), "item", "import", progress) as bar:
            _copy_items(features, plan, writer, bar, store_dtype)
            summary = writer.finish()
    return {**summary, "store": str(store)}


def _finite_items(rows: np.ndarray, dtype: str, lengths: torch.Tensor | None) -> np.ndarray:
    """Bool per item: every real value is finite once cast to the store's ``dtype`` (float16 overflows past
    65504), as extraction requires; padding does not count."""
    values = torch.from_numpy(np.asarray(rows, dtype=np.float32)).to(getattr(torch, dtype))
    ok = torch.isfinite(values)
    if lengths is not None and ok.dim() == 3:
        ok |= (torch.arange(ok.shape[1])[None, :] >= lengths[:, None])[..., None]
    return ok.flatten(1).all(1).numpy()


def _copy_items(features: Any, plan: dict[str, Any], writer: StoreWriter, bar: tqdm, dtype: str) -> None:
    """Feed ``features`` to the writer in batches of whole items, with each item's metadata. An item with a
    non-finite value (in the store's ``dtype``) is left out and recorded in the error table with the reason."""
    ids, lengths, offsets, layout = plan["ids"], plan["lengths"], plan["offsets"], plan["layout"]
    shape = plan["shape"]
    if offsets is None:
        item_values = int(np.prod(shape[1:], dtype=np.int64))
    else:  # flat tokens: the mean item's size
        item_values = int(offsets[-1]) * shape[1] // max(1, len(ids))
    step = max(1, _BATCH_BYTES // max(1, item_values * 4))
    for start in range(0, len(ids), step):
        stop = min(len(ids), start + step)
        metas = []
        for i in range(start, stop):
            meta: dict[str, Any] = {"id": ids[i]}
            for column, key in (("labels", "label"), ("refs", "ref"), ("source_ids", "source_id")):
                if plan[column] is not None and plan[column][i] is not None:
                    meta[key] = plan[column][i]
            metas.append(meta)
        if offsets is None:
            rows = np.asarray(features[start:stop])
            batch_lengths = torch.from_numpy(lengths[start:stop]) if layout == "ragged" else None
        else:  # flat tokens: pad this batch's items to its longest
            flat = np.asarray(features[int(offsets[start]) : int(offsets[stop])])
            batch_lengths_np = lengths[start:stop]
            rows = np.zeros((stop - start, int(batch_lengths_np.max()), shape[1]), dtype=flat.dtype)
            begin = offsets[start:stop] - offsets[start]
            for row, (a, n) in enumerate(zip(begin.tolist(), batch_lengths_np.tolist(), strict=True)):
                rows[row, :n] = flat[a : a + n]
            batch_lengths = torch.from_numpy(batch_lengths_np)
        finite = _finite_items(rows, dtype, batch_lengths)
        if not finite.all():
            writer.add_errors([{"id": meta["id"], "index": start + i, "reason": f"non-finite features (inf/nan) in "
                                f"{dtype}"} for i, meta in enumerate(metas) if not finite[i]])
            keep = np.flatnonzero(finite)
            metas, rows = [metas[i] for i in keep], rows[keep]
            batch_lengths = batch_lengths[torch.from_numpy(keep)] if batch_lengths is not None else None
        if metas:
            writer.add_batch(metas, torch.from_numpy(np.ascontiguousarray(rows)), batch_lengths)
        bar.update(stop - start)
