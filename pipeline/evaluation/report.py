"""Several runs side by side: their configurations, evaluation results and training curves.

Everything comes from what the runs already hold (``config.json``, ``metrics.jsonl``, ``eval/*.json`` written by
``eval retrieval``, ``eval zero-shot``, ``eval linear-probe`` and ``eval fine-tune``); nothing is recomputed.
One row per run, labelled from its config (head, fusion, width, blocks, loss, training settings, the modalities
added with fit-al), with the epoch its first stage kept and that epoch's validation R@1 (a ``fit-up --sweep``
folder stands for its runs); then one table per task and **evaluation set**, one column per metric:

- retrieval (``retrieval-A-B--STORE-KEY--STORE-KEY.json``): R@1, R@5, R@10 of each direction (``image->text R@1``);
- zero-shot (``zero-shot--STORE-KEY--PROMPTS-CLASSES.json``): top-1 accuracy;
- linear probe / fine-tune (``linear-probe[-raw]-TEST-KEY--train-TRAIN-KEY.json``, ``fine-tune-...``): the final
  test top-1 (the number to quote; the best checkpoint is selected on the test set).

An evaluation set is the stores a figure was computed on, by identity key (plus, for zero-shot, the classes and the
prompts): figures of different sets are put in different tables, never in one column, and every row names the
stores and keys its figures came from. Writes ``report.md``, ``report.json`` and matplotlib plots: ``loss.png`` and
``temperature.png`` (one line per run over its training epochs, every stage in order), ``recall.png`` (R@1/5/10
bars, one per run and evaluation set, fixed 0..1 scale, a dashed chance line on each bar) and ``val_recall.png``
(validation R@1 per epoch, one colour per run, one line style per direction).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.evaluation.evaluate import EvaluationError
from pipeline.rendering.plots import render_bars_png, render_lines_png
from pipeline.training.rundir import RunDir
from pipeline.training.sweep import sweep_runs
from stores import atomic_write_text

TASKS = ("retrieval", "zero-shot", "linear-probe", "fine-tune")
TASK_TITLES = {"retrieval": "Retrieval", "zero-shot": "Zero-shot classification",
               "linear-probe": "Linear probe (final test top-1)", "fine-tune": "Fine-tune (final test top-1)"}


class ReportError(EvaluationError):
    """The runs given to ``report`` cannot be reported."""


def run_label(config: dict) -> str:
    """A short description of a run from its config: head, fusion, width, blocks, loss, fit-up settings and the
    modalities aligned later (with their Alignment Layer kind), e.g. ``up add w256 4 blocks infonce 30 ep bs 128
    lr 0.001 +audio(linear)``."""
    model = config.get("model", {})
    parts = [str(config.get("head", "?"))]
    if "fusion" in model:
        parts.append(str(model["fusion"]))
    if "width" in model:
        parts.append(f"w{model['width']}")
    if "blocks" in model:
        parts.append(f"{model['blocks']} block{'s' if model['blocks'] != 1 else ''}")
    loss = config.get("loss", {})
    if loss:
        parts.append(str(loss.get("kind", "?")) + (f" mix {loss['target_mix']}" if loss.get("target_mix") else ""))
    stages = config.get("stages") or [{}]
    train = stages[0].get("train", {})
    for key, fmt in (("epochs", "{} ep"), ("batch_size", "bs {}"), ("lr", "lr {}"), ("seed", "seed {}")):
        if key in train:
            parts.append(fmt.format(train[key]))
    for name, record in config.get("modalities", {}).items():
        if str(record.get("stage", "")).startswith("fit-al"):
            parts.append(f"+{name}({record.get('al', '?')})")
    if "fine_tuned" in config:  # a bundle written by eval fine-tune
        parts.append(f"fine-tuned on {Path(config['fine_tuned'].get('train_store', '?')).name}")
    return " ".join(parts)


def _store(role: str, path: str, key: str | None) -> dict:
    return {"role": role, "path": str(path), "name": Path(str(path).rstrip("/")).name, "key": key}


def _evaluation(report: dict) -> dict:
    """What one evaluation report measured and on what: ``task``, ``stores`` (role, path, name and identity key of
    each store its figures were computed on; a report without the keys is refused),
    ``conditions`` (zero-shot: the classes and the prompts), ``set`` (the identity of all that: figures are only
    ever compared within one set) and ``values`` (``{column: value}``)."""
    task = report.get("task")
    conditions: dict[str, Any] = {}
    if task == "retrieval":
        keys = report.get("store_keys", {})
        stores = [_store(m, p, keys.get(m)) for m, p in report["stores"].items()]
        values = {f"{direction} R@{k}": float(m[f"R@{k}"]) for direction, m in report["metrics"].items()
                  for k in (1, 5, 10)}
    elif task == "zero-shot":
        stores = [_store("image", report["store"], report.get("store_key"))]
        if report.get("prompt_store"):
            stores.append(_store("prompts", report["prompt_store"], report.get("prompt_store_key")))
        else:
            conditions["template"] = report["template"]
        digest = hashlib.sha256(json.dumps(report["classes"]).encode()).hexdigest()[:8]
        conditions["classes"] = f"{len(report['classes'])} ({digest})"
        values = {"top1": float(report["accuracy"]["top1"])}
    elif task in ("linear-probe", "fine-tune"):
        stores = [_store("train", report["train_store"], report.get("train_store_key")),
                  _store("test", report["test_store"], report.get("test_store_key"))]
        values = {"top1 raw" if report.get("features") == "raw" else "top1": float(report["final"]["top1"])}
    else:
        raise KeyError(f"task {task!r} is not one of {', '.join(TASKS)}")
    if any(s["key"] is None for s in stores):
        raise ValueError("the report does not record the identity keys of its stores (written by an older version, "
                         "whose retrieval figures were wrong for shared-ref pairings): run the evaluation again")
    identity = [f"{s['role']}={s['key']}" for s in stores]
    identity += [f"{name}={value}" for name, value in conditions.items()]
    return {"task": task, "set": "; ".join(identity), "stores": stores, "conditions": conditions, "values": values}


def stores_label(stores: list[dict], digits: int = 8) -> str:
    """``image m2m-image@9af5d0db, text m2m-text@ef5c47ab``: each store's role, folder name and identity key."""
    return ", ".join(f"{s['role']} {s['name']}@{s['key'][:digits]}" for s in stores)


def collect_run(run_dir: Path | str) -> dict:
    """One run's row: its label, settings, evaluations from ``eval/*.json`` and curves from ``metrics.jsonl``."""
    run = RunDir(run_dir)
    config = run.read_config()
    evaluations = []
    skipped = []
    for path in sorted((run.path / "eval").glob("*.json")):
        try:
            evaluation = _evaluation(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as err:  # another tool's JSON, a half-written or older report
            skipped.append({"file": str(path), "reason": f"{type(err).__name__}: {err}"})
            continue
        evaluations.append({**evaluation, "source": str(path)})
    history = run.metrics()
    last = history[-1] if history else {}
    first_stage = (config.get("stages") or [{}])[0]
    selection = first_stage.get("selection") or {}
    kept = next((r for r in history if r.get("stage") == first_stage.get("name")
                 and r.get("epoch") == selection.get("epoch")), {})
    return {
        "run": str(run.path),
        "name": run.path.name,
        "label": run_label(config),
        "head": config.get("head"),
        "modalities": sorted(config.get("modalities", {})),
        "epochs_trained": len(history),
        "final_loss": last.get("loss"),
        "final_temperature": last.get("temperature"),
        # The epoch the first stage kept and its validation R@1 per direction: how a sweep's runs compare before
        # any evaluation is run.
        "kept_epoch": selection.get("epoch"),
        "kept_val_r1": {d: m["R@1"] for d, m in (kept.get("val") or {}).items() if isinstance(m, dict)},
        "evaluations": evaluations,
        "skipped": skipped,
        "curves": {"stage": [r.get("stage") for r in history], "loss": [r.get("loss") for r in history],
                   "temperature": [r.get("temperature") for r in history]},
    }


def evaluation_tables(rows: list[dict], names: list[str]) -> list[dict]:
    """One table per task and evaluation set (the same stores by identity key, the same classes and prompts): rows
    are the runs evaluated on that set, so figures computed on different stores never share a column."""
    tables: dict[tuple[str, str], dict] = {}
    for name, row in zip(names, rows, strict=True):
        for evaluation in row["evaluations"]:
            table = tables.setdefault((evaluation["task"], evaluation["set"]), {
                "task": evaluation["task"], "set": evaluation["set"], "stores": evaluation["stores"],
                "conditions": evaluation["conditions"], "columns": [], "rows": []})
            table["columns"] += [c for c in evaluation["values"] if c not in table["columns"]]
            sources = {column: evaluation["source"] for column in evaluation["values"]}
            # A run's reports on one set share its row (a probe on aligned and on raw features) unless they repeat
            # a column, which then gets a row of its own.
            row_of_run = next((r for r in table["rows"] if r["run"] == name and not set(r["values"]) & set(sources)),
                              None)
            if row_of_run is None:
                table["rows"].append({"run": name, "stores": evaluation["stores"], "values": {}, "sources": {}})
                row_of_run = table["rows"][-1]
            row_of_run["values"].update(evaluation["values"])
            row_of_run["sources"].update(sources)
    ordered = sorted(tables.values(), key=lambda t: TASKS.index(t["task"]))  # stable: sets in the order found
    for task in TASKS:
        of_task = [t for t in ordered if t["task"] == task]
        for n, table in enumerate(of_task, 1):
            table["title"] = TASK_TITLES[task] + (f", evaluation set {n} of {len(of_task)}" if len(of_task) > 1 else "")
            table["label"] = f"set {n}" if len(of_task) > 1 else ""
    return ordered


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _set_description(table: dict) -> str:
    stores = ", ".join(f"{s['role']} `{s['name']}` (key {s['key']})" for s in table["stores"])
    conditions = "".join(f"; {name}: {value!r}" if name == "template" else f"; {name}: {value}"
                         for name, value in table["conditions"].items())
    return f"Computed on {stores}{conditions}."


def report_markdown(report: dict) -> str:
    """The comparison as Markdown: one table of runs, then one table per task and evaluation set (rows = runs, each
    naming the stores and identity keys its figures came from; columns = metrics)."""
    rows = report["runs"]
    lines = ["# Runs side by side", "", "| # | run | label | modalities | epochs | final loss | temperature | "
             "kept epoch | val R@1 at kept epoch |", "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for i, r in enumerate(rows, 1):
        val = ", ".join(f"{d} {v:.3f}" for d, v in r.get("kept_val_r1", {}).items()) or "-"
        lines.append(f"| {i} | {r['name']} | {r['label']} | {', '.join(r['modalities'])} | {r['epochs_trained']} | "
                     f"{_fmt(r['final_loss'])} | {_fmt(r['final_temperature'])} | {_fmt(r.get('kept_epoch'))} | "
                     f"{val} |")
    for table in report["tables"]:
        columns = table["columns"]
        lines += ["", f"## {table['title']}", "", _set_description(table), "",
                  "| run | stores | " + " | ".join(columns) + " |", "| --- | --- |" + " ---: |" * len(columns)]
        for row in table["rows"]:
            values = [_fmt(row["values"].get(c)) for c in columns]
            lines.append(f"| {row['run']} | {stores_label(row['stores'])} | " + " | ".join(values) + " |")
    if not report["tables"]:
        lines += ["", "No evaluation reports in these runs yet (RUN/eval/*.json): run `eval retrieval`, "
                      "`eval zero-shot`, `eval linear-probe` or `eval fine-tune` first."]
    skipped = [s for r in rows for s in r["skipped"]]
    if skipped:
        lines += ["", "Files in eval/ that report does not read (left out):", ""]
        lines += [f"- {s['file']}: {s['reason']}" for s in skipped]
    plots = [f"`{Path(p).name}`" for p in report["plots"].values() if p]
    lines += ["", f"Plots: {', '.join(plots) if plots else 'none'}", ""]
    return "\n".join(lines)


def compare_runs(run_dirs: Sequence[Path | str], out: Path | str) -> dict:
    """Put ``run_dirs`` side by side (a ``fit-up --sweep`` folder stands for its runs); write ``report.md``, ``report.json`` and the PNG plots into ``out``."""
    run_dirs = [run for folder in run_dirs for run in (sweep_runs(folder) or [folder])]  # a sweep: its runs
    if not run_dirs:
        raise ReportError("give at least one run directory")
    resolved = [Path(r).resolve() for r in run_dirs]
    repeated = sorted({str(r) for r in resolved if resolved.count(r) > 1})
    if repeated:
        raise ReportError(f"run directories given more than once: {', '.join(repeated)}")
    rows = [collect_run(r) for r in run_dirs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = _legend_names(rows)
    tables = evaluation_tables(rows, names)
    plots: dict[str, str | None] = {}
    for key, title in (("loss", "training loss per epoch"), ("temperature", "temperature per epoch")):
        series = [(n, r["curves"][key]) for n, r in zip(names, rows, strict=True)
                  if any(v is not None for v in r["curves"][key])]
        plots[key] = None
        if series:
            render_lines_png(series, out / f"{key}.png", title=title, xlabel="epoch (every stage, in order)")
            plots[key] = str(out / f"{key}.png")
    # One group of bars per column of each retrieval table: bars of different evaluation sets never share a group.
    retrieval = [t for t in tables if t["task"] == "retrieval"]
    recall_columns = [f"{t['label']}: {c}" if t["label"] else c for t in retrieval for c in t["columns"]]
    plots["recall"] = None
    if recall_columns:
        def value(table: dict, name: str, column: str) -> float | None:
            return next((row["values"].get(column) for row in table["rows"] if row["run"] == name), None)

        values = [[value(t, n, c) for t in retrieval for c in t["columns"]] for n in names]
        render_bars_png(recall_columns, list(zip(names, values, strict=True)), out / "recall.png",
                        title="retrieval recall@k (dashed: chance)", chance=recall_chance(retrieval, names))
        plots["recall"] = str(out / "recall.png")
    val_series, val_styles = validation_series(rows, names)
    plots["val_recall"] = None
    if any(v is not None for _, ys in val_series for v in ys):
        render_lines_png(val_series, out / "val_recall.png", title="validation R@1 per epoch",
                         xlabel="epoch (every stage, in order)", styles=val_styles, ylim=(0, 1.02))
        plots["val_recall"] = str(out / "val_recall.png")
    report = {"runs": rows, "tables": tables, "plots": plots, "out": str(out)}
    report["report_path"], report["markdown_path"] = str(out / "report.json"), str(out / "report.md")
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", report_markdown(report))
    return report


def _legend_names(rows: list[dict]) -> list[str]:
    """The run directory names, made unique with their parent folder where two runs share a name."""
    names = [r["name"] for r in rows]
    return [f"{Path(r['run']).parent.name}/{r['name']}" if names.count(r["name"]) > 1 else r["name"] for r in rows]


def recall_chance(tables: Sequence[dict], names: Sequence[str]) -> list[list[float | None]]:
    """Chance level of each run's bar in every column (``"image->text R@5"``) of the retrieval ``tables``, from the
    report the figure came from: its ``chance_R@k`` when recorded, else ``k`` x its ``chance_R@1`` (exact when each
    query has one relevant target, an upper bound when it has several), capped at 1."""
    reports: dict[str, dict] = {}

    def level(table: dict, name: str, column: str) -> float | None:
        row = next((r for r in table["rows"] if r["run"] == name), None)
        source = row["sources"].get(column) if row else None
        direction, _, metric = column.rpartition(" ")
        if not source or not metric.startswith("R@"):
            return None
        if source not in reports:
            try:
                reports[source] = json.loads(Path(source).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                reports[source] = {}
        report, k = reports[source], int(metric[2:])
        recorded = (report.get(f"chance_{metric}") or {}).get(direction)
        if recorded is not None:
            return float(recorded)
        first = (report.get("chance_R@1") or {}).get(direction)
        return None if first is None else min(1.0, k * float(first))

    return [[level(t, name, c) for t in tables for c in t["columns"]] for name in names]


def validation_series(rows: Sequence[dict], names: Sequence[str]) -> tuple[list, list]:
    """Validation R@1 per epoch of each run and direction (``metrics.jsonl``'s ``val``): ``(series, styles)``,
    one colour per run, one line style per direction."""
    series, styles = [], []
    dashes = ("-", "--", ":", "-.")
    for i, (name, row) in enumerate(zip(names, rows, strict=True)):
        history = RunDir(row["run"]).metrics()
        directions = list(dict.fromkeys(d for r in history for d, m in (r.get("val") or {}).items()
                                        if isinstance(m, dict) and "R@1" in m))
        for j, direction in enumerate(directions):
            series.append((f"{name} {direction}", [((r.get("val") or {}).get(direction) or {}).get("R@1")
                                                   for r in history]))
            styles.append((i, dashes[j % len(dashes)]))
    return series, styles
