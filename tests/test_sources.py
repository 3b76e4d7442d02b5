"""``extract --inputs``: WebDataset shards, a Hugging Face save_to_disk folder, a Parquet file and a glob give the
same store as the equivalent manifest (same ids, same tokens), are up to date when run again and resume like a
manifest extraction. The shards and datasets are built here, in their published formats."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from extract.adapters import DatasetError
from extract.manifest import read_manifest, write_manifest
from extract.run import run_extraction
from extract.sources import inputs_manifest
from stores import FeatureStore, StoreWriter, store_status

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red square", "a green field", "a blue sky at noon", "a gray cat", "noise"]


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(24 + seed, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


SAMPLES = [(f"sample{k:03d}", _jpeg(k), CAPTIONS[k]) for k in range(5)]


def _shards(folder: Path) -> list[Path]:
    """Two WebDataset shards: members KEY.jpg, KEY.txt, KEY.json per sample, three samples then two."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, chunk in enumerate((SAMPLES[:3], SAMPLES[3:])):
        path = folder / f"shard-{n:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for key, image, caption in chunk:
                for ext, data in (("jpg", image), ("txt", caption.encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def _equivalent(folder: Path) -> tuple[str, str]:
    """The manifests a user would write by hand for the same samples: images on disk, captions inline."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for key, image, _ in SAMPLES:
        (folder / f"{key}.jpg").write_bytes(image)
        records.append({"id": key, "path": f"{key}.jpg"})
    return (write_manifest(folder / "images.jsonl", records),
            write_manifest(folder / "captions.jsonl", [{"id": key, "text": text} for key, _, text in SAMPLES]))


def _same_store(a: Path, b: Path) -> None:
    sa, sb = FeatureStore.open(a), FeatureStore.open(b)
    assert sa.ids == sb.ids == [key for key, _, _ in SAMPLES]
    ta, la = sa.get_batch(list(range(len(sa))))
    tb, lb = sb.get_batch(list(range(len(sb))))
    assert torch.equal(ta, tb) and torch.equal(torch.as_tensor(la), torch.as_tensor(lb))


def test_webdataset_shards_give_the_manifests_store(tiny_image_model: str, tiny_text_model: str,
                                                    tmp_path: Path) -> None:
    shards = _shards(tmp_path / "shards")
    images, captions = _equivalent(tmp_path / "by-hand")
    cache = tmp_path / "inputs"
    run_extraction(images, "image", tiny_image_model, tmp_path / "manifest-image", progress=False)
    result = subprocess.run(
        [sys.executable, "cli.py", "extract", "--modality", "image", "--encoder", tiny_image_model, "--inputs",
         str(tmp_path / "shards" / "shard-*.tar"), "--inputs-dir", cache, "--store", tmp_path / "wds-image",
         "--workers", "0"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    _same_store(tmp_path / "manifest-image", tmp_path / "wds-image")
    run_extraction(captions, "text", tiny_text_model, tmp_path / "manifest-text", progress=False)
    run_extraction(inputs_manifest([str(p) for p in shards], "text", inputs_dir=cache), "text", tiny_text_model,
                   tmp_path / "wds-text", progress=False)
    _same_store(tmp_path / "manifest-text", tmp_path / "wds-text")
    generated = inputs_manifest([str(p) for p in shards], "text", inputs_dir=cache)
    assert [(it.id, it.text) for it in read_manifest(generated)] == [(k, t) for k, _, t in SAMPLES]
    # the same command again: the same equivalent manifest, so the same key, and nothing to do
    again = run_extraction(inputs_manifest([str(p) for p in shards], "image", inputs_dir=cache), "image",
                           tiny_image_model, tmp_path / "wds-image", progress=False)
    assert again.status == "up-to-date"


def test_an_interrupted_extraction_from_shards_resumes(tiny_image_model: str, tmp_path: Path) -> None:
    shards = [str(p) for p in _shards(tmp_path / "shards")]
    manifest = inputs_manifest(shards, "image", inputs_dir=tmp_path / "inputs")
    done = run_extraction(manifest, "image", tiny_image_model, tmp_path / "ref", progress=False)
    crashed = tmp_path / "crashed"
    writer = StoreWriter.create(crashed, modality="image", layout="fixed", dim=done_dim(tmp_path / "ref"),
                                tokens_per_item=FeatureStore.open(tmp_path / "ref").meta.tokens_per_item,
                                dtype="float16", identity=done.identity)
    writer.abort()  # as if the process died before its first shard
    again = inputs_manifest(shards, "image", inputs_dir=tmp_path / "inputs")
    assert again == manifest
    assert store_status(crashed, done.identity) == "incomplete"
    result = run_extraction(again, "image", tiny_image_model, crashed, progress=False)
    assert result.status == "written"
    _same_store(tmp_path / "ref", crashed)


def done_dim(store: Path) -> int:
    return int(FeatureStore.open(store).meta.dim)


def _image_table(with_ids: bool) -> pa.Table:
    """Rows as Hugging Face stores an Image feature: a struct of the file's bytes and its original name."""
    columns: dict[str, list] = {
        "image": [{"bytes": image, "path": f"{key}.jpg"} for key, image, _ in SAMPLES],
        "text": [text for _, _, text in SAMPLES],
    }
    if with_ids:
        columns["key"] = [key for key, _, _ in SAMPLES]
    return pa.table(columns)


def _save_to_disk(folder: Path, table: pa.Table) -> Path:
    """The layout Dataset.save_to_disk writes: Arrow IPC stream files listed in state.json."""
    folder.mkdir(parents=True)
    half = table.num_rows // 2
    names = []
    for n, part in enumerate((table.slice(0, half), table.slice(half))):
        name = f"data-{n:05d}-of-00002.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, part.schema) as writer:
            writer.write_table(part)
        names.append({"filename": name})
    (folder / "state.json").write_text(json.dumps({"_data_files": names, "_fingerprint": "x", "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


@pytest.mark.parametrize("kind", ["hf", "parquet"])
def test_tables_give_the_manifests_store(kind: str, tiny_image_model: str, tiny_text_model: str,
                                         tmp_path: Path) -> None:
    table = _image_table(with_ids=True)
    if kind == "hf":
        source = str(_save_to_disk(tmp_path / "ds", table))
    else:
        source = str(tmp_path / "pairs.parquet")
        pq.write_table(table, source)
    images, captions = _equivalent(tmp_path / "by-hand")
    cache = tmp_path / "inputs"
    for modality, model, manifest in (("image", tiny_image_model, images), ("text", tiny_text_model, captions)):
        run_extraction(manifest, modality, model, tmp_path / f"manifest-{modality}", progress=False)
        generated = inputs_manifest([source], modality, id_column="key", inputs_dir=cache)
        run_extraction(generated, modality, model, tmp_path / f"{kind}-{modality}", progress=False)
        _same_store(tmp_path / f"manifest-{modality}", tmp_path / f"{kind}-{modality}")
    by_row = read_manifest(inputs_manifest([source], "text", inputs_dir=cache))
    assert [(it.id, it.text) for it in by_row] == [(str(k), t) for k, (_, _, t) in enumerate(SAMPLES)]
    with pytest.raises(DatasetError, match=r"no column 'photo' \(columns: image, text, key\)"):
        inputs_manifest([source], "image", path_column="photo", inputs_dir=cache)


def test_a_dataset_dict_folder_names_its_splits(tmp_path: Path) -> None:
    _save_to_disk(tmp_path / "dd" / "train", _image_table(with_ids=False))
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(DatasetError, match=r"a DatasetDict with splits train; give one split's folder"):
        inputs_manifest([str(tmp_path / "dd")], "image", inputs_dir=tmp_path / "inputs")


def test_a_glob_of_media_files(tiny_image_model: str, tmp_path: Path) -> None:
    images, _ = _equivalent(tmp_path / "media")
    generated = inputs_manifest([str(tmp_path / "media" / "*.jpg")], "image", inputs_dir=tmp_path / "inputs")
    assert [it.id for it in read_manifest(generated)] == [f"{key}.jpg" for key, _, _ in SAMPLES]
    listed = tmp_path / "media" / "list.txt"
    listed.write_text("".join(f"{key}.jpg\n" for key, _, _ in SAMPLES))
    assert inputs_manifest([f"@{listed}"], "image", inputs_dir=tmp_path / "inputs") == generated
    a = run_extraction(images, "image", tiny_image_model, tmp_path / "a", progress=False)
    b = run_extraction(generated, "image", tiny_image_model, tmp_path / "b", progress=False)
    assert a.items == b.items == len(SAMPLES)
    ta, _ = FeatureStore.open(tmp_path / "a").get_batch(list(range(len(SAMPLES))))
    tb, _ = FeatureStore.open(tmp_path / "b").get_batch(list(range(len(SAMPLES))))
    assert torch.equal(ta, tb)
    with pytest.raises(DatasetError, match="matches no file"):
        inputs_manifest([str(tmp_path / "media" / "*.png")], "image", inputs_dir=tmp_path / "inputs")


def test_a_shard_sample_without_the_media_member_is_named(tmp_path: Path) -> None:
    shards = _shards(tmp_path / "shards")
    with pytest.raises(DatasetError, match=r"shard-00000\.tar: sample sample000 has no \.png member \(members: "
                                           r"jpg, json, txt\)"):
        inputs_manifest([str(shards[0])], "image", path_column="png", inputs_dir=tmp_path / "inputs")


def test_shards_at_an_fsspec_url(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for shard in _shards(tmp_path / "shards"):
        fs.pipe(f"/wds-{tmp_path.name}/{shard.name}", shard.read_bytes())
    manifest = inputs_manifest([f"memory:///wds-{tmp_path.name}/*.tar"], "image", inputs_dir=tmp_path / "inputs")
    items = read_manifest(manifest)
    assert [it.id for it in items] == [key for key, _, _ in SAMPLES]
    assert [Path(it.path).read_bytes() for it in items] == [image for _, image, _ in SAMPLES]
    assert json.loads(Path(manifest).read_text().splitlines()[0])["path"] == "media/shard-00000.tar/sample000.jpg"
