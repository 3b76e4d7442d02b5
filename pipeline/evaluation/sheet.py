"""Qualitative retrieval sheet (the paper's Figure 4): for a few queries, the top-k results of a trained run.

Text -> image rows show a caption and the ``k`` images closest to it; image -> text rows show an image and its ``k``
closest captions. The ground truth (the caption's own image, the image's own captions) is highlighted where it
appears, and each row says at which rank the ground truth came (the rank ``eval retrieval`` counts, over the same
gallery: every paired image, every paired caption). Queries are drawn with a seeded generator, so the same command
draws the same queries.

Stores hold ids, not media: thumbnails and caption texts come from the manifests the stores were extracted from
(recorded in each store), used only while their sha256 still matches the store identity; otherwise the sheet
says so and shows ids instead. Output: one self-contained HTML page (thumbnails embedded as base64 PNG) or one PNG
grid, chosen by the file suffix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.curate import source_items
from pipeline.embed import embed_store
from pipeline.evaluation.evaluate import EvaluationError
from pipeline.evaluation.metrics import ranks_of_first_match
from pipeline.rendering.sheet_page import Thumbnails, write_sheet
from pipeline.training.pairs import pair_stores
from pipeline.training.rundir import RunDir, check_compatible
from stores import FeatureStore

DIRECTIONS = ("text->image", "image->text")


class SheetError(EvaluationError):
    """The sheet cannot be made as asked (wrong stores, bad options, unknown output format)."""


def _choose(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct positions out of ``n``, in increasing order (the same for the same seed)."""
    return np.sort(rng.choice(n, size=min(count, n), replace=False))


def _rows(sim: torch.Tensor, relevant: torch.Tensor, queries: np.ndarray, k: int) -> list[dict]:
    """Top-``k`` gallery positions of each query row, their scores, which are relevant, and the ground truth's rank.

    Ordering is by descending score, ties in gallery order; the rank is :func:`ranks_of_first_match`'s (ties count
    against the query), i.e. what ``eval retrieval`` reports."""
    sim, relevant = sim[queries], relevant[queries]
    ranks = ranks_of_first_match(sim, relevant)
    order = torch.argsort(sim, dim=1, descending=True, stable=True)[:, :k]
    return [{"query": int(q), "rank": int(rank),
             "results": [{"position": int(j), "score": float(sim[row, j]), "ground_truth": bool(relevant[row, j])}
                         for j in order[row].tolist()]}
            for row, (q, rank) in enumerate(zip(queries.tolist(), ranks.tolist(), strict=True))]


def retrieval_sheet(
    run_dir: Path | str,
    image_store: Path | str,
    text_store: Path | str,
    out: Path | str | None = None,
    *,
    queries: int = 8,
    k: int = 5,
    seed: int = 0,
    directions: tuple[str, ...] = DIRECTIONS,
    thumb: int = 128,
    device: str = "cpu",
) -> dict:
    """Draw ``queries`` queries per direction, retrieve their top ``k`` with the run, and render the sheet to
    ``out`` (``.html`` or ``.png``; default ``RUN/eval/retrieval-sheet.html``). Returns a report: the rows (query,
    results with scores and ground-truth flags, ground-truth rank), warnings, the output path; for a PNG each
    result also carries its cell ``box`` ``[x0, y0, x1, y1]`` in the image."""
    if queries < 1 or k < 1:
        raise SheetError(f"--queries and --k must be at least 1 (got {queries} and {k})")
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown or not directions:
        raise SheetError(f"unknown direction(s) {unknown}; choose from {list(DIRECTIONS)}")
    run = RunDir(run_dir)
    out = Path(out) if out is not None else run.path / "eval" / "retrieval-sheet.html"
    fmt = {".html": "html", ".htm": "html", ".png": "png"}.get(out.suffix.lower())
    if fmt is None:
        raise SheetError(f"{out}: the sheet is written as .html or .png, not {out.suffix or 'a file without suffix'}")
    model, _, config = run.load_model(device)
    images, texts = FeatureStore.open(image_store), FeatureStore.open(text_store)
    for store, modality in ((images, "image"), (texts, "text")):
        if store.modality != modality:
            raise SheetError(f"store {store.path} holds {store.modality!r} features, not {modality!r}")
        check_compatible(config, modality, store)

    # The gallery of eval retrieval: every image with a caption, every caption of such an image.
    relevance = pair_stores(images, texts).relevance()
    emb_images = embed_store(model, "image", images, relevance.anchors, device=device, progress=True)
    emb_texts = embed_store(model, "text", texts, relevance.partners, device=device, progress=True)
    sim = emb_texts @ emb_images.T  # [captions, images]
    relevant = relevance.dense().T
    gallery = _Gallery(images, texts, relevance.anchors, relevance.partners)
    rows = []
    for direction in directions:
        rng = np.random.default_rng([seed, DIRECTIONS.index(direction)])  # each direction draws its own queries
        rows += gallery.rows(direction, sim, relevant, rng, queries, k)
    report: dict[str, Any] = {
        "task": "retrieval-sheet", "run": str(run.path),
        "stores": {"image": str(images.path), "text": str(texts.path)},
        "queries_per_direction": queries, "k": k, "seed": seed, "directions": list(directions),
        "gallery": {"image": len(relevance.anchors), "text": len(relevance.partners)},
        "hits_in_top_k": {d: sum(1 for r in rows if r["direction"] == d and r["rank"] <= k) for d in directions},
        "rows": rows, "warnings": gallery.warnings, "format": fmt, "out": str(out),
    }
    write_sheet(out, report, Thumbnails(thumb))
    return report


class _Gallery:
    """The images and captions of the sheet, each shown by its manifest item (path or text) when it is there."""

    def __init__(self, images: FeatureStore, texts: FeatureStore, anchors: np.ndarray, captions: np.ndarray) -> None:
        self.images, self.texts, self.anchors, self.captions = images, texts, anchors, captions
        self.image_items, image_problem = source_items(images)
        self.text_items, text_problem = source_items(texts)
        self.warnings = [f"{problem}: {what} are shown by id" for problem, what in
                         ((image_problem, "images"), (text_problem, "captions")) if problem]

    def image_entry(self, position: int) -> dict:
        index = int(self.anchors[position])
        item = self.image_items.get(self.images.ids[index]) if self.image_items else None
        return {"id": self.images.ids[index], "path": item.path if item is not None else None}

    def text_entry(self, position: int) -> dict:
        index = int(self.captions[position])
        item = self.text_items.get(self.texts.ids[index]) if self.text_items else None
        return {"id": self.texts.ids[index], "text": item.text if item is not None else None}

    def rows(self, direction: str, sim: torch.Tensor, relevant: torch.Tensor, rng: np.random.Generator,
             queries: int, k: int) -> list[dict]:
        """The sheet's rows of one direction: ``queries`` drawn queries, each with its top ``k`` results."""
        if direction == "text->image":
            picked = _rows(sim, relevant, _choose(len(self.captions), queries, rng), k)
            query_entry, result_entry = self.text_entry, self.image_entry
        else:
            picked = _rows(sim.T, relevant.T, _choose(len(self.anchors), queries, rng), k)
            query_entry, result_entry = self.image_entry, self.text_entry
        return [{"direction": direction, "query": query_entry(row["query"]), "rank": row["rank"],
                 "results": [{**result_entry(r["position"]), "rank": n, "score": round(r["score"], 6),
                              "ground_truth": r["ground_truth"]}
                             for n, r in enumerate(row["results"], start=1)]}
                for row in picked]
