"""The command line end to end, in real subprocesses, on tiny models saved with save_pretrained."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import run_cli

from pipeline.demo import make_shapes_dataset
from pipeline.training.defaults import FIT_UP_TEMPERATURE

cli = run_cli


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, Path]:
    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_images=48, seed=0, prefix="s")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, shapes, tiny_image_model, tiny_text_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    image_manifest, caption_manifest = shapes
    cli("extract", "--modality", "image", "--encoder", tiny_image_model, "--manifest", image_manifest,
        "--store", root / "img", "--batch-size", 16)
    cli("extract", "--modality", "text", "--encoder", tiny_text_model, "--manifest", caption_manifest,
        "--store", root / "txt", "--batch-size", 16, "--workers", 1)
    return {"root": root, "image": root / "img", "text": root / "txt"}


def test_extract_writes_stores_and_a_rerun_is_a_noop(extracted, shapes, tiny_text_model):
    _, caption_manifest = shapes
    started = time.perf_counter()
    again = cli("extract", "--modality", "text", "--encoder", tiny_text_model, "--manifest", caption_manifest,
                "--store", extracted["text"])
    assert "up to date" in again.stderr
    assert time.perf_counter() - started < 20  # no model load; generous for a loaded CI machine
    listing = cli("stores", "ls", extracted["root"]).stdout
    assert "img" in listing and "txt" in listing and listing.count("complete") == 2
    info = json.loads(cli("stores", "info", extracted["image"], "--json").stdout)
    assert info["items"] == 48 and info["layout"] == "fixed" and info["complete"]
    assert info["identity"]["encoder"] and info["identity"]["manifest_sha256"]


def test_a_changed_manifest_is_never_mixed_in(extracted, shapes, tiny_text_model, tmp_path):
    _, caption_manifest = shapes
    changed = tmp_path / "captions.jsonl"
    lines = Path(caption_manifest).read_text().splitlines()
    first = json.loads(lines[0])
    first["text"] = "an entirely different caption"
    changed.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    (tmp_path / "images").symlink_to(Path(caption_manifest).parent / "images")
    refused = cli("extract", "--modality", "text", "--encoder", tiny_text_model, "--manifest", changed,
                  "--store", extracted["text"], ok=False)
    assert refused.returncode == 1 and "manifest_sha256" in refused.stderr and "Traceback" not in refused.stderr
    keyed = cli("extract", "--modality", "text", "--encoder", tiny_text_model, "--manifest", changed,
                "--store", tmp_path / "txt-{key}")
    assert "wrote" in keyed.stderr and len(list(tmp_path.glob("txt-*"))) == 1


def test_fit_up_and_evaluate_through_the_cli(extracted, tmp_path, tiny_text_model, shapes):
    run = tmp_path / "run"
    cli("fit-up", "--image-store", extracted["image"], "--text-store", extracted["text"], "--out", run,
        "--epochs", 3, "--batch-size", 16, "--width", 32, "--blocks", 1, "--fusion", "attention", "--loss", "soft")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all("R@10" in m["val"]["image->text"] for m in metrics)
    config = json.loads((run / "config.json").read_text())
    assert (run / "model.safetensors").exists() and config["model"]["fusion"] == "attention"
    # fit-up's defaults (docs/training.md): the UP with the pooled linear path, warm-up + cosine, the
    # one-standard-error selection
    train = config["stages"][0]["train"]
    assert config["model"]["pooled_skip"] is True and config["model"]["token_dropout"] == 0.0
    assert config["model"]["path_loss"] == "shared"  # the path trains with the UP's loss (hypothesis 18)
    assert (train["lr_schedule"], train["lr_warmup"], train["select"]) == ("cosine", 0.1, "mean-rank-1se")
    # ... and the initial temperature, from the same table as the API's (hypothesis 6)
    assert config["loss"]["init_temperature"] == FIT_UP_TEMPERATURE
    paper = tmp_path / "paper"
    cli("fit-up", "--image-store", extracted["image"], "--text-store", extracted["text"], "--out", paper,
        "--epochs", 1, "--batch-size", 16, "--width", 32, "--blocks", 1, "--no-pooled-skip", "--lr-schedule",
        "constant", "--select", "rsum")
    config = json.loads((paper / "config.json").read_text())
    train = config["stages"][0]["train"]
    assert config["model"]["pooled_skip"] is False and (train["lr_schedule"], train["select"]) == ("constant", "rsum")
    refused = cli("fit-up", "--image-store", extracted["image"], "--text-store", extracted["text"], "--out",
                  tmp_path / "refused", "--no-pooled-skip", "--up-drop", 0.5, ok=False)
    assert refused.returncode == 1 and "up_drop" in refused.stderr and "needs pooled_skip" in refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "refused").exists()
    refused = cli("fit-up", "--image-store", extracted["image"], "--text-store", extracted["text"], "--out",
                  tmp_path / "refused", "--no-pooled-skip", "--path-loss", "own", ok=False)
    assert refused.returncode == 1 and "path_loss" in refused.stderr and "needs pooled_skip" in refused.stderr
    assert not (tmp_path / "refused").exists()
    resumed = cli("fit-up", "--image-store", extracted["image"], "--text-store", extracted["text"], "--out", run,
                  "--epochs", 4, "--batch-size", 16, "--resume")
    assert "epoch   4" in resumed.stdout and "epoch   3" not in resumed.stdout

    table = cli("eval", "retrieval", "--run", run, "--image-store", extracted["image"], "--text-store",
                extracted["text"]).stdout
    assert "image->text" in table and "text->image" in table and "chance" in table
    report = json.loads(Path(table.split("report: ")[1].strip()).read_text())
    assert report["metrics"]["image->text"]["queries"] == 48

    classes = tmp_path / "classes.txt"
    labels = sorted({json.loads(line)["label"] for line in Path(shapes[0]).read_text().splitlines()})
    classes.write_text("\n".join(labels) + "\n")
    zero_shot = cli("eval", "zero-shot", "--run", run, "--image-store", extracted["image"], "--classes", classes,
                    "--template", "a {}", "--text-encoder", tiny_text_model).stdout
    assert "top1" in zero_shot and Path(zero_shot.split("report: ")[1].strip()).parent == run / "eval"
    assert json.loads(Path(zero_shot.split("report: ")[1].strip()).read_text())["task"] == "zero-shot"


def test_zero_shot_refuses_another_text_encoder(extracted, tmp_path, tiny_text_model, shapes):
    import torch
    from transformers import AutoModel, AutoTokenizer

    run = tmp_path / "run"
    cli("fit-up", "--image-store", extracted["image"], "--text-store", extracted["text"], "--out", run,
        "--epochs", 1, "--batch-size", 16, "--width", 32, "--blocks", 1)
    other = tmp_path / "other-text-model"
    model = AutoModel.from_pretrained(tiny_text_model)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.mul_(2.0)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_text_model).save_pretrained(other)
    classes = tmp_path / "classes.txt"
    classes.write_text("red circle\nblue square\n")
    too_few = cli("eval", "zero-shot", "--run", run, "--image-store", extracted["image"], "--classes", classes,
                  "--text-encoder", tiny_text_model, ok=False)
    assert too_few.returncode == 1 and "are not among the classes" in too_few.stderr
    assert "Traceback" not in too_few.stderr
    labels = sorted({json.loads(line)["label"] for line in Path(shapes[0]).read_text().splitlines()})
    classes.write_text("\n".join(labels) + "\n")
    refused = cli("eval", "zero-shot", "--run", run, "--image-store", extracted["image"], "--classes", classes,
                  "--text-encoder", other, ok=False)
    assert refused.returncode == 1 and "not the encoder the text store was built with" in refused.stderr


def test_bad_manifest_line_is_reported_before_any_model_work(tmp_path, tiny_text_model):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n{"text": "no id"}\n')
    result = cli("extract", "--modality", "text", "--encoder", tiny_text_model, "--manifest", manifest,
                 "--store", tmp_path / "s", ok=False)
    assert result.returncode == 1 and "bad.jsonl:2: invalid JSON" in result.stderr and "bad.jsonl:3: missing" in result.stderr
    assert not (tmp_path / "s").exists()


def test_demo_runs_offline_with_tiny_encoders(tmp_path):
    result = cli("demo", "--tiny", "--images", 40, "--epochs", 2, "--out", tmp_path / "demo")
    assert "TINY RANDOMLY INITIALISED" in result.stdout
    assert "zero-shot" in result.stdout and "R@1" in result.stdout and "chance" in result.stdout
