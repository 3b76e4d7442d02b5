"""Nearest-neighbour search over aligned embeddings: a FAISS index beside an ``embed`` folder, and chunked exact
top-k / rank helpers that never hold a query x gallery matrix.

``build_index`` writes ``index.faiss`` + ``index.json`` into the embedding folder. Kinds (inner product on unit
vectors = cosine): ``flat`` (exact, ``IndexFlatIP``), ``hnsw`` (``IndexHNSWFlat``, graph, no training) and ``ivf``
(``IndexIVFFlat``, k-means cells, needs a training sample); ``auto`` is exact up to :data:`EXACT_UP_TO` vectors and
IVF past it (the measurement behind the threshold is in docs/evaluation.md, "Search").

``search`` embeds one query with the run that made the embeddings (text, a media file, or an item of any aligned
store) and returns the top k with ids, scores and the items' paths or texts from the store's manifest.

``exact_topk`` and ``first_relevant_ranks`` are for evaluation on large galleries: they stream gallery chunks
(a memory-mapped ``embeddings.npy`` works) so memory stays ``query_chunk x gallery_chunk`` scores, never
``queries x gallery``.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.embed import EmbedError, read_embeddings, run_identity
from stores import atomic_write_text

INDEX_FILE, INDEX_META = "index.faiss", "index.json"
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")
# Past this many vectors ``auto`` builds IVF: measured at width 256 on 2 busy CPU cores, an exact query took 80 ms at
# 100k vectors and 370 ms at 400k, IVF 0.6 / 7 ms at recall@10 1.0 (docs/evaluation.md, "Search").
EXACT_UP_TO = 100_000
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128


class SearchError(EmbedError):
    """The index or the query cannot be used as asked."""


def _faiss():
    import faiss

    return faiss


def build_index(folder: Path | str, kind: str = "auto", nlist: int | None = None, nprobe: int | None = None) -> dict:
    """Build a nearest-neighbour index over the finished embeddings in ``folder`` and save it there.

    ``ivf``: ``nlist`` cells (default ``4 sqrt(N)``), trained on at most ``40 nlist`` vectors, searched with
    ``nprobe`` cells (default ``nlist / 16``, at least 1). Returns the ``index.json`` record."""
    if kind not in INDEX_KINDS:
        raise SearchError(f"index kind must be one of {', '.join(INDEX_KINDS)}, not {kind!r}")
    faiss = _faiss()
    folder = Path(folder)
    _, matrix, meta = read_embeddings(folder)
    n, width = matrix.shape
    if n == 0:
        raise SearchError(f"{folder}: no embeddings to index")
    chosen = kind if kind != "auto" else ("flat" if n <= EXACT_UP_TO else "ivf")
    params: dict = {}
    if chosen == "flat":
        index = faiss.IndexFlatIP(width)
    elif chosen == "hnsw":
        index = faiss.IndexHNSWFlat(width, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH
        params = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
    else:
        nlist = nlist or max(1, int(4 * np.sqrt(n)))
        if nlist > n:
            raise SearchError(f"an IVF index of {nlist} cells needs at least {nlist} vectors, {folder} has {n}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(n, size=min(n, 40 * nlist), replace=False)
        index.train(np.ascontiguousarray(matrix[np.sort(sample)], dtype=np.float32))
        index.nprobe = nprobe or max(1, nlist // 16)
        params = {"nlist": nlist, "nprobe": index.nprobe}
    for start in range(0, n, 65536):  # adds in slices, so a memory-mapped matrix is never copied whole
        index.add(np.ascontiguousarray(matrix[start : start + 65536], dtype=np.float32))
    tmp = folder / f".{INDEX_FILE}.tmp"
    faiss.write_index(index, str(tmp))
    tmp.replace(folder / INDEX_FILE)
    record = {"kind": chosen, "requested": kind, "vectors": n, "width": width, "params": params,
              "metric": "inner product (cosine on unit vectors)", "run_weights_sha256": meta["run"]["weights_sha256"],
              "store_key": meta["store"]["key"]}
    atomic_write_text(folder / INDEX_META, json.dumps(record, indent=2, sort_keys=True))
    return record


def load_index(folder: Path | str):
    """``(faiss index, ids, embed.json record, index.json record)``; refuses an index older than its embeddings."""
    faiss = _faiss()
    folder = Path(folder)
    if not (folder / INDEX_FILE).is_file():
        raise SearchError(f"{folder} has no {INDEX_FILE}; build one with `index --embeddings {folder}`")
    record = json.loads((folder / INDEX_META).read_text(encoding="utf-8"))
    ids, _, meta = read_embeddings(folder)
    if (record["run_weights_sha256"], record["store_key"], record["vectors"]) != (
            meta["run"]["weights_sha256"], meta["store"]["key"], len(ids)):
        raise SearchError(f"{folder}: the index was built over other embeddings than the ones there now; rebuild "
                          "it with `index`")
    return faiss.read_index(str(folder / INDEX_FILE)), ids, meta, record


def query_vector(run_dir: Path | str, *, text: str | None = None, file: str | Path | None = None,
                 modality: str | None = None, item: str | None = None, item_store: Path | str | None = None,
                 folder: Path | str | None = None, encoder_spec: str | None = None,
                 device: str = "cpu") -> tuple[np.ndarray, dict]:
    """One unit query vector ``[W]`` and a description of the query.

    Exactly one of: ``text``; ``file`` (a media file of ``modality``); ``item`` (an item id of ``item_store``, any
    aligned modality, or without a store an id of the indexed embeddings in ``folder``)."""
    from pipeline.encode import encode
    from pipeline.training.rundir import RunDir, check_compatible
    from stores import FeatureStore

    if sum(x is not None for x in (text, file, item)) != 1:
        raise SearchError("give exactly one query: a text, a file or an item id")
    if text is not None:
        _, vectors = encode(run_dir, "text", [text], encoder_spec=encoder_spec, device=device)
        return vectors[0], {"text": text, "modality": "text"}
    if file is not None:
        if modality is None:
            raise SearchError(f"say which modality {file} is (image, audio or video)")
        if not Path(file).is_file():
            raise SearchError(f"query file {file} does not exist")
        ids, vectors = encode(run_dir, modality, [str(file)], encoder_spec=encoder_spec, device=device)
        if len(ids) != 1:  # an audio split into segments or a video into clips: one query of their mean
            vectors = vectors.mean(0, keepdims=True) / np.linalg.norm(vectors.mean(0))
        return vectors[0], {"file": str(file), "modality": modality}
    if item_store is None:
        ids, matrix, meta = read_embeddings(folder)
        try:
            row = ids.index(str(item))
        except ValueError:
            raise SearchError(f"id {item!r} is not among the indexed items of {folder}; give --item-store to take "
                              "it from a store") from None
        return np.asarray(matrix[row], dtype=np.float32), {"item": str(item), "modality": meta["modality"]}
    from pipeline.embed import embed_store

    store = FeatureStore.open(item_store)
    model, _, config = RunDir(run_dir).load_model(device)
    check_compatible(config, store.modality, store)
    try:
        index = store.index_of(str(item))
    except KeyError as err:
        raise SearchError(str(err.args[0])) from None
    vector = embed_store(model, store.modality, store, [index], device=device)[0].numpy()
    return vector, {"item": str(item), "store": str(store.path), "modality": store.modality}


def _item_sources(meta: dict) -> tuple[dict | None, str | None]:
    """Manifest records of the embedded store's items, by id (see ``pipeline.curate.source_items``)."""
    from pipeline.curate import source_items
    from stores import FeatureStore, StoreError

    try:
        return source_items(FeatureStore.open(meta["store"]["path"]))
    except (StoreError, OSError) as err:
        return None, f"store {meta['store']['path']} cannot be opened ({err}): results are shown by id"


def search(run_dir: Path | str, folder: Path | str, k: int = 10, *, text: str | None = None,
           file: str | Path | None = None, modality: str | None = None, item: str | None = None,
           item_store: Path | str | None = None, encoder_spec: str | None = None, device: str = "cpu") -> dict:
    """The ``k`` nearest indexed items to one query: ``{"query", "results": [{rank, id, score, path|text}], ...}``.

    The run must be the one whose weights made the embeddings (another run's space is not comparable)."""
    if k < 1:
        raise SearchError(f"k must be at least 1, got {k}")
    index, ids, meta, record = load_index(folder)
    if run_identity(run_dir)["weights_sha256"] != meta["run"]["weights_sha256"]:
        raise SearchError(f"{folder} was embedded with other weights ({meta['run']['path']}) than run {run_dir}: "
                          "query with that run, or embed the store again with this one")
    vector, query = query_vector(run_dir, text=text, file=file, modality=modality, item=item, item_store=item_store,
                                 folder=folder, encoder_spec=encoder_spec, device=device)
    scores, rows = index.search(np.ascontiguousarray(vector[None, :], dtype=np.float32), min(k, len(ids)))
    sources, problem = _item_sources(meta)
    results = []
    for rank, (row, score) in enumerate(zip(rows[0].tolist(), scores[0].tolist(), strict=True), start=1):
        if row < 0:  # an approximate index may return fewer than k
            continue
        item_id = ids[row]
        source = sources.get(item_id.split("#")[0]) if sources else None
        entry = {"rank": rank, "id": item_id, "score": round(float(score), 6)}
        if source is not None:
            entry.update({"path": source.path} if source.path is not None else {"text": source.text})
        results.append(entry)
    return {"task": "search", "run": str(run_dir), "index": str(folder), "index_kind": record["kind"],
            "modality": meta["modality"], "query": query, "k": k, "results": results,
            "warnings": [problem] if problem else []}


def search_html(report: dict, out: Path | str, thumb: int = 128) -> Path:
    """The search results as one self-contained HTML page (image results as embedded thumbnails)."""
    from pipeline.rendering.sheet_page import Thumbnails

    thumbs, e = Thumbnails(thumb), html.escape
    query = report["query"]
    shown = query.get("text") or query.get("file") or f"item {query.get('item')}"
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>search: {e(shown)}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em} td{vertical-align:top;font-size:12px;width:"
             f"{thumb}px}} .meta{{color:#666}}</style></head><body>",
             f"<h1>{e(shown)}</h1>", f'<p class="meta">run {e(report["run"])}; index {e(report["index"])} '
             f'({e(report["index_kind"])}); top {report["k"]} of {e(report["modality"])}</p>']
    if query.get("modality") == "image" and query.get("file"):
        uri, _ = thumbs.data_uri({"id": "query", "path": query["file"]})
        parts.append(f'<p><img src="{uri}" alt="query"></p>')
    parts += [f'<p class="meta">{e(w)}</p>' for w in report["warnings"]]
    parts.append("<table><tr>")
    for hit in report["results"]:
        if report["modality"] == "image":
            uri, _ = thumbs.data_uri(hit)
            body = f'<img src="{uri}" alt="{e(hit["id"])}">'
        else:
            body = f"<div>{e(str(hit.get('text') or hit.get('path') or hit['id']))}</div>"
        parts.append(f'<td data-rank="{hit["rank"]}" data-id="{e(hit["id"])}">{body}<div class="meta">'
                     f'#{hit["rank"]} &middot; cos {hit["score"]:.3f} &middot; {e(hit["id"])}</div></td>')
    parts.append("</tr></table></body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(parts) + "\n")
    return out


# ---- exact search without a queries x gallery matrix -------------------------------------------------------------
def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def exact_topk(queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor, k: int,
               query_chunk: int = 1024, gallery_chunk: int = 65536,
               device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` by inner product: ``(scores [Q, k], gallery rows [Q, k])`` on the CPU, best first; ties go to
    the lower row. ``gallery`` may be a memory-mapped array: it is read ``gallery_chunk`` rows at a time and each
    chunk is moved to ``device`` (default: where ``queries`` are), so a CUDA device does the products.

    Peak extra memory: ``4 * query_chunk * (gallery_chunk + 2k)`` bytes of scores plus one float32 gallery chunk
    (``4 * gallery_chunk * W``), whatever Q and N are (docs/evaluation.md, "Search")."""
    q_all = _queries(queries, device)
    n = len(gallery)
    k = min(k, n)
    best_scores = torch.empty((len(q_all), k), device=q_all.device)
    best_rows = torch.empty((len(q_all), k), dtype=torch.int64, device=q_all.device)
    for g0, g1 in _chunks(n, gallery_chunk):
        block = _rows(gallery, g0, g1).to(q_all.device)
        for q0, q1 in _chunks(len(q_all), query_chunk):
            scores = q_all[q0:q1] @ block.T
            top = scores.topk(min(k, g1 - g0), dim=1)  # topk is not stable: equal scores are re-sorted below
            cand_s, cand_r = top.values, top.indices + g0
            if g0 > 0:
                cand_s = torch.cat([best_scores[q0:q1], cand_s], 1)
                cand_r = torch.cat([best_rows[q0:q1], cand_r], 1)
            # best score first, lower row first among equals: sort by row, then stably by score
            by_row = torch.argsort(cand_r, dim=1)
            cand_s, cand_r = cand_s.gather(1, by_row), cand_r.gather(1, by_row)
            order = torch.argsort(cand_s, dim=1, descending=True, stable=True)[:, :k]
            best_scores[q0:q1], best_rows[q0:q1] = cand_s.gather(1, order), cand_r.gather(1, order)
    return best_scores.cpu(), best_rows.cpu()


def _queries(queries: np.ndarray | torch.Tensor, device: str | torch.device | None) -> torch.Tensor:
    q = queries.float() if torch.is_tensor(queries) else torch.from_numpy(np.array(queries, dtype=np.float32))
    return q.to(device) if device is not None else q


def _rows(matrix: np.ndarray | torch.Tensor, start: int, stop: int) -> torch.Tensor:
    if torch.is_tensor(matrix):
        return matrix[start:stop].float()
    return torch.from_numpy(np.array(matrix[start:stop], dtype=np.float32))  # a copy: memory maps are read-only


def first_relevant_ranks(queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor,
                         relevant: Sequence[Sequence[int]], query_chunk: int = 1024,
                         gallery_chunk: int = 65536, device: str | torch.device | None = None) -> np.ndarray:
    """1-based rank of each query's best-scored relevant gallery row, ties counted against the query (the rule of
    ``pipeline.evaluation.metrics.ranks_of_first_match``), computed chunk by chunk.

    ``relevant[i]``: the gallery rows relevant to query ``i`` (at least one). Two passes over the gallery: the
    first takes the best relevant score of each query, the second counts the irrelevant rows scoring at least as
    well. Both read the scores from the same chunked products, so a relevant row is compared with itself exactly.
    ``device``: as for :func:`exact_topk`."""
    q_all = _queries(queries, device)
    if len(relevant) != len(q_all):
        raise ValueError(f"{len(q_all)} queries but {len(relevant)} relevance lists")
    if any(len(r) == 0 for r in relevant):
        raise ValueError("every query needs at least one relevant target")
    pair_query = torch.from_numpy(np.repeat(np.arange(len(relevant)), [len(r) for r in relevant])).to(q_all.device)
    pair_row = torch.from_numpy(np.concatenate([np.asarray(r, dtype=np.int64) for r in relevant])).to(q_all.device)
    best = torch.full((len(q_all),), -torch.inf, device=q_all.device)
    better = torch.zeros(len(q_all), dtype=torch.int64, device=q_all.device)
    for counting in (False, True):
        for g0, g1 in _chunks(len(gallery), gallery_chunk):
            block = _rows(gallery, g0, g1).to(q_all.device)
            for q0, q1 in _chunks(len(q_all), query_chunk):
                scores = q_all[q0:q1] @ block.T
                inside = (pair_query >= q0) & (pair_query < q1) & (pair_row >= g0) & (pair_row < g1)
                pq, pr = pair_query[inside] - q0, pair_row[inside] - g0
                if not counting:
                    best[q0:q1] = best[q0:q1].scatter_reduce(0, pq, scores[pq, pr], reduce="amax")
                else:
                    scores[pq, pr] = -torch.inf  # relevant rows never count against their query
                    better[q0:q1] += (scores >= best[q0:q1, None]).sum(1)
    return (better + 1).cpu().numpy()
