"""Retrieval on many-to-many pairings, reports named by the stores they were computed on, and ``report`` keeping
figures of different evaluation sets apart: metrics against brute force, then the CLI on hand-built stores."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from toy_stores import make_shared_ref_stores

from pipeline.evaluation.metrics import bidirectional_retrieval, query_metrics, retrieval_metrics
from pipeline.training.pairs import Pairs, pair_stores, split_by_anchor
from stores import FeatureStore

cli = run_cli


# ---------------------------------------------------------------- metrics against brute force


def _brute_force(queries: torch.Tensor, gallery: torch.Tensor, relevant: set[tuple[int, int]], ks=(1, 5, 10)) -> dict:
    """Each query's gallery sorted by hand (descending score, irrelevant first among equal scores), then every metric
    read off that list."""
    ranks, aps, recalls = [], [], []
    for q in range(len(queries)):
        scores = [float(queries[q] @ gallery[t]) for t in range(len(gallery))]
        ranked = sorted(range(len(gallery)), key=lambda t: (-scores[t], (q, t) in relevant))
        hits = [(q, t) in relevant for t in ranked]
        ranks.append(hits.index(True) + 1)
        found = [i + 1 for i, hit in enumerate(hits) if hit]
        aps.append(sum(k / position for k, position in enumerate(found, start=1)) / len(found))
        recalls.append(hits[0] / len(found))
    ranks = np.asarray(ranks)
    return {**{f"R@{k}": float(np.mean(ranks <= k)) for k in ks}, "P@1": float(np.mean(ranks == 1)),
            "recall@1": float(np.mean(recalls)), "mAP": float(np.mean(aps)), "median_rank": float(np.median(ranks)),
            "mean_rank": float(np.mean(ranks)), "mean_rank_se": float(np.std(ranks, ddof=1) / np.sqrt(len(ranks))),
            "queries": len(ranks)}


@pytest.mark.parametrize("seed", range(4))
def test_many_to_many_metrics_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    # Random many-to-many pairs between store items (some repeated, some items of either store never paired), and
    # small integer embeddings so that equal scores are frequent and the tie rule is exercised.
    n_pairs = int(rng.integers(20, 60))
    pairs = Pairs(rng.integers(0, 25, n_pairs) * 3, rng.integers(0, 40, n_pairs) + 100)
    relevance = pairs.relevance()
    assert len(relevance.anchors) == len(set(pairs.anchor)) and len(relevance.partners) == len(set(pairs.partner))
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(-2, 3, (len(relevance.anchors), 4), generator=gen).float()
    b = torch.randint(-2, 3, (len(relevance.partners), 4), generator=gen).float()
    row = {int(x): i for i, x in enumerate(relevance.anchors)}
    col = {int(x): j for j, x in enumerate(relevance.partners)}
    truth = {(row[int(i)], col[int(j)]) for i, j in zip(pairs.anchor, pairs.partner, strict=True)}

    metrics = bidirectional_retrieval(a, b, relevance, "a", "b")
    expected = {"a->b": _brute_force(a, b, truth), "b->a": _brute_force(b, a, {(j, i) for i, j in truth})}
    for direction in ("a->b", "b->a"):
        assert metrics[direction] == pytest.approx(expected[direction], abs=1e-6), direction
    # The same figures a few queries at a time (a large gallery is never scored whole) and from a dense matrix.
    chunked = retrieval_metrics(a, b, relevance.anchor_pos, relevance.partner_pos, chunk_cells=len(b) * 3)
    assert chunked == pytest.approx(expected["a->b"], abs=1e-6)
    assert query_metrics(a @ b.T, relevance.dense()) == pytest.approx(expected["a->b"], abs=1e-6)


def test_shared_refs_split_keeps_every_caption_of_an_image_on_one_side(tmp_path):
    stores = make_shared_ref_stores(tmp_path, n_images=20)
    text, audio = FeatureStore.open(stores["text"]), FeatureStore.open(stores["audio"])
    pairs = pair_stores(text, audio)  # both ref the image: every written caption pairs with every spoken one
    assert len(pairs) == 20 * 2 * 2
    relevance = pairs.relevance()
    assert (len(relevance.anchors), len(relevance.partners), len(relevance.anchor_pos)) == (40, 40, 80)
    train, val = split_by_anchor(pairs, 0.2, seed=0)
    images = {side: {text.refs[i] for i in part.anchor} | {audio.refs[j] for j in part.partner}
              for side, part in (("train", train), ("val", val))}
    assert len(images["val"]) == 4 and not images["train"] & images["val"]


# ---------------------------------------------------------------- through the CLI on hand-built stores


@pytest.fixture(scope="module")
def m2m(tmp_path_factory) -> dict:
    """A run aligned on 10 images x 2 written x 2 spoken captions (identical tokens within an image, so the aligned
    run embeds them perfectly), and a second set of stores made the same way from other data."""
    root = tmp_path_factory.mktemp("m2m")
    stores = make_shared_ref_stores(root / "train")
    other = make_shared_ref_stores(root / "other", seed=1)  # same folder names, other manifests: other keys
    run = root / "run"
    small = ("--batch-size", 10, "--no-tensorboard")
    cli("fit-up", "--image-store", stores["image"], "--text-store", stores["text"], "--out", run, "--epochs", 40,
        "--val-fraction", 0, "--width", 32, "--blocks", 1, *small)
    validated = root / "run-validated"  # a short fit-al with held-out images, for its validation records
    shutil.copytree(run, validated)
    for target, epochs, val_fraction in ((run, 60, 0), (validated, 2, 0.2)):
        cli("fit-al", "--run", target, "--modality", "audio", "--store", stores["audio"], "--pivot", "text",
            "--pivot-store", stores["text"], "--epochs", epochs, "--val-fraction", val_fraction, *small)
    return {"root": root, "run": run, "validated": validated, "stores": stores, "other": other}


def test_many_to_many_retrieval_through_the_cli(m2m):
    # The validation of fit-al ranks distinct items: 2 held-out images, 4 written and 4 spoken captions each way.
    val = [json.loads(line)["val"] for line in (m2m["validated"] / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["stage"] == "fit-al:audio"]
    assert {m["queries"] for record in val for m in record.values() if isinstance(m, dict)} == {4}

    out = cli("eval", "retrieval", "--run", m2m["run"], "--audio-store", m2m["stores"]["audio"], "--text-store",
              m2m["stores"]["text"], "--json").stdout
    report = json.loads(out)
    for direction in ("text->audio", "audio->text"):
        m = report["metrics"][direction]
        assert (m["queries"], m["R@1"], m["P@1"], m["mAP"], m["median_rank"]) == (20, 1.0, 1.0, 1.0, 1.0), direction
        assert m["recall@1"] == 0.5  # two relevant captions, one in the top 1
    assert report["items"] == {"text": 20, "audio": 20} and report["pairs"] == 40
    assert report["chance_R@1"] == {"text->audio": pytest.approx(0.1), "audio->text": pytest.approx(0.1)}


def test_reports_on_two_store_pairs_are_both_kept(m2m):
    run, reports = m2m["run"], {}
    for name in ("stores", "other"):
        stores = m2m[name]
        printed = cli("eval", "retrieval", "--run", run, "--image-store", stores["image"], "--text-store",
                      stores["text"]).stdout
        path = Path(re.search(r"^report: (.+)$", printed, re.M).group(1))
        reports[name] = json.loads(path.read_text())
        keys = {m: FeatureStore.open(stores[m]).key for m in ("image", "text")}
        assert reports[name]["store_keys"] == keys and reports[name]["report_path"] == str(path)
        assert path.parent == run / "eval" and all(key[:8] in path.name for key in keys.values())
    first, second = (Path(reports[n]["report_path"]) for n in ("stores", "other"))
    assert first != second and first.is_file() and json.loads(first.read_text()) == reports["stores"]
    assert json.loads(first.read_text())["stores"]["image"] == str(m2m["stores"]["image"])
