"""The fit-up study of docs/training.md: fit configurations x seeds x development sets from cached stores, recording
held-out text->image recall at every epoch (``run_stage``'s ``on_epoch`` monitor; it never steers training).

Usage (after ``python -m pipeline.studies.devsets --out dev --extract``)::

    python -m pipeline.studies.train_study --dev dev --configs linear up-paper up --seeds 0 1 2 --out study.jsonl
    python -m pipeline.studies.train_study --summary study.jsonl

Each fit appends one JSON line: config, set, seed, the kept epoch (by the run's selection signal), and per epoch the
validation numbers and the held-out ones, so other selection signals can be compared offline.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.embed import embed_store
from pipeline.evaluation.metrics import bidirectional_retrieval, retrieval_metrics
from pipeline.training import fit as fit_module
from pipeline.training.defaults import FIT_UP_SCHEDULE
from pipeline.training.fit import LossConfig, Stage, TrainConfig, _validate, checked_pairs, fit_up
from pipeline.training.pairs import pair_stores, split_by_anchor
from pipeline.training.prefetch import token_batch
from project.up import OneEncoder
from stores import FeatureStore

# The paper's settings: constant lr, rsum selection, UP without the skip. Each other config changes one thing.
# Configs without "epochs" train TrainConfig's 30 (the paper-based ones) or fit-up's default (FIT_UP_SCHEDULE).
# Every config names its initial temperature: the first three rounds ran before fit-up's became 0.1.
CLIP_TEMPERATURE = {"init_temperature": 0.07}
PAPER = {"head": "up", "head_options": {"pooled_skip": False}, "train": {"lr_schedule": "constant", "select": "rsum"},
         "loss": CLIP_TEMPERATURE}
# The first round's fit-up schedule, and the second to fourth rounds' (pinned, whatever the default becomes).
COSINE_30 = {**FIT_UP_SCHEDULE, "epochs": 30, "select": "mean-rank"}
COSINE_10 = {**FIT_UP_SCHEDULE, "epochs": 10, "select": "mean-rank"}
CONFIGS = {
    "linear": {"head": "linear", "head_options": {}, "train": {"lr_schedule": "constant", "select": "rsum"},
               "loss": CLIP_TEMPERATURE},
    "linear-cos": {"head": "linear", "head_options": {}, "train": COSINE_30, "loss": CLIP_TEMPERATURE},
    "up-paper": PAPER,
    "up-cos": {**PAPER, "train": {"lr_schedule": "cosine"}},
    "up-cos-b32": {**PAPER, "train": {"lr_schedule": "cosine", "batch_size": 32}},
    "up-skip": {**PAPER, "head_options": {"pooled_skip": True}, "train": {"lr_schedule": "cosine"}},
    "up-skip-b32": {**PAPER, "head_options": {"pooled_skip": True},
                    "train": {"lr_schedule": "cosine", "batch_size": 32}},
    "up-skip-1b": {**PAPER, "head_options": {"pooled_skip": True}, "blocks": 1, "train": {"lr_schedule": "cosine"}},
    "up-skip-wd": {**PAPER, "head_options": {"pooled_skip": True},
                   "train": {"lr_schedule": "cosine", "weight_decay": 0.1}},
    "up-skip-do3": {**PAPER, "head_options": {"pooled_skip": True, "dropout": 0.3},
                    "train": {"lr_schedule": "cosine"}},
    "up-skip-tok": {**PAPER, "head_options": {"pooled_skip": True, "pool": "token"},
                    "train": {"lr_schedule": "cosine"}},
    "up-skip-t10": {**PAPER, "head_options": {"pooled_skip": True}, "train": {"lr_schedule": "cosine"},
                    "loss": {"init_temperature": 0.1}},
    "up-1b": {**PAPER, "blocks": 1, "train": {"lr_schedule": "cosine"}},
    "up-do3": {**PAPER, "head_options": {"pooled_skip": False, "dropout": 0.3}, "train": {"lr_schedule": "cosine"}},
    "up-tok": {**PAPER, "head_options": {"pooled_skip": False, "pool": "token"}, "train": {"lr_schedule": "cosine"}},
    "up-skip-cos": {**PAPER, "head_options": {"pooled_skip": True}, "train": COSINE_30},
    "default": {"head": "up", "head_options": {}, "train": FIT_UP_SCHEDULE, "loss": {}},  # fit-up's defaults now
    "linear-default": {"head": "linear", "head_options": {}, "train": FIT_UP_SCHEDULE, "loss": {}},  # --head linear
}
# The second and third rounds (docs/training.md): the default of their time (30 epochs, then 10, both at CLIP's
# temperature) and changes to it; "default" trains fit-up's defaults as they are now.
DEFAULT = {**CONFIGS["default"], "loss": CLIP_TEMPERATURE}
CONFIGS.update({
    "default-e30": {**DEFAULT, "train": COSINE_30},
    "default-td3": {**DEFAULT, "head_options": {"token_dropout": 0.3}, "train": COSINE_30},
    "default-td5": {**DEFAULT, "head_options": {"token_dropout": 0.5}, "train": COSINE_30},
    "default-e10": {**DEFAULT, "train": COSINE_10},
    "default-e10-td5": {**DEFAULT, "head_options": {"token_dropout": 0.5}, "train": COSINE_10},
    "default-e10-wd": {**DEFAULT, "train": {**COSINE_10, "weight_decay": 0.05}},
    "default-e10-do3": {**DEFAULT, "head_options": {"dropout": 0.3}, "train": COSINE_10},
    "default-e10-ud5": {**DEFAULT, "head_options": {"up_drop": 0.5}, "train": COSINE_10},
    "default-e10-b32": {**DEFAULT, "train": {**COSINE_10, "batch_size": 32}},
    # The UP's own parameters (adapters and transformer) at this fraction of the learning rate of the pooled linear
    # path, its gate and the temperature.
    "default-e10-uplr3": {**DEFAULT, "up_lr_scale": 0.3, "train": COSINE_10},
    "default-e10-1b": {**DEFAULT, "blocks": 1, "train": COSINE_10},
    "default-e10-2b": {**DEFAULT, "blocks": 2, "train": COSINE_10},
    "default-e10-tok": {**DEFAULT, "head_options": {"pool": "token"}, "train": COSINE_10},
    "linear-cos-e10": {**CONFIGS["linear-cos"], "train": COSINE_10},
    "linear-cos-e10-b32": {**CONFIGS["linear-cos"], "train": {**COSINE_10, "batch_size": 32}},
})
# Hypothesis 6: the initial temperature, for either head.
CONFIGS.update({f"default-e10-t{round(t * 100)}": {**CONFIGS["default-e10"], "loss": {"init_temperature": t}}
                for t in (0.1, 0.15)})
CONFIGS.update({f"linear-cos-e10-t{round(t * 100)}": {**CONFIGS["linear-cos-e10"], "loss": {"init_temperature": t}}
                for t in (0.1, 0.15, 0.2, 0.3)})
# Model selection, fourth round: fit-up's defaults over 30 epochs, and the paper's constant lr, under its rule.
CONFIGS.update({
    "linear-default-e30": {**CONFIGS["linear-default"], "train": {**FIT_UP_SCHEDULE, "epochs": 30}},
    "linear-constant-e30": {**CONFIGS["linear-default"],
                            "train": {**FIT_UP_SCHEDULE, "epochs": 30, "lr_schedule": "constant"}},
})
# Hypothesis 11: the gate of the UP's branch at this multiple of the lr (UPConfig.gate_scale), at fit-up's defaults.
CONFIGS.update({f"default-gs{scale}": {**CONFIGS["default"], "head_options": {"gate_scale": float(scale)}}
                for scale in (10, 30, 100)})


# Hypothesis 14: the linear path pools the raw tokens through a learned query (UPConfig.skip_pool), and the same pool
# in the linear head (LinearConfig.pool) to tell the pool's share from the UP's.
CONFIGS["default-qp"] = {**CONFIGS["default"], "head_options": {"skip_pool": "query"}}
CONFIGS["linear-qp"] = {**CONFIGS["linear-default"], "head_options": {"pool": "query"}}


# Hypothesis 1, width: the UP (and, for the same start, the linear head) at another width than 256.
CONFIGS.update({f"{name}-w{width}": {**CONFIGS[base], "width": width}
                for name, base in (("default", "default"), ("linear", "linear-default")) for width in (128, 512)})

# Hypothesis 3: a LayerNorm on each modality's raw tokens before the UP's adapter (UPConfig.input_norm).
CONFIGS["default-in"] = {**CONFIGS["default"], "head_options": {"input_norm": True}}

# Hypothesis 16: each training image is read, per minibatch row, from itself or one of 4 augmented views extracted
# beforehand (``devsets --views 4``), all equally likely; validation and held-out read the images themselves.
CONFIGS["default-v4"] = {**CONFIGS["default"], "views": 4}
CONFIGS["linear-v4"] = {**CONFIGS["linear-default"], "views": 4}


# Hypothesis 17: the UP's branch for the captions only; images get the UP's linear path alone, in training and
# evaluation (hypothesis 15 found the captions' branch carries the UP's gain).
CONFIGS["default-caption-branch"] = {**CONFIGS["default"], "branch_for": ("text",)}


# Hypothesis 18: the UP's linear path trained by a contrastive loss of its own. "own" (fit-up's path_loss): the
# UP's embedding reads the path without its gradient, so the path trains as the linear head does and the branch fits
# what it leaves; "joint" (a study patch): the path's own loss is added to the UP's, which still trains the path too.
CONFIGS["default-path-own"] = {**CONFIGS["default"], "head_options": {"path_loss": "own"}}
CONFIGS["default-path-joint"] = {**CONFIGS["default"], "path_loss": "joint"}


@contextlib.contextmanager
def joint_path_loss(joint: bool):
    """Within (when ``joint``): a pooled-path UP's training embeddings add its linear path's, so fit-up's loss adds
    the path's own contrastive loss to the UP's, which still trains the path as well (a study hypothesis, not a
    fit-up option; with ``path_loss="own"`` the UP's loss does not reach the path)."""
    if not joint:
        yield
        return
    original = OneEncoder._training_embeddings

    def embeddings(self, modality, tokens, mask):
        out = original(self, modality, tokens, mask)
        return (*out, self.linear_path(modality, tokens, mask)) if self.training else out

    OneEncoder._training_embeddings = embeddings
    try:
        yield
    finally:
        OneEncoder._training_embeddings = original


@contextlib.contextmanager
def branch_only_for(modalities: tuple[str, ...] | None):
    """Within: a pooled-path UP's branch adds to the embeddings of ``modalities`` only; every other modality's
    embedding is the UP's linear path alone, in training and evaluation (a study hypothesis, not a UP option).
    None: the UP as it is."""
    if modalities is None:
        yield
        return
    original = OneEncoder._training_embeddings

    def embeddings(self, modality, tokens, mask):
        if modality in modalities:
            return original(self, modality, tokens, mask)
        return (self.linear_path(modality, tokens, mask),)

    OneEncoder._training_embeddings = embeddings
    try:
        yield
    finally:
        OneEncoder._training_embeddings = original


@contextlib.contextmanager
def image_views(views: list[FeatureStore], seed: int):
    """Within: fit-up's training minibatches read each image row from the image itself or one of ``views`` (stores
    of augmented views with the same ids), drawn uniformly per row from a generator seeded by ``seed`` (a study
    hypothesis, not a fit-up option); validation reads the images themselves."""
    if not views:
        yield
        return
    original = fit_module._rank_fetcher

    def fetcher(stage, pin, holder=None):
        fetch = original(stage, pin, holder)
        ids = stage.anchor_store.ids
        rows = [np.asarray([view._index.get(item_id, -1) for item_id in ids]) for view in views]
        rng = np.random.default_rng(seed)

        def with_views(pair: tuple) -> tuple:
            (tokens, mask), partner = fetch(pair)
            anchors = np.asarray(pair[0])
            choice = rng.integers(0, len(views) + 1, size=len(anchors))
            for k, view in enumerate(views, 1):
                view_rows = rows[k - 1][anchors]
                picked = np.nonzero((choice == k) & (view_rows >= 0))[0]
                if len(picked):
                    view_tokens, _ = token_batch(view, view_rows[picked])
                    tokens[torch.from_numpy(picked)] = view_tokens.to(tokens.dtype)
            return (tokens, mask), partner

        return with_views

    fit_module._rank_fetcher = fetcher
    try:
        yield
    finally:
        fit_module._rank_fetcher = original


@contextlib.contextmanager
def branch_shut(model: torch.nn.Module, shut: bool):
    """Within (when ``shut``): the gate of a pooled-path UP is 0, so its branch adds nothing; restored after."""
    if not shut:
        yield
        return
    gate = model.up_gate.detach().clone()
    with torch.no_grad():
        model.up_gate.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            model.up_gate.copy_(gate)


# Hypothesis 15: held-out R@5 with the UP's branch shut for these modalities' embeddings, every weight unchanged.
BRANCH_SHUT = {"image": ("image",), "text": ("text",), "both": ("image", "text")}


def held_out(model: torch.nn.Module, images: FeatureStore, texts: FeatureStore, shut: tuple[str, ...] = ()) -> dict:
    """Held-out text->image recall; ``shut``: the modalities whose embeddings leave the UP's branch out."""
    relevance = pair_stores(images, texts).relevance()
    with branch_shut(model, "image" in shut):
        a = embed_store(model, "image", images, relevance.anchors)
    with branch_shut(model, "text" in shut):
        b = embed_store(model, "text", texts, relevance.partners)
    m = bidirectional_retrieval(a, b, relevance, "image", "text")["text->image"]
    return {"R@1": m["R@1"], "R@5": m["R@5"], "R@10": m["R@10"], "mean_rank": m["mean_rank"]}


# Averages of the epoch-end weights from these epochs on (stochastic weight averaging over epochs, Izmailov et al.
# 2018), measured on the held-out split beside each epoch's own weights; they never steer training.
AVERAGE_FROM = (3, 5, 7)


class EpochAverages:
    """Held-out recall of each epoch's weights and of running averages of the epoch-end weights (AVERAGE_FROM)."""

    def __init__(self, images: FeatureStore, texts: FeatureStore) -> None:
        self.images, self.texts = images, texts
        self.sums: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}

    def __call__(self, epoch: int, model: torch.nn.Module) -> dict:
        out = held_out(model, self.images, self.texts)
        weights = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        for start in AVERAGE_FROM:
            if epoch < start:
                continue
            count, total = self.sums.get(start, (0, None))
            total = weights if total is None else {k: total[k] + weights[k] for k in total}
            self.sums[start] = (count + 1, total)
            averaged = copy.deepcopy(model)
            averaged.load_state_dict({k: v / (count + 1) for k, v in total.items()})
            out[f"avg_from_{start}"] = held_out(averaged, self.images, self.texts)
        return out


class GalleryValidation:
    """Mean rank of each validation pair's true partner among every item of the other side's store (its training
    items as distractors), both directions averaged: a validation signal with a gallery ten times the validation
    split's, measured beside the fit's own (which ranks among the validation items only); it never steers."""

    def __init__(self, images: FeatureStore, texts: FeatureStore, val_fraction: float, seed: int) -> None:
        self.images, self.texts = images, texts
        pairs = pair_stores(images, texts, absent="drop")
        self.all = pairs.relevance()
        _, val = split_by_anchor(pairs, val_fraction, seed)
        # Each validation pair's image and caption, as rows of the embeddings of every item.
        self.rows = np.searchsorted(self.all.anchors, val.anchor)
        self.cols = np.searchsorted(self.all.partners, val.partner)

    def __call__(self, model: torch.nn.Module) -> float:
        a = embed_store(model, "image", self.images, self.all.anchors)
        b = embed_store(model, "text", self.texts, self.all.partners)
        queries = np.arange(len(self.rows))  # query k is validation pair k
        image_to_text = retrieval_metrics(a[torch.as_tensor(self.rows)], b, queries, self.cols)
        text_to_image = retrieval_metrics(b[torch.as_tensor(self.cols)], a, queries, self.rows)
        return (image_to_text["mean_rank"] + text_to_image["mean_rank"]) / 2


@contextlib.contextmanager
def up_lr_scaled(scale: float | None, lr: float):
    """Within: fit-up's optimiser gets the UP's own parameters (``adapters.*``, ``up.*``) as a group at ``scale``
    times the run's learning rate ``lr`` (a study hypothesis, not a fit-up option)."""
    if scale is None:
        yield
        return
    original = fit_module._trainable_parameters

    def grouped(model, loss_fn, trainable):
        params = original(model, loss_fn, trainable)
        up = {id(p) for n, p in model.named_parameters() if n.startswith(("adapters.", "up."))}
        return [{"params": [p for p in params if id(p) not in up]},
                {"params": [p for p in params if id(p) in up], "lr": lr * scale}]

    fit_module._trainable_parameters = grouped
    try:
        yield
    finally:
        fit_module._trainable_parameters = original


def run_one(dev: Path, set_name: str, config_name: str, seed: int, epochs: int | None = None) -> dict:
    """One fit of ``config_name`` on ``set_name``; ``epochs`` (if given) replaces the config's own."""
    config = CONFIGS[config_name]
    folder = dev / set_name
    test_images, test_texts = FeatureStore.open(folder / "image-test"), FeatureStore.open(folder / "text-test")
    train = TrainConfig(**{**config["train"], **({"epochs": epochs} if epochs else {}), "seed": seed,
                           "tensorboard": False})
    loss = LossConfig(**config["loss"])
    averages = EpochAverages(test_images, test_texts)
    train_images, train_texts = FeatureStore.open(folder / "image-train"), FeatureStore.open(folder / "text-train")
    gallery = GalleryValidation(train_images, train_texts, train.val_fraction, seed)
    stage = Stage("fit-up", "image", "text", train_images, train_texts, train)
    _, _, val_pairs = checked_pairs(train_images, train_texts, train)  # the fit's own validation split

    def monitor(epoch: int, model: torch.nn.Module) -> dict:
        out = {**averages(epoch, model), "val_gallery_mean_rank": gallery(model)}
        if hasattr(model, "up_gate"):
            out["branch_shut_r5"] = {name: held_out(model, test_images, test_texts, shut)["R@5"]
                                     for name, shut in BRANCH_SHUT.items()}
            with branch_shut(model, True):  # the validation split's view of the UP's linear path alone
                shut = _validate(model, stage, val_pairs)[0]
            out["val_branch_shut"] = {"mean_rank": shut["mean_rank"], "mean_rank_se": shut["mean_rank_se"]}
        return out

    started = time.perf_counter()
    views = [FeatureStore.open(folder / f"image-train-view{k}") for k in range(1, config.get("views", 0) + 1)]
    with (tempfile.TemporaryDirectory() as tmp, up_lr_scaled(config.get("up_lr_scale"), train.lr),
          image_views(views, seed), branch_only_for(config.get("branch_for")),
          joint_path_loss(config.get("path_loss") == "joint")):
        options = dict(config["head_options"])
        fit_up(folder / "image-train", folder / "text-train", Path(tmp) / "run", head=config["head"],
               width=config.get("width", 256), blocks=config.get("blocks", 4),
               pooled_skip=options.pop("pooled_skip", True), head_options=options, loss=loss, train=train,
               progress=False, on_epoch=monitor)
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    kept = max(r["epoch"] for r in records if r.get("saved"))
    return {"config": config_name, "set": set_name, "seed": seed, "kept_epoch": kept,
            "seconds": round(time.perf_counter() - started, 1),
            "epochs": [{"epoch": r["epoch"], "loss": r["loss"], "val_rsum": r["val"]["rsum"],
                        "val_mean_rank": r["val"]["mean_rank"], "val_mean_rank_se": r["val"]["mean_rank_se"],
                        "held_out": r["monitor"]} for r in records]}


def summarise(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by.setdefault((row["config"], row["set"]), []).append(row)
    lines = ["| config | set | seeds | kept R@5 | best-epoch R@5 | last R@5 | kept - best | mean-rank pick | "
             "rsum pick | average from 5 |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def fmt(values: list[float]) -> str:
        if not values:
            return "-"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} +- {spread:.3f}"

    for (config, set_name), group in sorted(by.items()):
        kept, best, last, gap, by_rank, by_rsum, averaged = [], [], [], [], [], [], []
        for row in group:
            r5 = {e["epoch"]: e["held_out"]["R@5"] for e in row["epochs"]}
            kept.append(r5[row["kept_epoch"]])
            best.append(max(r5.values()))
            last.append(r5[max(r5)])
            gap.append(kept[-1] - best[-1])
            # The epoch each validation signal would keep (first of ties, as the fit loop keeps only improvements).
            by_rank.append(r5[min(row["epochs"], key=lambda e: (e["val_mean_rank"], e["epoch"]))["epoch"]])
            by_rsum.append(r5[max(row["epochs"], key=lambda e: (e["val_rsum"], -e["epoch"]))["epoch"]])
            if "avg_from_5" in row["epochs"][-1]["held_out"]:  # studies recorded before EpochAverages lack it
                averaged.append(row["epochs"][-1]["held_out"]["avg_from_5"]["R@5"])
        lines.append(f"| {config} | {set_name} | {len(group)} | {fmt(kept)} | {fmt(best)} | {fmt(last)} | "
                     f"{fmt(gap)} | {fmt(by_rank)} | {fmt(by_rsum)} | {fmt(averaged)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dev", type=Path)
    parser.add_argument("--sets", nargs="+", default=["clipart", "emoji", "icons"])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="replaces every config's own number of epochs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--summary", type=Path, help="print the table of a study file and stop")
    args = parser.parse_args()
    if args.summary:
        print(summarise(args.summary))
        return
    torch.set_num_threads(args.threads)
    for seed in args.seeds:  # seeds outermost: a study cut short still covers every set and config evenly
        for set_name in args.sets:
            for config_name in args.configs:
                row = run_one(args.dev, set_name, config_name, seed, args.epochs)
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                kept = {e["epoch"]: e["held_out"] for e in row["epochs"]}[row["kept_epoch"]]
                print(f"{config_name} {set_name} seed {seed}: kept epoch {row['kept_epoch']} held-out R@5 "
                      f"{kept['R@5']:.3f} ({row['seconds']} s)", flush=True)


if __name__ == "__main__":
    main()
