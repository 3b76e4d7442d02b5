"""``fit-up --sweep``: each configuration of a sweep trained together with the others (every minibatch read once)
gives the same run as fit-up of that configuration alone with the same seed, byte for byte; the grid file's forms
and refusals; ``report`` over a sweep's folder or its runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.training.fit import LossConfig, TrainConfig, fit_up
from pipeline.training.sweep import SweepError, fit_up_sweep, grid_configurations, read_grid, run_name
from tests.toy_stores import make_toy_pair

REPO = Path(__file__).resolve().parents[1]


def _train(**changes) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "seed": 0, "tensorboard": False, "lr_schedule": "cosine",
                          "select": "mean-rank", **changes})


def test_each_run_of_a_sweep_equals_fit_up_alone(tmp_path):
    images, texts = make_toy_pair(tmp_path, n_images=40)
    shared = {"width": 32, "blocks": 1, "loss": LossConfig(kind="soft"), "train": _train(seed=3),
              "head_options": {"dropout": 0.1}}  # dropout on: each head must draw its own masks
    grid = [{"width": 32, "lr": 0.002}, {"width": 16, "fusion": "attention"}, {"seed": 5, "loss": "infonce"}]
    result = fit_up_sweep(images, texts, tmp_path / "sweep", grid, progress=False, **shared)
    assert [r["name"] for r in result["runs"]] == ["width-32_lr-0.002", "width-16_fusion-attention",
                                                   "seed-5_loss-infonce"]
    alone = [
        fit_up(images, texts, tmp_path / "alone0", width=32, blocks=1, loss=LossConfig(kind="soft"),
               train=_train(seed=3, lr=0.002), head_options={"dropout": 0.1}, progress=False),
        fit_up(images, texts, tmp_path / "alone1", width=16, blocks=1, fusion="attention",
               loss=LossConfig(kind="soft"), train=_train(seed=3), head_options={"dropout": 0.1}, progress=False),
        fit_up(images, texts, tmp_path / "alone2", width=32, blocks=1, loss=LossConfig(kind="infonce"),
               train=_train(seed=5), head_options={"dropout": 0.1}, progress=False),
    ]
    weights = set()
    for swept, single in zip(result["runs"], alone, strict=True):
        swept_dir, single_dir = Path(swept["run"]), Path(single["run"])
        assert swept_dir.parent == tmp_path / "sweep"
        weights.add((swept_dir / "model.safetensors").read_bytes())
        assert (swept_dir / "model.safetensors").read_bytes() == (single_dir / "model.safetensors").read_bytes()
        assert swept["selected_epoch"] == single["selected_epoch"]
        a = [json.loads(line) for line in (swept_dir / "metrics.jsonl").read_text().splitlines()]
        b = [json.loads(line) for line in (single_dir / "metrics.jsonl").read_text().splitlines()]
        assert [{k: v for k, v in r.items() if k != "seconds"} for r in a] == \
               [{k: v for k, v in r.items() if k != "seconds"} for r in b]
        config_a = json.loads((swept_dir / "config.json").read_text())
        config_b = json.loads((single_dir / "config.json").read_text())
        assert config_a["model"] == config_b["model"] and config_a["loss"] == config_b["loss"]
        assert config_a["stages"] == config_b["stages"]
    assert len(weights) == 3  # the configurations really differ
    listed = json.loads((tmp_path / "sweep" / "SWEEP.json").read_text())
    assert [r["options"] for r in listed["runs"]] == grid


def test_grid_forms_and_refusals(tmp_path):
    assert grid_configurations({"width": [64, 128], "lr": [0.001]}) == [{"width": 64, "lr": 0.001},
                                                                       {"width": 128, "lr": 0.001}]
    assert grid_configurations([{"weight-decay": 0.1}]) == [{"weight_decay": 0.1}]
    assert run_name({"fusion": "add", "lr": 0.001}) == "fusion-add_lr-0.001"
    with pytest.raises(SweepError, match="cannot sweep batch_size"):
        grid_configurations({"batch_size": [32, 64]})
    with pytest.raises(SweepError, match="non-empty list"):
        grid_configurations({"width": []})
    with pytest.raises(SweepError, match="more than once"):
        grid_configurations([{"width": 64}, {"width": 64}])
    bad = tmp_path / "grid.json"
    bad.write_text("{width: [1]")
    with pytest.raises(SweepError, match="cannot read it as JSON"):
        read_grid(bad)
    with pytest.raises(SweepError, match="cannot --resume"):
        fit_up_sweep(tmp_path / "absent-image", tmp_path / "absent-text", tmp_path / "sweep", [{"width": 8}],
                     resume=True)


def test_cli_sweep_then_report_over_the_folder_and_the_runs(tmp_path):
    images, texts = make_toy_pair(tmp_path, n_images=32)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"width": [16, 24]}))
    out = tmp_path / "sweep"
    fit = [sys.executable, "cli.py", "fit-up", "--image-store", str(images), "--text-store", str(texts), "--out",
           str(out), "--sweep", str(grid), "--blocks", "1", "--epochs", "1", "--batch-size", "8", "--no-tensorboard"]
    result = subprocess.run(fit, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    runs = [out / "width-16", out / "width-24"]
    assert all((r / "model.safetensors").is_file() for r in runs)
    again = subprocess.run(fit, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and "already holds a run" in again.stderr
    for given in ([str(out)], [str(r) for r in runs]):
        report_dir = tmp_path / f"report{len(given)}"
        shown = subprocess.run([sys.executable, "cli.py", "report", *given, "--out", str(report_dir)], cwd=REPO,
                               capture_output=True, text=True, timeout=600)
        assert shown.returncode == 0, shown.stderr
        report = json.loads((report_dir / "report.json").read_text())
        assert [row["name"] for row in report["runs"]] == ["width-16", "width-24"]
        assert "w16" in shown.stdout and "w24" in shown.stdout


def test_a_sweeps_run_resumes_with_fit_up_like_a_run_trained_alone(tmp_path):
    images, texts = make_toy_pair(tmp_path, n_images=32)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([{"width": 16, "fusion": "attention"}, {"lr": 0.002}]))
    common = ["--image-store", str(images), "--text-store", str(texts), "--blocks", "1", "--epochs", "1",
              "--batch-size", "8", "--no-tensorboard"]

    def cli(*args: str) -> None:
        result = subprocess.run([sys.executable, "cli.py", "fit-up", *args], cwd=REPO, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr

    cli(*common, "--out", str(tmp_path / "sweep"), "--sweep", str(grid))
    cli(*common, "--out", str(tmp_path / "alone"), "--width", "16", "--fusion", "attention")
    swept, alone = tmp_path / "sweep" / "width-16_fusion-attention", tmp_path / "alone"
    for run in (swept, alone):  # only the stores and the new length: the rest comes from the run's own record
        cli("--image-store", str(images), "--text-store", str(texts), "--out", str(run), "--resume", "--epochs", "2")
    records = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (swept, alone)]
    assert [r["epoch"] for r in records[0] if "epoch" in r][-1] == 2
    assert records[0] == records[1]
    assert (swept / "model.safetensors").read_bytes() == (alone / "model.safetensors").read_bytes()
    assert json.loads((swept / "config.json").read_text())["model"]["fusion"] == "attention"
