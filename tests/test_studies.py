"""The training study of docs/training.md runs on the library as it is: one configuration, one seed, one set of
toy stores in the development-set layout, with the held-out recall recorded at every epoch."""

from __future__ import annotations

import json

import pytest
import torch
from toy_stores import make_toy_pair

from pipeline.embed import embed_store
from pipeline.evaluation.metrics import bidirectional_retrieval
from pipeline.studies.train_study import GalleryValidation, held_out, run_one, summarise, up_lr_scaled
from pipeline.training import fit as fit_module
from pipeline.training.pairs import pair_stores
from project import HEADS, ContrastiveLoss, build_head
from stores import FeatureStore


def test_a_study_fit_records_held_out_recall_at_every_epoch_and_summarises(tmp_path):
    folder = tmp_path / "dev" / "toy"
    for split, seed in (("train", 0), ("test", 1)):
        image, text = make_toy_pair(tmp_path / split, n_images=24, captions=1, seed=seed)
        folder.mkdir(parents=True, exist_ok=True)
        image.rename(folder / f"image-{split}")
        text.rename(folder / f"text-{split}")
    row = run_one(tmp_path / "dev", "toy", "linear-cos", seed=0, epochs=2)
    assert [e["epoch"] for e in row["epochs"]] == [1, 2] and row["kept_epoch"] in (1, 2)
    assert "branch_shut_r5" not in row["epochs"][0]["held_out"]  # a linear head has no UP branch to shut
    up = run_one(tmp_path / "dev", "toy", "default", seed=0, epochs=1)
    assert set(up["epochs"][0]["held_out"]["branch_shut_r5"]) == {"image", "text", "both"}
    own = run_one(tmp_path / "dev", "toy", "linear-cos-e10", seed=0)  # no --epochs: the config's own 10
    assert len(own["epochs"]) == 10
    for epoch in row["epochs"]:
        held_out = epoch["held_out"]
        assert 0 <= held_out["R@1"] <= held_out["R@5"] <= held_out["R@10"] <= 1 and held_out["mean_rank"] >= 1
        # The fit's own validation pairs ranked among all 24 training items: more distractors, never a better rank.
        assert epoch["val_mean_rank"] <= held_out["val_gallery_mean_rank"] <= 24
    # The running averages of the epoch-end weights start at their epoch (one sample: the epoch's own weights).
    metrics = ("R@1", "R@5", "R@10", "mean_rank")
    for epoch in own["epochs"]:
        starts = sorted(int(k.removeprefix("avg_from_")) for k in epoch["held_out"] if k.startswith("avg_from_"))
        assert starts == [s for s in (3, 5, 7) if s <= epoch["epoch"]]
        for start in starts:
            if start == epoch["epoch"]:
                averaged = epoch["held_out"][f"avg_from_{start}"]
                assert [averaged[m] for m in metrics] == [epoch["held_out"][m] for m in metrics]
    study = tmp_path / "study.jsonl"
    study.write_text(json.dumps(row) + "\n" + json.dumps(own) + "\n")
    table = summarise(study)
    assert "linear-cos" in table and "toy" in table and "average from 5" in table


def test_the_up_lr_study_gives_the_ups_own_parameters_a_group_of_their_own_and_restores_fit_up():
    model = torch.nn.ModuleDict({"up": torch.nn.Linear(2, 2), "skip": torch.nn.Linear(2, 2)})
    loss = ContrastiveLoss()
    original = fit_module._trainable_parameters
    with up_lr_scaled(0.3, lr=2e-3):
        groups = fit_module._trainable_parameters(model, loss, [])
    assert fit_module._trainable_parameters is original
    up_ids = {id(p) for p in model["up"].parameters()}
    assert {id(p) for p in groups[1]["params"]} == up_ids and groups[1]["lr"] == 0.3 * 2e-3
    assert not up_ids & {id(p) for p in groups[0]["params"]} and len(groups[0]["params"]) == 2 + len(list(loss.parameters()))


def test_the_gallery_validation_with_every_pair_held_out_is_the_fits_own_mean_rank(tmp_path):
    image_path, text_path = make_toy_pair(tmp_path, n_images=20, captions=1, seed=3)
    images, texts = FeatureStore.open(image_path), FeatureStore.open(text_path)
    torch.manual_seed(0)
    model = build_head("linear", {"input_dims": {"image": images.dim, "text": texts.dim}, "width": 8}).eval()
    relevance = pair_stores(images, texts).relevance()
    metrics = bidirectional_retrieval(embed_store(model, "image", images, relevance.anchors),
                                      embed_store(model, "text", texts, relevance.partners), relevance, "i", "t")
    own = (metrics["i->t"]["mean_rank"] + metrics["t->i"]["mean_rank"]) / 2
    assert own > 1.5  # an untrained head: ranks spread, so a wrong pairing would show
    assert GalleryValidation(images, texts, val_fraction=1.0, seed=0)(model) == pytest.approx(own)


def test_shutting_the_ups_branch_for_both_modalities_is_its_linear_path_alone_and_restores_the_gate(tmp_path):
    image, text = make_toy_pair(tmp_path, n_images=24, captions=1, seed=0)
    images, texts = FeatureStore.open(image), FeatureStore.open(text)
    torch.manual_seed(0)
    model = build_head("up", HEADS["up"].config_class({"image": images.dim, "text": texts.dim}, width=32, blocks=1,
                                                      pooled_skip=True))
    model.eval()
    with torch.no_grad():
        model.up_gate.fill_(0.5)
    full = held_out(model, images, texts)
    shut = held_out(model, images, texts, ("image", "text"))
    assert float(model.up_gate.detach()) == 0.5 and held_out(model, images, texts) == full  # nothing left changed
    with torch.no_grad():
        model.up_gate.zero_()
    assert shut == held_out(model, images, texts)  # the branch shut everywhere: the gate at 0
    assert shut != full  # the branch counts on these stores, so the comparison can tell
