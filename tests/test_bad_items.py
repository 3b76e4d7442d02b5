"""One bad item never blocks a dataset: each is left out (or refused before any work) with its reason, and
everything else is stored and trained on. Each test reproduces a defect a user hit by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
