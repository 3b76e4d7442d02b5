"""Retrieval and classification metrics over L2-normalised embeddings.

Retrieval is defined on a many-to-many relevance between distinct queries and distinct gallery items (a query may
have several relevant items, and an item may be relevant to several queries). Each query's gallery is ranked by
descending score; **ties count against the query**: among items of equal score the irrelevant ones rank first.
The definitions, per query ``q`` with relevant set ``R_q`` (never empty):

- ``rank``: 1-based rank of the best-ranked relevant item (1 + the irrelevant items scoring at least as well);
- ``R@k``: the fraction of queries with ``rank <= k`` (the hit rate of CLIP-style papers); ``P@1`` equals R@1;
- ``recall@1``: relevant items in the top 1 over ``|R_q|``, averaged;
- ``mAP``: the mean over queries of ``AP = (1/|R_q|) * sum_i i / rank_i`` over the relevant items in ranked order;
- ``median_rank``, ``mean_rank`` (MnR): of ``rank`` over the queries; ``mean_rank_se``: the standard error of
  ``mean_rank`` (the sample standard deviation of ``rank`` over the square root of the number of queries).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from pipeline.training.pairs import Relevance

# Queries are scored in chunks of at most this many (query, gallery item) cells: a large gallery never needs the
# whole similarity matrix at once.
CHUNK_CELLS = 1 << 22


def ranks_of_first_match(similarity: torch.Tensor, relevant: torch.Tensor) -> np.ndarray:
    """1-based rank of the best-ranked relevant target for each query.

    ``similarity`` [Q, T]; ``relevant`` bool [Q, T] (a query may have several relevant targets, e.g. an image and its
    five captions). Ties count against the query (a relevant target tied with k others ranks after them).
    """
    if not bool(relevant.any(1).all()):
        raise ValueError("every query needs at least one relevant target")
    best_relevant = torch.where(relevant, similarity, torch.full_like(similarity, -torch.inf)).max(1).values
    # Irrelevant targets scoring at least as well as the best relevant one all rank before it.
    better = ((similarity >= best_relevant[:, None]) & ~relevant).sum(1)
    return (better + 1).cpu().numpy()


def _query_stats(similarity: torch.Tensor, relevant: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query: rank of the first relevant item, average precision, and recall@1.

    The i-th relevant item in ranked order (ties against the query) has rank ``i`` + the irrelevant items scoring
    at least as well as it, so one sort of the irrelevant scores and a binary search per relevant item give every
    rank (no sort of the whole gallery with its indices)."""
    count = relevant.sum(1)
    if not bool((count > 0).all()):
        raise ValueError("every query needs at least one relevant target")
    lowest = torch.tensor(-torch.inf, dtype=similarity.dtype, device=similarity.device)
    irrelevant_sorted = torch.where(relevant, lowest, similarity).sort(dim=1).values  # ascending; relevant = -inf
    relevant_scores = torch.where(relevant, similarity, lowest).topk(int(count.max()), dim=1).values  # descending
    at_least = similarity.shape[1] - torch.searchsorted(irrelevant_sorted, relevant_scores.contiguous(), side="left")
    i = torch.arange(1, relevant_scores.shape[1] + 1, device=similarity.device, dtype=torch.float64)
    ranks = i + at_least  # [queries, most relevant]; columns past a query's count are padding
    valid = i <= count[:, None]
    ap = torch.where(valid, i / ranks, 0.0).sum(1) / count
    first = ranks[:, 0].long()
    return first.cpu().numpy(), ap.cpu().numpy(), ((first == 1).double() / count).cpu().numpy()


def average_precision(similarity: torch.Tensor, relevant: torch.Tensor) -> np.ndarray:
    """AP of each query over all its relevant targets (ties count against the query, as for the ranks)."""
    return _query_stats(similarity, relevant)[1]


def _summary(ranks: np.ndarray, ap: np.ndarray, recall_at_1: np.ndarray, ks: tuple[int, ...]) -> dict:
    out = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out["P@1"] = float(np.mean(ranks <= 1))
    out["recall@1"] = float(np.mean(recall_at_1))
    out["mAP"] = float(np.mean(ap))
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = float(np.mean(ranks))
    # Its standard error over the queries: how far apart two mean ranks must be to say one model ranks better.
    out["mean_rank_se"] = float(np.std(ranks, ddof=1) / np.sqrt(len(ranks))) if len(ranks) > 1 else 0.0
    out["queries"] = int(len(ranks))
    return out


def query_metrics(similarity: torch.Tensor, relevant: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """Retrieval metrics of queries (rows) against targets (columns), from a dense similarity and relevance.

    ``R@k``: fraction of queries with a relevant target in the top k; ``P@1``: precision of the top result (equals
    R@1); ``recall@1``: relevant targets in the top 1 over all relevant targets of the query (differs from R@1 when
    a query has several, as in audio-text Table V); ``mAP``: mean average precision; ranks are 1-based ranks of the
    best-ranked relevant target. Definitions and the tie rule: the module docstring.
    """
    return _summary(*_query_stats(similarity, relevant), ks)


def retrieval_metrics(queries: torch.Tensor, gallery: torch.Tensor, query_pos: np.ndarray, gallery_pos: np.ndarray,
                      ks: tuple[int, ...] = (1, 5, 10), chunk_cells: int = CHUNK_CELLS) -> dict:
    """:func:`query_metrics` of every row of ``queries`` [Q, W] against ``gallery`` [T, W], where
    ``(query_pos[k], gallery_pos[k])`` are the relevant pairs; scored a chunk of queries at a time."""
    order = np.argsort(query_pos, kind="stable")
    query_pos, gallery_pos = np.asarray(query_pos)[order], np.asarray(gallery_pos)[order]
    step = max(1, chunk_cells // max(len(gallery), 1))
    parts = []
    for start in range(0, len(queries), step):
        stop = min(start + step, len(queries))
        lo, hi = np.searchsorted(query_pos, [start, stop])
        relevant = torch.zeros(stop - start, len(gallery), dtype=torch.bool)
        relevant[torch.from_numpy(query_pos[lo:hi] - start), torch.from_numpy(gallery_pos[lo:hi])] = True
        parts.append(_query_stats(queries[start:stop] @ gallery.T, relevant))
    return _summary(*(np.concatenate(column) for column in zip(*parts, strict=True)), ks)


def bidirectional_retrieval(a: torch.Tensor, b: torch.Tensor, relevance: Relevance, a_name: str = "a",
                            b_name: str = "b") -> dict[str, dict[str, float]]:
    """Metrics both ways between the embeddings ``a`` of ``relevance.anchors`` and ``b`` of ``relevance.partners``
    (each distinct item once, in that order): ``a`` queries ``b`` and ``b`` queries ``a``."""
    if (len(a), len(b)) != (len(relevance.anchors), len(relevance.partners)):
        raise ValueError(f"{len(a)} x {len(b)} embeddings for {len(relevance.anchors)} x {len(relevance.partners)} "
                         "items: embed each distinct item of the relevance once")
    return {
        f"{a_name}->{b_name}": retrieval_metrics(a, b, relevance.anchor_pos, relevance.partner_pos),
        f"{b_name}->{a_name}": retrieval_metrics(b, a, relevance.partner_pos, relevance.anchor_pos),
    }


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 2, 3, 4, 5)) -> dict:
    """Top-k accuracy for each k no larger than the number of classes."""
    ks = tuple(k for k in ks if k <= logits.shape[1])
    top = logits.topk(max(ks), dim=1).indices
    hits = top == targets[:, None]
    return {f"top{k}": float(hits[:, :k].any(1).float().mean()) for k in ks}
