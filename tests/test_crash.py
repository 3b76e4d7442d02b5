"""Crash safety with real processes killed by SIGKILL: training resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from toy_stores import make_toy_pair, store_files

REPO = Path(__file__).resolve().parents[1]


def _fit_up_cmd(image_store: Path, text_store: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "cli.py", "fit-up", "--image-store", str(image_store), "--text-store", str(text_store),
            "--out", str(run), "--epochs", "8", "--batch-size", "8", "--width", "32", "--blocks", "1",
            "--seed", "5", *extra]


def _kill_after_epochs(cmd: list[str], run: Path, epochs: int) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``epochs`` metric lines exist (mid-way through the next epoch)."""
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= epochs:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_fit_up_killed_between_epochs_resumes_to_the_same_metrics(tmp_path):
    image_store, text_store = make_toy_pair(tmp_path, n_images=48)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_fit_up_cmd(image_store, text_store, straight), cwd=REPO, check=True, capture_output=True)
    _kill_after_epochs(_fit_up_cmd(image_store, text_store, killed), killed, epochs=3)
    resumed = subprocess.run(_fit_up_cmd(image_store, text_store, killed, "--resume"), cwd=REPO,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _records(killed) == _records(straight)
    assert (killed / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()


def test_extract_killed_twice_resumes_to_the_same_bytes(tmp_path, tiny_text_model):
    words = ["red", "green", "blue", "circle", "square", "left", "right", "top", "small", "large", "a", "photo"]
    manifest = tmp_path / "captions.jsonl"
    with open(manifest, "w") as handle:
        for i in range(3000):
            text = " ".join(words[(i * 7 + k * 5) % len(words)] for k in range(2 + i % 9))
            handle.write(json.dumps({"id": f"c{i}", "text": text if i % 97 else "   ", "ref": f"i{i // 2}"}) + "\n")

    def extract(store: Path) -> list[str]:
        return [sys.executable, "cli.py", "extract", "--modality", "text", "--encoder", tiny_text_model,
                "--manifest", str(manifest), "--store", str(store), "--batch-size", "16", "--shard-mb", "0.004"]

    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    subprocess.run(extract(clean), cwd=REPO, check=True, capture_output=True)
    for shards_before_kill in (4, 40):  # kill early, then again during the resumed run
        process = subprocess.Popen(extract(crashed), cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        entries = crashed / "_shards" / "tokens"
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if entries.is_dir() and len(list(entries.glob("*.json"))) >= shards_before_kill:
                os.kill(process.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        process.wait()
        assert process.returncode == -signal.SIGKILL, "extraction finished before it could be killed"
        info = json.loads(subprocess.run([sys.executable, "cli.py", "stores", "info", str(crashed), "--json"],
                                         cwd=REPO, capture_output=True, text=True, check=True).stdout)
        assert not info["complete"]
    resumed = subprocess.run(extract(crashed), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at item" in resumed.stderr
    assert store_files(crashed) == store_files(clean)
    verify = subprocess.run([sys.executable, "cli.py", "stores", "verify", str(crashed)], cwd=REPO,
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_verify_repair_restores_the_original_bytes(tmp_path, tiny_text_model, text_manifest):
    store = tmp_path / "s"
    subprocess.run([sys.executable, "cli.py", "extract", "--modality", "text", "--encoder", tiny_text_model,
                    "--manifest", text_manifest, "--store", str(store), "--batch-size", "2", "--shard-mb", "0.001"],
                   cwd=REPO, check=True, capture_output=True)
    original = store_files(store)
    shards = sorted((store / "tokens" / "c").iterdir(), key=lambda p: int(p.name))
    assert len(shards) >= 2
    altered = shards[0] / "0"
    data = bytearray(altered.read_bytes())
    data[3] ^= 0x40
    altered.write_bytes(bytes(data))
    (shards[-1] / "0").unlink()
    verify = [sys.executable, "cli.py", "stores", "verify", str(store)]
    bad = subprocess.run(verify, cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and f"tokens shard {shards[0].name}" in bad.stdout and "altered" in bad.stdout
    assert "missing" in bad.stdout
    fixed = subprocess.run([*verify, "--repair"], cwd=REPO, capture_output=True, text=True)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert store_files(store) == original


def _max_part(store: Path) -> int:
    folder = store / "_staging" / "tokens"
    numbers = [int(p.stem) for p in folder.glob("*.json")] if folder.is_dir() else []
    return max(numbers, default=-1)


def test_a_killed_extraction_loses_only_what_came_after_its_last_commit(tmp_path, tiny_text_model):
    """With 64 MB shards nothing of a small extraction is a whole shard until it ends: what was encoded is made
    durable every --commit-seconds (here after every batch) as staging parts, a kill keeps them, and the resumed
    store (killed twice) is byte-identical to an uninterrupted run."""
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"c{i}", "text": "a photo of " * (1 + i % 6) + str(i)}) + "\n"
                                for i in range(400)))

    def extract(store: Path, *extra: str) -> list[str]:
        return [sys.executable, "cli.py", "extract", "--modality", "text", "--encoder", tiny_text_model,
                "--manifest", str(manifest), "--store", str(store), "--batch-size", "8", "--workers", "0", *extra]

    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    subprocess.run(extract(clean), cwd=REPO, check=True, capture_output=True)
    resumed_at = []
    for parts_before_kill in (6, 12):
        process = subprocess.Popen(extract(crashed, "--commit-seconds", "0"), cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        first = _max_part(crashed)
        deadline = time.time() + 300
        while time.time() < deadline and process.poll() is None:
            if _max_part(crashed) >= first + parts_before_kill:
                os.kill(process.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        stderr = process.communicate()[1]
        assert process.returncode == -signal.SIGKILL, "extraction finished before it could be killed"
        if "resuming at item" in stderr:
            resumed_at.append(int(stderr.split("resuming at item ")[1].split()[0]))
        assert not (crashed / "tokens" / "c").exists()  # no whole shard yet: only the staging parts hold items
    resumed = subprocess.run(extract(crashed), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    resumed_at.append(int(resumed.stderr.split("resuming at item ")[1].split()[0]))
    # each run resumed after at least the batches its predecessor had committed (6, then 6 more, of 8 items)
    assert resumed_at[0] > 6 * 8 and resumed_at[1] > resumed_at[0] + 6 * 8 - 8, resumed_at
    assert store_files(crashed) == store_files(clean)
    assert not (crashed / "_staging").exists()
