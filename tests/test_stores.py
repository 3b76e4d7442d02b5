"""Feature stores on real disk: round trips, layouts, dtypes, identity checks, plain-zarr readability."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stores import (
    FeatureStore,
    StoreError,
    StoreExistsError,
    StoreIncompleteError,
    StoreMismatchError,
    StoreWriter,
    identity_key,
    store_status,
)
from stores.catalog import describe, find_stores

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def write_store(path, layout, dtype, items, dim=6, tokens_per_item=None, batch=3, shard_mb=0.001, identity=None):
    """Write ``items`` (list of tensors) in batches; returns the writer's summary."""
    writer = StoreWriter.create(
        path, modality="text", layout=layout, dim=dim, tokens_per_item=tokens_per_item, dtype=dtype,
        identity=identity or {"layout": layout, "dtype": dtype}, shard_mb=shard_mb,
    )
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        metas = [{"id": f"item{start + i}", "label": (start + i) % 3, "ref": f"img{(start + i) // 2}"}
                 for i in range(len(chunk))]
        if layout == "pooled":
            writer.add_batch(metas, torch.stack(chunk))
            continue
        width = max(t.shape[0] for t in chunk)
        padded = torch.full((len(chunk), width, dim), -999.0)  # junk in the padding: must never be stored
        for i, t in enumerate(chunk):
            padded[i, : t.shape[0]] = t
        writer.add_batch(metas, padded, torch.tensor([t.shape[0] for t in chunk]))
    return writer.finish()


@pytest.mark.parametrize("layout", ["fixed", "ragged", "pooled"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("ram", [True, False])
def test_round_trip_every_layout_and_dtype(tmp_path, layout, dtype, ram):
    gen = torch.Generator().manual_seed(1)
    if layout == "pooled":
        items = [torch.randn(6, generator=gen) for _ in range(11)]
    elif layout == "fixed":
        items = [torch.randn(4, 6, generator=gen) for _ in range(11)]
    else:
        items = [torch.randn(int(n), 6, generator=gen) for n in torch.randint(1, 9, (11,), generator=gen)]
    summary = write_store(tmp_path / "s", layout, dtype, items, tokens_per_item=4 if layout == "fixed" else None)
    assert summary["items"] == 11
    store = FeatureStore.open(tmp_path / "s", ram_budget_gb=1.0 if ram else 0.0)
    assert store.in_memory is ram
    order = [10, 0, 5, 5, 3]
    tokens, mask = store.get_batch(order)
    for row, i in enumerate(order):
        expected = items[i].to(TORCH_DTYPES[dtype]).float().reshape(-1, 6)
        assert int(mask[row].sum()) == expected.shape[0]
        assert torch.equal(tokens[row][mask[row]], expected)  # bit-exact, bf16 included
        assert torch.all(tokens[row][~mask[row]] == 0)
    # In the store's own dtype (what the fit loop reads, to cast on the device): the same values, uncast.
    assert store.dtype == TORCH_DTYPES[dtype]
    stored, stored_mask = store.get_batch(order, dtype=store.dtype)
    assert stored.dtype == store.dtype and torch.equal(stored_mask, mask) and torch.equal(stored.float(), tokens)
    assert store.ids[3] == "item3" and store.labels[4] == 1 and store.refs[5] == "img2"
    assert store.index_of("item7") == 7


def test_ragged_store_holds_no_padding(tmp_path):
    lengths = [1, 5, 2, 9, 3, 3, 8]
    items = [torch.ones(n, 16) * (i + 1) for i, n in enumerate(lengths)]
    write_store(tmp_path / "s", "ragged", "float16", items, dim=16, shard_mb=1)
    group = zarr.open_group(tmp_path / "s", mode="r")
    assert group["tokens"].shape == (sum(lengths), 16)
    assert group["offsets"][:].tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert -999.0 not in np.unique(group["tokens"][:])  # the padding value never reached the disk


def test_plain_zarr_reader_follows_the_documented_format(tmp_path):
    items = [torch.randn(n, 6) for n in (3, 1, 4)]
    write_store(tmp_path / "s", "ragged", "float16", items)
    group = zarr.open_group(tmp_path / "s", mode="r")
    attrs = group.attrs["feature_store"]
    assert attrs["complete"] and attrs["layout"] == "ragged" and attrs["dim"] == 6
    lines = [json.loads(line) for line in (tmp_path / "s" / "items.jsonl").read_text().splitlines()]
    assert [line["length"] for line in lines] == [3, 1, 4]
    offsets = group["offsets"][:]
    second = group["tokens"][offsets[1] : offsets[2]]
    np.testing.assert_array_equal(second, items[1].half().numpy())


def test_shard_manifest_entries_match_files(tmp_path):
    import hashlib

    write_store(tmp_path / "s", "fixed", "float16", [torch.randn(4, 6) for _ in range(10)], tokens_per_item=4,
                shard_mb=0.0002)
    entries = sorted((tmp_path / "s" / "_shards" / "tokens").glob("*.json"), key=lambda p: int(p.stem))
    assert len(entries) > 1
    covered = 0
    for path in entries:
        entry = json.loads(path.read_text())
        start, end = entry["rows"]
        assert start == covered
        covered = end
        shard = tmp_path / "s" / "tokens" / "c" / str(entry["shard"]) / "0" / "0"
        assert hashlib.sha256(shard.read_bytes()).hexdigest() == entry["sha256"]
        assert shard.stat().st_size == entry["bytes"]
    assert covered == 10


def test_status_and_identity_checks(tmp_path):
    identity = {"encoder": {"id": "a", "weights": "123"}, "manifest_sha256": "x"}
    assert store_status(tmp_path / "s", identity) == "absent"
    write_store(tmp_path / "s", "pooled", "float16", [torch.randn(6)], identity=identity)
    assert store_status(tmp_path / "s", identity) == "complete"
    changed = {"encoder": {"id": "a", "weights": "456"}, "manifest_sha256": "x"}
    with pytest.raises(StoreMismatchError, match="encoder.weights"):
        store_status(tmp_path / "s", changed)
    with pytest.raises(StoreExistsError):
        write_store(tmp_path / "s", "pooled", "float16", [torch.randn(6)], identity=changed)
    assert FeatureStore.open(tmp_path / "s").key == identity_key(identity)


def test_unfinished_store_is_refused(tmp_path):
    writer = StoreWriter.create(tmp_path / "s", modality="image", layout="fixed", dim=6, tokens_per_item=2,
                                dtype="float16", identity={"x": 1}, shard_mb=0.0001)
    writer.add_batch([{"id": "a"}, {"id": "b"}], torch.randn(2, 2, 6))
    writer.abort()
    assert store_status(tmp_path / "s", {"x": 1}) == "incomplete"
    with pytest.raises(StoreIncompleteError, match="incomplete"):
        FeatureStore.open(tmp_path / "s")


def test_overwrite_never_deletes_foreign_data(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "precious.txt").write_text("keep me")
    with pytest.raises(StoreExistsError, match="not a feature store"):
        StoreWriter.create(tmp_path / "s", modality="text", layout="pooled", dim=4, tokens_per_item=None,
                           dtype="float16", identity={}, overwrite=True)
    assert (tmp_path / "s" / "precious.txt").read_text() == "keep me"
    with pytest.raises(StoreError, match="not a feature store"):
        store_status(tmp_path / "s", {})


def test_writer_rejects_inconsistent_batches(tmp_path):
    writer = StoreWriter.create(tmp_path / "s", modality="image", layout="fixed", dim=6, tokens_per_item=4,
                                dtype="float16", identity={})
    with pytest.raises(StoreError, match="token width"):
        writer.add_batch([{"id": "a"}], torch.randn(1, 4, 5))
    with pytest.raises(StoreError, match="tokens per item"):
        writer.add_batch([{"id": "a"}], torch.randn(1, 3, 6))
    writer.abort()


def test_catalog_describes_and_finds_stores(tmp_path):
    write_store(tmp_path / "a" / "text", "ragged", "float16", [torch.randn(2, 6)])
    write_store(tmp_path / "b", "pooled", "float32", [torch.randn(6), torch.randn(6)])
    assert find_stores(tmp_path) == [tmp_path / "a" / "text", tmp_path / "b"]
    info = describe(tmp_path / "b")
    assert info["items"] == 2 and info["layout"] == "pooled" and info["complete"] and info["disk_bytes"] > 0


def test_pooled_is_masked_mean(tmp_path):
    items = [torch.randn(n, 6) for n in (1, 4, 2)]
    write_store(tmp_path / "s", "ragged", "float32", items)
    pooled = FeatureStore.open(tmp_path / "s").pooled()
    torch.testing.assert_close(pooled, torch.stack([t.mean(0) for t in items]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=30),
    batch=st.integers(min_value=1, max_value=7),
    shard_kb=st.sampled_from([0.1, 0.5, 4.0]),
)
def test_ragged_round_trip_property(tmp_path_factory, lengths, batch, shard_kb):
    path = tmp_path_factory.mktemp("prop") / "s"
    gen = torch.Generator().manual_seed(len(lengths) * 31 + batch)
    items = [torch.randn(n, 6, generator=gen) for n in lengths]
    write_store(path, "ragged", "float32", items, batch=batch, shard_mb=shard_kb / 1024)
    store = FeatureStore.open(path, ram_budget_gb=0.0)
    assert store.lengths.tolist() == lengths
    tokens, mask = store.get_batch(np.arange(len(lengths))[::-1])
    for row, i in enumerate(range(len(lengths) - 1, -1, -1)):
        assert torch.equal(tokens[row][mask[row]], items[i])


@pytest.mark.parametrize("layout", ["fixed", "ragged", "pooled"])
def test_all_zero_data_is_written_and_read_back(tmp_path, layout):
    items = [torch.zeros(6)] * 3 if layout == "pooled" else [torch.zeros(2, 6)] * 3
    write_store(tmp_path / "s", layout, "float16", items, tokens_per_item=2 if layout == "fixed" else None)
    tokens, mask = FeatureStore.open(tmp_path / "s", ram_budget_gb=0.0).get_batch([0, 2])
    assert int(mask.sum()) == (2 if layout == "pooled" else 4) and torch.all(tokens == 0)


def test_small_stores_stay_small_on_disk(tmp_path):
    items = [torch.randn(17, 32) for _ in range(3)]
    write_store(tmp_path / "s", "fixed", "float16", items, dim=32, tokens_per_item=17, shard_mb=64)
    payload = 3 * 17 * 32 * 2
    assert describe(tmp_path / "s")["disk_bytes"] < payload + 100_000  # shard index capped at 64 KiB


def _partial_store(path, n_batches, batch=4, identity=None):
    """A store whose writer wrote ``n_batches`` batches of 4 items (tiny shards) and then stopped."""
    writer = StoreWriter.create(path, modality="text", layout="ragged", dim=6, tokens_per_item=None,
                                dtype="float32", identity=identity or {"x": 1}, shard_mb=0.0002, extraction={"expected_items": 40})
    gen = torch.Generator().manual_seed(0)
    for b in range(n_batches):
        lengths = torch.randint(1, 6, (batch,), generator=gen)
        writer.add_batch([{"id": f"i{b * batch + k}", "line": b * batch + k + 1} for k in range(batch)],
                         torch.randn(batch, 5, 6, generator=gen), lengths)
    return writer


def test_incomplete_store_names_the_missing_range(tmp_path):
    writer = _partial_store(tmp_path / "s", 3)
    writer.abort()
    with pytest.raises(StoreIncompleteError, match=r"of 40 are missing.*manifest line"):
        FeatureStore.open(tmp_path / "s")


def test_second_writer_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    from stores.lock import LOCK_FILE, StoreLockedError

    writer = _partial_store(tmp_path / "s", 1)
    with pytest.raises(StoreLockedError, match=f"pid {__import__('os').getpid()}"):
        StoreWriter.reopen(tmp_path / "s")
    writer.abort()
    # a lock left by a process that has exited is stale
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path = tmp_path / "s" / LOCK_FILE
    lock_path.write_text(json.dumps({"pid": int(dead.stdout), "host": __import__("socket").gethostname(),
                                     "started": "then"}))
    StoreWriter.reopen(tmp_path / "s").abort()
    assert not lock_path.exists()


def test_reopen_drops_a_torn_shard_and_trailing_records(tmp_path):
    from stores.integrity import shard_entries
    from stores.writer import committed_records

    writer = _partial_store(tmp_path / "s", 6)
    writer._tokens._drain(0)
    writer.abort()
    entries = shard_entries(tmp_path / "s", "tokens")
    last = max(entries)
    shard = tmp_path / "s" / "tokens" / "c" / str(last) / "0"
    shard.write_bytes(shard.read_bytes()[:-10])  # torn write of the last shard
    reopened = StoreWriter.reopen(tmp_path / "s")
    assert reopened.resumed["shards"] == last and not shard.exists()
    kept = committed_records(tmp_path / "s")["items"]  # the records the verified shards' manifest entries commit
    assert reopened.resumed["items"] == len(kept) and kept[0]["id"] == "i0"
    rows = sum(item["length"] for item in kept)
    # only items whose rows are all stored are kept; at most one item (< 5 rows) straddles the last shard's end
    assert rows <= reopened.resumed["rows"] < rows + 5
    reopened.abort()


def test_verify_names_missing_truncated_and_altered_shards(tmp_path):
    from stores.integrity import verify

    items = [torch.randn(4, 6) for _ in range(12)]
    write_store(tmp_path / "s", "fixed", "float16", items, tokens_per_item=4, shard_mb=0.0001)
    assert verify(tmp_path / "s") == []
    shards = sorted((tmp_path / "s" / "tokens" / "c").iterdir(), key=lambda p: int(p.name))
    flipped = shards[0] / "0" / "0"
    data = bytearray(flipped.read_bytes())
    data[5] ^= 0x01  # one flipped bit in the data: zarr itself would not notice
    flipped.write_bytes(bytes(data))
    truncated = shards[1] / "0" / "0"
    truncated.write_bytes(truncated.read_bytes()[:-3])
    (shards[2] / "0" / "0").unlink()
    problems = {p.shard: p.reason for p in verify(tmp_path / "s")}
    assert "altered" in problems[0] and "truncated" in problems[1] and "missing" in problems[2]
    assert set(problems) == {0, 1, 2}


def test_a_rewritten_shard_with_an_all_zero_item_is_byte_identical(tmp_path):
    from stores.integrity import verify
    from stores.writer import rewrite_shard, shard_file

    rows = torch.randn(6, 3, 8)
    rows[2] = 0  # an all-zero item is one all-zero inner chunk: zarr skips those unless told not to
    writer = StoreWriter.create(tmp_path / "s", modality="image", layout="fixed", dim=8, tokens_per_item=3,
                                dtype="float16", identity={"t": 1})
    writer.add_batch([{"id": f"x{i}"} for i in range(6)], rows)
    writer.finish()
    shard = shard_file(tmp_path / "s", "tokens", 0, 3)
    before = shard.read_bytes()
    rewrite_shard(tmp_path / "s", "tokens", 0, rows[: len(FeatureStore.open(tmp_path / "s"))])
    assert shard.read_bytes() == before
    assert not verify(tmp_path / "s")


def test_reopen_removes_the_temporary_files_of_killed_writes(tmp_path):
    writer = _partial_store(tmp_path / "s", 6)
    writer._tokens._drain(0)
    writer.abort()
    shard = next(p for p in sorted((tmp_path / "s" / "tokens").rglob("*")) if p.is_file())
    zarr_temp = shard.with_suffix(".0123456789abcdef0123456789abcdef.partial")  # zarr's own temp-file naming
    ours = tmp_path / "s" / ".items.jsonl.tmp4242"
    zarr_temp.write_bytes(b"half a shard")
    ours.write_text("half a table")
    StoreWriter.reopen(tmp_path / "s").abort()
    assert not zarr_temp.exists() and not ours.exists() and shard.exists()
    assert (tmp_path / "s" / "zarr.json").exists()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(st.tuples(st.booleans(), st.integers(1, 6)), min_size=1, max_size=6),
                        min_size=1, max_size=8),
       reverse_failures=st.booleans(), shard_rows=st.sampled_from([0.0002, 0.0006]))  # 32 or 64 rows
def test_manifest_entries_commit_what_the_commit_plan_of_the_whole_tables_says(tmp_path_factory, batches,
                                                                               reverse_failures, shard_rows):
    """The rule that decides which records a shard's entry commits depends only on rows and lines, never on when
    records arrived: a writer fed batch by batch (errors first, in either order) commits exactly what
    :func:`commit_plan` computes from the finished tables, which is what a distributed extraction writes."""
    from stores import commit_plan, read_jsonl
    from stores.integrity import shard_entries

    path = tmp_path_factory.mktemp("plan") / "s"
    writer = StoreWriter.create(path, modality="text", layout="ragged", dim=2, tokens_per_item=None,
                                dtype="float32", identity={"x": 1}, shard_mb=shard_rows)
    line = 0
    for batch in batches:
        items, failures = [], []
        for failed, length in batch:
            line += 1
            (failures if failed else items).append((line, length))
        if reverse_failures:
            failures.reverse()  # stages report failures out of line order
        writer.add_errors([{"id": f"e{ln}", "line": ln, "reason": "bad"} for ln, _ in failures])
        if items:
            lengths = torch.tensor([n for _, n in items])
            writer.add_batch([{"id": f"i{ln}", "line": ln} for ln, _ in items],
                             torch.randn(len(items), 6, 2), lengths)
    if writer.items_written == 0:
        writer.abort()
        return
    writer.finish()
    items, errors = read_jsonl(path / "items.jsonl"), read_jsonl(path / "errors.jsonl")
    assert [e["line"] for e in errors] == sorted(e["line"] for e in errors)
    entries = shard_entries(path, "tokens")
    ends = [entries[i]["rows"][1] for i in sorted(entries)]
    plan, tail = commit_plan(items, errors, [it["length"] for it in items], ends)
    assert [{k: entries[i].get(k, []) for k in ("items", "errors")} for i in sorted(entries)] == plan
    assert errors == [e for p in plan for e in p["errors"]] + tail


def test_stores_ls_lists_each_store_once_through_symlink_loops(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path / "root"
    write_store(root / "a" / "s", "pooled", "float16", [torch.randn(6) for _ in range(3)])
    (root / "a" / "b").mkdir()
    (root / "a" / "b" / "up").symlink_to("..")  # a loop through the parent
    (root / "a" / "b" / "top").symlink_to(root)  # a loop to the root, absolute
    (root / "a" / "self").symlink_to(".")
    (root / "loop").symlink_to("loop")  # a link to itself: reading through it fails with ELOOP
    (root / "a" / "s" / "back").symlink_to("..")  # inside a store
    (root / "again").symlink_to(root / "a")
    done = subprocess.run([sys.executable, "cli.py", "stores", "ls", str(root)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)  # the old walk never ended
    assert done.returncode == 0, done.stderr
    listed = done.stdout.splitlines()[1:]
    assert len(listed) == 1 and listed[0].split()[-1] == str(root / "a" / "s"), done.stdout


@pytest.mark.parametrize("layout", ["ragged", "fixed", "pooled"])
def test_staging_parts_keep_what_came_after_the_last_shard_and_resume_to_the_same_bytes(tmp_path, layout):
    """A writer that commits after every batch (commit_seconds=0) and stops at several points: what it staged
    after its last whole shard is kept (more items than the shards hold), a resumed writer fed the batches from
    the restart point on, stopped again and resumed, ends byte-identical to one uninterrupted writer."""
    from toy_stores import store_files

    from stores.writer import committed_records

    gen = torch.Generator().manual_seed(3)
    batches = []
    for b in range(14):
        lengths = torch.randint(1, 6, (3,), generator=gen)
        shape = (3, 6) if layout == "pooled" else (3, 5, 6)
        batches.append(([{"id": f"i{3 * b + k}", "line": 3 * b + k + 1} for k in range(3)],
                        torch.randn(*shape, generator=gen), lengths))

    def writer_at(path, commit_seconds, restart=None):
        if restart is None:
            return StoreWriter.create(path, modality="text", layout=layout, dim=6, dtype="float32",
                                      tokens_per_item=5 if layout == "fixed" else None, identity={"l": layout},
                                      shard_mb=0.0015, commit_seconds=commit_seconds)
        return StoreWriter.reopen(path, restart_line=restart, shard_mb=0.0015, commit_seconds=commit_seconds)

    def feed(writer, first, last):
        for metas, tokens, lengths in batches[first:last]:
            writer.add_batch(metas, tokens, None if layout != "ragged" else lengths)

    whole = writer_at(tmp_path / "whole", None)
    feed(whole, 0, len(batches))
    whole.finish()

    path = tmp_path / "stopped"
    writer, start = writer_at(path, 0), 0
    for stop in (5, 9):
        feed(writer, start, stop)
        writer._tokens._drain(0)  # a kill after the last part's write was done
        writer.abort()
        durable = StoreWriter.progress(path)
        assert durable["items"] == 3 * stop > len(committed_records(path)["items"])  # parts hold the rest
        start = durable["items"] // 3  # the batch after the last durable item
        writer = writer_at(path, 0, restart=3 * start + 1)
    feed(writer, start, len(batches))
    writer.finish()
    assert store_files(path) == store_files(tmp_path / "whole")
