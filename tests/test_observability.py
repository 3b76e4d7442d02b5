"""Observability: TensorBoard event files mirror metrics.jsonl (also across a resume), and the qualitative
retrieval sheet (HTML and PNG) shows the right results, ground truth where the ranks say, and falls back to ids
when a store's manifest changed."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from extract.run import run_extraction
from pipeline.demo import make_shapes_dataset
from pipeline.embed import embed_store
from pipeline.evaluation.sheet import retrieval_sheet
from pipeline.rendering.sheet_page import HIGHLIGHT
from pipeline.training.fit import TrainConfig, fit_al, fit_up
from pipeline.training.rundir import RunDir
from stores import FeatureStore
from tests.toy_stores import make_toy_modality, make_toy_pair

cli = run_cli


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event of the event files in ``folder``, raw (no purging of out-of-order steps)."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_mirrors(run: Path, stage: str = "fit-up", folder: str = "fit-up",
                   directions: tuple[str, ...] = ("image->text", "text->image")) -> dict:
    records = [r for r in RunDir(run).metrics() if r["stage"] == stage]
    got = scalars(run / "tb" / folder)
    epochs = [r["epoch"] for r in records]
    for name in ("loss", "temperature", "seconds"):
        assert [step for step, _ in got[name]] == epochs  # each epoch once, in order
        assert [v for _, v in got[name]] == pytest.approx([r[name] for r in records], rel=1e-6)
    for direction in directions:
        for k in ("R@1", "R@5", "R@10"):
            tag = f"val/{direction}/{k}"
            assert [step for step, _ in got[tag]] == epochs
            assert [v for _, v in got[tag]] == pytest.approx([r["val"][direction][k] for r in records], rel=1e-6)
    return got


# ---- TensorBoard -------------------------------------------------------------------------------------------------
def test_tensorboard_events_mirror_metrics_and_a_resume_writes_no_step_twice(tmp_path, one_thread):
    image, text = make_toy_pair(tmp_path, n_images=24)
    run = tmp_path / "run"
    settings = {"width": 32, "blocks": 1, "progress": False}
    fit_up(image, text, run, train=TrainConfig(epochs=2, batch_size=8, val_fraction=0.25), **settings)
    assert assert_mirrors(run)["loss"][0][0] == 1

    # A run killed after writing epoch 3's metrics but before its checkpoint: the record is mirrored at once
    # (flushed per record), and the resume must redo epoch 3 and leave one step 3 with the redone values.
    ahead = {**RunDir(run).metrics()[-1], "epoch": 3, "loss": 123.0}
    RunDir(run).append_metrics(ahead)
    assert scalars(run / "tb" / "fit-up")["loss"][-1] == (3, 123.0)
    fit_up(image, text, run, train=TrainConfig(epochs=3, batch_size=8, val_fraction=0.25), resume=True, **settings)
    got = assert_mirrors(run)
    assert [step for step, _ in got["loss"]] == [1, 2, 3]
    assert got["loss"][-1][1] != 123.0
    assert len(list((run / "tb" / "fit-up").iterdir())) == 1  # rebuilt from metrics.jsonl, not appended to

    # fit-al writes its own stage folder ("fit-al:audio" -> a portable folder name), leaving fit-up's alone.
    audio = make_toy_modality(tmp_path, "audio", n_images=24)
    fit_al(run, "audio", audio, "text", text, train=TrainConfig(epochs=2, batch_size=8, val_fraction=0.25),
           progress=False)
    assert sorted(p.name for p in (run / "tb").iterdir()) == ["fit-al-audio", "fit-up"]
    assert_mirrors(run, "fit-al:audio", "fit-al-audio", ("text->audio", "audio->text"))
    assert scalars(run / "tb" / "fit-up") == got


def test_no_tensorboard_flag_writes_metrics_only(tmp_path):
    image, text = make_toy_pair(tmp_path, n_images=16)
    run = tmp_path / "run"
    cli("fit-up", "--image-store", image, "--text-store", text, "--out", run, "--width", 16, "--blocks", 1,
        "--epochs", 1, "--batch-size", 8, "--val-fraction", 0.25, "--no-tensorboard")
    assert len(RunDir(run).metrics()) == 1
    assert not (run / "tb").exists()


# ---- retrieval sheet ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sheet_run(tmp_path_factory, tiny_image_model, tiny_text_model) -> dict:
    """A real image-caption set (16 images, 2 captions each), extracted with tiny models, fitted 2 epochs."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sheet")
    images_manifest, captions_manifest = make_shapes_dataset(root / "data", n_images=16, seed=3, prefix="q")
    image = run_extraction(images_manifest, "image", tiny_image_model, root / "img", batch_size=16,
                           progress=False).store
    text = run_extraction(captions_manifest, "text", tiny_text_model, root / "txt", batch_size=16,
                          progress=False).store
    fit_up(image, text, root / "run", width=32, blocks=1, progress=False,
           train=TrainConfig(epochs=2, batch_size=8, val_fraction=0.25))
    torch.set_num_threads(threads)
    captions = [json.loads(line) for line in Path(captions_manifest).read_text().splitlines()]
    return {"root": root, "run": root / "run", "image": Path(image), "text": Path(text),
            "images_manifest": Path(images_manifest), "captions_manifest": Path(captions_manifest),
            "caption": {c["id"]: c for c in captions}}


def truth(sheet_run: dict) -> dict:
    """Ranks computed here, independently of pipeline/evaluation/sheet.py: cosine of the run's embeddings, rank 1 + the
    non-matching gallery items scoring at least as well as the best match."""
    model, _, _ = RunDir(sheet_run["run"]).load_model()
    images, texts = FeatureStore.open(sheet_run["image"]), FeatureStore.open(sheet_run["text"])
    image_emb = embed_store(model, "image", images).numpy()
    text_emb = embed_store(model, "text", texts).numpy()
    image_of = {t: sheet_run["caption"][t]["ref"] for t in texts.ids}
    sim = text_emb @ image_emb.T  # every caption of this set is paired, so the gallery is the whole store

    def rank(scores: np.ndarray, match: np.ndarray) -> int:
        return int(1 + ((scores >= scores[match].max()) & ~match).sum())

    t2i = {t: rank(sim[j], np.asarray([i == image_of[t] for i in images.ids])) for j, t in enumerate(texts.ids)}
    i2t = {i: rank(sim[:, n], np.asarray([image_of[t] == i for t in texts.ids])) for n, i in enumerate(images.ids)}
    return {"text->image": t2i, "image->text": i2t, "image_of": image_of}


class SheetParser(HTMLParser):
    """Rows of the sheet: per table direction, each query row's attributes and its result cells' attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.direction = None
        self.images: list[str] = []
        self.warnings = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "table":
            self.direction = a["data-direction"]
        elif tag == "tr" and "query" in classes:
            self.rows.append({"direction": self.direction, "query": a["data-query-id"], "rank": int(a["data-rank"]),
                              "hits": []})
        elif tag == "td" and "hit" in classes:
            self.rows[-1]["hits"].append({"rank": int(a["data-rank"]), "id": a["data-id"], "gt": "gt" in classes})
        elif tag == "img":
            self.images.append(a["src"])
        elif "warning" in classes:
            self.warnings += 1


def test_html_sheet_shows_top_k_with_the_ground_truth_where_the_ranks_say(sheet_run, tmp_path):
    out = tmp_path / "sheet.html"
    report = retrieval_sheet(sheet_run["run"], sheet_run["image"], sheet_run["text"], out, queries=4, k=5, seed=1,
                             thumb=48)
    page = out.read_text(encoding="utf-8")
    parsed = SheetParser()
    parsed.feed(page)
    expected = truth(sheet_run)
    assert report["warnings"] == [] and parsed.warnings == 0
    assert [r["direction"] for r in parsed.rows] == ["text->image"] * 4 + ["image->text"] * 4
    assert len({r["query"] for r in parsed.rows}) == 8
    image_of = expected["image_of"]
    for row in parsed.rows:
        assert row["rank"] == expected[row["direction"]][row["query"]]
        assert [h["rank"] for h in row["hits"]] == [1, 2, 3, 4, 5]
        if row["direction"] == "text->image":
            assert [h["gt"] for h in row["hits"]] == [h["id"] == image_of[row["query"]] for h in row["hits"]]
        else:
            assert [h["gt"] for h in row["hits"]] == [image_of[h["id"]] == row["query"] for h in row["hits"]]
        first = next((h["rank"] for h in row["hits"] if h["gt"]), None)
        assert first == (row["rank"] if row["rank"] <= 5 else None)  # highlighted exactly at the reported rank
    assert 0 < sum(r["rank"] <= 5 for r in parsed.rows) < 8  # both cases are on the sheet
    # Captions come from the manifest; thumbnails are embedded PNGs (20 results + 4 image queries), nothing remote.
    query_text = sheet_run["caption"][parsed.rows[0]["query"]]["text"]
    assert query_text in page
    assert len(parsed.images) == 24 and all(src.startswith("data:image/png;base64,") for src in parsed.images)
    thumb = Image.open(io.BytesIO(base64.b64decode(parsed.images[0].split(",", 1)[1])))
    assert thumb.size == (48, 48)
    # Same seed, same queries; another seed draws others.
    again = retrieval_sheet(sheet_run["run"], sheet_run["image"], sheet_run["text"], tmp_path / "b.html",
                            queries=4, k=5, seed=1, thumb=48)
    other = retrieval_sheet(sheet_run["run"], sheet_run["image"], sheet_run["text"], tmp_path / "c.html",
                            queries=4, k=5, seed=2, thumb=48)
    ids = lambda r: [row["query"]["id"] for row in r["rows"]]  # noqa: E731
    assert ids(again) == ids(report) and ids(other) != ids(report)


def test_png_sheet_frames_the_ground_truth_cells(sheet_run, tmp_path):
    out = tmp_path / "sheet.png"
    report = retrieval_sheet(sheet_run["run"], sheet_run["image"], sheet_run["text"], out, queries=6, k=4, seed=3,
                             thumb=40)
    expected = truth(sheet_run)
    canvas = Image.open(out).convert("RGB")
    assert len(report["rows"]) == 12  # 6 queries each way: enough for hits inside and outside the top 4
    framed = 0
    for row in report["rows"]:
        assert row["rank"] == expected[row["direction"]][row["query"]["id"]]
        assert len(row["results"]) == 4
        for hit in row["results"]:
            x0, y0, x1, y1 = hit["box"]
            assert x1 < canvas.width and y1 < canvas.height
            colour = canvas.getpixel((x0 + 1, y0 + 1))
            assert (colour == HIGHLIGHT) == hit["ground_truth"]
            framed += colour == HIGHLIGHT
        if row["rank"] <= 4:
            assert row["results"][row["rank"] - 1]["ground_truth"]
            assert not any(h["ground_truth"] for h in row["results"][: row["rank"] - 1])
    assert framed == sum(h["ground_truth"] for r in report["rows"] for h in r["results"])
    assert framed > 0 and any(r["rank"] > 4 for r in report["rows"])  # both cases are on the sheet


def test_sheet_cli_falls_back_to_ids_when_the_manifests_changed(sheet_run, tmp_path):
    captions, images = sheet_run["captions_manifest"], sheet_run["images_manifest"]
    caption_bytes, image_bytes = captions.read_bytes(), images.read_bytes()
    try:
        captions.write_bytes(caption_bytes + b'{"id": "extra", "text": "an edit after extraction"}\n')
        images.unlink()
        out = tmp_path / "fallback.html"
        result = cli("eval", "sheet", "--run", sheet_run["run"], "--image-store", sheet_run["image"],
                     "--text-store", sheet_run["text"], "--queries", 2, "--k", 3, "--thumb", 32, "--out", out)
    finally:
        captions.write_bytes(caption_bytes)
        images.write_bytes(image_bytes)
    assert "changed since store" in result.stderr and "captions are shown by id" in result.stderr
    assert "is gone" in result.stderr and "images are shown by id" in result.stderr
    assert f"sheet: {out}" in result.stdout
    page = out.read_text(encoding="utf-8")
    parsed = SheetParser()
    parsed.feed(page)
    assert parsed.warnings == 2 and len(parsed.rows) == 4
    text_query = parsed.rows[0]["query"]
    assert f"[caption {text_query}]" in page and sheet_run["caption"][text_query]["text"] not in page
    bad = cli("eval", "sheet", "--run", sheet_run["run"], "--image-store", sheet_run["image"], "--text-store",
              sheet_run["text"], "--out", tmp_path / "sheet.pdf", ok=False)
    assert bad.returncode == 1 and "written as .html or .png" in bad.stderr
