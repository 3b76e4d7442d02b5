"""The GPU path, tested on the CPU: --precision (autocast bf16 / fp16, the loss in fp32), --store-device (stores
held whole on a device, batches gathered there: the same tensors as the disk path) and pinned prefetch. The tests
marked ``cuda`` run where a GPU is present (pipeline/tools/gpu_check.sh)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_stores import make_toy_modality, make_toy_pair

from pipeline.training.fit import TrainConfig, TrainingError, fit_al, fit_up
from pipeline.training.prefetch import token_batch
from pipeline.training.resident import ResidentStore, check_fits
from pipeline.training.rundir import RunDir
from stores import FeatureStore, StoreWriter

REPO = Path(__file__).resolve().parents[1]
SMALL = {"width": 32, "blocks": 1}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _weights(run: Path) -> bytes:
    return (run / "model.safetensors").read_bytes()


def test_bf16_trains_the_toy_set_above_chance_and_is_recorded(tmp_path, one_thread):
    image_store, text_store = make_toy_pair(tmp_path, n_images=60)
    run = tmp_path / "bf16"
    fit_up(image_store, text_store, run, **SMALL, progress=False,
           train=TrainConfig(epochs=12, batch_size=16, val_fraction=0.25, precision="bf16"))
    metrics = RunDir(run).metrics()
    assert all(np.isfinite(m["loss"]) for m in metrics) and metrics[-1]["loss"] < metrics[0]["loss"]
    best = max(m["val"]["image->text"]["R@1"] for m in metrics)
    assert best >= 0.5, f"held-out R@1 {best}: chance is 1/15"
    config = json.loads((run / "config.json").read_text())
    assert config["stages"][0]["train"]["precision"] == "bf16"
    fp32 = tmp_path / "fp32"
    fit_up(image_store, text_store, fp32, **SMALL, progress=False,
           train=TrainConfig(epochs=1, batch_size=16, val_fraction=0.25))
    assert _weights(fp32) != _weights(run)  # the precision reached the step
    assert json.loads((fp32 / "config.json").read_text())["stages"][0]["train"]["precision"] == "fp32"


def test_fp16_on_a_cpu_is_refused_in_one_line_before_the_run_is_written(tmp_path):
    image_store, text_store = make_toy_pair(tmp_path, n_images=24)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "cli.py", "fit-up", "--image-store", str(image_store), "--text-store",
                             str(text_store), "--out", str(out), "--device", "cpu", "--precision", "fp16",
                             "--epochs", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--precision fp16 needs a CUDA device" in result.stderr and "bf16" in result.stderr
    assert not out.exists()


def test_a_resume_keeps_the_recorded_precision(tmp_path, one_thread):
    image_store, text_store = make_toy_pair(tmp_path, n_images=24)
    out = tmp_path / "run"
    common = ["--image-store", str(image_store), "--text-store", str(text_store), "--out", str(out), "--device",
              "cpu", "--width", "32", "--blocks", "1", "--batch-size", "8", "--no-tensorboard"]
    for extra in (["--epochs", "1", "--precision", "bf16"], ["--epochs", "2", "--resume"]):
        result = subprocess.run([sys.executable, "cli.py", "fit-up", *common, *extra], cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["stages"][0]["train"]["precision"] == "bf16" and len(RunDir(out).metrics()) == 2
    result = subprocess.run([sys.executable, "cli.py", "fit-up", *common, "--epochs", "3", "--resume",
                             "--precision", "fp32"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "--precision fp32 differs from the run's bf16" in result.stderr


def _bf16_store(path: Path, layout: str) -> Path:
    gen = torch.Generator().manual_seed(5)
    lengths = torch.tensor([3, 1, 5, 2, 4, 5]) if layout == "ragged" else torch.full((6,), 3)
    writer = StoreWriter.create(path, modality="text", layout=layout, dim=4, tokens_per_item=3 if layout == "fixed"
                                else None, dtype="bfloat16", identity={"t": layout}, shard_mb=0.01)
    writer.add_batch([{"id": f"t{i}"} for i in range(6)], torch.randn(6, 5, 4, generator=gen)[:, : int(lengths.max())],
                     lengths)
    writer.finish()
    return path


def test_resident_batches_are_the_tensors_the_store_reads(tmp_path):
    image_path, text_path = make_toy_pair(tmp_path, n_images=20)
    stores = [FeatureStore.open(p, ram_budget_gb=0) for p in (image_path, text_path)]
    stores += [FeatureStore.open(_bf16_store(tmp_path / layout, layout)) for layout in ("ragged", "fixed")]
    rng = np.random.default_rng(0)
    for store in stores:
        resident = ResidentStore(store, "cpu")
        assert resident.nbytes == store.nbytes  # flat: no padding held
        for _ in range(4):
            idx = rng.integers(0, len(store), size=5)  # repeats allowed, as --sampling all draws them
            tokens, mask = resident.batch(idx)
            expected_tokens, expected_mask = token_batch(store, idx)
            assert tokens.dtype == expected_tokens.dtype and torch.equal(mask, expected_mask)
            assert torch.equal(tokens, expected_tokens), store.path


def test_store_device_cpu_gives_the_weights_of_the_disk_path(tmp_path, one_thread):
    image_store, text_store = make_toy_pair(tmp_path, n_images=30)
    train = {"epochs": 2, "batch_size": 8, "val_fraction": 0.2}
    for name, store_device in (("default", "none"), ("resident", "cpu")):
        fit_up(image_store, text_store, tmp_path / name, **SMALL, progress=False,
               train=TrainConfig(**train, store_device=store_device))
    assert _weights(tmp_path / "default") == _weights(tmp_path / "resident")
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]  # noqa: E731
    assert strip(RunDir(tmp_path / "default").metrics()) == strip(RunDir(tmp_path / "resident").metrics())


def test_stores_that_do_not_fit_are_refused_in_one_line(tmp_path):
    image_path, text_path = make_toy_pair(tmp_path, n_images=20)
    stores = [FeatureStore.open(p, ram_budget_gb=0) for p in (image_path, text_path)]
    need = sum(s.nbytes for s in stores)
    with pytest.raises(TrainingError, match=r"--store-device cpu: the stores need .* MiB .* but RAM has") as error:
        check_fits(stores, "cpu", free={"device": need})  # under the headroom left for the model
    assert "\n" not in str(error.value) and "--store-device none" in str(error.value)
    check_fits(stores, "cpu", free={"device": 2 * need})
    with pytest.raises(TrainingError, match="--store-device cuda needs a CUDA training device"):
        fit_up(image_path, text_path, tmp_path / "run", **SMALL, progress=False,
               train=TrainConfig(epochs=1, store_device="cuda"))
    assert not (tmp_path / "run").exists()


def test_cpu_batches_are_not_pinned(tmp_path):
    image_path, _ = make_toy_pair(tmp_path, n_images=4)
    tokens, mask = token_batch(FeatureStore.open(image_path), np.arange(3))
    assert not tokens.is_pinned() and not mask.is_pinned()


# ---- on a GPU ----------------------------------------------------------------------------------------------------
@cuda
def test_cuda_resident_store_matches_the_disk_path(tmp_path):
    image_path, text_path = make_toy_pair(tmp_path, n_images=20)
    for path in (image_path, text_path):
        store = FeatureStore.open(path)
        resident = ResidentStore(store, "cuda")
        idx = np.array([3, 1, 4, 1, 5])
        tokens, mask = resident.batch(idx)
        expected_tokens, expected_mask = token_batch(store, idx, pin=True)
        assert expected_tokens.is_pinned() and tokens.device.type == "cuda"
        assert torch.equal(tokens.cpu(), expected_tokens) and torch.equal(mask.cpu(), expected_mask)


@cuda
@pytest.mark.parametrize(("precision", "store_device"), [("fp32", "none"), ("bf16", "cuda"), ("fp16", "cpu"),
                                                         ("fp16", "cuda")])
def test_cuda_fit_up_trains_under_each_precision_and_store_device(tmp_path, precision, store_device):
    image_store, text_store = make_toy_pair(tmp_path, n_images=60)
    run = tmp_path / precision
    fit_up(image_store, text_store, run, **SMALL, progress=False,
           train=TrainConfig(epochs=12, batch_size=16, val_fraction=0.25, device="cuda", precision=precision,
                             store_device=store_device))
    metrics = RunDir(run).metrics()
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert max(m["val"]["image->text"]["R@1"] for m in metrics) >= 0.5  # chance: 1/15


def test_fit_al_takes_both_options_and_resident_stores_give_the_disk_paths_weights(tmp_path, one_thread):
    image_store, text_store = make_toy_pair(tmp_path, n_images=30)
    audio = make_toy_modality(tmp_path, "audio", n_images=30)
    base = tmp_path / "base"
    fit_up(image_store, text_store, base, **SMALL, progress=False, train=TrainConfig(epochs=1, batch_size=8))
    runs = {}
    for name, options in (("disk", {}), ("resident", {"store_device": "cpu"}),
                          ("bf16", {"store_device": "cpu", "precision": "bf16"})):
        runs[name] = shutil.copytree(base, tmp_path / name)
        fit_al(runs[name], "audio", audio, "text", text_store, progress=False,
               train=TrainConfig(epochs=2, batch_size=8, **options))
    assert _weights(runs["disk"]) == _weights(runs["resident"]) != _weights(runs["bf16"])
    stage = json.loads((runs["bf16"] / "config.json").read_text())["stages"][-1]
    assert stage["name"] == "fit-al:audio" and stage["train"]["precision"] == "bf16"
    assert all(np.isfinite(m["loss"]) for m in RunDir(runs["bf16"]).metrics())
