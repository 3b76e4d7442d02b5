"""The evaluation protocol's commands on real stores: CKA ranking, concept curation, linear probe.

Stores are written through the real StoreWriter from constructed features whose right answers are known; the
commands run as real subprocesses where the command line itself is under test, in-process otherwise (faster).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from toy_stores import make_toy_pair

from extract.manifest import manifest_sha256
from pipeline.curate import CurationError, curate
from pipeline.embed import embed_store
from pipeline.evaluation.cka import (
    CKAError,
    format_ranking,
    linear_cka,
    minibatch_cka,
    minibatch_cka_matrix,
    read_pairs_file,
    store_cka,
)
from pipeline.evaluation.probe import ProbeError, linear_probe
from pipeline.training.fit import LossConfig, TrainConfig, fit_up
from pipeline.training.rundir import RunDir, RunError
from stores import FeatureStore, StoreWriter

cli = run_cli


def write_store(path: Path, modality: str, rows, ids: list[str], *, labels: list | None = None,
                refs: list[str] | None = None, encoder: str = "enc", identity: dict | None = None,
                extraction: dict | None = None) -> Path:
    """A finished store: ``rows`` is a tensor ``[n, D]`` (pooled layout) or a list of ``[L_i, D]`` token tensors
    (ragged layout, pooled by the reader's masked mean)."""
    ragged = isinstance(rows, list)
    dim = rows[0].shape[-1]
    identity = identity or {"encoder": {"id": encoder}, "modality": modality, "layer": -1,
                            "keep": "tokens" if ragged else "pooled", "manifest_sha256": f"{path.name}-manifest"}
    writer = StoreWriter.create(path, modality=modality, layout="ragged" if ragged else "pooled", dim=dim,
                                tokens_per_item=None, dtype="float32", identity=identity, shard_mb=0.05,
                                extraction=extraction)
    for start in range(0, len(ids), 32):
        metas = []
        for i in range(start, min(start + 32, len(ids))):
            meta = {"id": ids[i]}
            if labels is not None:
                meta["label"] = labels[i]
            if refs is not None:
                meta["ref"] = refs[i]
            metas.append(meta)
        if ragged:
            chunk = rows[start : start + 32]
            padded = torch.zeros(len(chunk), max(t.shape[0] for t in chunk), dim)
            for b, t in enumerate(chunk):
                padded[b, : t.shape[0]] = t
            writer.add_batch(metas, padded, torch.tensor([t.shape[0] for t in chunk]))
        else:
            writer.add_batch(metas, rows[start : start + 32])
    writer.finish()
    return path


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only spin-waits (see one_thread in conftest)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- CKA


@pytest.fixture(scope="module")
def cka_stores(tmp_path_factory) -> dict:
    """Two image encoders and two text encoders over 300 images with 2 captions each.

    ``bert``'s first caption of every image carries exactly ``vit``'s features (spread over ragged tokens whose
    mean is that vector); its second caption and every other store are independent noise.
    """
    root = tmp_path_factory.mktemp("cka")
    n = 300
    g = _gen(0)
    x = torch.randn(n, 10, generator=g) @ torch.randn(10, 10, generator=g)
    image_ids = [f"img{i}" for i in range(n)]
    caption_ids = [f"img{i}-cap{c}" for i in range(n) for c in range(2)]
    caption_refs = [f"img{i}" for i in range(n) for _ in range(2)]
    bert_rows = []
    for i in range(n):
        offset = torch.randn(1, 10, generator=g)
        bert_rows.append(torch.cat([x[i] + offset, x[i] - offset]))  # mean over its 2 tokens = x[i]
        bert_rows.append(torch.randn(3, 10, generator=g))
    return {
        "vit": write_store(root / "vit", "image", x, image_ids, encoder="vit"),
        "cnn": write_store(root / "cnn", "image", torch.randn(n, 6, generator=g), image_ids, encoder="cnn"),
        "bert": write_store(root / "bert", "text", bert_rows, caption_ids, refs=caption_refs, encoder="bert"),
        "noise": write_store(root / "noise", "text", torch.randn(2 * n, 8, generator=g), caption_ids,
                             refs=caption_refs, encoder="noise"),
        "n": n, "root": root,
    }


def test_cka_command_ranks_identical_features_first_and_noise_near_zero(cka_stores, tmp_path):
    s = cka_stores
    out = tmp_path / "cka"
    result = cli("cka", "--store", s["bert"], "--store", s["vit"], "--store", s["noise"], "--store", s["cnn"],
                 "--out", out)
    lines = result.stdout.splitlines()
    ranked = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert ranked[0][1:3] == ["vit", "bert"] and float(ranked[0][3]) == pytest.approx(1.0, abs=1e-4)
    assert "300 pairs (minibatch estimator" in result.stdout  # the unbiased estimator by default
    assert abs(float(ranked[0][4])) < 0.1 and "noise: the same estimator" in result.stdout  # the noise baseline
    report = json.loads((out / "cka.json").read_text())
    # Grouped by modality from the metadata, whatever the order on the command line: images are the rows.
    assert report["rows"]["modality"] == "image" and [r["name"] for r in report["rows"]["stores"]] == ["vit", "cnn"]
    assert [c["name"] for c in report["cols"]["stores"]] == ["bert", "noise"]
    assert report["estimator"] == "minibatch" and report["pairs"] == 300
    full = store_cka([s["bert"], s["vit"], s["noise"], s["cnn"]], estimator="full")
    matrix = full["matrix"]
    assert matrix[0][0] == pytest.approx(1.0, abs=1e-6)
    assert all(abs(v) < 0.1 for v in (matrix[0][1], matrix[1][0], matrix[1][1]))
    assert [r["cka"] for r in report["ranking"]] == sorted((r["cka"] for r in report["ranking"]), reverse=True)
    assert np.allclose(report["matrix"], matrix, atol=0.08)
    # The full estimator's cells are the library's linear CKA on the pooled features of each image and its first caption.
    vit, noise = FeatureStore.open(s["vit"]), FeatureStore.open(s["noise"])
    first_captions = [noise.index_of(f"img{i}-cap0") for i in range(s["n"])]
    assert matrix[0][1] == pytest.approx(linear_cka(vit.pooled(), noise.pooled(first_captions)), abs=1e-9)
    with Image.open(out / "cka.png") as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 80
    table = [[cell.strip() for cell in row.split("|")[1:-1]]
             for row in (out / "cka.md").read_text().splitlines() if row.startswith("| ")]
    assert table[0] == ["rank", "image", "text", "CKA", "noise baseline"] and set(table[1][0]) <= set("-: ")
    first = report["ranking"][0]
    assert table[2] == ["1", "vit", "bert", f"{first['cka']:.4f}", f"{first['noise']:.4f}"]
    assert len(table) == 2 + len(report["ranking"])


def test_cka_minibatch_estimator_and_explicit_pairs(cka_stores, tmp_path):
    s = cka_stores
    forced = store_cka([s["vit"], s["cnn"], s["bert"], s["noise"]], estimator="minibatch", batch_size=64)
    full = store_cka([s["vit"], s["cnn"], s["bert"], s["noise"]], estimator="full")
    assert forced["estimator"] == "minibatch" and full["estimator"] == "full"
    assert forced["matrix"][0][0] == pytest.approx(1.0, abs=1e-9)  # identical features: every batch agrees exactly
    assert np.allclose(forced["matrix"], full["matrix"], atol=0.08)
    # auto falls back to the minibatch estimator when the features do not fit the memory budget
    assert store_cka([s["vit"], s["bert"]], memory_gb=1e-6)["estimator"] == "minibatch"

    # An explicit pairs file: the second captions (independent noise), one pair naming an id no store holds.
    pairs = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"a": f"img{i}", "b": f"img{i}-cap1"}) for i in range(200)]
    pairs.write_text("\n".join([*lines, json.dumps({"a": "img0", "b": "nope"}), ""]))
    assert len(read_pairs_file(pairs)) == 201
    report = store_cka([s["vit"], s["bert"]], pairs_file=pairs, estimator="minibatch", batch_size=50)
    assert report["pairs"] == 200 and report["pairs_source"] == str(pairs)
    assert report["dropped"] == [{"store": "bert", "missing_ids": 1, "examples": ["nope"]}]
    assert "bert lacks 1 paired ids" in format_ranking(report)
    assert abs(report["ranking"][0]["cka"]) < 0.15  # now the pairs are unrelated


def test_default_estimator_does_not_score_wide_noise_high_and_reports_the_noise_baseline(tmp_path):
    """Fewer pairs than feature dimensions (as with 156 real images of 1280-wide tokens): the biased full-batch
    estimator scores an unrelated noise store about as high as a related one; the default (unbiased) does not,
    and each cell's noise baseline says how high noise alone scores with that estimator."""
    g = _gen(11)
    n = 120
    latent = torch.randn(n, 6, generator=g)
    ids = [f"img{i}" for i in range(n)]
    words = latent @ torch.randn(6, 32, generator=g) + torch.randn(n, 32, generator=g)
    text = write_store(tmp_path / "text", "text", words, [f"{i}-c" for i in ids], refs=ids, encoder="text")
    real = write_store(tmp_path / "real", "image", latent @ torch.randn(6, 400, generator=g)
                       + 2.0 * torch.randn(n, 400, generator=g), ids, encoder="real")
    noise = write_store(tmp_path / "noise", "image", torch.randn(n, 400, generator=g), ids, encoder="noise")
    biased = store_cka([real, noise, text], estimator="full")
    by_name = {r["image"]: r for r in biased["ranking"]}
    # The defect: noise scores far above zero, and its noise baseline says that is all noise scores here.
    assert by_name["noise"]["cka"] > 0.15 and by_name["noise"]["noise"] > 0.15
    default = store_cka([real, noise, text])
    assert default["estimator"] == "minibatch" and default["pairs"] == n
    by_name = {r["image"]: r for r in default["ranking"]}
    assert abs(by_name["noise"]["cka"]) < 0.1 and by_name["real"]["cka"] > 0.3
    assert all(abs(r["noise"]) < 0.1 for r in default["ranking"])  # noise of each row store's width, same pairs
    assert [r["image"] for r in default["ranking"]] == ["real", "noise"]


def test_minibatch_matrix_equals_pairwise_minibatch_cka():
    g = _gen(5)
    z = torch.randn(256, 3, generator=g)
    a = {"x": z @ torch.randn(3, 7, generator=g), "y": torch.randn(256, 4, generator=g)}
    b = {"u": z @ torch.randn(3, 5, generator=g) + 0.5 * torch.randn(256, 5, generator=g)}
    chunks = [slice(i, i + 32) for i in range(0, 256, 32)]
    rows, cols, matrix = minibatch_cka_matrix(({k: v[c] for k, v in a.items()}, {k: v[c] for k, v in b.items()})
                                              for c in chunks)
    assert rows == ["x", "y"] and cols == ["u"]
    for i, r in enumerate(rows):
        assert float(matrix[i, 0]) == pytest.approx(minibatch_cka([(a[r][c], b["u"][c]) for c in chunks]), abs=1e-12)
    assert float(matrix[0, 0]) > 0.5 > abs(float(matrix[1, 0]))


def test_cka_errors(cka_stores, tmp_path):
    s = cka_stores
    result = cli("cka", "--store", s["vit"], "--store", s["cnn"], ok=False)
    assert result.returncode == 1 and "two modalities" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(CKAError, match="store given twice"):
        store_cka([s["vit"], s["vit"], s["bert"]])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": "img0", "b": "img0-cap0"}\n{"a": "img1"}\nnot json\n')
    with pytest.raises(CKAError, match="line 2.*line 3"):
        read_pairs_file(bad)
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"a": f"img{i}", "b": f"img{i}-cap0"}) + "\n" for i in range(3)))
    with pytest.raises(CKAError, match="only 3 pairs"):
        store_cka([s["vit"], s["bert"]], pairs_file=few)
    constant = write_store(tmp_path / "flat", "text", torch.ones(2 * s["n"], 4),
                           [f"img{i}-cap{c}" for i in range(s["n"]) for c in range(2)],
                           refs=[f"img{i}" for i in range(s["n"]) for _ in range(2)])
    with pytest.raises(CKAError, match="flat"):
        store_cka([s["vit"], constant])


# ---------------------------------------------------------------- curation

CONCEPTS = ["cat", "dog", "eel"]
# (concept index, cosine with it): concept 0 has 5 captions, concept 1 three, concept 2 only one.
PLANTED = [(0, 0.95), (0, 0.9), (0, 0.8), (0, 0.7), (0, 0.6), (1, 0.85), (1, 0.75), (1, 0.5), (2, 0.9)]


def _curation_stores(root: Path, dim: int = 8) -> tuple[Path, Path, dict]:
    """Concept k's images are 2 e_k +- n (n orthogonal to e_k): their normalised mean points exactly along e_k.
    Captions are a e_k + sqrt(1 - a^2) u (u a unit vector orthogonal to every e), scaled at random, plus one mixed
    caption 0.6 e_0 + 0.7 e_1; the expected concept and cosine of each caption are known in closed form."""
    g = _gen(1)
    eye = torch.eye(dim)
    images, labels = [], []
    for k, concept in enumerate(CONCEPTS):
        for _ in range(3):
            noise = torch.zeros(dim)
            noise[3:] = torch.randn(dim - 3, generator=g)
            images += [2 * eye[k] + noise, 2 * eye[k] - noise]
            labels += [concept, concept]
    captions, expected = [], {}
    for j, (k, a) in enumerate(PLANTED):
        u = torch.zeros(dim)
        u[3:] = torch.randn(dim - 3, generator=g)
        u = u / u.norm()
        scale = float(torch.rand(1, generator=g)) * 5 + 0.1  # cosine ignores the norm
        captions.append(scale * (a * eye[k] + math.sqrt(1 - a * a) * u))
        expected[f"cap{j}"] = (CONCEPTS[k], a)
    captions.append(0.6 * eye[0] + 0.7 * eye[1])
    expected[f"cap{len(PLANTED)}"] = ("dog", 0.7 / math.hypot(0.6, 0.7))
    order = torch.randperm(len(captions), generator=g).tolist()  # store order says nothing about the answer
    ids = [f"cap{j}" for j in order]
    manifest = root / "captions.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "text": f"caption number {i[3:]}", "ref": f"img-{i}"}) + "\n"
                                for i in ids))
    identity = {"encoder": {"id": "enc"}, "modality": "text", "layer": -1, "keep": "pooled",
                "manifest_sha256": manifest_sha256(manifest)}
    image_store = write_store(root / "concept-images", "image", torch.stack(images),
                              [f"im{i}" for i in range(len(images))], labels=labels)
    caption_store = write_store(root / "caption-pool", "text", torch.stack([captions[j] for j in order]), ids,
                                refs=[f"img-{i}" for i in ids], identity=identity,
                                extraction={"manifest": str(manifest.resolve())})
    return image_store, caption_store, expected


def test_curate_keeps_exactly_k_most_similar_per_concept(tmp_path, single_thread):
    images, captions, expected = _curation_stores(tmp_path)
    out = tmp_path / "curated.jsonl"
    result = cli("curate", "--prototypes", images, "--captions", captions, "--per-concept", "3", "--out", out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    by_concept = {c: [r for r in records if r["concept"] == c] for c in CONCEPTS}
    # The K best of each concept's assigned captions, best first; a concept with fewer keeps all it has.
    for concept in CONCEPTS:
        assigned = sorted((s, i) for i, (c, s) in expected.items() if c == concept)[::-1]
        want = [i for _, i in assigned[:3]]
        assert [r["id"] for r in by_concept[concept]] == want
        for r in by_concept[concept]:
            assert r["score"] == pytest.approx(expected[r["id"]][1], abs=1e-5)
    assert len(by_concept["cat"]) == 3 and len(by_concept["dog"]) == 3 and len(by_concept["eel"]) == 1
    assert "cap9" in [r["id"] for r in by_concept["dog"]]  # the mixed caption goes to its closer concept only
    # Texts come back from the caption store's manifest (it is still there, unchanged), refs from the store.
    assert all(r["text"] == f"caption number {r['id'][3:]}" and r["ref"] == f"img-{r['id']}" for r in records)
    assert "1 concept(s) got fewer than 3 captions: eel" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("cat"))
    assert row.split()[1:4] == ["6", "5", "3"]  # 6 prototype images, 5 captions assigned, 3 kept

    # An edited manifest no longer vouches for the texts: ids, refs, concepts and scores only.
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text(manifest.read_text() + json.dumps({"id": "extra", "text": "x"}) + "\n")
    report = curate(images, captions, 2, tmp_path / "ids-only.jsonl")
    records = [json.loads(line) for line in (tmp_path / "ids-only.jsonl").read_text().splitlines()]
    assert not report["with_text"] and all("text" not in r for r in records) and len(records) == 5
    assert report["short"] == ["eel"] and [p["kept"] for p in report["concepts"]] == [2, 2, 1]
    assert report["warning"] is None and "warning" not in result.stdout  # one encoder on both sides
    other = write_store(tmp_path / "other-encoder", "text", torch.randn(6, 8), [f"o{i}" for i in range(6)],
                        encoder="another")
    assert "--run" in curate(images, other, 2, tmp_path / "other.jsonl")["warning"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, single_thread) -> dict:
    """A 2-epoch UP run on the toy pair (image 24-d, labels 0/1; text 16-d)."""
    root = tmp_path_factory.mktemp("run")
    image_store, text_store = make_toy_pair(root, n_images=48)
    run = root / "run"
    fit_up(image_store, text_store, run, width=32, blocks=1, loss=LossConfig(kind="infonce"),
           train=TrainConfig(epochs=2, batch_size=16, val_fraction=0.2), progress=False)
    return {"run": run, "image": image_store, "text": text_store, "root": root}


def test_curate_in_the_aligned_space_of_a_run(toy_run, tmp_path, single_thread):
    images, texts = toy_run["image"], toy_run["text"]
    # The raw widths differ (24 vs 16): only the run's aligned space can compare them.
    result = cli("curate", "--prototypes", images, "--captions", texts, "--per-concept", "5", "--out",
                 tmp_path / "x.jsonl", ok=False)
    assert result.returncode == 1 and "--run" in result.stderr and "Traceback" not in result.stderr
    with pytest.raises(CurationError, match="different widths"):
        curate(images, texts, 5, tmp_path / "x.jsonl")
    report = curate(images, texts, 5, tmp_path / "aligned.jsonl", run_dir=toy_run["run"])
    records = [json.loads(line) for line in (tmp_path / "aligned.jsonl").read_text().splitlines()]
    assert [p["concept"] for p in report["concepts"]] == [0, 1] and report["space"].startswith("aligned")
    # Scores are cosines between the run's caption embeddings and the normalised mean image embedding per label.
    model, _, _ = RunDir(toy_run["run"]).load_model()
    image_store, text_store = FeatureStore.open(images), FeatureStore.open(texts)
    img, txt = embed_store(model, "image", image_store), embed_store(model, "text", text_store)
    labels = torch.tensor(image_store.labels)
    protos = torch.nn.functional.normalize(torch.stack([img[labels == c].mean(0) for c in (0, 1)]), dim=-1)
    scores = txt @ protos.T
    value, best = scores.max(1)
    for concept in (0, 1):
        mine = [r for r in records if r["concept"] == concept]
        assigned = (best == concept).nonzero().flatten()
        want = assigned[value[assigned].argsort(descending=True)][:5]
        assert len(mine) == min(5, len(assigned))
        assert [r["id"] for r in mine] == [text_store.ids[int(i)] for i in want]
        assert [r["score"] for r in mine] == pytest.approx([float(value[i]) for i in want], abs=1e-4)
    with pytest.raises(CurationError, match="has no labels"):
        curate(texts, texts, 5, tmp_path / "y.jsonl")  # captions carry no labels: no prototypes
    with pytest.raises(CurationError, match="at least 1"):
        curate(images, texts, 0, tmp_path / "y.jsonl", run_dir=toy_run["run"])


# ---------------------------------------------------------------- linear probe


def _clusters(n_per_class: int, seed: int, dim: int = 24, classes: int = 4, spread: float = 0.15,
              tokens: int = 0) -> tuple[torch.Tensor | list, list]:
    """Well-separated Gaussian clusters (linearly separable); the centres are fixed, the samples follow ``seed``."""
    centres = 3 * torch.randn(classes, dim, generator=_gen(100))
    g = _gen(seed)
    rows, labels = [], []
    for c in range(classes):
        for _ in range(n_per_class):
            rows.append(centres[c] + spread * torch.randn(dim, generator=g))
            labels.append(f"class-{c}")
    if tokens:  # fixed number of tokens around each row, for stores a UP run can read
        return [r + 0.05 * torch.randn(tokens, dim, generator=g) for r in rows], labels
    return torch.stack(rows), labels


def _toy_identity(name: str) -> dict:
    """The identity of make_toy_pair's image store, another manifest: the run accepts these stores."""
    return {"encoder": {"id": "toy-encoder"}, "layer": -1, "keep": "tokens", "modality": "image",
            "manifest_sha256": name}


def test_linear_probe_on_aligned_embeddings_reaches_full_accuracy(toy_run, tmp_path, single_thread):
    rows, labels = _clusters(30, seed=1, tokens=6)
    train = write_store(tmp_path / "probe-train", "image", rows, [f"tr{i}" for i in range(len(labels))],
                        labels=labels, identity=_toy_identity("train"))
    rows, labels = _clusters(15, seed=2, tokens=6)
    test = write_store(tmp_path / "probe-test", "image", rows, [f"te{i}" for i in range(len(labels))],
                       labels=labels, identity=_toy_identity("test"))
    run = toy_run["run"]
    result = cli("eval", "linear-probe", "--run", run, "--train-store", train, "--test-store", test,
                 "--epochs", "40", "--eval-every", "10", "--batch-size", "32")
    assert "final (epoch 40) test top1 1.000" in result.stdout
    report_path = Path(result.stdout.split("report: ")[1].splitlines()[0])
    assert report_path.parent == run / "eval" and report_path.name.startswith("linear-probe-probe-test-")
    report = json.loads(report_path.read_text())
    assert [c["epoch"] for c in report["checkpoints"]] == [10, 20, 30, 40]
    assert report["final"]["top1"] == 1.0 and report["best"]["top1"] == 1.0 and report["features"] == "aligned"
    assert report["classes"] == [f"class-{c}" for c in range(4)] and report["dim"] == 32  # the run's width
    assert report["chance_top1"] == 0.25
    table = report_path.with_suffix(".md").read_text()
    assert "| epoch | train loss | train top-1 | test top-1 |" in table and "| 40 |" in table
    # A store from another encoder is refused by the run.
    other = write_store(tmp_path / "other", "image", torch.randn(8, 24), [f"o{i}" for i in range(8)],
                        labels=[f"class-{c}" for c in range(4)] * 2)
    with pytest.raises(RunError, match="was not made like"):
        linear_probe(other, test, run_dir=run, epochs=1)


def test_linear_probe_on_raw_features_and_a_control_that_must_fail(tmp_path, single_thread):
    rows, labels = _clusters(30, seed=3, dim=12)
    train = write_store(tmp_path / "train", "image", rows, [f"tr{i}" for i in range(len(labels))], labels=labels)
    rows, labels = _clusters(15, seed=4, dim=12)
    test = write_store(tmp_path / "test", "image", rows, [f"te{i}" for i in range(len(labels))], labels=labels)
    out = tmp_path / "reports"
    report = linear_probe(train, test, features="raw", epochs=20, batch_size=32, lr=0.01, out_dir=out)
    assert report["space"] == "raw pooled features" and report["dim"] == 12
    assert Path(report["report_path"]).parent == out and json.loads(Path(report["report_path"]).read_text()) == report
    # A probe on the same test store with another training store is kept beside the first, not over it.
    other_rows, other_labels = _clusters(30, seed=5, dim=12)
    other_train = write_store(tmp_path / "train-2", "image", other_rows, [f"tr{i}" for i in range(len(other_labels))],
                              labels=other_labels)
    second = linear_probe(other_train, test, features="raw", epochs=2, batch_size=32, out_dir=out)
    assert second["report_path"] != report["report_path"] and json.loads(Path(report["report_path"]).read_text()) == report
    assert sorted(p.name.split("--train-")[1] for p in out.glob("linear-probe-raw-test-*.json")) == sorted(
        f"{Path(s).name}-{FeatureStore.open(s).key[:8]}.json" for s in (train, other_train))
    assert report["final"]["top1"] == 1.0 and [c["epoch"] for c in report["checkpoints"]] == list(range(2, 21, 2))
    # Control: the same features with labels shuffled carry no signal, so test accuracy stays near chance.
    shuffled = [labels[i] for i in torch.randperm(len(labels), generator=_gen(9)).tolist()]
    rows_train, train_labels = _clusters(30, seed=3, dim=12)
    mixed = [train_labels[i] for i in torch.randperm(len(train_labels), generator=_gen(10)).tolist()]
    noisy_train = write_store(tmp_path / "noisy-train", "image", rows_train,
                              [f"tr{i}" for i in range(len(mixed))], labels=mixed)
    noisy_test = write_store(tmp_path / "noisy-test", "image", rows, [f"te{i}" for i in range(len(shuffled))],
                             labels=shuffled)
    control = linear_probe(noisy_train, noisy_test, features="raw", epochs=20, batch_size=32, lr=0.01, out_dir=out)
    assert control["final"]["top1"] < 0.6


def test_linear_probe_errors(tmp_path, single_thread):
    g = _gen(7)
    ids = [f"i{i}" for i in range(12)]
    train = write_store(tmp_path / "train", "image", torch.randn(12, 5, generator=g), ids, labels=["a", "b"] * 6)
    test = write_store(tmp_path / "test", "image", torch.randn(12, 5, generator=g), ids,
                       labels=["a", "b", "zebra", "yak"] * 3)
    with pytest.raises(ProbeError, match=r"labels only in the test store .*\"yak\", \"zebra\" \(6 test items\)"):
        linear_probe(train, test, features="raw", out_dir=tmp_path)
    unlabelled = write_store(tmp_path / "plain", "image", torch.randn(12, 5, generator=g), ids)
    with pytest.raises(ProbeError, match="train store .*plain has no labels"):
        linear_probe(unlabelled, test, features="raw", out_dir=tmp_path)
    with pytest.raises(ProbeError, match="needs --run"):
        linear_probe(train, train, out_dir=tmp_path)
    other = write_store(tmp_path / "other-encoder", "image", torch.randn(12, 5, generator=g), ids,
                        labels=["a", "b"] * 6, encoder="another")
    with pytest.raises(ProbeError, match="not made by the same extraction"):
        linear_probe(train, other, features="raw", out_dir=tmp_path)
    text = write_store(tmp_path / "text", "text", torch.randn(12, 5, generator=g), ids, labels=["a", "b"] * 6)
    with pytest.raises(ProbeError, match="holds image features but test store .* holds text"):
        linear_probe(train, text, features="raw", out_dir=tmp_path)
