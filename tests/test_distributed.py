"""torchrun with 2 CPU processes on gloo: the global-batch contrastive loss and its gradients equal one process's,
fit-up trains with DDP and only rank 0 writes the run, and a distributed extraction writes the store a single
process writes (fixed and ragged layouts), also after a rank is killed and the run resumed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from toy_stores import make_toy_modality, make_toy_pair

from pipeline.training import distributed
from pipeline.training.fit import global_batch_loss, head_config
from pipeline.training.pairs import pair_stores
from project import ContrastiveLoss, build_head
from stores import FeatureStore

REPO = Path(__file__).resolve().parents[1]
# One intra-op thread per process: two ranks share the 2 cores, and the same thread count on both sides keeps
# CPU matmuls bit-identical between the single-process and the distributed runs.
GATED_PLUGIN = Path(__file__).with_name("gated_plugin.py")  # see its docstring
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _torchrun(*args: str, nproc: int = 2, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300, **kwargs)


# ---- training ----------------------------------------------------------------------------------------------------
BATCH = 11  # odd: the two ranks' slices differ in length, exercising the padded gather

STEP_WORKER = """
import sys

import torch

from pipeline.training import distributed
from pipeline.training.fit import global_batch_loss, head_config
from pipeline.training.pairs import pair_stores
from project import ContrastiveLoss, build_head
from stores import FeatureStore

image_store, text_store, out = sys.argv[1:4]
with distributed.session("cpu"):
    images, texts = FeatureStore.open(image_store), FeatureStore.open(text_store)
    torch.manual_seed(0)
    model = build_head("up", head_config("up", {"image": images.dim, "text": texts.dim}, width=16, blocks=1)).eval()
    loss_fn = ContrastiveLoss("infonce")
    pairs = pair_stores(images, texts)
    anchor, partner = pairs.anchor[:BATCH], pairs.partner[:BATCH]
    part = distributed.my_slice(BATCH)  # this rank reads only its slice of the global batch
    fetched = (images.get_batch(anchor[part]), texts.get_batch(partner[part]))
    encode_pair = distributed.pair_encoder(model, "image", "text", "cpu")
    loss = global_batch_loss(encode_pair, loss_fn, fetched, BATCH, "cpu")
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"loss": loss.detach(), "grads": grads, "tau": loss_fn.log_temperature.grad,
                "rows": part.stop - part.start}, f"{out}/rank{distributed.rank()}.pt")
""".replace("BATCH", str(BATCH))


def test_ddp_loss_and_gradients_equal_one_process_on_the_global_batch(tmp_path, one_thread):
    image_store, text_store = make_toy_pair(tmp_path, n_images=16)
    script = tmp_path / "step.py"
    script.write_text(STEP_WORKER)
    run = _torchrun(str(script), str(image_store), str(text_store), str(tmp_path))
    assert run.returncode == 0, run.stderr[-3000:]

    images, texts = FeatureStore.open(image_store), FeatureStore.open(text_store)
    torch.manual_seed(0)
    model = build_head("up", head_config("up", {"image": images.dim, "text": texts.dim}, width=16, blocks=1)).eval()
    loss_fn = ContrastiveLoss("infonce")
    pairs = pair_stores(images, texts)
    fetched = (images.get_batch(pairs.anchor[:BATCH]), texts.get_batch(pairs.partner[:BATCH]))
    loss = global_batch_loss(distributed.pair_encoder(model, "image", "text", "cpu"), loss_fn, fetched, BATCH, "cpu")
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["rows"] for r in ranks] == [6, 5]
    for got in ranks:
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["tau"], loss_fn.log_temperature.grad, rtol=1e-4, atol=1e-6)
        assert set(got["grads"]) == set(grads) and len(grads) > 5
        for name, grad in grads.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # the negatives really came from the other rank: rank 0's slice alone has a different loss
    alone = global_batch_loss(distributed.pair_encoder(model, "image", "text", "cpu"), loss_fn,
                              tuple((t[:6], m[:6]) for t, m in fetched), 6, "cpu")
    assert abs(alone.item() - loss.item()) > 1e-3


def test_fit_up_and_fit_al_under_torchrun_train_and_only_rank_0_writes_the_run(tmp_path):
    image_store, text_store = make_toy_pair(tmp_path, n_images=48)
    audio_store = make_toy_modality(tmp_path, "audio", n_images=48)
    run_dir = tmp_path / "run"
    result = _torchrun("cli.py", "fit-up", "--image-store", str(image_store), "--text-store", str(text_store),
                       "--out", str(run_dir), "--epochs", "3", "--batch-size", "16", "--width", "32",
                       "--blocks", "1", "--seed", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run written to") == 1  # rank 0 speaks for the run
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]  # one writer: no duplicated records
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    config = json.loads((run_dir / "config.json").read_text())
    assert {m["status"] for m in config["modalities"].values()} == {"aligned"}
    assert (run_dir / "checkpoints" / "latest").read_text() == "epoch-0003"

    frozen = load_file(str(run_dir / "model.safetensors"))
    # --run-dir: torchrun's own parser would take --run as an abbreviation of its --run-path
    result = _torchrun("cli.py", "fit-al", "--run-dir", str(run_dir), "--modality", "audio", "--store",
                       str(audio_store), "--pivot", "text", "--pivot-store", str(text_store), "--epochs", "2",
                       "--batch-size", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("audio aligned") == 1
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["stage"], m["epoch"]) for m in metrics[3:]] == [("fit-al:audio", 1), ("fit-al:audio", 2)]
    after = load_file(str(run_dir / "model.safetensors"))
    for name, tensor in frozen.items():  # the UP and the image/text adapters stayed frozen on every rank
        if name.startswith("model."):  # (the loss's temperature trains in every stage)
            assert torch.equal(after[name], tensor), name
    assert any(name.startswith("model.adapters.audio") for name in after)


# ---- extraction --------------------------------------------------------------------------------------------------
def _extract(modality: str, encoder: str, manifest: Path, store: Path, nproc: int = 0,
             **kwargs) -> subprocess.CompletedProcess:
    args = ["cli.py", "extract", "--modality", modality, "--encoder", encoder, "--manifest", str(manifest),
            "--store", str(store), "--batch-size", "2", "--shard-mb", "0.0001"]  # tiny shards: many of them
    if nproc:
        return _torchrun(*args, nproc=nproc, **kwargs)
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def _snapshot(store: Path) -> dict[str, object]:
    """Every file of a store by relative path (token and offset shards, their manifest entries, array metadata,
    items and errors), and the group metadata without the run's duration."""
    files: dict[str, object] = {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
                                if p.is_file() and p.name != ".writer.lock" and p.parent != store or
                                p.name in ("items.jsonl", "errors.jsonl")}
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]["feature_store"]
    attrs["summary"].pop("seconds")
    files["zarr.json"] = attrs
    return files


def _text_manifest(path: Path, n: int = 13) -> Path:
    words = ["a", "red", "square", "over", "a", "blue", "circle", "beside", "the", "small", "green", "triangle"]
    path.write_text("".join(json.dumps({"id": f"t{i}", "text": " ".join(words[: 1 + (i * 5) % len(words)]),
                                        "label": i % 3}) + "\n" for i in range(n)))
    return path


def test_distributed_extraction_writes_the_single_process_store_ragged_and_fixed(
        tmp_path, tiny_text_model, tiny_image_model, image_dir):
    text = _text_manifest(tmp_path / "text.jsonl")
    images = tmp_path / "images.jsonl"
    names = ["red.jpg", "blue.png", "alpha.png", "gray.jpg", "noise.png"]
    records = [{"id": f"i{i}", "path": str(image_dir / "images" / names[i % 5])} for i in range(7)]
    records.insert(3, {"id": "broken", "path": str(tmp_path / "missing.png")})  # an error record to assemble too
    images.write_text("".join(json.dumps(r) + "\n" for r in records))
    for modality, encoder, manifest in (("text", tiny_text_model, text), ("image", tiny_image_model, images)):
        single, multi = tmp_path / f"{modality}-1", tmp_path / f"{modality}-2"
        one = _extract(modality, encoder, manifest, single)
        assert one.returncode == 0, one.stderr[-3000:]
        two = _extract(modality, encoder, manifest, multi, nproc=2)
        assert two.returncode == 0, two.stderr[-3000:]
        store = FeatureStore.open(multi)
        assert store.layout == ("ragged" if modality == "text" else "fixed")
        assert len(list((multi / "_shards" / "tokens").glob("*.json"))) >= 4  # shards written by both ranks
        assert not (multi / "_parts").exists()
        assert _snapshot(multi) == _snapshot(single)
    assert [e["id"] for e in map(json.loads, (tmp_path / "image-2" / "errors.jsonl").read_text().splitlines())] \
        == ["broken"]


def _complete(store: Path) -> bool:
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"]["feature_store"]["complete"]
    except (OSError, ValueError, KeyError):
        return False


def test_killed_distributed_extraction_resumes_to_the_single_process_store(tmp_path):
    # Rank 1 waits at its first batch until the gate opens, so rank 0 finishes its parts while rank 1 is mid-way.
    plugin = Path(shutil.copy(GATED_PLUGIN, tmp_path / "held.py"))
    manifest = _text_manifest(tmp_path / "text.jsonl", n=20)  # 10 batches of 2 -> 5 parts of 2 batches
    (tmp_path / "gate").touch()
    single = _extract("text", f"{plugin}:load", manifest, tmp_path / "single")
    assert single.returncode == 0, single.stderr[-3000:]
    (tmp_path / "gate").unlink()
    (tmp_path / "pid0").unlink()

    store = tmp_path / "multi"
    args = ["cli.py", "extract", "--modality", "text", "--encoder", f"{plugin}:load", "--manifest", str(manifest),
            "--store", str(store), "--batch-size", "2", "--shard-mb", "0.0001"]
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                            *args], cwd=REPO, env={**ENV, "GATED_RANK": "1"}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL,
                           start_new_session=True)
    try:
        rank0_parts = [store / "_parts" / f"{i:06d}" for i in (0, 2, 4)]

        def ready() -> bool:  # rank 0 is done with its parts and rank 1 is loaded (held at the gate)
            return all(_complete(p) for p in rank0_parts) and (tmp_path / "pid1").exists()

        deadline = time.time() + 120
        while not ready() and time.time() < deadline and job.poll() is None:
            time.sleep(0.05)
        assert ready(), "rank 0 did not finish its parts"
    finally:
        for pid_file in (tmp_path / "pid0", tmp_path / "pid1"):  # both ranks and the agent, like a lost node
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert not _complete(store) and not _complete(store / "_parts" / "000001")

    (tmp_path / "encoded.log").unlink()
    (tmp_path / "gate").touch()
    resumed = _torchrun(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    redone = sorted((tmp_path / "encoded.log").read_text().split())
    assert redone == sorted(f"t{i}" for i in (*range(4, 8), *range(12, 16)))  # only rank 1's parts 1 and 3
    assert _snapshot(store) == _snapshot(tmp_path / "single")
    assert FeatureStore.open(store).ids == [f"t{i}" for i in range(20)]
    again = _torchrun(*args)  # and a finished store is a no-op on every rank
    assert again.returncode == 0 and again.stderr.count("up to date") == 1, again.stderr[-2000:]


def test_the_rank_helpers_are_one_set_shared_by_extraction_and_training():
    from extract import ranks

    for name in ("is_distributed", "is_main", "rank", "world_size", "barrier", "broadcast_object",
                 "all_gather_object"):
        assert getattr(distributed, name) is getattr(ranks, name), name
    # Outside torchrun every helper answers as for one process.
    assert (ranks.rank(), ranks.world_size(), ranks.is_main()) == (0, 1, True)
    assert ranks.broadcast_object({"plan": 1}) == {"plan": 1} and ranks.all_gather_object(3) == [3]
