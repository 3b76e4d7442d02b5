"""Evaluation from cached features: retrieval between aligned modalities, zero-shot classification."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath

import torch

from pipeline.embed import embed_store
from pipeline.encode import embed_records
from pipeline.evaluation.metrics import bidirectional_retrieval, topk_accuracy
from pipeline.training.pairs import pair_stores
from pipeline.training.rundir import RunDir, check_compatible
from stores import FeatureStore, OneEncoderError, atomic_write_text


class EvaluationError(OneEncoderError, ValueError):
    """The evaluation inputs do not fit together (classes and labels, missing labels)."""


def evaluate_retrieval(run_dir: Path | str, store_a: Path | str, store_b: Path | str, device: str = "cpu") -> dict:
    """R@1/5/10, P@1, recall@1, mAP, median and mean rank both ways between two aligned modalities.

    Pairs come from ``ref`` or ids (:func:`pair_stores`); each distinct item is embedded and ranked once, and a
    query's relevant items are all those it is paired with (many-to-many: the two spoken and the two written
    captions of one image are all relevant to each other). Definitions: :mod:`pipeline.evaluation.metrics`."""
    run = RunDir(run_dir)
    model, _, config = run.load_model(device)
    a, b = FeatureStore.open(store_a), FeatureStore.open(store_b)
    for store in (a, b):
        check_compatible(config, store.modality, store)
    relevance = pair_stores(a, b).relevance()
    emb_a = embed_store(model, a.modality, a, relevance.anchors, device=device, progress=True)  # bars only on a TTY
    emb_b = embed_store(model, b.modality, b, relevance.partners, device=device, progress=True)
    metrics = bidirectional_retrieval(emb_a, emb_b, relevance, a.modality, b.modality)
    chance_ab, chance_ba = relevance.chance_at_1()
    report = {"task": "retrieval", "run": str(run.path), "stores": {a.modality: str(a.path), b.modality: str(b.path)},
              "store_keys": {a.modality: a.key, b.modality: b.key},
              "items": {a.modality: len(relevance.anchors), b.modality: len(relevance.partners)},
              "pairs": len(relevance.anchor_pos), "metrics": metrics,
              "chance_R@1": {f"{a.modality}->{b.modality}": chance_ab, f"{b.modality}->{a.modality}": chance_ba}}
    _write(run, f"retrieval-{a.modality}-{b.modality}--{report_stem(a)}--{report_stem(b)}", report,
           retrieval_markdown)
    return report


def report_stem(store: FeatureStore) -> str:
    """A store in a report's file name: its folder name and the first 8 digits of its cache key, so that reports
    computed on different stores never share a file and one computed again on the same store replaces its own."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", PurePosixPath(str(store.path).rstrip("/")).name) or "store"
    return f"{name}-{store.key[:8]}"


def _write(run: RunDir, name: str, report: dict, markdown) -> None:
    """``RUN/eval/<name>.json`` and a Markdown table beside it; their paths go into the returned report."""
    report["markdown_path"] = str(run.path / "eval" / f"{name}.md")
    report["report_path"] = str(run.path / "eval" / f"{name}.json")
    run.write_report(name, report)
    atomic_write_text(Path(report["markdown_path"]), markdown(report))


def retrieval_markdown(report: dict) -> str:
    """A retrieval report as a Markdown table, one row per direction."""
    keys = report.get("store_keys", {})
    stores = ", ".join(f"{m}: {p} (key {keys.get(m, 'not recorded')})" for m, p in report["stores"].items())
    items = ", ".join(f"{n} {m}" for m, n in report.get("items", {}).items())
    lines = [f"# Retrieval: {' <-> '.join(report['stores'])}", "", f"- run: {report['run']}", f"- stores: {stores}",
             f"- {report['pairs']} relevant pairs" + (f" between {items} items" if items else ""), "",
             "| direction | R@1 | R@5 | R@10 | P@1 | recall@1 | mAP | median rank | mean rank | queries | chance R@1 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for direction, m in report["metrics"].items():
        lines.append(f"| {direction} | {m['R@1']:.4f} | {m['R@5']:.4f} | {m['R@10']:.4f} | {m['P@1']:.4f} | "
                     f"{m['recall@1']:.4f} | {m['mAP']:.4f} | {m['median_rank']:.1f} | {m['mean_rank']:.1f} | "
                     f"{m['queries']} | {report['chance_R@1'][direction]:.4f} |")
    return "\n".join(lines) + "\n"


def read_classes(path: Path | str) -> list[str]:
    classes = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    classes = [c for c in classes if c and not c.startswith("#")]
    if len(classes) < 2:
        raise EvaluationError(f"{path}: zero-shot needs at least 2 class names (one per line), found {len(classes)}")
    if len(set(classes)) != len(classes):
        raise EvaluationError(f"{path}: class names repeat")
    return classes


def class_targets(labels: list | None, classes: list[str], store: FeatureStore) -> torch.Tensor:
    """Class index of each item: its label is a class name, or an integer index into ``classes``."""
    if labels is None:
        raise EvaluationError(f"store {store.path} has no labels: zero-shot needs a 'label' on every item")
    position = {c: i for i, c in enumerate(classes)}
    targets, unknown = [], set()
    for label in labels:
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(classes):
            targets.append(label)
        elif str(label) in position:
            targets.append(position[str(label)])
        else:
            unknown.add(str(label))
    if unknown:
        raise EvaluationError(
            f"{len(unknown)} labels of {store.path} are not among the classes, e.g. {sorted(unknown)[:10]}"
        )
    return torch.tensor(targets)


def evaluate_zero_shot(
    run_dir: Path | str,
    image_store: Path | str,
    classes_file: Path | str,
    text_encoder: str | None = None,
    template: str = "a photo of a {}.",
    device: str = "cpu",
    prompt_store: Path | str | None = None,
) -> dict:
    """CLIP-style zero-shot classification of a labelled store's items.

    Prompts are either text made from the class names, encoded by the same extraction path as the text store
    (``text_encoder`` must be the encoder that store was built with; another one is refused), or the items of
    ``prompt_store``: a labelled store of any other aligned modality, e.g. the class names spoken as audio clips
    (the paper's Table VI). A class's prompt embedding is then the normalised mean of its clips' embeddings.
    """
    if (text_encoder is None) == (prompt_store is None):
        raise EvaluationError("zero-shot needs exactly one source of prompts: a text encoder or a prompt store")
    run = RunDir(run_dir)
    model, _, config = run.load_model(device)
    images = FeatureStore.open(image_store)
    check_compatible(config, images.modality, images)
    classes = read_classes(classes_file)
    targets = class_targets(images.labels, classes, images)
    if prompt_store is None:
        prompts = [{"id": f"class-{i}", "text": template.format(c)} for i, c in enumerate(classes)]
        class_emb = embed_records(run, model, config, "text", prompts, text_encoder, device)
        source = {"template": template}
    else:
        clips = FeatureStore.open(prompt_store)
        check_compatible(config, clips.modality, clips)
        clip_classes = class_targets(clips.labels, classes, clips)
        missing = [c for i, c in enumerate(classes) if not bool((clip_classes == i).any())]
        if missing:
            raise EvaluationError(f"prompt store {clips.path} has no item labelled {missing[:10]} "
                                  f"({len(missing)} of {len(classes)} classes): every class needs a prompt")
        clip_emb = embed_store(model, clips.modality, clips, device=device, progress=True)
        sums = torch.zeros(len(classes), clip_emb.shape[1]).index_add_(0, clip_classes, clip_emb)
        class_emb = torch.nn.functional.normalize(sums, dim=-1)
        source = {"template": None, "prompt_store": str(clips.path), "prompt_store_key": clips.key,
                  "prompt_modality": clips.modality, "prompt_items": len(clips)}
    image_emb = embed_store(model, images.modality, images, device=device, progress=True)
    accuracy = topk_accuracy(image_emb @ class_emb.T, targets)
    report = {"task": "zero-shot", "run": str(run.path), "store": str(images.path), "store_key": images.key,
              "classes": classes, **source, "items": len(images), "accuracy": accuracy,
              "chance_top1": 1 / len(classes)}
    # Named by the image store, the prompts' source and the classes (with the template): what the figure measures.
    prompts = "text" if prompt_store is None else report_stem(clips)
    task_digest = hashlib.sha256(json.dumps([classes, template if prompt_store is None else None]).encode())
    _write(run, f"zero-shot--{report_stem(images)}--{prompts}-{task_digest.hexdigest()[:8]}", report,
           zero_shot_markdown)
    return report


def zero_shot_markdown(report: dict) -> str:
    """A zero-shot report as Markdown: the top-k accuracies beside chance."""
    ks = list(report["accuracy"])
    return "\n".join([
        f"# Zero-shot: {report['store']}", "", f"- run: {report['run']}",
        f"- store key: {report.get('store_key', 'not recorded')}",
        f"- {report['items']} items, {len(report['classes'])} classes, prompts: "
        + (f"template {report['template']!r}" if report.get("template") else
           f"{report['prompt_modality']} store {report['prompt_store']} ({report['prompt_items']} items)"),
        f"- chance top-1 {report['chance_top1']:.4f}", "",
        "| " + " | ".join(ks) + " |", "|" + " ---: |" * len(ks),
        "| " + " | ".join(f"{report['accuracy'][k]:.4f}" for k in ks) + " |", ""])
