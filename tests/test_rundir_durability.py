"""A run directory survives a crash: checkpoints are on the disk before they are published, and a record torn by a
crash mid-append does not stop ``--resume``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from toy_stores import make_toy_pair

from pipeline.training.fit import TrainConfig, fit_up
from pipeline.training.rundir import METRICS_FILE, RunDir

SMALL = {"width": 32, "blocks": 1}
TRAIN = {"batch_size": 16, "val_fraction": 0.2, "seed": 1, "tensorboard": False}


def test_resume_survives_a_torn_last_line_of_metrics(tmp_path):
    image_store, text_store = make_toy_pair(tmp_path, n_images=24)
    fit_up(image_store, text_store, tmp_path / "straight", **SMALL, train=TrainConfig(epochs=3, **TRAIN),
           progress=False)
    run = tmp_path / "run"
    fit_up(image_store, text_store, run, **SMALL, train=TrainConfig(epochs=2, **TRAIN), progress=False)
    with open(run / METRICS_FILE, "ab") as handle:  # killed while appending epoch 3's record
        handle.write(b'{"epoch": 3, "loss": 1.2, "st')
    fit_up(image_store, text_store, run, **SMALL, train=TrainConfig(epochs=3, **TRAIN), resume=True, progress=False)
    drop_time = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]  # noqa: E731
    assert drop_time(RunDir(run).metrics()) == drop_time(RunDir(tmp_path / "straight").metrics())
    assert (run / METRICS_FILE).read_text().count("\n") == 3
    a, b = load_file(run / "model.safetensors"), load_file(tmp_path / "straight" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_torn_line_without_a_checkpoint_is_cut_before_the_next_append(tmp_path):
    image_store, text_store = make_toy_pair(tmp_path, n_images=24)
    run = tmp_path / "run"
    fit_up(image_store, text_store, run, **SMALL, train=TrainConfig(epochs=1, **TRAIN), progress=False)
    RunDir(run).append_metrics({"stage": "note", "epoch": 0})
    with open(run / METRICS_FILE, "ab") as handle:
        handle.write(b'{"stage": "no')
    RunDir(run).append_metrics({"stage": "note", "epoch": 1})
    assert [r["stage"] for r in RunDir(run).metrics()] == ["fit-up", "note", "note"]


def test_checkpoint_files_are_fsynced_before_the_rename_publishes_them(tmp_path, monkeypatch):
    image_store, text_store = make_toy_pair(tmp_path, n_images=24)
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", str(Path(src).resolve())))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fit_up(image_store, text_store, tmp_path / "run", **SMALL, train=TrainConfig(epochs=1, **TRAIN), progress=False)
    replaced = [(i, path) for i, (kind, path) in enumerate(events) if kind == "replace"]
    (publish,) = [i for i, path in replaced if "/checkpoints/.epoch-0001" in path]
    folder = events[publish][1]
    synced_before = {path for kind, path in events[:publish] if kind == "fsync"}
    for name in ("model.safetensors", "trainer_state.pt", ""):
        assert os.path.join(folder, name).rstrip("/") in synced_before, name
    weights = [i for i, path in replaced if path.endswith(f"model.safetensors.tmp{os.getpid()}")]
    assert weights and all(("fsync", events[i][1]) in events[:i] for i in weights)
