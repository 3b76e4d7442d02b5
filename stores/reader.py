"""Reading feature stores: a batch of item indices -> padded token tensor + mask.

Small stores (under ``ram_budget_gb``) are loaded whole into RAM once, so a training step gathers from a tensor.
Larger ones are read with TensorStore (local files, S3, GCS; sorted, de-duplicated, every range requested at once),
then put back in batch order. zarr-python opens the metadata, reads what TensorStore cannot reach (other fsspec
backends) and is the cross-check reader (``fast_reads=False``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import zarr

from stores.errors import StoreError, StoreIncompleteError
from stores.layout import ITEMS_FILE, StoreMeta, read_meta, token_array_name
from stores.location import Location

DEFAULT_RAM_BUDGET_GB = float(os.environ.get("ONEENCODER_RAM_BUDGET_GB", "4"))
# Output dtypes a batch can be assembled in with numpy (gather, cast and padding in one single-threaded copy).
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


class _TensorStoreRows:
    """Row reads (axis 0) of one store array through TensorStore.

    zarr-python 3.1 spends ~1 s of CPU per batch of 256 random 197x768 items turning the selection into per-element
    coordinates; TensorStore reads the same bytes 30-40x faster and releases the GIL while it does, so a batch can
    be read in a background thread while the model trains (docs/benchmarks.md). It reads any codec chain zarr
    writes and checks the shard index checksum, as zarr does.
    """

    def __init__(self, folder: Location, kvstore: dict):
        import tensorstore as ts

        self.folder = folder
        # No TensorStore cache: the OS page cache already holds hot shards, and a second copy would only grow.
        context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        # A missing shard is an error, never the fill value standing in for data.
        spec = {"driver": "zarr3", "kvstore": kvstore, "fill_missing_data_reads": False}
        try:
            self._array = ts.open(spec, read=True, open=True, context=context).result()
        except Exception as error:  # noqa: BLE001 - TensorStore raises ValueError/RuntimeError subclasses
            raise StoreError(f"{folder}: cannot open the array: {error}") from None

    def _result(self, future, where: str) -> np.ndarray:
        try:
            return future.result()
        except Exception as error:  # noqa: BLE001
            raise StoreError(f"{self.folder}: reading {where} failed: {error}") from None

    def read(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Rows ``[starts[i], stops[i])`` for each ``i``, concatenated in the given order. Every range is requested
        at once, so TensorStore fetches them concurrently."""
        futures = [self._array[int(a) : int(b)].read() for a, b in zip(starts, stops, strict=True)]
        pieces = [self._result(f, f"rows {a}-{b}") for f, a, b in zip(futures, starts, stops, strict=True)]
        return np.concatenate(pieces) if pieces else np.empty((0, *self._array.shape[1:]), self._array.dtype.numpy_dtype)

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Whole rows ``indices`` (any order, repeats allowed), in that order: one sorted, de-duplicated read."""
        unique, inverse = np.unique(indices, return_inverse=True)
        rows = self._result(self._array.oindex[unique].read(), f"{len(unique)} rows")
        return rows[inverse.reshape(-1)]


def _check_shards(path: Location, group: zarr.Group, name: str) -> None:
    """Refuse a store whose shard objects are missing or not the size their manifest entries record: zarr would
    read a missing shard back as zeros without a word. (Contents are re-hashed by ``stores verify``.)"""
    from stores.integrity import array_problems

    arrays = [name, *(["offsets"] if "offsets" in group else [])]
    problems = [p for a in arrays for p in array_problems(path, a, group[a], full_hash=False)]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise StoreError(f"store {path} cannot be read: {problems[0]}{more}; run 'stores verify --repair' on it")


@dataclass(frozen=True)
class PageCacheEviction:
    """What :meth:`FeatureStore.evict_from_page_cache` did: the files (and their bytes) advised out of the OS page
    cache, or why it did nothing (``skipped``)."""

    files: int = 0
    bytes: int = 0
    skipped: str | None = None


class FeatureStore:
    """A finished feature store opened for reading. Use :meth:`open`."""

    def __init__(self, path: Location, meta: StoreMeta, items: list[dict], ram_budget_gb: float,
                 fast_reads: bool = True):
        self.path, self.meta = path, meta
        self.ids: list[str] = [str(item["id"]) for item in items]
        self.lengths = np.asarray([int(item["length"]) for item in items], dtype=np.int64)
        labels = [item.get("label") for item in items]
        refs = [item.get("ref") for item in items]
        self.labels: list | None = labels if any(label is not None for label in labels) else None
        self.refs: list[str | None] | None = [None if r is None else str(r) for r in refs] if any(refs) else None
        self._index = {item_id: i for i, item_id in enumerate(self.ids)}
        group = zarr.open_group(path.zarr_store(read_only=True), mode="r")
        name = token_array_name(meta.layout)
        self._array = group[name]
        if meta.complete:
            _check_shards(path, group, name)
        # zarr-python stays the reader of record for metadata, the fallback ``fast_reads=False`` (a cross-check) and
        # the reader of remote stores (their whole arrays are fetched shard by shard, concurrently, into RAM)
        kvstore = (path / name).tensorstore_kvstore() if fast_reads else None
        self._fast = None
        if kvstore:
            try:
                self._fast = _TensorStoreRows(path / name, kvstore)
            except StoreError:
                if not path.remote:
                    raise  # a local array TensorStore cannot open is broken; zarr-python would not do better
                # remote: credentials or endpoint set up in a way only fsspec knows; zarr-python reads through it
        self._offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(self.lengths, out=self._offsets[1:])
        if meta.layout == "ragged" and "offsets" in group:
            stored = group["offsets"][:]
            if not np.array_equal(stored, self._offsets):
                raise StoreError(f"{path}: offsets array disagrees with the item table ({ITEMS_FILE})")
        self._memory: torch.Tensor | None = None
        self._memory_np: np.ndarray | None = None  # the same bytes as _memory, in the storage dtype
        if self.nbytes <= ram_budget_gb * (1 << 30):
            self.load_into_memory()

    @classmethod
    def open(
        cls,
        path: Location | str | os.PathLike[str],
        *,
        ram_budget_gb: float = DEFAULT_RAM_BUDGET_GB,
        allow_incomplete: bool = False,
        fast_reads: bool = True,
    ) -> FeatureStore:
        """Open a store (a local path or an fsspec URL). Refuses one whose extraction has not finished unless
        ``allow_incomplete``; an unfinished
        store then shows only its committed items (those in shards that match their manifest entries), never item
        records that ran ahead of a shard that was not written.

        ``fast_reads=False`` reads every array through zarr-python instead of TensorStore (30-40x slower at random
        reads; kept for comparison and as a cross-check).
        """
        from stores.writer import StoreWriter, committed_records

        path = Location.of(path)
        meta = read_meta(path)
        if meta is None:
            raise StoreError(f"{path} is not a feature store (no {path / 'zarr.json'} with feature-store attributes)")
        if not meta.complete and not allow_incomplete:
            done = StoreWriter.progress(path)
            expected = (meta.summary or {}).get("expected_items")
            missing = (f"items {done['items'] + 1}-{expected} of {expected} are missing" if expected
                       else f"only {done['items']} items are stored")
            raise StoreIncompleteError(
                f"store {path} is incomplete: its extraction stopped ({missing}; everything after manifest line "
                f"{done['last_line']}). Re-run the same extract command to resume it."
            )
        items = committed_records(path)["items"]
        if meta.complete and len(items) != meta.count:
            raise StoreError(f"{path}: {ITEMS_FILE} lists {len(items)} items but the store records {meta.count}")
        return cls(path, meta, items, ram_budget_gb, fast_reads)

    # ---- description -------------------------------------------------------------------------------------------
    @property
    def modality(self) -> str:
        return self.meta.modality

    @property
    def layout(self) -> str:
        return self.meta.layout

    @property
    def dim(self) -> int:
        return self.meta.dim

    @property
    def identity(self) -> dict:
        return self.meta.identity

    @property
    def key(self) -> str:
        return self.meta.key

    @property
    def dtype(self) -> torch.dtype:
        """The dtype tokens are stored in: ``get_batch(indices, dtype=store.dtype)`` returns them uncast."""
        return getattr(torch, self.meta.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of token data (logical, uncompressed)."""
        return int(np.prod(self._array.shape)) * self._array.dtype.itemsize

    @property
    def in_memory(self) -> bool:
        return self._memory is not None

    @property
    def reads(self) -> str:
        """Where batches come from: ``"memory"``, ``"tensorstore"`` or ``"zarr-python"``."""
        return "memory" if self.in_memory else "tensorstore" if self._fast is not None else "zarr-python"

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, {self.modality}, {self.layout}, n={len(self)}, dim={self.dim})"

    def index_of(self, item_id: str) -> int:
        try:
            return self._index[str(item_id)]
        except KeyError:
            raise KeyError(f"id {item_id!r} is not in store {self.path}") from None

    def evict_from_page_cache(self) -> PageCacheEviction:
        """Drop this store's files from the OS page cache, so the next reads come from the disk, as they do from a
        store larger than RAM (``cli.py bench``'s P1a_cold). Needs no privileges: each file is fsynced (dirty pages
        cannot be dropped), then advised ``POSIX_FADV_DONTNEED``. A store loaded into RAM keeps its copy there."""
        if self.path.remote:
            return PageCacheEviction(skipped=f"{self.path} is remote: its objects are not in this machine's page cache")
        if not hasattr(os, "posix_fadvise"):
            return PageCacheEviction(skipped="this platform has no posix_fadvise")
        files = total = 0
        for location, size in self.path.files():
            try:
                fd = os.open(os.fspath(location), os.O_RDONLY)
            except FileNotFoundError:  # a temporary file that was renamed meanwhile
                continue
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            files, total = files + 1, total + size
        return PageCacheEviction(files, total)

    def errors(self) -> list[dict]:
        """Items the extraction left out, with the reason."""
        from stores.writer import committed_records

        return committed_records(self.path, ("errors",))["errors"]

    # ---- reading -----------------------------------------------------------------------------------------------
    def load_into_memory(self) -> None:
        """Read the whole token array into a CPU tensor (storage dtype) once."""
        if self._memory is None:
            # the rows of the listed items only: an unfinished store's array may extend over shards never written
            rows = int(self._offsets[-1]) if self.layout == "ragged" else len(self.ids)
            whole = self._fast.read(np.array([0]), np.array([rows])) if self._fast else self._array[:rows]
            self._memory_np = np.ascontiguousarray(whole)
            self._memory = self._as_tensor(self._memory_np)

    def whole_tokens(self) -> tuple[torch.Tensor, np.ndarray]:
        """Every item's tokens in one CPU tensor in the storage dtype, loaded into memory once whatever the RAM
        budget (:meth:`load_into_memory`), and the item offsets: ragged rows ``[total tokens, D]`` (item ``i`` is
        rows ``offsets[i]:offsets[i + 1]``), fixed ``[N, L, D]``, pooled ``[N, D]``. No padding: the tensor takes
        :attr:`nbytes`."""
        self.load_into_memory()
        assert self._memory is not None
        return self._memory, self._offsets

    def _as_tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.view(torch.bfloat16) if self.meta.dtype == "bfloat16" else tensor

    def _rows(self, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
        """Rows ``[start, stop)`` for each pair, concatenated in the given order (storage dtype)."""
        if self._fast is not None:
            return self._fast.read(starts, stops)
        order = np.argsort(starts, kind="stable")
        pieces: list[np.ndarray] = [None] * len(starts)  # type: ignore[list-item]
        for i in order:  # ascending offsets: sequential on disk
            pieces[i] = self._array[int(starts[i]) : int(stops[i])]
        return np.concatenate(pieces)

    def _items(self, indices: np.ndarray) -> np.ndarray:
        """Whole items for fixed/pooled layouts, in the given order (storage dtype)."""
        if self._memory_np is not None:
            return self._memory_np[indices]
        if self._fast is not None:
            return self._fast.take(indices)
        unique, inverse = np.unique(indices, return_inverse=True)  # sorted, de-duplicated selection
        return self._array.oindex[unique][inverse.reshape(-1)]

    def _numpy_dtype(self, dtype: torch.dtype) -> type | None:
        """The numpy dtype to assemble a batch in, or None when torch must convert (bfloat16 in or out)."""
        return None if self.meta.dtype == "bfloat16" else _NUMPY_DTYPES.get(dtype)

    def get_batch(
        self, indices: Sequence[int] | np.ndarray, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``[B, L, D]`` (zero-padded to the longest item) and mask ``[B, L]``, True on real tokens."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"indices out of range for store {self.path} with {len(self)} items")
        # Batches are gathered, cast and padded with numpy, not torch: each torch kernel big enough to go
        # multi-threaded waits for its worker threads to be scheduled, ~8 ms on a busy 2-core machine, and a
        # batch took several (docs/benchmarks.md).
        target = self._numpy_dtype(dtype)
        if self.layout in ("pooled", "fixed"):
            rows = self._items(idx)
            tokens = torch.from_numpy(rows.astype(target, copy=False)) if target else self._as_tensor(rows).to(dtype)
            tokens = tokens.unsqueeze(1) if self.layout == "pooled" else tokens
            return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool)
        lengths = self.lengths[idx]
        width = int(lengths.max()) if len(idx) else 0
        mask = torch.from_numpy(np.arange(width)[None, :] < lengths[:, None])
        if self._memory_np is not None:
            source, starts = self._memory_np, self._offsets[idx]
        else:  # one sorted read of every item's rows, then the same copy as from RAM
            source = self._rows(self._offsets[idx], self._offsets[idx] + lengths)
            starts = np.cumsum(lengths) - lengths
        if target is None:
            flat = self._as_tensor(np.concatenate([source[a : a + n] for a, n in zip(starts, lengths, strict=True)]))
            tokens = torch.zeros((len(idx), width, self.dim), dtype=dtype)
            tokens[mask] = flat.to(dtype)  # row-major fill of the mask matches item-by-item concatenation
            return tokens, mask
        out = np.zeros((len(idx), width, self.dim), dtype=target)
        for row, (start, n) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
            out[row, :n] = source[start : start + n]  # gather, cast and pad in one copy
        return torch.from_numpy(out), mask

    def iter_batches(
        self, batch_size: int = 256, dtype: torch.dtype = torch.float32
    ) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
        """All items in store order: ``(indices, tokens, mask)`` per batch."""
        for start in range(0, len(self), batch_size):
            idx = np.arange(start, min(start + batch_size, len(self)))
            yield (idx, *self.get_batch(idx, dtype))

    def pooled(self, indices: Sequence[int] | np.ndarray | None = None, batch_size: int = 1024) -> torch.Tensor:
        """Masked mean of each item's tokens (the stored vector for pooled stores), float32 ``[n, D]``."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        out = []
        for start in range(0, len(idx), batch_size):
            tokens, mask = self.get_batch(idx[start : start + batch_size])
            weights = mask.unsqueeze(-1).float()
            out.append((tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0))
        return torch.cat(out) if out else torch.zeros((0, self.dim))
