"""Concept curation (freeze-align, Section 3.2): keep the captions closest to each concept of a labelled store.

Concept prototypes are the mean L2-normalised embedding of each label's items in a labelled store (e.g. images of
ImageNet classes). Every caption is scored by cosine against every prototype and assigned to its best concept;
each concept keeps its ``K`` best-scoring captions. Embeddings are the stores' raw pooled features, or, with a run,
the run's aligned embeddings (:func:`pipeline.embed.embed_store`), which is required when the raw features of the
two stores have different widths (they then live in different spaces).

Both stores are streamed in batches: only the prototypes and one (concept, score) per caption stay in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.embed import embed_store
from pipeline.training.rundir import RunDir, check_compatible
from stores import FeatureStore, OneEncoderError, atomic_write_text


class CurationError(OneEncoderError, ValueError):
    """The stores given to ``curate`` cannot be curated as asked."""


def _batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, batch_size):
        yield np.arange(start, min(start + batch_size, n))


def _embed(store: FeatureStore, indices: np.ndarray, model: nn.Module | None, device: str) -> torch.Tensor:
    """Unit vectors of ``indices``: aligned embeddings through ``model``, or the raw pooled features."""
    if model is not None:
        return embed_store(model, store.modality, store, indices, batch_size=len(indices), device=device)
    return F.normalize(store.pooled(indices).double(), dim=-1).float()


def label_key(label: Any) -> str:
    """Labels as JSON text, so that 1 and "1" stay apart and any JSON value can name a concept."""
    return json.dumps(label, sort_keys=True)


def class_indices(labels: list) -> tuple[list, np.ndarray]:
    """``(classes, index of each item's class)``: the distinct labels sorted (numerically when all are numbers)."""
    keys = [label_key(label) for label in labels]
    distinct = {k: label for k, label in zip(keys, labels, strict=True)}
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct.values())
    order = sorted(distinct, key=lambda k: distinct[k]) if numeric else sorted(distinct, key=str)
    position = {k: c for c, k in enumerate(order)}
    return [distinct[k] for k in order], np.asarray([position[k] for k in keys], dtype=np.int64)


def labels_of(store: FeatureStore, role: str, error: type[Exception] = CurationError) -> list:
    """Every item's label; ``error`` naming the store when it has none, or naming the items without one."""
    if store.labels is None:
        raise error(f"{role} store {store.path} has no labels: every item needs a 'label' (from the manifest it "
                    "was extracted from)")
    unlabelled = [store.ids[i] for i, label in enumerate(store.labels) if label is None]
    if unlabelled:
        raise error(f"{len(unlabelled)} items of {role} store {store.path} have no label, e.g. {unlabelled[:5]}")
    return list(store.labels)


def concept_prototypes(store: FeatureStore, model: nn.Module | None = None, batch_size: int = 1024,
                       device: str = "cpu") -> tuple[list, torch.Tensor, np.ndarray]:
    """``(concepts, prototypes [C, D] unit vectors, items per concept)``: the mean unit embedding of each label,
    re-normalised; concepts in sorted order of their labels."""
    concepts, target = class_indices(labels_of(store, "labelled"))
    sums: torch.Tensor | None = None
    for idx in _batches(len(store), batch_size):
        emb = _embed(store, idx, model, device).double()
        if sums is None:
            sums = torch.zeros(len(concepts), emb.shape[1], dtype=torch.float64)
        sums.index_add_(0, torch.from_numpy(target[idx]), emb)
    assert sums is not None  # a finished store has at least one item
    return concepts, F.normalize(sums, dim=-1).float(), np.bincount(target, minlength=len(concepts))


def source_items(store: FeatureStore) -> tuple[dict[str, Any] | None, str | None]:
    """``(manifest items by id, None)`` when the manifest the store was extracted from is still there, unchanged;
    else ``(None, why not)``.

    A store keeps ids, labels and refs but not the texts or media paths; the manifest path recorded at extraction
    plus the manifest hash in the identity let us recover them safely (an edited manifest might name other texts).
    """
    from extract.manifest import ManifestError, manifest_sha256, read_manifest

    manifest = (store.meta.summary or {}).get("manifest")
    if not manifest:
        return None, f"store {store.path} records no manifest (it was not extracted from one)"
    if not Path(manifest).is_file():
        return None, f"the manifest {manifest} that store {store.path} was extracted from is gone"
    if manifest_sha256(manifest) != store.identity.get("manifest_sha256"):
        return None, (f"the manifest {manifest} changed since store {store.path} was extracted from it (its sha256 "
                      "differs from the store identity's manifest_sha256)")
    try:
        return {item.id: item for item in read_manifest(manifest)}, None
    except ManifestError as err:
        return None, f"the manifest {manifest} of store {store.path} cannot be read: {str(err).splitlines()[0]}"


def _best_concepts(captions: FeatureStore, prototypes: torch.Tensor, model: Any, batch_size: int,
                   device: str) -> tuple[np.ndarray, np.ndarray]:
    """Each caption's most similar concept (its row in ``prototypes``) and that cosine."""
    best = np.zeros(len(captions), dtype=np.int64)
    score = np.zeros(len(captions), dtype=np.float64)
    for idx in _batches(len(captions), batch_size):
        similarity = _embed(captions, idx, model, device).double() @ prototypes.double().T
        top = similarity.max(dim=1)
        best[idx], score[idx] = top.indices.numpy(), top.values.numpy()
    return best, score


def _keep_per_concept(concepts: list, support: Any, best: np.ndarray, score: np.ndarray,
                      per_concept: int) -> tuple[list[np.ndarray], list[dict]]:
    """The rows kept for each concept (its ``per_concept`` best-scoring captions, best first) and its counts."""
    kept: list[np.ndarray] = []
    per = []
    for c, concept in enumerate(concepts):
        mine = np.flatnonzero(best == c)
        mine = mine[np.argsort(-score[mine], kind="stable")]  # ties keep store order
        kept.append(mine[:per_concept])
        per.append({"concept": concept, "prototype_items": int(support[c]), "assigned": len(mine),
                    "kept": len(kept[-1]),
                    "best_score": float(score[mine[0]]) if len(mine) else None,
                    "lowest_kept_score": float(score[kept[-1][-1]]) if len(kept[-1]) else None})
    return kept, per


def _caption_record(captions: FeatureStore, sources: dict | None, i: int, concept: Any, score: float) -> dict:
    """The output line of kept caption ``i``: its id, its text or path (when its manifest is there), ref, label,
    concept and score."""
    record: dict[str, Any] = {"id": captions.ids[i]}
    item = sources.get(captions.ids[i]) if sources else None
    if item is not None and item.text is not None:
        record["text"] = item.text
    elif item is not None and item.path is not None:
        record["path"] = item.path
    if captions.refs is not None and captions.refs[i] is not None:
        record["ref"] = captions.refs[i]
    if captions.labels is not None and captions.labels[i] is not None:
        record["label"] = captions.labels[i]
    record.update(concept=concept, score=round(float(score), 6))
    return record


def curate(
    prototypes_store: str | Path,
    captions_store: str | Path,
    per_concept: int,
    out: str | Path,
    run_dir: str | Path | None = None,
    batch_size: int = 1024,
    device: str = "cpu",
) -> dict:
    """Keep the ``per_concept`` captions most similar to each concept prototype and write them as JSONL to ``out``.

    Each caption goes to its best concept only (a caption is kept at most once). Output records, best first within
    each concept: ``id``, ``text`` (or ``path``) when the caption store's manifest is still there unchanged,
    ``ref`` and ``label`` when the caption had them, ``concept`` and ``score`` (the cosine). With ``text`` the file
    is itself a text manifest (unknown keys are ignored), ready for ``extract``. Returns a report with per-concept
    counts; ``short`` lists the concepts that got fewer than ``per_concept`` captions.
    """
    if per_concept < 1:
        raise CurationError(f"--per-concept must be at least 1, got {per_concept}")
    labelled, captions = FeatureStore.open(prototypes_store), FeatureStore.open(captions_store)
    model = None
    space = "raw pooled features"
    if run_dir is not None:
        run = RunDir(run_dir)
        model, _, config = run.load_model(device)
        for store in (labelled, captions):
            check_compatible(config, store.modality, store)
        space = f"aligned embeddings of run {run.path}"
    elif labelled.dim != captions.dim:
        raise CurationError(
            f"the raw features of {labelled.path} ({labelled.dim}-d, {labelled.modality}) and {captions.path} "
            f"({captions.dim}-d, {captions.modality}) have different widths, so they cannot be compared directly: "
            "pass --run RUN_DIR to compare them in the run's aligned space"
        )
    warning = None
    if model is None:
        encoders = [(s.identity.get("encoder") or {}).get("id") for s in (labelled, captions)]
        if encoders[0] != encoders[1]:
            # Same width is not the same space: only the user knows whether these encoders share one (a CLIP pair).
            warning = (f"raw features of different encoders ({encoders[0]} and {encoders[1]}) are compared "
                       "directly; this is meaningful only if they share one embedding space (else pass --run)")
    concepts, prototypes, support = concept_prototypes(labelled, model, batch_size, device)
    best, score = _best_concepts(captions, prototypes, model, batch_size, device)
    kept, per = _keep_per_concept(concepts, support, best, score, per_concept)
    sources, _ = source_items(captions)
    lines = [json.dumps(_caption_record(captions, sources, i, concepts[c], score[i]), ensure_ascii=False)
             for c, rows in enumerate(kept) for i in rows]
    out = Path(out)
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    return {
        "task": "curate",
        "prototypes_store": str(labelled.path),
        "captions_store": str(captions.path),
        "space": space,
        "per_concept": per_concept,
        "captions": len(captions),
        "kept": len(lines),
        "with_text": sources is not None,
        "concepts": per,
        "short": [p["concept"] for p in per if p["kept"] < per_concept],
        "warning": warning,
        "out": str(out),
    }


def format_curation(report: dict) -> str:
    """The per-concept counts of a :func:`curate` report as a plain-text table."""
    names = [json.dumps(p["concept"]) if not isinstance(p["concept"], str) else p["concept"]
             for p in report["concepts"]]
    width = max([len("concept"), *map(len, names)]) + 2
    lines = [f"{len(report['concepts'])} concepts from {report['prototypes_store']}; {report['captions']} captions "
             f"of {report['captions_store']} scored by cosine in the {report['space']}",
             f"{'concept':<{width}}{'images':>8}{'assigned':>10}{'kept':>6}{'best':>8}{'lowest kept':>13}"]
    for name, p in zip(names, report["concepts"], strict=True):
        best = f"{p['best_score']:.3f}" if p["best_score"] is not None else "-"
        low = f"{p['lowest_kept_score']:.3f}" if p["lowest_kept_score"] is not None else "-"
        lines.append(f"{name:<{width}}{p['prototype_items']:>8}{p['assigned']:>10}{p['kept']:>6}{best:>8}{low:>13}")
    k = report["per_concept"]
    if report["short"]:
        short = [n for n, p in zip(names, report["concepts"], strict=True) if p["kept"] < k]
        lines.append(f"{len(short)} concept(s) got fewer than {k} captions: {', '.join(short)}")
    else:
        lines.append(f"every concept got {k} captions")
    text = "with texts from the caption store's manifest" if report["with_text"] else (
        "ids only: the caption store's manifest is gone or changed, so no texts")
    lines.append(f"{report['kept']} captions written to {report['out']} ({text})")
    if report.get("warning"):
        lines.append(f"warning: {report['warning']}")
    return "\n".join(lines)
