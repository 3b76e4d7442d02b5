"""Errors and logs a cluster job can live with: a hub id that is neither local nor cached fails at once in one line
(offline, or with the hub unreachable), and outside a terminal the long steps log a progress line at a steady
interval (count, rate, ETA, failures) through ``logging``; ``--quiet`` silences them."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from extract.progress import INTERVAL_ENV, PACKAGES, configure_logging
from pipeline.progress import progress_bar

REPO = Path(__file__).resolve().parents[1]


def cli(*args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def _manifest(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"t{k}", "text": t}) + "\n" for k, t in enumerate(texts)))
    return path


def test_a_mistyped_hub_id_fails_in_one_line_offline_and_without_network(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path / "m.jsonl", ["a cat"])
    args = ("extract", "--modality", "text", "--encoder", "sentence-transformers/all-MiniLM-L6-v3-typo",
            "--manifest", manifest, "--store", tmp_path / "store")
    empty_cache = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    offline = cli(*args, env={**empty_cache, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1 and "Traceback" not in offline.stderr
    assert offline.stderr.strip().splitlines() == [
        "Error: encoder 'sentence-transformers/all-MiniLM-L6-v3-typo' is neither a local directory nor in the local "
        "Hugging Face cache, and HF_HUB_OFFLINE is set; pass a directory saved with save_pretrained instead "
        "(--encoder path/to/model), or download the model into the Hugging Face cache where there is network "
        "(`hf download ID`)"]
    # online mode, but nothing answers where the hub should be: one request, no retries, the same kind of line
    unreachable = cli(*args, env={**empty_cache, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
                                  "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    assert unreachable.returncode == 1 and "Traceback" not in unreachable.stderr
    line, = unreachable.stderr.strip().splitlines()
    assert "is not in the local Hugging Face cache and the hub cannot be reached" in line
    assert "set HF_HUB_OFFLINE=1" in line and "save_pretrained" in line
    assert not (tmp_path / "store").exists()


def test_extraction_outside_a_terminal_logs_progress_lines(tiny_text_model: str, tmp_path: Path) -> None:
    texts = ["a red square", "   ", "a green field", "a blue sky", "a gray cat", "noise"]  # one empty: a failure
    manifest = _manifest(tmp_path / "m.jsonl", texts)
    args = ("extract", "--modality", "text", "--encoder", tiny_text_model, "--manifest", manifest, "--batch-size", 2,
            "--workers", 0)
    result = cli(*args, "--store", tmp_path / "a", env={INTERVAL_ENV: "0"})  # stderr is a pipe, not a terminal
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("extract text: ")]
    assert len(lines) >= 3, result.stderr  # the start, each batch, the end
    assert lines[-1].startswith("extract text: 6/6 items (100%) in ")
    assert all("item" in line and "/s" in line and "ETA" in line for line in lines)
    assert lines[-1].endswith("failed=1")
    assert any(line.startswith("wrote ") and "1 failed" in line for line in result.stderr.splitlines())

    quiet = cli("--quiet", *args, "--store", tmp_path / "b", env={INTERVAL_ENV: "0"})
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_progress_lines_go_through_logging_at_the_interval(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The bar fit and embed draw (pipeline.progress) is the same mechanism: with a long interval only the first and
    the last line are written, whatever the number of steps."""
    caplog.set_level(logging.INFO, logger="extract")
    monkeypatch.setenv(INTERVAL_ENV, "3600")
    for _ in progress_bar(range(50), total=50, desc="[up] epoch 1", unit="step"):
        pass
    lines = [r.getMessage() for r in caplog.records if r.name == "extract.progress"]
    assert len(lines) == 2 and lines[0].startswith("[up] epoch 1: 0/50 steps (0%)")
    assert lines[1].startswith("[up] epoch 1: 50/50 steps (100%)")


def test_verbose_records_carry_time_and_logger(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        configure_logging(1)
        logging.getLogger("extract.run").debug("decoding batch 3")
        assert capsys.readouterr().err.rstrip().endswith("extract.run DEBUG: decoding batch 3")
        configure_logging(-1)
        logging.getLogger("extract.run").info("hidden")
        assert capsys.readouterr().err == ""
    finally:
        for name in PACKAGES:  # leave the loggers as the other tests expect them
            package = logging.getLogger(name)
            package.handlers = [h for h in package.handlers if h.get_name() != "oneencoder-cli"]
            package.setLevel(logging.NOTSET)
