"""Embed store items with a trained head: cached tokens -> aligned, L2-normalised vectors."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.progress import progress_bar
from stores import FeatureStore, OneEncoderError, atomic_write_text


@torch.no_grad()
def embed_store(
    model: nn.Module,
    modality: str,
    store: FeatureStore,
    indices: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """``[n, W]`` unit vectors for ``indices`` (all items by default), in that order, on the CPU.

    ``progress``: a progress bar (items, rate, ETA) on stderr, shown only when stderr is a terminal."""
    was_training = model.training
    model.eval()
    idx = np.arange(len(store)) if indices is None else np.asarray(indices, dtype=np.int64)
    out = []
    with progress_bar(total=len(idx), desc=f"embed {modality}", enabled=progress, leave=False) as bar:
        for start in range(0, len(idx), batch_size):
            tokens, mask = store.get_batch(idx[start : start + batch_size])
            out.append(F.normalize(model.encode(modality, tokens.to(device), mask.to(device)).float(), dim=-1).cpu())
            bar.update(len(tokens))
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros((0, 0))


# ---- a whole store -> embedding files (``cli.py embed``) ----------------------------------------------------------
# OUT/embed.json records what the files hold and how far they got; the embeddings themselves are either
#   npy:     embeddings.npy (float32 [N, W], written in place through a memory map) + ids.json
#   parquet: part-NNNNN.parquet files of ``chunk_rows`` rows (columns id, embedding), each renamed into place whole
# Progress (rows_done) is rewritten atomically after every chunk, so a killed run resumes at its last chunk.
EMBED_META = "embed.json"
EMBED_FORMATS = ("npy", "parquet")


class EmbedError(OneEncoderError, RuntimeError):
    """The embedding folder cannot be written as asked (made from another run or store, unknown format)."""


def run_identity(run_path: Path | str) -> dict:
    """What identifies a run's embedding space: its head and the sha256 of the evaluation weights."""
    from pipeline.training.rundir import WEIGHTS_FILE, RunDir
    from stores import sha256_file

    run = RunDir(run_path)
    config = run.read_config()
    weights = run.path / WEIGHTS_FILE
    if not weights.is_file():
        raise EmbedError(f"{run.path} has no {WEIGHTS_FILE}: its training has not finished an epoch")
    return {"path": str(run.path.resolve()), "head": config.get("head"), "weights_sha256": sha256_file(weights),
            "width": (config.get("model") or {}).get("width")}


def store_identity(store: FeatureStore) -> dict:
    return {"path": str(store.path), "modality": store.modality, "key": store.key, "items": len(store),
            "identity": store.identity}


def _parquet_schema(width: int, meta: dict):
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("embedding", pa.list_(pa.float32(), width))],
                     metadata={b"oneencoder": json.dumps(meta, sort_keys=True).encode("utf-8")})


def embed_to_files(run_dir: Path | str, store_path: Path | str, out: Path | str, fmt: str = "npy",
                   batch_size: int = 256, chunk_rows: int = 65536, device: str = "cpu", overwrite: bool = False,
                   progress: bool = False) -> dict:
    """Every item of a store through the run's head, written to ``out`` as aligned unit vectors.

    Resumable: a folder made from the same run weights, store and format continues from its last complete chunk
    (``rows_done`` in ``embed.json``); a finished one is left as it is. A folder made from another run or store is
    refused unless ``overwrite``. Returns the ``embed.json`` record plus ``resumed_from`` (rows found done)."""
    from pipeline.training.rundir import RunDir, check_compatible

    if fmt not in EMBED_FORMATS:
        raise EmbedError(f"format must be one of {', '.join(EMBED_FORMATS)}, not {fmt!r}")
    if chunk_rows < 1 or batch_size < 1:
        raise EmbedError("--batch-size and the chunk size must be at least 1")
    out = Path(out)
    run_id = run_identity(run_dir)
    store = FeatureStore.open(store_path)
    model, _, config = RunDir(run_dir).load_model(device)
    check_compatible(config, store.modality, store)
    width = int(config["model"]["width"])  # every head's output width
    wanted = {"format": fmt, "modality": store.modality, "count": len(store), "width": width, "run": run_id,
              "store": store_identity(store), "chunk_rows": chunk_rows, "dtype": "float32", "normalised": True}
    meta_path = out / EMBED_META
    done = 0
    if meta_path.is_file() and not overwrite:
        found = json.loads(meta_path.read_text(encoding="utf-8"))
        same = {k: found.get(k) for k in wanted} == wanted
        if not same:
            differ = sorted(k for k in wanted if found.get(k) != wanted[k])
            raise EmbedError(f"{out} holds embeddings made differently ({', '.join(differ)} differ); choose another "
                             "--out or pass --overwrite")
        done = int(found.get("rows_done", 0))
        if found.get("complete"):
            return {**found, "resumed_from": done}
    else:
        if out.exists() and overwrite:
            for name in [EMBED_META, "embeddings.npy", "ids.json", *INDEX_FILES, *(p.name for p in out.glob("part-*"))]:
                (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    resumed_from = done
    record = {**wanted, "rows_done": done, "complete": False}
    if fmt == "npy":
        if done == 0:
            atomic_write_text(out / "ids.json", json.dumps(list(store.ids)))
            matrix = np.lib.format.open_memmap(out / "embeddings.npy", mode="w+", dtype=np.float32,
                                               shape=(len(store), width))
        else:
            matrix = np.load(out / "embeddings.npy", mmap_mode="r+")
    else:
        for stale in out.glob("part-*.parquet.tmp*"):
            stale.unlink()
    atomic_write_text(meta_path, json.dumps(record, indent=2, sort_keys=True))
    with progress_bar(total=len(store), desc=f"embed {store.modality}", enabled=progress) as bar:
        bar.update(done)
        while done < len(store):
            start, stop = done, min(done + chunk_rows, len(store))
            vectors = embed_store(model, store.modality, store, np.arange(start, stop), batch_size=batch_size,
                                  device=device).numpy()
            if fmt == "npy":
                matrix[start:stop] = vectors
                matrix.flush()
            else:
                _write_parquet_part(out, start // chunk_rows, store.ids[start:stop], vectors, width, wanted)
            done = stop
            record["rows_done"] = done
            atomic_write_text(meta_path, json.dumps(record, indent=2, sort_keys=True))
            bar.update(stop - start)
    record["complete"] = True
    atomic_write_text(meta_path, json.dumps(record, indent=2, sort_keys=True))
    return {**record, "resumed_from": resumed_from}


def _write_parquet_part(out: Path, part: int, ids: Sequence[str], vectors: np.ndarray, width: int,
                        meta: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    table = pa.Table.from_arrays([pa.array(list(ids), pa.string()), pa.FixedSizeListArray.from_arrays(flat, width)],
                                 schema=_parquet_schema(width, meta))
    final = out / f"part-{part:05d}.parquet"
    tmp = out / f"{final.name}.tmp{os.getpid()}"
    pq.write_table(table, tmp)
    os.replace(tmp, final)


def read_embeddings(folder: Path | str, mmap: bool = True) -> tuple[list[str], np.ndarray, dict]:
    """``(ids, [N, W] float32, embed.json record)`` of a finished embedding folder (either format)."""
    folder = Path(folder)
    meta_path = folder / EMBED_META
    if not meta_path.is_file():
        raise EmbedError(f"{folder} holds no embeddings ({EMBED_META} missing); write them with `embed` first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if not meta.get("complete"):
        raise EmbedError(f"{folder}: the embedding stopped at row {meta.get('rows_done')} of {meta.get('count')}; "
                         "run the same `embed` command again to finish it")
    if meta["format"] == "npy":
        ids = json.loads((folder / "ids.json").read_text(encoding="utf-8"))
        matrix = np.load(folder / "embeddings.npy", mmap_mode="r" if mmap else None)
    else:
        import pyarrow.parquet as pq

        parts = sorted(folder.glob("part-*.parquet"))
        tables = [pq.read_table(p) for p in parts]
        ids = [i for t in tables for i in t.column("id").to_pylist()]
        matrix = np.concatenate([t.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, meta["width"])
                                 for t in tables]) if tables else np.zeros((0, meta["width"]), np.float32)
    if len(ids) != meta["count"] or matrix.shape != (meta["count"], meta["width"]):
        raise EmbedError(f"{folder}: found {len(ids)} ids and a {tuple(matrix.shape)} matrix, expected "
                         f"{meta['count']} x {meta['width']} (files changed since they were written)")
    return ids, matrix, meta


# Files an index adds beside the embeddings (pipeline/search.py); removed with them on --overwrite.
INDEX_FILES = ("index.faiss", "index.json")
