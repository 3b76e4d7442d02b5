"""Fine-tuning a run's head with a linear classifier, text classification end to end, and multi-run reports.

Stores are real (written through the StoreWriter, or extracted with the tiny text model); runs are trained by the
real fit loop; the CLI runs as a subprocess where the command line itself is under test.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from toy_stores import _write, make_toy_pair

from extract.run import run_extraction
from extract.tiny import TINY_WORDS
from pipeline.evaluation.evaluate import evaluate_retrieval
from pipeline.evaluation.metrics import topk_accuracy
from pipeline.evaluation.probe import ProbeError, fine_tune, linear_probe
from pipeline.evaluation.report import (
    ReportError,
    compare_runs,
    recall_chance,
    run_label,
    validation_series,
)
from pipeline.rendering.plots import PALETTE
from pipeline.training.fit import LossConfig, TrainConfig, fit_up
from pipeline.training.rundir import RunDir, RunError
from project.classifier import EmbeddingClassifier
from stores import FeatureStore

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: a second thread only spin-waits
    result = subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=env)
    if ok and result.returncode != 0:
        raise AssertionError(f"cli {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(image_store: Path, text_store: Path, out: Path, fusion: str = "add", epochs: int = 2) -> Path:
    fit_up(image_store, text_store, out, width=32, blocks=1, fusion=fusion, loss=LossConfig(kind="infonce"),
           train=TrainConfig(epochs=epochs, batch_size=16, val_fraction=0.2), progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, single_thread) -> dict:
    """Two 2-epoch runs on the toy pair that differ only in fusion (add, attention)."""
    root = tmp_path_factory.mktemp("runs")
    image_store, text_store = make_toy_pair(root, n_images=48)
    return {"root": root, "image": image_store, "text": text_store,
            "add": _train(image_store, text_store, root / "run-add", "add"),
            "attention": _train(image_store, text_store, root / "run-attention", "attention")}


def _toy_identity(modality: str, name: str, encoder: str = "toy-encoder") -> dict:
    """The identity of make_toy_pair's stores (another manifest): the toy runs accept these stores."""
    return {"encoder": {"id": encoder}, "layer": -1, "keep": "tokens", "modality": modality, "manifest_sha256": name}


def labelled_clusters(path: Path, n_per_class: int, seed: int, modality: str = "image", dim: int = 24,
                      classes: int = 4, encoder: str = "toy-encoder") -> Path:
    """A fixed-layout store (6 tokens per item) of well-separated Gaussian clusters labelled ``class-K``: the
    centres are fixed, the samples follow ``seed``."""
    centres = 3 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(100))
    g = torch.Generator().manual_seed(seed)
    items, metas = [], []
    for c in range(classes):
        for k in range(n_per_class):
            items.append(centres[c] + 0.3 * torch.randn(6, dim, generator=g))
            metas.append({"id": f"{path.name}-{c}-{k}", "label": f"class-{c}"})
    return _write(path, modality, "fixed", items, metas, dim, 6, _toy_identity(modality, path.name, encoder))


def _hashes(folder: Path, skip: str = "eval") -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).parts[0] != skip}


# ---------------------------------------------------------------- fine-tune


def test_fine_tune_beats_chance_trains_the_head_and_leaves_the_run_untouched(runs, tmp_path, single_thread):
    run = runs["add"]
    train = labelled_clusters(tmp_path / "ft-train", 24, seed=1)
    test = labelled_clusters(tmp_path / "ft-test", 10, seed=2)
    before = _hashes(run)
    result = cli("eval", "fine-tune", "--run", run, "--train-store", train, "--test-store", test,
                 "--epochs", "6", "--batch-size", "16", "--lr", "3e-3")
    assert "fine tune on" in result.stdout and "weights:" in result.stdout
    assert _hashes(run) == before, "fine-tuning wrote into the run's own files"

    report_path = Path(result.stdout.split("report: ")[1].splitlines()[0])
    assert report_path.parent == run / "eval" and report_path.name.startswith("fine-tune-ft-test-")
    assert "--train-ft-train-" in report_path.name  # named by both stores
    report = json.loads(report_path.read_text())
    assert report["task"] == "fine-tune" and report["modality"] == "image"
    assert [c["epoch"] for c in report["checkpoints"]] == [1, 2, 3, 4, 5, 6]  # accuracy every epoch
    assert report["chance_top1"] == 0.25 and report["final"]["top1"] >= 0.9
    assert "adapters.image" in report["trained"] and "adapters.text" not in report["trained"]
    table = report_path.with_suffix(".md").read_text()
    assert table.startswith("# Fine-tune:") and "| 6 |" in table

    # The fine-tuned head is a run bundle of its own: the image path changed, the text adapter (never reached by
    # image items) did not, and head + classifier reproduce the reported final accuracy.
    bundle = Path(report["weights"])
    assert bundle == report_path.with_suffix("")
    original, tuned = load_file(str(run / "model.safetensors")), load_file(str(bundle / "model.safetensors"))
    assert set(original) == set(tuned)
    changed = {k for k in original if not torch.equal(original[k], tuned[k])}
    assert any(k.startswith("model.adapters.image.") for k in changed)
    assert any(k.startswith("model.up.encoder.") for k in changed)
    assert not any(k.startswith("model.adapters.text.") or k == "model.up.modality_tokens.text" for k in changed)
    head, _, config = RunDir(bundle).load_model()
    assert config["fine_tuned"]["classes"] == report["classes"] and config["fine_tuned"]["from_run"] == str(run)
    state = load_file(str(bundle / "classifier.safetensors"))
    classifier = EmbeddingClassifier(state["mean"].shape[0], 4, head=head, modality="image")
    classifier.load_state_dict({**state, **{f"head.{k}": v for k, v in head.state_dict().items()}})
    store = FeatureStore.open(test)
    tokens, mask = store.get_batch(np.arange(len(store)))
    with torch.no_grad():
        logits = classifier.eval()(tokens, mask)
    targets = torch.tensor([report["classes"].index(label) for label in store.labels])
    assert topk_accuracy(logits, targets, ks=(1,))["top1"] == pytest.approx(report["final"]["top1"])

    # The probe on the same stores is the same loop with the head frozen: no weights saved, no head change.
    probe = linear_probe(train, test, run, epochs=6, batch_size=16, lr=3e-3, eval_every=1)
    assert probe["task"] == "linear-probe" and "weights" not in probe and _hashes(run) == before


def test_fine_tune_refuses_what_the_run_cannot_embed(runs, tmp_path, single_thread):
    run = runs["add"]
    # A labelled audio store: the run aligns image and text only.
    audio_train = labelled_clusters(tmp_path / "audio-train", 4, seed=3, modality="audio")
    audio_test = labelled_clusters(tmp_path / "audio-test", 2, seed=4, modality="audio")
    with pytest.raises(ProbeError, match=r"cannot embed audio store .*aligns image, text only .*fit-al"):
        fine_tune(audio_train, audio_test, run, epochs=1)
    result = cli("eval", "fine-tune", "--run", run, "--train-store", audio_train, "--test-store", audio_test,
                 "--epochs", "1", ok=False)
    assert result.returncode == 1 and "cannot embed audio store" in result.stderr
    assert "Traceback" not in result.stderr
    # An image store from another encoder than the run's.
    other = labelled_clusters(tmp_path / "other-encoder", 4, seed=5, encoder="another")
    with pytest.raises(RunError, match="was not made like"):
        fine_tune(other, other, run, epochs=1)
    with pytest.raises(ProbeError, match="needs --run"):
        fine_tune(other, other, None, epochs=1, out_dir=tmp_path)


# ---------------------------------------------------------------- text classification end to end


def _sentences(words: list[str], n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 7))) for _ in range(n)]


def test_text_classification_end_to_end(tiny_text_model, tmp_path, single_thread):
    rng = random.Random(0)
    # Captions of toy images, extracted with the tiny text model: the run's text store.
    image_store, _ = make_toy_pair(tmp_path, n_images=32, tag="cap")
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"id": f"c{i}", "text": s, "ref": f"img{i}"}) + "\n"
                                for i, s in enumerate(_sentences(TINY_WORDS, 32, rng))))
    caption_store = tmp_path / "caption-text"
    run_extraction(captions, "text", tiny_text_model, caption_store, batch_size=16, progress=False)
    run = _train(image_store, caption_store, tmp_path / "run", epochs=1)

    # An SST-2 folder: sentence<TAB>label; positive and negative sentences use different words (four each: the
    # tiny random encoder and a 1-epoch run separate those; with forty words each they overlap too much).
    positive, negative = TINY_WORDS[40:44], TINY_WORDS[120:124]
    sst2 = tmp_path / "SST-2"
    sst2.mkdir()
    for name, n in (("train.tsv", 24), ("dev.tsv", 12)):
        rows = [(s, 1) for s in _sentences(positive, n, rng)] + [(s, 0) for s in _sentences(negative, n, rng)]
        with open(sst2 / name, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
            writer.writerow(["sentence", "label"])
            writer.writerows(rows)
    written = cli("manifest", "sst2", sst2, "--out", tmp_path / "sst2").stdout.split()
    assert [Path(p).name for p in written] == ["train.jsonl", "dev.jsonl"]
    stores = {}
    for split in ("train", "dev"):
        stores[split] = tmp_path / f"sst2-{split}"
        run_extraction(tmp_path / "sst2" / f"{split}.jsonl", "text", tiny_text_model, stores[split], batch_size=16,
                       progress=False)
    assert sorted(set(FeatureStore.open(stores["dev"]).labels)) == [0, 1]

    probe = linear_probe(stores["train"], stores["dev"], run, epochs=20, batch_size=16, lr=1e-2)
    assert probe["modality"] == "text" and probe["classes"] == [0, 1] and probe["test_items"] == 24
    assert probe["space"].startswith("aligned embeddings") and probe["dim"] == 32
    assert probe["checkpoints"][-1]["train"]["top1"] >= 0.9 and probe["final"]["top1"] >= 0.9
    assert Path(probe["markdown_path"]).is_file() and Path(probe["markdown_path"]).name.startswith("linear-probe-sst2-dev-")

    before = _hashes(run)
    tuned = fine_tune(stores["train"], stores["dev"], run, epochs=8, batch_size=16, lr=3e-3)
    assert tuned["modality"] == "text" and tuned["final"]["top1"] >= 0.9
    assert "adapters.text" in tuned["trained"] and "adapters.image" not in tuned["trained"]
    assert Path(tuned["weights"], "classifier.safetensors").is_file() and _hashes(run) == before

    # The probe checks the store against the run's text store: another run (toy encoder) refuses it.
    toy_image, toy_text = make_toy_pair(tmp_path / "toy", n_images=16)
    toy_run = _train(toy_image, toy_text, tmp_path / "toy-run", epochs=1)
    with pytest.raises(RunError, match="was not made like the text store"):
        linear_probe(stores["train"], stores["dev"], toy_run, epochs=1)


# ---------------------------------------------------------------- report


def _colours(path: Path) -> set[tuple[int, int, int]]:
    image = Image.open(path).convert("RGB")
    return {c for _, c in image.getcolors(maxcolors=1 << 20)}


def test_report_puts_two_runs_side_by_side(runs, tmp_path, single_thread):
    val_image, val_text = make_toy_pair(tmp_path, n_images=24, tag="toy")
    retrieval = {name: evaluate_retrieval(runs[name], val_image, val_text) for name in ("add", "attention")}
    assert Path(retrieval["add"]["markdown_path"]).read_text().count("| image->text |") == 1
    # A labelled store for the probe: only the add run gets a probe report (a missing cell for the other).
    train = labelled_clusters(tmp_path / "probe-train", 8, seed=6)
    test = labelled_clusters(tmp_path / "probe-test", 4, seed=7)
    probe = linear_probe(train, test, runs["add"], epochs=4)
    (runs["attention"] / "eval" / "notes.json").write_text('{"something": "else"}')  # not a report: left out

    out = tmp_path / "report"
    result = cli("report", runs["add"], runs["attention"], "--out", out)
    assert "# Runs side by side" in result.stdout
    report = json.loads((out / "report.json").read_text())
    rows = report["runs"]
    assert [r["name"] for r in rows] == ["run-add", "run-attention"]
    for row, fusion in zip(rows, ("add", "attention"), strict=True):
        config = RunDir(row["run"]).read_config()
        assert row["label"] == run_label(config) and f"up {fusion} w32 1 block infonce" in row["label"]
        assert row["epochs_trained"] == 2
        assert row["final_loss"] == RunDir(row["run"]).metrics()[-1]["loss"]
    # Both runs were evaluated on the same stores: one retrieval table, every number the one in that run's eval JSON.
    keys = {m: FeatureStore.open(p).key for m, p in (("image", val_image), ("text", val_text))}
    retrieval_tables = [t for t in report["tables"] if t["task"] == "retrieval"]
    assert len(retrieval_tables) == 1 and [s["key"] for s in retrieval_tables[0]["stores"]] == list(keys.values())
    table = retrieval_tables[0]
    assert table["columns"] == [f"{d} R@{k}" for d in ("image->text", "text->image") for k in (1, 5, 10)]
    for table_row, name in zip(table["rows"], ("add", "attention"), strict=True):
        saved = json.loads(Path(retrieval[name]["report_path"]).read_text())
        assert table_row["run"] == f"run-{name}" and set(table_row["sources"].values()) == {retrieval[name]["report_path"]}
        for direction in ("image->text", "text->image"):
            for k in (1, 5, 10):
                assert table_row["values"][f"{direction} R@{k}"] == saved["metrics"][direction][f"R@{k}"]
    probe_table = next(t for t in report["tables"] if t["task"] == "linear-probe"
                       and [s["key"] for s in t["stores"]] == [probe["train_store_key"], probe["test_store_key"]])
    assert [r["run"] for r in probe_table["rows"]] == ["run-add"]  # the other run has no probe on these stores
    assert probe_table["rows"][0]["values"]["top1"] == probe["final"]["top1"]
    assert [s["file"] for s in rows[1]["skipped"]] == [str(runs["attention"] / "eval" / "notes.json")]

    markdown = (out / "report.md").read_text()
    retrieval_table = markdown.split("## Retrieval")[1].split("##")[0]
    assert retrieval_table.count("| run-add |") == 1 and retrieval_table.count("| run-attention |") == 1
    assert all(key in retrieval_table for key in keys.values())  # the stores' full identity keys
    probe_markdown = next(part for part in markdown.split("## Linear probe")[1:] if probe["test_store_key"] in part)
    header, *lines = [[cell.strip() for cell in line.strip("|").split("|")] for line in
                      probe_markdown.split("##")[0].splitlines() if line.startswith("| ") and "---" not in line]
    cells = {line[0]: dict(zip(header, line, strict=True)) for line in lines}
    assert set(cells) == {"run-add"} and cells["run-add"]["top1"] == f"{probe['final']['top1']:.4f}"
    assert cells["run-add"]["stores"] == f"train probe-train@{probe['train_store_key'][:8]}, " \
                                         f"test probe-test@{probe['test_store_key'][:8]}"

    # One line (or bar) per run in each plot, in the run's colour; validation R@1 per epoch from metrics.jsonl.
    for name in ("loss", "temperature", "recall", "val_recall"):
        path = out / f"{name}.png"
        assert report["plots"][name] == str(path)
        assert Image.open(path).format == "PNG"
        assert {PALETTE[0], PALETTE[1]} <= _colours(path), name
        assert PALETTE[2] not in _colours(path)
    series, styles = validation_series(rows, ["run-add", "run-attention"])
    assert [n for n, _ in series] == [f"run-{f} {d}" for f in ("add", "attention") for d in ("image->text",
                                                                                           "text->image")]
    assert series[0][1] == [m["val"]["image->text"]["R@1"] for m in RunDir(runs["add"]).metrics()]
    assert [c for c, _ in styles] == [0, 0, 1, 1] and styles[0][1] != styles[1][1]
    # The chance line of each recall bar: k x the report's chance R@1 (one relevant image per caption).
    (retrieval,) = [t for t in report["tables"] if t["task"] == "retrieval"]
    chance = recall_chance([retrieval], ["run-add", "run-attention"])
    (row,) = [r for r in retrieval["rows"] if r["run"] == "run-add"]
    saved = json.loads(Path(row["sources"]["text->image R@5"]).read_text())
    assert chance[0][retrieval["columns"].index("text->image R@5")] == pytest.approx(
        5 * saved["chance_R@1"]["text->image"])


def test_report_never_puts_figures_of_different_stores_in_one_column(runs, tmp_path, single_thread):
    # Run A evaluated on held-out stores, run B on its training stores: two evaluation sets.
    a, b = (tmp_path / "A", tmp_path / "B")
    for source, copy in ((runs["add"], a), (runs["attention"], b)):
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("eval"))
    val_image, val_text = make_toy_pair(tmp_path / "val", n_images=24, seed=5)
    evaluate_retrieval(a, val_image, val_text)
    saved = evaluate_retrieval(b, runs["image"], runs["text"])
    unkeyed = {k: v for k, v in saved.items() if k != "store_keys"}  # as written before reports recorded keys
    (a / "eval" / "retrieval-image-text.json").write_text(json.dumps(unkeyed))
    out = tmp_path / "report"
    cli("report", a, b, "--out", out)
    report = json.loads((out / "report.json").read_text())
    tables = [t for t in report["tables"] if t["task"] == "retrieval"]
    assert [[r["run"] for r in t["rows"]] for t in tables] == [["A"], ["B"]]
    skipped = report["runs"][0]["skipped"]  # figures that cannot be tied to their stores are left out, and said so
    assert [s["file"] for s in skipped] == [str(a / "eval" / "retrieval-image-text.json")]
    assert "identity keys" in skipped[0]["reason"]
    for table, (image, text) in zip(tables, ((val_image, val_text), (runs["image"], runs["text"])), strict=True):
        keys = [FeatureStore.open(image).key, FeatureStore.open(text).key]
        assert [s["key"] for s in table["stores"]] == keys
        assert [s["key"] for s in table["rows"][0]["stores"]] == keys
    markdown = (out / "report.md").read_text()
    assert markdown.count("## Retrieval, evaluation set") == 2
    for table in markdown.split("## Retrieval, evaluation set")[1:]:
        body = [line for line in table.split("\n\n")[2].splitlines() if line.startswith("| ") and "---" not in line]
        assert len(body) == 2  # the header and one run: never both runs under one column


def test_report_errors(runs, tmp_path):
    with pytest.raises(RunError, match="not a run directory"):
        compare_runs([runs["add"], tmp_path], tmp_path / "out")
    with pytest.raises(ReportError, match="more than once"):
        compare_runs([runs["add"], runs["add"]], tmp_path / "out")
    # A run with no evaluation yet still gets its row, curves and a note.
    fresh_image, fresh_text = make_toy_pair(tmp_path, n_images=16, tag="fresh")
    fresh = _train(fresh_image, fresh_text, tmp_path / "fresh", epochs=1)
    report = compare_runs([fresh], tmp_path / "out")
    assert report["tables"] == [] and report["plots"]["recall"] is None
    assert "No evaluation reports" in (tmp_path / "out" / "report.md").read_text()
