"""``stores verify --repair`` on real extractions of every layout and dtype: it restores the exact bytes, fixes a
corrupted manifest entry instead of the healthy shard it describes, and never removes bytes it cannot replace;
a reader refuses a store whose shard is missing rather than serve zeros."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from toy_stores import store_files

from extract.repair import repair_store
from extract.run import ExtractionError, run_extraction
from stores import FeatureStore, StoreError
from stores.integrity import verify

LAYOUTS = {"fixed": ("image", "tokens"), "ragged": ("text", "tokens"), "pooled": ("image", "pooled")}


def _extract(tmp_path: Path, layout: str, dtype: str, request) -> Path:
    modality, keep = LAYOUTS[layout]
    encoder = request.getfixturevalue(f"tiny_{modality}_model")
    source = request.getfixturevalue(f"{modality}_manifest")
    manifest = tmp_path / "source" / Path(source).name  # a copy: a test may change the media under it
    shutil.copytree(Path(source).parent, manifest.parent)
    store = tmp_path / "store"
    run_extraction(manifest, modality, encoder, store, batch_size=2, dtype=dtype, keep=keep, shard_mb=0.0005,
                   progress=False)
    return store


def _shards(store: Path, name: str) -> list[Path]:
    return sorted((p for p in (store / name / "c").rglob("*") if p.is_file()),
                  key=lambda p: int(p.relative_to(store / name / "c").parts[0]))


def _flip(path: Path, at: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("layout", ["fixed", "ragged", "pooled"])
def test_repair_restores_the_exact_bytes_of_every_layout_and_dtype(tmp_path, layout, dtype, request):
    store = _extract(tmp_path, layout, dtype, request)
    name = "pooled" if layout == "pooled" else "tokens"
    original = store_files(store)
    shards = _shards(store, name)
    _flip(shards[0])
    if len(shards) > 1:
        shards[-1].unlink()
    if layout == "ragged":
        _flip(_shards(store, "offsets")[0], at=-30)
    assert verify(store)
    repaired = repair_store(store)
    assert repaired and all("rewritten" in line for line in repaired)
    assert not verify(store)
    assert store_files(store) == original


def test_a_corrupted_manifest_entry_is_fixed_and_its_healthy_shard_kept(tmp_path, request):
    store = _extract(tmp_path, "fixed", "fp16", request)
    original = store_files(store)
    entry_path = store / "_shards" / "tokens" / "1.json"
    entry = json.loads(entry_path.read_text())
    entry["sha256"] = "0" * 64  # the entry, not the shard, got corrupted
    entry_path.write_text(json.dumps(entry))
    shard = _shards(store, "tokens")[1]
    inode = shard.stat().st_ino
    assert [p.shard for p in verify(store)] == [1]
    assert repair_store(store) == ["tokens shard 1: its manifest entry (the stored bytes were right)"]
    assert shard.stat().st_ino == inode  # the healthy shard was never touched
    assert store_files(store) == original


def test_a_lost_manifest_entry_is_rebuilt_with_the_records_it_committed(tmp_path, request):
    store = _extract(tmp_path, "ragged", "fp16", request)
    original = store_files(store)
    (store / "_shards" / "tokens" / "0.json").unlink()
    with pytest.raises(StoreError, match="no manifest entry"):
        FeatureStore.open(store)
    repair_store(store)
    assert store_files(store) == original


def test_repair_changes_nothing_when_the_source_changed(tmp_path, request):
    store = _extract(tmp_path, "fixed", "fp32", request)
    for image in (tmp_path / "source" / "images").iterdir():  # every source image is now another picture
        image.write_bytes((tmp_path / "source" / "images" / "noise.png").read_bytes())
    shards = _shards(store, "tokens")
    _flip(shards[0])
    _flip(shards[2])
    before = store_files(store)
    with pytest.raises(ExtractionError, match="differs from the bytes recorded.*nothing was changed"):
        repair_store(store)
    assert store_files(store) == before  # the damaged shards are still there, byte for byte, for a later try


@pytest.mark.parametrize("ram", [True, False])
def test_a_store_with_a_missing_or_truncated_shard_is_never_read_as_zeros(tmp_path, request, ram):
    store = _extract(tmp_path, "fixed", "fp16", request)
    budget = 4.0 if ram else 0.0
    shards = _shards(store, "tokens")
    saved = shards[1].read_bytes()
    shards[1].unlink()
    with pytest.raises(StoreError, match=r"tokens shard 1 \(rows 1-1\): shard file is missing.*verify --repair"):
        FeatureStore.open(store, ram_budget_gb=budget)
    shards[1].write_bytes(saved[:-5])
    with pytest.raises(StoreError, match="truncated"):
        FeatureStore.open(store, ram_budget_gb=budget)
    shards[1].write_bytes(saved)
    opened = FeatureStore.open(store, ram_budget_gb=budget)
    if not ram:  # read from disk batch by batch: a shard that disappears after opening is an error too
        shards[1].unlink()
        with pytest.raises(StoreError, match="rows"):
            opened.get_batch([1])
