"""The fit loop, pairing, metrics and evaluation, on real stores on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from toy_stores import make_toy_pair

from pipeline.evaluation.evaluate import check_compatible, evaluate_retrieval
from pipeline.evaluation.metrics import query_metrics, ranks_of_first_match, topk_accuracy
from pipeline.training.defaults import FIT_UP_SCHEDULE
from pipeline.training.fit import LossConfig, TrainConfig, TrainingError, fit_up
from pipeline.training.pairs import (
    PairingError,
    Pairs,
    epoch_batches,
    epoch_steps,
    pair_stores,
    split_by_anchor,
)
from pipeline.training.rundir import RunDir, RunError
from stores import FeatureStore, StoreWriter

SMALL = {"width": 32, "blocks": 1}


def test_ranks_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    sim = torch.randn(20, 30, generator=gen)
    relevant = torch.rand(20, 30, generator=gen) < 0.1
    relevant[torch.arange(20), torch.randint(0, 30, (20,), generator=gen)] = True
    ranks = ranks_of_first_match(sim, relevant)
    for q in range(20):
        order = torch.argsort(sim[q], descending=True).tolist()
        first = min(order.index(t) for t in range(30) if relevant[q, t])
        assert ranks[q] == first + 1


def test_average_precision_and_recall_match_hand_computation():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.9]])
    relevant = torch.tensor([[False, True, False, True], [False, False, False, True]])
    metrics = query_metrics(sim, relevant)
    # query 0: relevant at ranks 2 and 4 -> AP = (1/2 + 2/4) / 2 = 0.5; query 1: rank 1 -> AP 1
    assert metrics["mAP"] == pytest.approx(0.75)
    assert metrics["P@1"] == pytest.approx(0.5) and metrics["recall@1"] == pytest.approx(0.5)
    assert metrics["median_rank"] == pytest.approx(1.5) and metrics["R@5"] == 1.0


def test_topk_accuracy():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1]])
    acc = topk_accuracy(logits, torch.tensor([0, 0, 2]))
    assert acc == pytest.approx({"top1": 1 / 3, "top2": 1 / 3, "top3": 1.0})


def test_pairs_splits_and_batches(tmp_path):
    image_path, text_path = make_toy_pair(tmp_path, n_images=30, captions=3)
    images, texts = FeatureStore.open(image_path), FeatureStore.open(text_path)
    pairs = pair_stores(images, texts)
    assert len(pairs) == 90 and len(pairs.anchors) == 30
    assert all(texts.refs[p] == images.ids[a] for a, p in zip(pairs.anchor, pairs.partner, strict=True))
    train, val = split_by_anchor(pairs, 0.2, seed=1)
    assert not set(train.anchor) & set(val.anchor) and len(val.anchors) == 6 and len(train) + len(val) == 90
    batches = list(epoch_batches(train, 7, torch.Generator().manual_seed(0)))
    seen = np.concatenate([a for a, _ in batches])
    assert sorted(seen) == sorted(train.anchors)  # each training image exactly once per epoch
    assert all(len(set(a)) == len(a) for a, _ in batches)  # never two captions of one image in a batch


def test_missing_refs_are_reported(tmp_path):
    image_path, _ = make_toy_pair(tmp_path, n_images=4, tag="a")
    _, other_text = make_toy_pair(tmp_path, n_images=6, tag="b")
    with pytest.raises(PairingError, match="refer to ids absent"):
        pair_stores(FeatureStore.open(image_path), FeatureStore.open(other_text))


def test_fit_up_learns_a_separable_toy_set_and_writes_the_run(tmp_path):
    image_store, text_store = make_toy_pair(tmp_path, n_images=80)
    run = tmp_path / "run"
    fit_up(image_store, text_store, run, **SMALL, loss=LossConfig(kind="soft"),
           train=TrainConfig(epochs=25, batch_size=32, val_fraction=0.2), progress=False)
    metrics = RunDir(run).metrics()
    assert [m["epoch"] for m in metrics] == list(range(1, 26))
    last = metrics[-1]
    assert {"loss", "temperature", "val"} <= set(last) and metrics[0]["loss"] > last["loss"]
    best = max(m["val"]["image->text"]["R@1"] for m in metrics)
    assert best >= 0.8, f"held-out image->text R@1 only {best}"
    config = json.loads((run / "config.json").read_text())
    assert config["modalities"]["image"]["store"]["key"] == FeatureStore.open(image_store).key
    report = evaluate_retrieval(run, image_store, text_store)
    assert report["metrics"]["text->image"]["R@5"] > 0.8
    assert Path(report["report_path"]).parent == run / "eval" and Path(report["report_path"]).is_file()
    assert Path(report["report_path"]).name.startswith("retrieval-image-text--toy-image-")


def test_resume_gives_the_same_run_as_uninterrupted(tmp_path):
    image_store, text_store = make_toy_pair(tmp_path, n_images=40)
    train = {"batch_size": 16, "val_fraction": 0.2, "seed": 3}
    fit_up(image_store, text_store, tmp_path / "straight", **SMALL, train=TrainConfig(epochs=4, **train),
           progress=False)
    fit_up(image_store, text_store, tmp_path / "resumed", **SMALL, train=TrainConfig(epochs=2, **train),
           progress=False)
    fit_up(image_store, text_store, tmp_path / "resumed", **SMALL, train=TrainConfig(epochs=4, **train),
           resume=True, progress=False)
    straight, resumed = RunDir(tmp_path / "straight").metrics(), RunDir(tmp_path / "resumed").metrics()
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]  # noqa: E731
    assert strip(straight) == strip(resumed)
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fit_up_schedule_warms_up_then_decays_and_keeps_the_end_within_one_error(tmp_path):
    image_store, text_store = make_toy_pair(tmp_path, n_images=40)
    run = tmp_path / "run"
    # 30 training images in batches of 8: 4 steps per epoch, 32 in all; a quarter of them (2 epochs) warm up.
    fit_up(image_store, text_store, run, **SMALL, train=TrainConfig(**{**FIT_UP_SCHEDULE, "epochs": 8,
                                                                      "batch_size": 8, "val_fraction": 0.25,
                                                                      "lr_warmup": 0.25}),
           progress=False)
    metrics = RunDir(run).metrics()
    lrs = [m["lr"] for m in metrics]  # after each epoch's last step
    assert lrs[0] == pytest.approx(5 / 8 * 1e-3) and lrs[1] == pytest.approx(1e-3)  # linear warm-up over 8 steps
    assert lrs[1:] == sorted(lrs[1:], reverse=True) and lrs[-1] == pytest.approx(0.0, abs=1e-12)  # cosine to 0
    # The kept weights are those of the latest epoch whose validation mean rank is within one standard error of the
    # lowest (the first lowest's error).
    ranks = [m["val"]["mean_rank"] for m in metrics]
    lowest = metrics[ranks.index(min(ranks))]["val"]
    kept = max(m["epoch"] for m in metrics if m.get("saved"))
    assert kept == max(m["epoch"] for m in metrics if m["val"]["mean_rank"] <= min(ranks) + lowest["mean_rank_se"])
    assert lowest["mean_rank_se"] > 0
    for m in metrics:
        directions = [v["mean_rank"] for v in m["val"].values() if isinstance(v, dict)]
        assert m["val"]["mean_rank"] == pytest.approx(sum(directions) / 2)


def test_existing_run_and_foreign_stores_are_refused(tmp_path):
    image_store, text_store = make_toy_pair(tmp_path, n_images=20)
    fit_up(image_store, text_store, tmp_path / "run", **SMALL, train=TrainConfig(epochs=1, batch_size=8),
           progress=False)
    with pytest.raises(RunError, match="already holds a run"):
        fit_up(image_store, text_store, tmp_path / "run", **SMALL, train=TrainConfig(epochs=1), progress=False)
    other_image, other_text = make_toy_pair(tmp_path, n_images=20, tag="other")
    with pytest.raises(RunError, match="cannot resume"):
        fit_up(other_image, other_text, tmp_path / "run", **SMALL, train=TrainConfig(epochs=2), resume=True,
               progress=False)
    config = RunDir(tmp_path / "run").read_config()
    with pytest.raises(RunError, match="encoder.id"):
        check_compatible(config, "image", FeatureStore.open(other_image))


def test_non_finite_features_stop_training_with_a_clear_error(tmp_path):
    image_store, text_store = make_toy_pair(tmp_path, n_images=20)
    bad = StoreWriter.create(tmp_path / "bad", modality="image", layout="fixed", dim=24, tokens_per_item=6,
                             dtype="float32", identity={"bad": True})
    bad.add_batch([{"id": f"img{i}"} for i in range(20)], torch.full((20, 6, 24), float("inf")))
    bad.finish()
    with pytest.raises(TrainingError, match="loss became nan"):
        fit_up(tmp_path / "bad", text_store, tmp_path / "run", **SMALL, train=TrainConfig(epochs=1, batch_size=8),
               progress=False)


def test_pairs_dataclass_subset():
    pairs = Pairs(np.array([0, 0, 1]), np.array([0, 1, 2]))
    assert len(pairs.subset(np.array([True, False, True]))) == 2 and pairs.anchors.tolist() == [0, 1]


@pytest.mark.parametrize("sampling", ["one-per-anchor", "all"])
def test_epoch_steps_counts_the_batches_an_epoch_yields(sampling):
    rng = np.random.default_rng(3)
    for n_pairs, batch_size in ((1, 4), (9, 4), (10, 4), (17, 8), (40, 7), (41, 40)):
        anchors = rng.integers(0, max(1, n_pairs // 2), n_pairs)
        pairs = Pairs(anchors, np.arange(n_pairs))
        yielded = list(epoch_batches(pairs, batch_size, torch.Generator().manual_seed(n_pairs), sampling))
        assert epoch_steps(pairs, batch_size, sampling) == len(yielded), (n_pairs, batch_size)
