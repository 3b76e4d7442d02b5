"""``cli.py bench --quick`` end to end in a subprocess: every metric is reported with a finite value and the table
is printed. No timing is asserted: the machine running the tests may be shared (docs/benchmarks.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from pipeline.tools.bench import SIZES, best_total, format_table, interleaved, median_ratio, ratios

REPO = Path(__file__).resolve().parents[1]
METRICS = {"P1a", "P1a_disk", "P1a_cold", "P1b", "P1b_disk", "P2", "P3", "P3_small", "P4", "P5", "P6", "read",
           "P1_gpu", "P1_gpu_disk", "UP_bf16", "P8"}
GPU_METRICS = {"P1_gpu", "P1_gpu_disk", "UP_bf16"}  # measured on a CUDA device, else reported unmeasured


def test_quick_bench_reports_every_metric(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "cli.py", "bench", "--quick", "--out", str(out), "--json"], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    report = json.loads(out.read_text())
    assert json.loads(result.stdout) == report  # --json: the report on stdout, the table on stderr
    assert report["mode"] == "quick" and report["sizes"] == {**SIZES["quick"].__dict__}
    assert set(report["metrics"]) == METRICS
    for key, metric in report["metrics"].items():
        if key in GPU_METRICS and report["device"] == "cpu":
            assert metric["value"] is None and metric["passed"] is None, key
            assert metric["notes"].startswith("not measured: "), key
            continue
        assert isinstance(metric["value"], float) and math.isfinite(metric["value"]), key
        assert metric["passed"] in (True, False, None) and metric["target"] and metric["notes"], key
    header = next(line for line in result.stderr.splitlines() if line.startswith("metric"))
    assert all(column in header for column in ("measured", "target", "result", "notes"))
    for key in METRICS:
        assert any(line.startswith(f"{key} ") for line in result.stderr.splitlines()), key


def test_interleaved_alternates_order_and_times_every_round():
    calls: list[tuple[str, int]] = []
    times = interleaved({"a": lambda r: calls.append(("a", r)), "b": lambda r: calls.append(("b", r))}, rounds=3,
                        prepare={"b": lambda: calls.append(("prep", -1))})
    assert [c for c in calls if c[0] != "prep"] == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]
    assert calls.count(("prep", -1)) == 3
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert median_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 1.0]) == 4.0


def test_best_total_takes_each_pieces_least_time_over_repetitions():
    # two epochs of three steps, step-interleaved: rounds 0..5 are steps 0, 1, 2, 0, 1, 2
    epochs = [5.0, 2.0, 9.0, 1.0, 3.0, 4.0]
    assert best_total(epochs, period=3) == 1.0 + 2.0 + 4.0
    assert best_total(epochs) == 1.0
    both = ratios([2.0, 2.0, 4.0, 2.0], [1.0, 1.0, 1.0, 2.0], period=2)
    assert both == {"median": 2.0, "best": 2.0}


def test_table_marks_results():
    from pipeline.tools.bench import Metric

    table = format_table([Metric("P9", "thing", 1.5, "x", "<= 2", True, "fine"),
                          Metric("P8", "other", 3.0, "x", "<= 2", False, "slow"),
                          Metric("r", "rate", 12345.0, "samples/s", "report", None, "n/a")])
    lines = table.splitlines()
    assert lines[0].startswith("metric") and "pass" in lines[2] and "FAIL" in lines[3] and "info" in lines[4]
    assert "12,345 samples/s" in lines[4]


def test_the_gpu_rows_measure_on_any_device(tmp_path, one_thread):
    """The GPU rows' code, run on the CPU (a GPU run fills the rows): every variant trains, ratios and rates are
    finite. No timing is asserted."""
    from pipeline.tools.bench import Bench, gpu_overhead_times, up_step_rates

    bench = Bench(tmp_path, SIZES["quick"], "cpu")
    p1 = gpu_overhead_times(bench, "cpu")
    assert set(p1["seconds"]) == {"on the device", "resident", "disk, pinned"}
    assert all(math.isfinite(p1[k]["median"]) for k in ("resident", "disk")) and sum(p1["resident_bytes"]) > 0
    up = up_step_rates(bench, "cpu")
    assert set(up["images_per_s"]) == {"bf16", "fp32"} and all(r > 0 for r in up["images_per_s"].values())


def test_gpu_only_reports_the_gpu_rows_unmeasured_without_cuda(tmp_path):
    import torch

    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, "cli.py", "bench", "--gpu-only", "--quick", "--device", "cpu", "--out",
                             str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == GPU_METRICS
    expected = "not measured: no CUDA device" if not torch.cuda.is_available() else "not measured: the bench runs on cpu"
    assert all(m["value"] is None and m["notes"].startswith(expected) for m in report["metrics"].values())
    assert any(line.startswith("UP_bf16 ") and "not measured" in line for line in result.stdout.splitlines())
