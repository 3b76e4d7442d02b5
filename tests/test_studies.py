"""The training study of docs/training.md runs on the library as it is: one configuration, one seed, one set of
toy stores in the development-set layout, with the held-out recall recorded at every epoch."""

from __future__ import annotations

import json

import pytest
import torch
from toy_stores import make_toy_pair

from pipeline.embed import embed_store
from pipeline.evaluation.metrics import bidirectional_retrieval
from pipeline.studies import devsets
from pipeline.studies.devsets import write_views
from pipeline.studies.train_study import (
    GalleryValidation,
    branch_only_for,
    held_out,
    image_views,
    joint_path_loss,
    run_one,
    summarise,
    up_lr_scaled,
)
from pipeline.training import fit as fit_module
from pipeline.training.distributed import PairEncoder
from pipeline.training.fit import Stage, TrainConfig
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
    assert up["epochs"][0]["held_out"]["val_branch_shut"]["mean_rank"] >= 1
    # the running weight averages copy the model from epoch 3: a path-loss fit leaves nothing on it that cannot copy
    path_loss = run_one(tmp_path / "dev", "toy", "default-path-joint", seed=0, epochs=3)
    assert "avg_from_3" in path_loss["epochs"][2]["held_out"]
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


def test_the_views_study_reads_each_training_image_from_itself_or_a_view_and_restores_fit_up(tmp_path):
    image, text = make_toy_pair(tmp_path, n_images=40, captions=1, seed=0)
    view, _ = make_toy_pair(tmp_path, n_images=40, captions=1, seed=5, tag="view")  # the same ids, other tokens
    images, texts, views = FeatureStore.open(image), FeatureStore.open(text), FeatureStore.open(view)
    stage = Stage("fit-up", "image", "text", images, texts, TrainConfig())
    rows = torch.arange(40).numpy()
    own, _ = images.get_batch(rows, dtype=images.dtype)
    other, _ = views.get_batch(rows, dtype=views.dtype)
    original = fit_module._rank_fetcher
    with image_views([views], seed=0):
        (tokens, _), (captions, _) = fit_module._rank_fetcher(stage, pin=False)((rows, rows))
    assert fit_module._rank_fetcher is original
    from_view = (tokens == other).flatten(1).all(1)
    assert ((tokens == own).flatten(1).all(1) | from_view).all()  # every row is the image or its own view
    assert 5 < int(from_view.sum()) < 35  # about half from the view: both are drawn
    assert torch.equal(captions, texts.get_batch(rows, dtype=texts.dtype)[0])  # captions are never swapped


def test_augmented_views_keep_the_training_ids_differ_from_each_other_and_are_reproducible(tmp_path):
    from PIL import Image

    folder = tmp_path / "set"
    folder.mkdir()
    rng = torch.Generator().manual_seed(0)
    with open(folder / "image-train.jsonl", "w") as f:
        for i in range(3):
            path = tmp_path / f"{i}.png"
            Image.fromarray(torch.randint(0, 256, (40, 60, 3), generator=rng, dtype=torch.uint8).numpy()).save(path)
            f.write(json.dumps({"id": f"item-{i}", "path": str(path)}) + "\n")
    names = write_views(folder, views=2, seed=0)
    assert names == ["image-train-view1", "image-train-view2"]
    manifests = [[json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()] for name in names]
    assert [[item["id"] for item in m] for m in manifests] == [["item-0", "item-1", "item-2"]] * 2
    pixels = [[Image.open(item["path"]).tobytes() for item in m] for m in manifests]
    assert pixels[0] != pixels[1]  # each view draws its own crops
    write_views(folder, views=2, seed=0)
    assert pixels == [[Image.open(item["path"]).tobytes() for item in m] for m in manifests]


def test_a_caption_only_branch_leaves_images_on_the_linear_path_and_captions_on_the_full_up(tmp_path):
    image, text = make_toy_pair(tmp_path, n_images=8, captions=1, seed=0)
    images, texts = FeatureStore.open(image), FeatureStore.open(text)
    torch.manual_seed(0)
    model = build_head("up", HEADS["up"].config_class({"image": images.dim, "text": texts.dim}, width=32, blocks=1,
                                                      pooled_skip=True)).eval()
    with torch.no_grad():
        model.up_gate.fill_(0.5)
    rows = torch.arange(8).numpy()
    batches = {"image": images.get_batch(rows), "text": texts.get_batch(rows)}
    with torch.no_grad():  # every encoding under no_grad: the transformer's eval fast path differs in the last bits
        full = {m: model.encode(m, *batch) for m, batch in batches.items()}
    with branch_only_for(("text",)), torch.no_grad():
        caption_only = {m: model.encode(m, *batch) for m, batch in batches.items()}
        model.up_gate.zero_()
        linear_path = model.encode("image", *batches["image"])
        model.up_gate.fill_(0.5)
    assert torch.equal(caption_only["text"], full["text"])
    assert torch.equal(caption_only["image"], linear_path) and not torch.allclose(caption_only["image"], full["image"])
    with torch.no_grad():
        assert torch.equal(model.encode("image", *batches["image"]), full["image"])  # the UP is itself again after


@pytest.mark.parametrize("path_loss", ["own", "joint"])
def test_a_path_loss_adds_the_paths_own_loss_and_own_trains_the_path_by_it_alone(tmp_path, path_loss):
    image, text = make_toy_pair(tmp_path, n_images=8, captions=1, seed=0)
    images, texts = FeatureStore.open(image), FeatureStore.open(text)
    torch.manual_seed(0)
    config = HEADS["up"].config_class({"image": images.dim, "text": texts.dim}, width=32, blocks=1, dropout=0.0,
                                      pooled_skip=True, path_loss="own" if path_loss == "own" else "shared")
    model = build_head("up", config).train()
    with torch.no_grad():
        model.up_gate.fill_(0.5)
    rows = torch.arange(8).numpy()
    fetched = (images.get_batch(rows), texts.get_batch(rows))
    loss_fn = ContrastiveLoss()
    skip_weights = [model.skips[m].weight for m in ("image", "text")]

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss, skip_weights, retain_graph=True))

    full = loss_fn(model.encode("image", *fetched[0]), model.encode("text", *fetched[1]))
    path = loss_fn(model.linear_path("image", *fetched[0]), model.linear_path("text", *fetched[1]))
    with joint_path_loss(path_loss == "joint"):
        total = fit_module.global_batch_loss(PairEncoder(model, "image", "text"), loss_fn, fetched, 8, "cpu")
    assert len(model.training_embeddings("image", *fetched[0])) == (2 if path_loss == "own" else 1)  # restored
    assert torch.allclose(total, full + path, atol=1e-5)
    # own: the UP's embedding reads the path without its gradient, so only the path's own loss trains it
    if path_loss == "own":
        expected = grads(path)
    else:
        expected = [f + p for f, p in zip(grads(full), grads(path), strict=True)]
    for got, want in zip(grads(total), expected, strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_a_development_set_whose_media_are_missing_is_refused_naming_the_package(tmp_path, monkeypatch):
    assert set(devsets.SOURCES) == set(devsets.ALL_SETS)  # every set names where its media come from
    monkeypatch.setitem(devsets.SOURCES, "emoji", (tmp_path / "absent.ttf", "fonts-noto-color-emoji"))
    with pytest.raises(devsets.MissingSource, match="emoji: .*absent.ttf is missing; install the Debian package "
                                                    "fonts-noto-color-emoji"):
        devsets.write_set("emoji", tmp_path / "dev", 0.2, 0)
    assert not (tmp_path / "dev").exists()  # nothing half-written
