"""HDF5 / .npy interop: store -> file -> store is exact for every layout and dtype; foreign files import; bad files
are refused naming the file and what is missing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_cli

from stores import FeatureStore, StoreError, StoreMismatchError, StoreWriter
from stores.interop import export_store, import_hdf5

cli = run_cli


def _store(path: Path, layout: str, dtype: str, n: int = 11, dim: int = 5, seed: int = 0) -> Path:
    """A store with mixed labels (ints, strings, missing), refs on some items, a segment's source_id, written in
    three batches through the real writer with tiny shards (several shards per array)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 7, (n,), generator=gen) if layout == "ragged" else torch.full((n,), 4)
    metas = []
    for i in range(n):
        meta = {"id": f"item{i}" if i != 3 else "item3#seg0", "label": [i % 3, f"class-{i % 2}", None][i % 3]}
        if i % 4:
            meta["ref"] = f"img{i // 2}"
        if i == 3:
            meta["source_id"] = "item3"
        metas.append(meta)
    writer = StoreWriter.create(path, modality="audio", layout=layout, dim=dim,
                                tokens_per_item=4 if layout == "fixed" else None, dtype=dtype,
                                identity={"encoder": {"id": "toy"}, "layout": layout, "dtype": dtype},
                                shard_mb=0.0005)
    for start in range(0, n, 4):
        stop = min(n, start + 4)
        if layout == "pooled":
            tokens = torch.randn(stop - start, dim, generator=gen)
        else:
            tokens = torch.randn(stop - start, int(lengths[start:stop].max()), dim, generator=gen)
        writer.add_batch(metas[start:stop], tokens * 3, lengths[start:stop])
    writer.finish()
    return path


def _same_store(a: FeatureStore, b: FeatureStore) -> None:
    everything = np.arange(len(a))
    tokens_a, mask_a = a.get_batch(everything)
    tokens_b, mask_b = b.get_batch(everything)
    assert torch.equal(tokens_a, tokens_b) and torch.equal(mask_a, mask_b)  # fp16/bf16 -> fp32 is exact
    assert np.array_equal(a.lengths, b.lengths)
    assert (a.ids, a.labels, a.refs) == (b.ids, b.labels, b.refs)
    assert (a.layout, a.meta.dtype, a.dim, a.meta.tokens_per_item) == (b.layout, b.meta.dtype, b.dim,
                                                                         b.meta.tokens_per_item)
    items = [json.loads(line) for line in (b.path / "items.jsonl").read_text().splitlines()]
    assert items[3]["source_id"] == "item3"


@pytest.mark.parametrize(("layout", "dtype"), [("fixed", "float16"), ("ragged", "bfloat16"), ("pooled", "float32"),
                                               ("ragged", "float16")])
def test_store_to_hdf5_to_store_is_exact(tmp_path: Path, layout: str, dtype: str) -> None:
    source = _store(tmp_path / "source", layout, dtype)
    exported = export_store(source, tmp_path / "features.h5")
    with h5py.File(exported, "r") as f:
        assert f.attrs["format"] == "oneencoder-features-hdf5" and f.attrs["layout"] == layout
        shape = {"fixed": (11, 4, 5), "pooled": (11, 5)}.get(layout) or (int(f["offsets"][-1]), 5)
        assert f["features"].shape == shape
        assert f["features"].dtype == (np.float32 if dtype == "bfloat16" else np.dtype(dtype))
        assert json.loads(f.attrs["identity"])["encoder"] == {"id": "toy"}
        assert f["labels"].attrs["encoding"] == "json"  # mixed ints and strings keep their types
        assert not f["labels_present"][2] and f["labels_present"][1]
    back = tmp_path / "back"
    summary = import_hdf5(exported, back)
    assert summary["items"] == 11
    original, imported = FeatureStore.open(source), FeatureStore.open(back)
    _same_store(original, imported)
    assert imported.modality == "audio"
    assert imported.identity["import"]["sha256"] == hashlib.sha256(exported.read_bytes()).hexdigest()
    assert imported.identity["source_identity"] == original.identity

    # importing the same file again is a no-op; another file at the same store path is refused
    assert import_hdf5(exported, back)["skipped"] is True
    other = export_store(_store(tmp_path / "other", layout, dtype, seed=1), tmp_path / "other.h5")
    with pytest.raises(StoreMismatchError, match="import.sha256"):
        import_hdf5(other, back)
    import_hdf5(other, back, overwrite=True)
    _same_store(FeatureStore.open(tmp_path / "other"), FeatureStore.open(back))


def test_npy_export_reads_with_numpy_alone(tmp_path: Path) -> None:
    source = FeatureStore.open(_store(tmp_path / "source", "ragged", "float16"))
    folder = export_store(source.path, tmp_path / "npy", "npy")
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["layout"] == "ragged" and meta["identity"] == source.identity and meta["key"] == source.key
    load = {name: np.load(folder / spec["file"], allow_pickle=False) for name, spec in meta["arrays"].items()}
    features, offsets = np.load(folder / "features.npy", allow_pickle=False), load["offsets"]
    assert features.dtype == np.float16 and offsets[-1] == len(features)
    tokens, _ = source.get_batch(np.arange(len(source)))
    for i in range(len(source)):
        assert np.array_equal(features[offsets[i] : offsets[i + 1]].astype(np.float32),
                              tokens[i, : source.lengths[i]].numpy())
    assert load["ids"].tolist() == source.ids and np.array_equal(load["lengths"], source.lengths)
    labels = [json.loads(v) if p else None for v, p in zip(load["labels"], load["labels_present"], strict=True)]
    assert meta["arrays"]["labels"]["encoding"] == "json" and labels == source.labels
    refs = [v if p else None for v, p in zip(load["refs"].tolist(), load["refs_present"], strict=True)]
    assert refs == source.refs

    with pytest.raises(StoreError, match="already exists"):
        export_store(source.path, folder, "npy")
    export_store(source.path, folder, "npy", overwrite=True)


def test_foreign_hdf5_files_import(tmp_path: Path) -> None:
    pooled = tmp_path / "clip.h5"
    vectors = np.random.default_rng(0).standard_normal((4, 6))
    with h5py.File(pooled, "w") as f:
        f["features"] = vectors  # float64
        f["ids"] = np.array([10, 11, 12, 13])
        f["labels"] = np.array([b"cat", b"dog", b"cat", b"eel"])
    with pytest.raises(StoreError, match="records no modality; pass --modality"):
        import_hdf5(pooled, tmp_path / "s1")
    import_hdf5(pooled, tmp_path / "s1", modality="image")
    store = FeatureStore.open(tmp_path / "s1")
    assert (store.layout, store.meta.dtype, store.ids, store.labels) == ("pooled", "float32",
                                                                        ["10", "11", "12", "13"],
                                                                        ["cat", "dog", "cat", "eel"])
    assert torch.equal(store.get_batch([2])[0][0, 0], torch.from_numpy(vectors[2]).float())
    assert store.identity["import"] == {"format": "hdf5", "sha256": hashlib.sha256(pooled.read_bytes()).hexdigest()}

    padded = tmp_path / "padded.h5"
    tokens = np.random.default_rng(1).standard_normal((3, 5, 2)).astype(np.float16)
    with h5py.File(padded, "w") as f:
        f["features"], f["lengths"] = tokens, np.array([5, 2, 3])
        f.create_dataset("ids", data=["a", "b", "c"], dtype=h5py.string_dtype())
    import_hdf5(padded, tmp_path / "s2", modality="text")
    store = FeatureStore.open(tmp_path / "s2")  # shorter items: stored ragged, the padding dropped
    assert store.layout == "ragged" and store.lengths.tolist() == [5, 2, 3] and store.meta.dtype == "float16"
    assert torch.equal(store.get_batch([1])[0][0], torch.from_numpy(tokens[1, :2]).float())


def test_files_missing_required_datasets_are_refused_by_name(tmp_path: Path) -> None:
    def h5(name: str, **datasets) -> Path:
        path = tmp_path / name
        with h5py.File(path, "w") as f:
            for key, value in datasets.items():
                f[key] = value
        return path

    cases = [
        (h5("no-features.h5", embeddings=np.zeros((2, 3)), ids=np.array([1, 2])),
         r"no-features\.h5: no 'features' dataset .*found: embeddings, ids"),
        (h5("no-ids.h5", features=np.zeros((2, 3))), r"no-ids\.h5: no 'ids' dataset"),
        (h5("rows.h5", features=np.zeros((3, 4)), ids=np.array([1, 2])), r"'features' has 3 rows but 'ids' has 2"),
        (h5("dup.h5", features=np.zeros((2, 4)), ids=np.array([7, 7])), r"ids\[1\] = '7' repeats ids\[0\]"),
        (h5("offsets.h5", features=np.zeros((5, 4)), ids=np.array([1, 2]), offsets=np.array([0, 2, 4])),
         r"'offsets' must be \(3,\), start at 0, end at 5"),
    ]
    for path, message in cases:
        with pytest.raises(StoreError, match=message):
            import_hdf5(path, tmp_path / "store", modality="image")
    assert not (tmp_path / "store").exists()
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(StoreError, match=r"text\.h5: not a readable HDF5 file"):
        import_hdf5(tmp_path / "text.h5", tmp_path / "store", modality="image")


def test_cli_export_and_import(tmp_path: Path) -> None:
    source = _store(tmp_path / "source", "fixed", "float16")
    cli("stores", "export", source, "--out", tmp_path / "f.h5")
    done = cli("stores", "import", tmp_path / "f.h5", "--store", tmp_path / "back", "--dtype", "fp32")
    assert "11 items imported" in done.stdout
    back = FeatureStore.open(tmp_path / "back")
    assert back.meta.dtype == "float32"
    assert torch.equal(back.get_batch(np.arange(11))[0], FeatureStore.open(source).get_batch(np.arange(11))[0])
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["features"] = np.zeros((2, 3))
    bad = cli("stores", "import", tmp_path / "bad.h5", "--store", tmp_path / "x", "--modality", "image", ok=False)
    assert bad.returncode == 1 and "bad.h5: no 'ids' dataset" in bad.stderr and "Traceback" not in bad.stderr


def test_a_small_file_declaring_huge_datasets_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    """A few KB of HDF5 can declare tens of GB (chunked datasets with no chunk written read back as fill values)."""
    huge_features, huge_ids = tmp_path / "features.h5", tmp_path / "ids.h5"
    with h5py.File(huge_features, "w") as f:
        f.create_dataset("features", shape=(4, 200000, 100000), dtype="f4", chunks=(1, 100, 100))
        f["ids"] = np.arange(4)
    with h5py.File(huge_ids, "w") as f:
        f["features"] = np.zeros((2, 3), np.float32)
        f.create_dataset("ids", shape=(10**9,), dtype="i8", chunks=(1000,))
    squeezed = tmp_path / "squeezed.h5"  # compressed far beyond what any filter packs
    with h5py.File(squeezed, "w") as f:
        f.create_dataset("features", shape=(64, 100000), dtype="f4", chunks=(1, 100000), compression="gzip")
        f["features"][0, 0] = 1.0
        f["ids"] = np.arange(64)
    for path, name in ((huge_features, "features"), (huge_ids, "ids"), (squeezed, "features")):
        assert path.stat().st_size < 200_000
        done = cli("stores", "import", path, "--store", tmp_path / f"store-{path.stem}", "--modality", "image",
                   ok=False)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert f"'{name}' declares shape" in done.stderr and "does not contain its data" in done.stderr
        assert not (tmp_path / f"store-{path.stem}").exists()  # refused before a store was begun


def test_non_finite_features_are_left_out_and_named_like_extraction_does(tmp_path: Path) -> None:
    features = np.random.default_rng(2).standard_normal((6, 3, 4)).astype(np.float32)
    features[1, 0, 2] = np.nan
    features[3, 2, 0] = 1e6  # finite in float32, inf in float16
    features[4, 2, 1] = np.inf  # in the padding of a 2-token item: not part of the item
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        f["features"], f["ids"], f["lengths"] = features, np.arange(6), np.array([3, 3, 3, 3, 2, 3])
    summary = import_hdf5(path, tmp_path / "fp16", modality="text", dtype="fp16")
    store = FeatureStore.open(tmp_path / "fp16")
    assert store.ids == ["0", "2", "4", "5"] and summary["failed"] == 2
    assert [(e["id"], e["reason"]) for e in store.errors()] == [("1", "non-finite features (inf/nan) in float16"),
                                                                ("3", "non-finite features (inf/nan) in float16")]
    assert torch.equal(store.get_batch([3])[0][0], torch.from_numpy(features[5]).half().float())
    import_hdf5(path, tmp_path / "fp32", modality="text", dtype="fp32")
    assert FeatureStore.open(tmp_path / "fp32").ids == ["0", "2", "3", "4", "5"]
    done = cli("stores", "import", path, "--store", tmp_path / "cli", "--modality", "text", "--dtype", "fp16")
    assert "4 items imported" in done.stdout and "2 left out" in done.stdout
