"""Stores at fsspec URLs, against a real S3-protocol server (moto's standalone server) started on loopback.

Everything goes through the real CLI in subprocesses, as a user would run it: extract into ``s3://``, a writer
killed mid-store and resumed, fit-up and eval straight from the bucket, verify, ls, export. The remote store must
hold exactly the bytes a local extraction writes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from toy_stores import store_files

REPO = Path(__file__).resolve().parents[1]
BUCKET = "features"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback with one bucket; yields the environment that points boto at it."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "w") as handle:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=handle, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"the S3 server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield {"env": {**os.environ, **env}, "fs": fs}
    server.terminate()
    server.wait(timeout=10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _cli(s3, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "cli.py", *args], cwd=REPO, capture_output=True, text=True, env=s3["env"])
    if check:
        assert done.returncode == 0, f"cli {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _remote_objects(s3, url: str) -> dict[str, bytes]:
    fs, root = s3["fs"], url.removeprefix("s3://")
    fs.invalidate_cache()
    return {name[len(root) + 1:]: fs.cat_file(name) for name in sorted(fs.find(root))
            if not name.endswith("zarr.json")}


def test_extract_to_s3_is_byte_identical_to_local_and_trains_and_evaluates(s3, tmp_path, tiny_text_model,
                                                                           tiny_image_model, image_manifest,
                                                                           text_manifest):
    local, remote = {}, {}
    for modality, encoder, manifest in (("image", tiny_image_model, image_manifest),
                                        ("text", tiny_text_model, text_manifest)):
        local[modality] = tmp_path / modality
        remote[modality] = f"s3://{BUCKET}/one/{modality}"
        for store in (local[modality], remote[modality]):
            _cli(s3, "extract", "--modality", modality, "--encoder", encoder, "--manifest", str(manifest),
                 "--store", str(store), "--batch-size", "4", "--shard-mb", "0.01", "--workers", "0")
        objects = _remote_objects(s3, remote[modality])
        assert any(name.startswith("_shards/") for name in objects) and "items.jsonl" in objects
        assert objects == store_files(local[modality])  # shards, manifest entries, item and error tables
        again = _cli(s3, "extract", "--modality", modality, "--encoder", encoder, "--manifest", str(manifest),
                     "--store", remote[modality], "--batch-size", "4", "--shard-mb", "0.01")
        assert "up to date" in again.stderr + again.stdout

    listing = _cli(s3, "stores", "ls", f"s3://{BUCKET}/one").stdout
    assert f"s3://{BUCKET}/one/image" in listing and f"s3://{BUCKET}/one/text" in listing
    assert "ok: every shard" in _cli(s3, "stores", "verify", remote["image"]).stdout

    runs = {}
    for where, stores in (("local", local), ("remote", remote)):
        runs[where] = tmp_path / f"run-{where}"
        _cli(s3, "fit-up", "--image-store", str(stores["image"]), "--text-store", str(stores["text"]),
             "--out", str(runs[where]), "--epochs", "2", "--batch-size", "4", "--width", "32", "--blocks", "1",
             "--seed", "3", "--val-fraction", "0.4", "--no-tensorboard")
    config = json.loads((runs["remote"] / "config.json").read_text())
    assert remote["image"] in json.dumps(config)  # the run records where its features came from
    assert (runs["remote"] / "model.safetensors").read_bytes() == (runs["local"] / "model.safetensors").read_bytes()
    report = _cli(s3, "eval", "retrieval", "--run", str(runs["remote"]), "--image-store", remote["image"],
                  "--text-store", remote["text"]).stdout
    assert "R@1" in report or "recall" in report.lower()

    exported = tmp_path / "image.h5"
    _cli(s3, "stores", "export", remote["image"], "--out", str(exported))
    imported = f"s3://{BUCKET}/one/imported"
    assert "5 items imported" in _cli(s3, "stores", "import", str(exported), "--store", imported).stdout
    from stores import FeatureStore

    back, original = FeatureStore.open(imported), FeatureStore.open(local["image"])
    assert back.ids == original.ids and torch.equal(back.get_batch(range(5))[0], original.get_batch(range(5))[0])


def test_verify_names_an_altered_object_and_a_reader_refuses_an_unfinished_remote_store(s3, tmp_path,
                                                                                        tiny_text_model,
                                                                                        text_manifest):
    url = f"s3://{BUCKET}/two/text"
    _cli(s3, "extract", "--modality", "text", "--encoder", tiny_text_model, "--manifest", str(text_manifest),
         "--store", url, "--batch-size", "4", "--shard-mb", "0.002", "--workers", "0")
    fs = s3["fs"]
    fs.invalidate_cache()
    shard = f"{BUCKET}/two/text/tokens/c/1/0"
    data = bytearray(fs.cat_file(shard))
    data[10] ^= 0xFF
    fs.pipe_file(shard, bytes(data))
    verify = _cli(s3, "stores", "verify", url, check=False)
    assert verify.returncode != 0
    assert "tokens shard 1" in verify.stdout and "sha256" in verify.stdout

    # A bucket that does not exist is one clear line naming the store
    missing = _cli(s3, "extract", "--modality", "text", "--encoder", tiny_text_model, "--manifest",
                   str(text_manifest), "--store", "s3://no-such-bucket/x", check=False)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "s3://no-such-bucket/x" in missing.stderr and "does not exist" in missing.stderr

    # An unfinished store (its metadata says so) is refused by fit with the resume advice, naming the URL.
    meta_key = f"{BUCKET}/two/text/zarr.json"
    meta = json.loads(fs.cat_file(meta_key))
    meta["attributes"]["feature_store"]["complete"] = False
    fs.pipe_file(meta_key, json.dumps(meta).encode())
    info = json.loads(_cli(s3, "stores", "info", url, "--json").stdout)
    assert info["complete"] is False
    refused = _cli(s3, "fit-up", "--image-store", url, "--text-store", url, "--out", str(tmp_path / "r"),
                   check=False)
    assert refused.returncode != 0 and url in refused.stderr and "incomplete" in refused.stderr


def test_repair_of_a_remote_fixed_layout_store_restores_its_objects(s3, tiny_image_model, image_manifest):
    """An altered shard, a deleted one and a corrupted manifest entry of an image (fixed-layout) store in the bucket:
    a reader refuses it, and verify --repair restores every object to the bytes first written."""
    url = f"s3://{BUCKET}/repair/image"
    _cli(s3, "extract", "--modality", "image", "--encoder", tiny_image_model, "--manifest", str(image_manifest),
         "--store", url, "--batch-size", "2", "--shard-mb", "0.0005", "--workers", "0")
    original, fs, root = _remote_objects(s3, url), s3["fs"], f"{BUCKET}/repair/image"
    altered = bytearray(fs.cat_file(f"{root}/tokens/c/0/0/0"))
    altered[-20] ^= 0x10
    fs.pipe_file(f"{root}/tokens/c/0/0/0", bytes(altered))
    fs.rm_file(f"{root}/tokens/c/3/0/0")
    entry = json.loads(fs.cat_file(f"{root}/_shards/tokens/2.json"))
    entry["sha256"] = "f" * 64
    fs.pipe_file(f"{root}/_shards/tokens/2.json", json.dumps(entry).encode())
    refused = _cli(s3, "fit-up", "--image-store", url, "--text-store", url, "--out", "unused", check=False)
    assert refused.returncode != 0 and "shard file is missing" in refused.stderr and "Traceback" not in refused.stderr
    repaired = _cli(s3, "stores", "verify", url, "--repair")
    assert "repaired 3 shard(s)" in repaired.stdout and "tokens shard 2: its manifest entry" in repaired.stdout
    assert _remote_objects(s3, url) == original


def test_a_second_writer_is_refused_while_the_first_holds_the_remote_lock(s3):
    from stores import StoreWriter
    from stores.lock import StoreLockedError

    url = f"s3://{BUCKET}/three/s"
    first = StoreWriter.create(url, modality="text", layout="pooled", dim=4, tokens_per_item=None,
                               dtype="float32", identity={"x": 1})
    with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
        StoreWriter.reopen(url)
    first.abort()
    reopened = StoreWriter.reopen(url)  # the lock is released by abort
    reopened.abort()


def test_large_remote_stores_are_read_by_tensorstore_like_zarr_python(s3):
    """The disk-mode path for a store bigger than RAM: TensorStore's own S3 driver, configured from the same
    environment as fsspec, gives exactly zarr-python's rows (ragged: every item's tokens, padded, in batch order)."""

    from stores import FeatureStore, StoreWriter

    url = f"s3://{BUCKET}/five/ragged"
    gen = torch.Generator().manual_seed(0)
    writer = StoreWriter.create(url, modality="text", layout="ragged", dim=6, tokens_per_item=None, dtype="float16",
                                identity={"x": 5}, shard_mb=0.001)
    for b in range(6):
        lengths = torch.randint(1, 9, (8,), generator=gen)
        writer.add_batch([{"id": f"t{b * 8 + k}", "line": b * 8 + k + 1} for k in range(8)],
                         torch.randn(8, 8, 6, generator=gen), lengths)
    writer.finish()
    fast = FeatureStore.open(url, ram_budget_gb=0)
    slow = FeatureStore.open(url, ram_budget_gb=0, fast_reads=False)
    assert (fast.reads, slow.reads) == ("tensorstore", "zarr-python")
    batch = [47, 3, 3, 20, 0, 31]
    for got, want in zip(fast.get_batch(batch), slow.get_batch(batch), strict=True):
        assert torch.equal(got, want)
    assert FeatureStore.open(url).reads == "memory"  # small: fetched whole, through TensorStore


def test_a_killed_remote_writer_resumes_to_the_bytes_of_a_local_run(s3, tmp_path, tiny_text_model):
    words = ["red", "green", "blue", "circle", "square", "left", "right", "top", "small", "large", "a", "photo"]
    manifest = tmp_path / "captions.jsonl"
    with open(manifest, "w") as handle:
        for i in range(1200):  # many small shards: the kill lands mid-store on a fast machine too
            text = " ".join(words[(i * 7 + k * 5) % len(words)] for k in range(2 + i % 9))
            handle.write(json.dumps({"id": f"c{i}", "text": text if i % 97 else "   ", "ref": f"i{i // 2}"}) + "\n")

    def extract(store: str) -> list[str]:
        return [sys.executable, "cli.py", "extract", "--modality", "text", "--encoder", tiny_text_model,
                "--manifest", str(manifest), "--store", store, "--batch-size", "16", "--shard-mb", "0.004",
                "--workers", "0"]

    clean = tmp_path / "clean"
    subprocess.run(extract(str(clean)), cwd=REPO, check=True, capture_output=True, env=s3["env"])
    url = f"s3://{BUCKET}/four/text"
    entries = f"{BUCKET}/four/text/_shards/tokens"
    fs = s3["fs"]
    process = subprocess.Popen(extract(url), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=s3["env"])
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        fs.invalidate_cache()
        if fs.exists(entries) and len(fs.ls(entries)) >= 3:
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "extraction finished before it could be killed"
    info = json.loads(_cli(s3, "stores", "info", url, "--json").stdout)
    assert not info["complete"] and info["items"] > 0  # the items its committed shards hold
    resumed = _cli(s3, *extract(url)[2:])
    assert "resuming at item" in resumed.stderr
    objects = _remote_objects(s3, url)
    objects.pop(".writer.lock", None)
    assert objects == store_files(clean)
    assert "ok: every shard" in _cli(s3, "stores", "verify", url).stdout


def test_any_fsspec_url_holds_a_store_bit_exactly():
    """A backend other than S3 (fsspec's in-memory file system): write, resume after an abort, read, verify."""

    from stores import FeatureStore, StoreWriter
    from stores.integrity import verify

    url = "memory://oneencoder-test/bf16"
    rows = torch.randn(10, 3, 4)
    writer = StoreWriter.create(url, modality="text", layout="fixed", dim=4, tokens_per_item=3, dtype="bfloat16",
                                identity={"x": 1}, shard_mb=0.0001, overwrite=True)
    writer.add_batch([{"id": f"i{k}", "line": k + 1} for k in range(6)], rows[:6])
    writer._tokens._drain(0)  # the full shards are written; the writer then dies
    writer.abort()
    resumed = StoreWriter.reopen(url, restart_line=StoreWriter.progress(url)["last_line"] + 1)
    kept = resumed.items_written
    assert 0 < kept <= 6
    resumed.add_batch([{"id": f"i{k}", "line": k + 1} for k in range(kept, 10)], rows[kept:])
    resumed.finish()
    store = FeatureStore.open(url, ram_budget_gb=0)
    assert store.ids == [f"i{k}" for k in range(10)]
    tokens, _ = store.get_batch(list(range(10)), dtype=torch.bfloat16)
    assert torch.equal(tokens, rows.to(torch.bfloat16)) and verify(url) == []


def test_torchrun_extraction_into_s3_equals_one_local_process(s3, tmp_path, tiny_text_model):
    """Two gloo ranks write one remote store through the bucket (parts staged under STORE/_parts, final shards
    owned by rank): the same objects as one local process writes."""
    manifest = tmp_path / "text.jsonl"
    words = ["a", "red", "square", "over", "the", "small", "green", "triangle"]
    manifest.write_text("".join(json.dumps({"id": f"t{i}", "text": " ".join(words[: 1 + (i * 5) % len(words)])})
                                + "\n" for i in range(13)))
    args = ["cli.py", "extract", "--modality", "text", "--encoder", tiny_text_model, "--manifest", str(manifest),
            "--batch-size", "2", "--shard-mb", "0.0001"]
    env = {**s3["env"], "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # same numerics in every process
    local = tmp_path / "local"
    one = subprocess.run([sys.executable, *args, "--store", str(local)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    url = f"s3://{BUCKET}/six/text"
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", *args,
                          "--store", url], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "with 2 processes" in two.stdout + two.stderr
    objects = _remote_objects(s3, url)
    assert not any(name.startswith("_parts/") for name in objects)
    assert objects == store_files(local)
