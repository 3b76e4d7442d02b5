"""One bad item never blocks a dataset: each is left out (or refused before any work) with its reason, and
everything else is stored and trained on. Each test reproduces a defect a user hit by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stores import FeatureStore

REPO = Path(__file__).resolve().parents[1]


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=REPO, capture_output=True, text=True)


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_a_caption_with_a_lone_surrogate_fails_alone_and_the_rest_is_stored(tmp_path, tiny_text_model):
    # Valid JSON whose string holds a lone surrogate: no UTF-8 tokenizer or file can take it.
    manifest = _write_jsonl(tmp_path / "captions.jsonl", [
        json.dumps({"id": "a", "text": "a red circle", "ref": "i1"}),
        '{"id": "b", "text": "x\\udcff y", "ref": "i1"}',
        json.dumps({"id": "c", "text": "a blue square", "ref": "i2"}),
    ])
    store = tmp_path / "store"
    for _ in range(2):  # the second run is a no-op, not a crash on resume
        result = _cli("extract", "--modality", "text", "--encoder", tiny_text_model, "--manifest", manifest,
                      "--store", store, "--batch-size", 3, "--workers", 0)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    stored = FeatureStore.open(store)
    assert set(stored.ids) == {"a", "c"}
    (error,) = stored.errors()
    assert error["id"] == "b" and error["line"] == 2
    assert "lone surrogate U+DCFF" in error["reason"]
    assert error["text"] == "x\\udcff y"  # escaped, so the error table stays UTF-8


def test_a_lone_surrogate_in_an_id_is_a_manifest_error_naming_the_line(tmp_path, tiny_text_model):
    manifest = _write_jsonl(tmp_path / "captions.jsonl", [
        json.dumps({"id": "a", "text": "a red circle"}),
        '{"id": "b\\ud800", "text": "a cat"}',
    ])
    result = _cli("extract", "--modality", "text", "--encoder", tiny_text_model, "--manifest", manifest,
                  "--store", tmp_path / "store")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{manifest}:2: 'id' is not valid Unicode (lone surrogate U+D800" in result.stderr


def _extract_pair_with_one_failed_image(root: Path, tiny_image_model: str, tiny_text_model: str) -> tuple[Path, Path]:
    """Real stores: 8 images of which one is corrupt (it fails extraction), 16 captions that all name their image."""
    import numpy as np
    from PIL import Image

    from extract.run import run_extraction

    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images, captions = [], []
    words = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"]
    for i, word in enumerate(words):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
        images.append(json.dumps({"id": f"img{i}", "path": f"img/{i}.png"}))
        captions += [json.dumps({"id": f"img{i}-c{k}", "text": f"a {word} {shape}", "ref": f"img{i}"})
                     for k, shape in enumerate(("circle", "square"))]
    (root / "img" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # fails extraction with a reason
    image_store, text_store = root / "images", root / "captions"
    run_extraction(_write_jsonl(root / "images.jsonl", images), "image", tiny_image_model, image_store,
                   progress=False)
    run_extraction(_write_jsonl(root / "captions.jsonl", captions), "text", tiny_text_model, text_store,
                   progress=False)
    return image_store, text_store


def test_one_failed_image_does_not_block_training_and_its_captions_are_listed(tmp_path, tiny_image_model,
                                                                           tiny_text_model, capfd):
    from pipeline.training.fit import TrainConfig, TrainingError, fit_up
    from pipeline.training.pairs import PairingError

    image_store, text_store = _extract_pair_with_one_failed_image(tmp_path, tiny_image_model, tiny_text_model)
    assert [e["id"] for e in FeatureStore.open(image_store).errors()] == ["img3"]
    train = {"epochs": 1, "batch_size": 4, "val_fraction": 0.25, "tensorboard": False}

    strict = tmp_path / "strict-run"
    with pytest.raises(PairingError, match="'img3-c0' -> 'img3'"):
        fit_up(image_store, text_store, strict, width=16, blocks=1, train=TrainConfig(strict_pairs=True, **train),
               progress=False)
    assert not strict.exists()  # a refused input leaves no run directory behind (no --overwrite needed)
    with pytest.raises(TrainingError, match="training anchors"):
        fit_up(image_store, text_store, strict, width=16, blocks=1,
               train=TrainConfig(**{**train, "val_fraction": 0.9}), progress=False)
    assert not strict.exists()

    run = tmp_path / "run"
    fit_up(image_store, text_store, run, width=16, blocks=1, train=TrainConfig(**train), progress=False)
    line = capfd.readouterr().err
    assert "left out 2 item(s)" in line and "(2 failed extraction)" in line
    listed = json.loads((run / "dropped-pairs.json").read_text())["fit-up"]
    assert listed["items"] == [{"id": "img3-c0", "ref": "img3", "failed_extraction": True},
                               {"id": "img3-c1", "ref": "img3", "failed_extraction": True}]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1  # it trained


def test_a_nan_validation_caption_is_left_out_of_the_metrics_and_counted(tmp_path, capsys):
    import torch
    from toy_stores import _write, make_toy_pair

    from pipeline.training.fit import TrainConfig, fit_up
    from pipeline.training.pairs import pair_stores, split_by_anchor
    from pipeline.training.rundir import RunDir

    image_store, text_store = make_toy_pair(tmp_path, n_images=24, captions=2)
    images, texts = FeatureStore.open(image_store), FeatureStore.open(text_store)
    train = TrainConfig(epochs=1, batch_size=8, val_fraction=0.25, seed=2, tensorboard=False)
    _, val = split_by_anchor(pair_stores(images, texts), train.val_fraction, train.seed)
    poisoned = texts.ids[int(val.partner[0])]  # a caption of a validation image
    tokens = [texts.get_batch([i])[0][0, : int(texts.lengths[i])] for i in range(len(texts))]
    tokens[texts.index_of(poisoned)][0, 0] = float("nan")
    metas = [{"id": i, "ref": r} for i, r in zip(texts.ids, texts.refs, strict=True)]
    nan_text = _write(tmp_path / "nan-text", "text", "ragged", tokens, metas, texts.dim, None, texts.identity)

    run = tmp_path / "run"
    fit_up(image_store, nan_text, run, width=32, blocks=1, train=train)
    records = RunDir(run).metrics()
    for record in records:
        val_metrics = record["val"]
        assert all(not isinstance(v, float) or v == v for v in val_metrics.values())  # no NaN in the metrics
        assert val_metrics["nonfinite"] == 1 and record["val_nonfinite_ids"] == [poisoned]
        assert val_metrics["image->text"]["queries"] == len(val.anchors)  # its image keeps its other caption
        assert val_metrics["text->image"]["queries"] == len(val) - 1  # the NaN caption is no query
    assert torch.isfinite(torch.tensor([r["val"]["rsum"] for r in records])).all()
    assert f"1 non-finite val items left out, e.g. {poisoned!r}" in capsys.readouterr().out


def test_write_manifest_keeps_a_lone_surrogate_as_a_json_escape(tmp_path):
    from extract.manifest import read_manifest, write_manifest

    path = write_manifest(tmp_path / "m.jsonl", [{"id": "a", "text": "x\udcff y"}, {"id": "b", "text": "café"}])
    assert [item.text for item in read_manifest(path)] == ["x\udcff y", "café"]
