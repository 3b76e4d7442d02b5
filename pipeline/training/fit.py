"""The one fit loop, used by fit-up (train the UP on image-text pairs) and fit-al (train one Alignment Layer).

What differs between stages is only which parameters are trainable and which stores are paired; the loop reads
minibatches straight from the feature stores (the frozen encoders are never loaded), evaluates retrieval on a
held-out split each epoch, writes metrics, keeps the best weights and checkpoints for ``--resume``.
"""

from __future__ import annotations

import ctypes
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.embed import embed_store
from pipeline.evaluation.metrics import bidirectional_retrieval
from pipeline.progress import progress_bar
from pipeline.training import distributed
from pipeline.training.defaults import FIT_UP_SCHEDULE, FIT_UP_TEMPERATURE
from pipeline.training.loop import (
    LR_SCHEDULES,
    SELECTIONS,
    BestEpoch,
    RandomState,
    TrainConfig,
    TrainingError,
    add_selection_scores,
    autocast,
    build_optimizer,
    build_scheduler,
    check_precision,
    epoch_generator,
    epoch_line,
    epoch_seed,
    grad_scaler,
    optimiser_step,
    retrieval_parts,
    seconds_since,
    selection_rule,
    train_epoch,
)
from pipeline.training.pairs import (
    Pairs,
    check_pivot_refs,
    epoch_batches,
    epoch_steps,
    pair_stores,
    split_by_anchor,
)
from pipeline.training.prefetch import prefetched, to_device, token_batch
from pipeline.training.resident import ResidentStore, check_fits, store_device_for
from pipeline.training.rundir import RunDir, RunError
from project import HEADS, ContrastiveLoss
from stores import FeatureStore

# Head config fields fit-up takes as options of their own (through ``head_options``); the run records them in its
# model config, so --resume restores them and a sweep grid may vary them.
HEAD_OPTIONS = ("dropout", "token_dropout", "up_drop", "path_loss")


@dataclass
class LossConfig:
    kind: str = "infonce"
    init_temperature: float = FIT_UP_TEMPERATURE
    learn_temperature: bool = True
    target_mix: float = 0.0
    detach_targets: bool = False


@dataclass
class Stage:
    """One training stage: which stores are paired under which modality names, and what trains."""

    name: str
    anchor: str
    partner: str
    anchor_store: FeatureStore
    partner_store: FeatureStore
    train: TrainConfig
    trainable: list[str] = field(default_factory=list)  # parameter names; empty = everything


def store_record(store: FeatureStore) -> dict:
    return {"path": str(store.path), "key": store.key, "identity": store.identity, "dim": store.dim,
            "layout": store.layout, "items": len(store), "encoder_spec": (store.meta.summary or {}).get("encoder_spec")}


# What --resume lets differ from the recorded configuration: how long and where to train, not what is trained.
RESUME_MAY_CHANGE = frozenset({"epochs", "device", "tensorboard", "store_device"})
_FLAGS = {"loss_kind": "--loss", "tensorboard": "--no-tensorboard"}


def option_flag(name: str) -> str:
    """The command-line spelling of an option's parameter name (``batch_size`` -> ``--batch-size``)."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def recorded_options(config: dict, stage_name: str) -> dict[str, Any]:
    """The options stage ``stage_name`` of a run config was trained with, by parameter name (``batch_size``,
    ``loss_kind``, ``width``, ``al``, ``preset``, ...): what ``--resume`` restores. Empty for an unknown stage."""
    stage = next((s for s in config.get("stages", []) if s["name"] == stage_name), None)
    if stage is None:
        return {}
    options: dict[str, Any] = {**stage["train"], "preset": (stage.get("preset") or {}).get("name")}
    if stage_name == "fit-up":
        loss, model = config["loss"], config["model"]
        options.update(head=config["head"], loss_kind=loss["kind"], temperature=loss["init_temperature"],
                       target_mix=loss["target_mix"])
        head_fields = ("width", "blocks", "fusion", "pooled_skip", *HEAD_OPTIONS)
        options.update({k: model[k] for k in head_fields if k in model})
        cls = (model.get("cls_token") or {}).get("image")
        if cls is not None:
            options["cls_token"] = "yes" if cls else "no"
    else:
        options["al"] = config["modalities"][stage["partner"]].get("al")
    return options


def check_resume(run: RunDir, before: dict[str, Any], asked: dict[str, Any]) -> None:
    """Refuse to resume with options that differ from the recorded ones (:func:`recorded_options` of the run and of
    the configuration asked for), except :data:`RESUME_MAY_CHANGE`; ``None`` in ``asked`` means not given."""
    conflicts = [f"{option_flag(k)} {'none' if v is None else v} differs from the run's "
                 f"{'none' if before.get(k) is None else before[k]}"
                 for k, v in sorted(asked.items())
                 if k not in RESUME_MAY_CHANGE and k in before and v is not None and v != before[k]]
    if conflicts:
        raise RunError(f"cannot resume {run.path}: " + "; ".join(conflicts)
                       + " (--resume continues the recorded configuration; only --epochs, --device and --store-device may change)")


def record_selection(config: dict, stage_name: str, summary: dict) -> None:
    """Write the weight-selection rule and the epoch it chose into the stage's record of ``config``."""
    if "selected_epoch" not in summary:  # a resumed run that had already finished keeps its record
        return
    stage = next(s for s in config["stages"] if s["name"] == stage_name)
    stage["selection"] = {"rule": selection_rule(stage["train"].get("select", "rsum")), "epoch": summary["selected_epoch"],
                          "score": summary["selected_score"]}


def _validate(model: nn.Module, stage: Stage, pairs: Pairs) -> tuple[dict, list[str]]:
    """Validation retrieval metrics, and the ids of items whose embedding is not finite: those items (and the
    pairs they are in) are left out of the metrics, and counted there as ``nonfinite``."""
    if len(pairs) == 0:
        return {}, []
    device = stage.train.device
    relevance = pairs.relevance()  # each distinct item once; many-to-many relevance (pipeline/evaluation/metrics.py)
    a = embed_store(model, stage.anchor, stage.anchor_store, relevance.anchors, device=device)
    b = embed_store(model, stage.partner, stage.partner_store, relevance.partners, device=device)
    a_ok, b_ok = torch.isfinite(a).all(1).numpy(), torch.isfinite(b).all(1).numpy()
    bad = [stage.anchor_store.ids[int(i)] for i in relevance.anchors[~a_ok]]
    bad += [stage.partner_store.ids[int(j)] for j in relevance.partners[~b_ok]]
    if bad:
        keep = a_ok[relevance.anchor_pos] & b_ok[relevance.partner_pos]
        if not keep.any():
            raise TrainingError(f"every validation embedding of [{stage.name}] is non-finite (e.g. {bad[:3]}); "
                                "check the stores for non-finite values")
        kept = Pairs(relevance.anchors[relevance.anchor_pos[keep]],
                     relevance.partners[relevance.partner_pos[keep]]).relevance()
        a = a[np.searchsorted(relevance.anchors, kept.anchors)]
        b = b[np.searchsorted(relevance.partners, kept.partners)]
        relevance = kept
    metrics = add_selection_scores(bidirectional_retrieval(a, b, relevance, stage.anchor, stage.partner))
    if bad:
        metrics["nonfinite"] = len(bad)
    return metrics, bad


def global_batch_loss(encode_pair: nn.Module, loss_fn: ContrastiveLoss, fetched: tuple, batch_len: int,
                      device: str, precision: str = "fp32") -> torch.Tensor:
    """The contrastive loss of one global batch of ``batch_len`` pairs, from this rank's ``fetched`` slice
    ``((a_tokens, a_mask), (b_tokens, b_mask))``. In a single process the slice is the whole batch; under torchrun
    the slices' embeddings are gathered with gradients, so every rank returns the loss of the whole global batch
    and backward gives (after DDP's averaging) the single-process gradient. Under ``precision`` bf16 / fp16 the
    forward runs in autocast and the embeddings are cast back: the similarities and the loss are fp32. A head whose
    parts learn from losses of their own (``Head.training_embeddings``) gets the sum of one loss per part."""
    (a_tokens, a_mask), (b_tokens, b_mask) = (to_device(side, device) for side in fetched)
    with autocast(precision, device):
        a_parts, b_parts = encode_pair(a_tokens, a_mask, b_tokens, b_mask)
    if distributed.is_distributed():
        sizes = distributed.split_sizes(batch_len, distributed.world_size())
        own = sizes[distributed.rank()]  # a rank with an empty slice embedded one row it drops here
    total = None
    for a, b in zip(a_parts, b_parts, strict=True):
        if precision != "fp32":
            a, b = a.float(), b.float()
        if distributed.is_distributed():
            a, b = distributed.gather_rows(a[:own], sizes), distributed.gather_rows(b[:own], sizes)
        total = loss_fn(a, b) if total is None else total + loss_fn(a, b)
    return total


def checked_pairs(anchor: FeatureStore, partner: FeatureStore, cfg: TrainConfig) -> tuple[Pairs, Pairs, Pairs]:
    """(every pair, training pairs, validation pairs) of a stage, or the error that stops it; called before
    anything is written to the run directory, so a refused input leaves no run behind."""
    pairs = pair_stores(anchor, partner, absent="error" if cfg.strict_pairs else "drop")
    train_pairs, val_pairs = split_by_anchor(pairs, cfg.val_fraction, cfg.seed)
    if len(train_pairs.anchors) < 2:
        raise TrainingError(f"only {len(train_pairs.anchors)} training anchors: a contrastive batch needs 2 or more")
    return pairs, train_pairs, val_pairs


def _report_dropped(run: RunDir, stage: Stage, pairs: Pairs) -> None:
    """One line for the pairs left out because a partner is absent, and their list in the run directory."""
    other = stage.partner_store if pairs.dropped_from == str(stage.anchor_store.path) else stage.anchor_store
    failed = {e.get("source_id") or e.get("id") for e in other.errors()}
    listed = run.record_dropped_pairs(stage.name, pairs.dropped_from or "", other.path, pairs.dropped, failed)
    n, n_failed = len(pairs.dropped), sum(ref in failed for _, ref in pairs.dropped)
    example = ", ".join(f"{a!r} -> {b!r}" for a, b in pairs.dropped[:3])
    print(f"[{stage.name}] left out {n} item(s) of {pairs.dropped_from} whose partner is absent from {other.path} "
          f"({n_failed} failed extraction), e.g. {example}; listed in {listed} (--strict-pairs refuses instead)",
          file=sys.stderr, flush=True)


# glibc's mallopt parameter number of M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3


def return_freed_memory_to_the_os(threshold_bytes: int = 1 << 20) -> bool:
    """Make glibc serve every allocation of ``threshold_bytes`` or more with its own mmap, unmapped when freed.

    A training step allocates and frees about 1 GB of activations (UP, batch 128 x 49 tokens). glibc raises its mmap
    threshold each time such a block is freed (up to 32 MiB), so later blocks come from its heaps, which keep freed
    memory: the process then holds ~2 GB after a few steps and more as the heaps fragment, for a 45 MB store
    (docs/training.md, memory). A fixed threshold keeps the resident size at the stores plus the model between
    steps. Returns False where the C library is not glibc (nothing changes)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
    except (OSError, AttributeError):
        return False


def _check_schedule(cfg: TrainConfig) -> None:
    check_precision(cfg.precision, cfg.device)
    store_device_for(cfg.store_device, cfg.device)
    if cfg.select not in SELECTIONS:
        raise TrainingError(f"select must be one of {SELECTIONS}, got {cfg.select!r}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise TrainingError(f"lr_schedule must be one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}")


def _check_placement(cfg: TrainConfig, stores: list[FeatureStore]) -> None:
    """Refuse a precision or ``--store-device`` this machine cannot train with, and stores that do not fit on the
    device they are to be held on, before a run directory is touched."""
    _check_schedule(cfg)
    holder = store_device_for(cfg.store_device, cfg.device)
    if holder is not None:
        check_fits(stores, holder)


def _trainable_parameters(model: nn.Module, loss_fn: ContrastiveLoss, trainable: list[str]) -> list[nn.Parameter]:
    """The parameters named in ``trainable`` (all when empty) and the loss's; only they keep gradients."""
    names = set(trainable)
    params = [p for n, p in model.named_parameters() if not names or n in names]
    params += list(loss_fn.parameters())
    for n, p in model.named_parameters():
        p.requires_grad_(not names or n in names)
    return params


def _train_modes(model: nn.Module, trainable: list[str]) -> Callable[[], None]:
    """What puts the model in training mode at the start of an epoch. Modules that own trainable parameters train
    (dropout on); everything frozen stays in eval mode, because frozen means frozen: a frozen UP must give the
    pivot the same embedding every step."""
    names = set(trainable)
    modules = dict(model.named_modules())
    owners = sorted({owner for n in names if (owner := ".".join(n.split(".")[:2])) in modules})

    def set_modes() -> None:
        if names:
            model.eval()
            for owner in owners:
                model.get_submodule(owner).train()
        else:
            model.train()

    return set_modes


def _resume_point(run: RunDir, stage: Stage, model: nn.Module, loss_fn: ContrastiveLoss,
                  optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                  resume: bool, scaler: torch.amp.GradScaler | None = None) -> tuple[int, BestEpoch]:
    """The first epoch to train and the best epoch so far: a resumed stage restores its last checkpoint (weights,
    optimiser, schedule, random state) and drops the metrics of epochs after it; a fresh one drops its old metrics."""
    state = run.checkpoint_state() if resume else None
    if state is None or state.get("stage") != stage.name:  # an earlier stage's checkpoint is not ours
        if not resume and distributed.is_main():
            run.truncate_metrics(lambda r: r.get("stage") != stage.name)
        return 1, BestEpoch()
    run.load_checkpoint_weights(model, loss_fn)
    optimizer.load_state_dict(state["optimizer"])
    if "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    done = int(state["epoch"])
    best_epoch = int(state.get("best_epoch") or max(
        (r["epoch"] for r in run.metrics() if r.get("stage") == stage.name and r.get("saved")
         and r["epoch"] <= done), default=0))
    if distributed.is_main():
        run.truncate_metrics(lambda r: r.get("stage") != stage.name or r["epoch"] <= done)
    return done + 1, BestEpoch(float(state["best"]), best_epoch, state.get("best_tolerance"))


def _rank_fetcher(stage: Stage, pin: bool, holder: str | None = None) -> Callable[[tuple], tuple]:
    """What reads one minibatch of ``stage``: from the stores (:func:`token_batch`, pinned when ``pin``), or, with
    ``holder`` (``--store-device``), gathered from both stores held whole on that device (:class:`ResidentStore`)."""
    if holder is None:
        reads = [lambda idx, store=store: token_batch(store, idx, pin)
                 for store in (stage.anchor_store, stage.partner_store)]
    else:
        reads = [ResidentStore(store, holder, pin=pin and holder == "cpu").batch
                 for store in (stage.anchor_store, stage.partner_store)]

    def fetch(pair: tuple) -> tuple:
        """Both sides of this rank's part of one minibatch, read in the prefetch thread.

        A rank whose slice is empty (a global batch smaller than the world) reads one row it then drops, so that
        every rank runs the same forward and backward."""
        part = distributed.my_slice(len(pair[0]))
        if part.start == part.stop:
            part = slice(0, 1)
        return reads[0](pair[0][part]), reads[1](pair[1][part])

    return fetch


@dataclass
class FitStep:
    """One optimiser step of the fit loop on one global batch: the batch's contrastive loss
    (:func:`global_batch_loss`), the step, the learning-rate schedule and the temperature clamp. The benchmark
    suite times this same step."""

    encode_pair: nn.Module
    loss_fn: ContrastiveLoss
    optimizer: torch.optim.Optimizer
    device: str
    hint: str = "lower --lr or check the stores for non-finite values"
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    precision: str = "fp32"  # the forward's (loop.PRECISIONS); the loss is fp32
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scaler (loop.grad_scaler)

    def __call__(self, fetched: tuple, batch_len: int, where: str) -> float:
        """Train on ``fetched``, this rank's part of a global batch of ``batch_len`` pairs; returns the loss."""
        loss = global_batch_loss(self.encode_pair, self.loss_fn, fetched, batch_len, self.device, self.precision)
        value = optimiser_step(self.optimizer, loss, where, self.hint, self.scaler)
        if self.scheduler is not None:
            self.scheduler.step()
        self.loss_fn.clamp_temperature_()
        return value

    def on_pair_batch(self, batch: tuple, where: str) -> tuple[float, int]:
        """:func:`pipeline.training.loop.train_epoch`'s step on one prefetched ``((anchor rows, partner rows),
        fetched)``: the loss and the global batch size."""
        (a_idx, _), fetched = batch
        return self(fetched, len(a_idx), where), len(a_idx)


def run_stage(run: RunDir, model: nn.Module, loss_fn: ContrastiveLoss, stage: Stage, resume: bool,
              progress: bool = True, on_epoch: Callable[[int, nn.Module], dict] | None = None) -> dict:
    """Train ``stage`` and return its closing summary. The run config must already be written.

    ``on_epoch(epoch, model)``: extra numbers recorded under ``monitor`` in the epoch's metrics (e.g. recall on a
    held-out set, for studying model selection); it never influences training or selection."""
    trainee = prepare_stage(run, model, loss_fn, stage, resume, on_epoch)
    if isinstance(trainee, dict):
        return trainee
    return train_together([trainee], progress)[0]


@dataclass
class Trainee:
    """One model the fit loop trains: its run, stage, step, kept epoch and its own global random state, swapped in
    around everything it does (:class:`RandomState`), so that models trained side by side on the same batches
    (``fit-up --sweep``) draw the dropout masks each would draw alone."""

    run: RunDir
    model: nn.Module
    stage: Stage
    step: FitStep
    train_pairs: Pairs
    val_pairs: Pairs
    steps_per_epoch: int
    start_epoch: int
    best: BestEpoch
    train_modes: Callable[[], None]
    mix_after_warmup: float
    random_state: RandomState
    on_epoch: Callable[[int, nn.Module], dict] | None = None
    label: str | None = None  # prefix of its epoch lines when several train together
    summary: dict = field(default_factory=dict)

    def begin_epoch(self, epoch: int) -> None:
        cfg, loss_fn = self.stage.train, self.step.loss_fn
        with self.random_state:
            self.train_modes()
            loss_fn.target_mix = 1.0 if epoch <= cfg.warmup_epochs else self.mix_after_warmup
            if distributed.is_distributed():
                # Each rank draws its own dropout masks (same seeds would repeat one mask across ranks), reproducibly.
                torch.manual_seed(epoch_seed(cfg.seed, epoch) * 65_537 + distributed.rank())

    def train_step(self, batch: tuple, where: str) -> tuple[float, int]:
        with self.random_state:
            return self.step.on_pair_batch(batch, where)

    def end_epoch(self, epoch: int, loss: float, started: float, progress: bool) -> None:
        """Validate, record and keep (or not) the epoch's weights; print its line."""
        main, loss_fn = distributed.is_main(), self.step.loss_fn
        with self.random_state:
            val, nonfinite = _validate(self.model, self.stage, self.val_pairs) if main else ({}, [])  # rank 0 writes
            record = {
                "stage": self.stage.name, "epoch": epoch, "loss": loss, "temperature": loss_fn.temperature,
                "target_mix": loss_fn.target_mix, "steps": self.steps_per_epoch, "seconds": seconds_since(started),
                "lr": self.step.optimizer.param_groups[0]["lr"], "val": val,
            }
            if nonfinite:
                record["val_nonfinite_ids"] = nonfinite[:20]
            if self.on_epoch is not None and main:
                record["monitor"] = self.on_epoch(epoch, self.model)
            _close_epoch(self.run, self.model, self.step, self.stage, record, self.best)
        if progress and main:
            print((f"{self.label}: " if self.label else "") + _epoch_line(record), flush=True)
        self.summary = {**record, "selected_epoch": self.best.epoch, "selected_score": self.best.score}


def prepare_stage(run: RunDir, model: nn.Module, loss_fn: ContrastiveLoss, stage: Stage, resume: bool,
                  on_epoch: Callable[[int, nn.Module], dict] | None = None, label: str | None = None) -> Trainee | dict:
    """Everything before ``stage``'s first epoch (pairs, optimiser, schedule, resume point), or the closing summary
    of a resumed stage that had already finished. Its random state is the global one as it stands (after the
    caller's seeding and building, or the resumed checkpoint's)."""
    cfg = stage.train
    _check_schedule(cfg)
    return_freed_memory_to_the_os()
    pairs, train_pairs, val_pairs = checked_pairs(stage.anchor_store, stage.partner_store, cfg)
    if pairs.dropped and distributed.is_main():
        _report_dropped(run, stage, pairs)
    model.to(cfg.device)
    loss_fn.to(cfg.device)
    optimizer = build_optimizer(_trainable_parameters(model, loss_fn, stage.trainable), cfg)
    steps_per_epoch = epoch_steps(train_pairs, cfg.batch_size, cfg.sampling)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch * cfg.epochs)
    scaler = grad_scaler(cfg.precision, cfg.device)
    start_epoch, best = _resume_point(run, stage, model, loss_fn, optimizer, scheduler, resume, scaler)
    if start_epoch > cfg.epochs:
        return {"stage": stage.name, "epochs": cfg.epochs, "resumed_finished_run": True}
    # Under torchrun each rank reads and embeds only its contiguous slice of every global batch; the embeddings are
    # gathered with gradients, so the loss (and its gradient) is that of the whole global batch (pipeline/distributed).
    step = FitStep(distributed.pair_encoder(model, stage.anchor, stage.partner, cfg.device), loss_fn, optimizer,
                   cfg.device, f"the last good checkpoint in {run.checkpoints} is intact; lower --lr or check the "
                   "stores for non-finite values", scheduler, cfg.precision, scaler)
    holder = store_device_for(cfg.store_device, cfg.device)
    if holder is not None:
        check_fits([stage.anchor_store, stage.partner_store], holder)
    return Trainee(run, model, stage, step, train_pairs, val_pairs, steps_per_epoch, start_epoch, best,
                   _train_modes(model, stage.trainable), loss_fn.target_mix, RandomState(cfg.device), on_epoch, label)


def train_together(trainees: list[Trainee], progress: bool = True) -> list[dict]:
    """Train ``trainees`` epoch by epoch on the same batches, each batch read from the stores once and given to
    each in turn; returns their closing summaries. They must draw the same batches: the same stores, seed,
    validation split, batch size and sampling (one model: fit-up or fit-al; several: ``fit-up --sweep``)."""
    lead = trainees[0]
    cfg = lead.stage.train
    fetch = _rank_fetcher(lead.stage, pin=torch.device(cfg.device).type == "cuda",
                          holder=store_device_for(cfg.store_device, cfg.device))
    main = distributed.is_main()
    first = min(t.start_epoch for t in trainees)
    for epoch in range(first, max(t.stage.train.epochs for t in trainees) + 1):
        active = [t for t in trainees if t.start_epoch <= epoch <= t.stage.train.epochs]
        started = time.perf_counter()
        for trainee in active:
            trainee.begin_epoch(epoch)
        generator = epoch_generator(cfg.seed, epoch)  # same batches after a resume
        batches = epoch_batches(lead.train_pairs, cfg.batch_size, generator, cfg.sampling)
        steps = progress_bar(prefetched(batches, fetch), total=lead.steps_per_epoch,
                             desc=f"[{lead.stage.name}] epoch {epoch}", unit="step", enabled=progress and main,
                             leave=False)  # only on a terminal
        losses = train_epoch(steps, partial(_train_steps, active), f"at epoch {epoch}")
        for trainee, loss in zip(active, losses, strict=True):
            trainee.end_epoch(epoch, float(loss), started, progress)
    for trainee in trainees:
        trainee.step.loss_fn.target_mix = trainee.mix_after_warmup
    distributed.barrier()  # the run directory is complete (rank 0's last checkpoint) before any rank returns
    return [t.summary for t in trainees]


def _train_steps(trainees: list[Trainee], batch: tuple, where: str) -> tuple[np.ndarray, int]:
    """One batch, trained on by each of ``trainees`` in turn: their losses and the batch size."""
    results = [t.train_step(batch, where) for t in trainees]
    return np.array([value for value, _ in results], dtype=np.float64), results[0][1]


def _close_epoch(run: RunDir, model: nn.Module, step: FitStep, stage: Stage, record: dict, best: BestEpoch) -> None:
    """Keep the epoch's weights if it is the best so far (without validation: the last epoch), then (rank 0)
    append its metrics and write its checkpoint."""
    loss_fn = step.loss_fn
    main = distributed.is_main()
    if best.offer_validation(record["val"], stage.train.select, record["epoch"]):
        record["saved"] = True
        if main:
            run.save_model(model, loss_fn)
    if main:
        run.append_metrics(record)
        run.save_checkpoint(model, loss_fn, {"stage": stage.name, "epoch": record["epoch"], "best": best.score,
                                             "best_tolerance": best.tolerance, "best_epoch": best.epoch,
                                             "optimizer": step.optimizer.state_dict(),
                                             "scheduler": step.scheduler.state_dict() if step.scheduler else None,
                                             **({"scaler": step.scaler.state_dict()} if step.scaler else {}),
                                             "rng": torch.get_rng_state()},
                            tag=f"epoch-{record['epoch']:04d}")


def _epoch_line(record: dict) -> str:
    val = record["val"]
    parts = [f"tau {record['temperature']:.4f}", *retrieval_parts(val)]
    if val.get("nonfinite"):
        parts.append(f"({val['nonfinite']} non-finite val items left out, e.g. {record['val_nonfinite_ids'][0]!r})")
    if record.get("saved"):
        parts.append("*")
    return epoch_line(record["stage"], record["epoch"], record["loss"], parts, record["seconds"])



def head_config(head: str, input_dims: dict[str, int], **options):
    """The config of a registered head, taking only the options that head has (e.g. ``blocks`` for the UP)."""
    if head not in HEADS:
        raise TrainingError(f"unknown head {head!r}; choose one of {sorted(HEADS)}")
    config_class = HEADS[head].config_class
    known = {f.name for f in fields(config_class)}
    try:
        return config_class(input_dims=input_dims, **{k: v for k, v in options.items() if k in known})
    except ValueError as err:  # a bad option value: one line naming it, not a traceback
        raise TrainingError(f"--head {head}: {err}") from err


def fit_up(
    image_store: Path | str,
    text_store: Path | str,
    out: Path | str,
    *,
    head: str = "up",
    width: int = 256,
    blocks: int = 4,
    fusion: str = "add",
    cls_token: bool | None = None,
    pooled_skip: bool = True,
    loss: LossConfig | None = None,
    train: TrainConfig | None = None,
    head_options: dict | None = None,
    preset: dict | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_epoch: Callable[[int, nn.Module], dict] | None = None,
) -> dict:
    """Step 1 (Algorithm 1): train the Universal Projection (or another registered ``head``: dfe, freeze-align,
    linear) on image-text pairs read from two stores. ``blocks``, ``fusion``, ``pooled_skip`` (UPConfig; False:
    the paper's UP) and ``head_options`` (other config fields, e.g. ``dropout``, ``pool``) apply to heads that have
    them. ``on_epoch``: see :func:`run_stage`.

    ``cls_token`` (freeze-align): whether the image tokens start with a CLS token, which then gets the projector's
    own CLS branch instead of being averaged with the patches; None: read from the image store (an encoder known to
    prepend one, :func:`extract.encoders.image_tokens_start_with_cls`). ``preset``: the record of the
    ``--preset`` the options came from (:func:`pipeline.training.presets.resolve_options`), kept with the stage.
    ``resume`` continues the run with its recorded configuration: options that differ from it are refused
    (:func:`check_resume`), except ``train.epochs`` (train longer) and where it runs."""
    images, texts = open_fit_up_stores(image_store, text_store)
    run, model, loss_fn, stage = setup_fit_up(images, texts, out, head=head, width=width, blocks=blocks,
                                              fusion=fusion, cls_token=cls_token, pooled_skip=pooled_skip, loss=loss,
                                              train=train, head_options=head_options, preset=preset, resume=resume,
                                              overwrite=overwrite)
    summary = run_stage(run, model, loss_fn, stage, resume=resume, progress=progress, on_epoch=on_epoch)
    return close_fit_up(run, summary)


def open_fit_up_stores(image_store: Path | str, text_store: Path | str) -> tuple[FeatureStore, FeatureStore]:
    """fit-up's image and text stores, refused when they hold another modality."""
    images, texts = FeatureStore.open(image_store), FeatureStore.open(text_store)
    for store, modality in ((images, "image"), (texts, "text")):
        if store.modality != modality:
            raise TrainingError(f"store {store.path} holds {store.modality!r} features, not {modality!r}")
    return images, texts


def setup_fit_up(images: FeatureStore, texts: FeatureStore, out: Path | str, *, head: str = "up", width: int = 256,
                 blocks: int = 4, fusion: str = "add", cls_token: bool | None = None, pooled_skip: bool = True,
                 loss: LossConfig | None = None, train: TrainConfig | None = None, head_options: dict | None = None,
                 preset: dict | None = None, resume: bool = False,
                 overwrite: bool = False) -> tuple[RunDir, nn.Module, ContrastiveLoss, Stage]:
    """Everything :func:`fit_up` does before training (options as there): the checked inputs, the run directory
    and its config, and the model built after seeding the global random state with the run's seed."""
    from extract.encoders import image_tokens_start_with_cls

    train, loss = train or TrainConfig(**FIT_UP_SCHEDULE), loss or LossConfig()
    checked_pairs(images, texts, train)  # every input is checked before the run directory is touched
    _check_placement(train, [images, texts])
    cls = image_tokens_start_with_cls(images.identity) if cls_token is None else bool(cls_token)
    model_config = head_config(head, {"image": images.dim, "text": texts.dim}, width=width, blocks=blocks,
                               fusion=fusion, cls_token={"image": cls}, pooled_skip=pooled_skip,
                               **(head_options or {})).to_dict()
    run = RunDir(out, tensorboard=train.tensorboard)
    stores = {"image": store_record(images), "text": store_record(texts)}
    stage_record: dict[str, Any] = {"name": "fit-up", "anchor": "image", "partner": "text", "train": asdict(train)}
    if preset is not None:
        stage_record["preset"] = preset
    asked = {
        "head": head,
        "model": model_config,
        "loss": asdict(loss),
        "modalities": {name: {"store": record, "stage": "fit-up", "status": "training"}
                       for name, record in stores.items()},
        "stages": [stage_record],
    }
    if resume and run.exists():
        config, train = _resumed_fit_up(run, asked, train, cls_token, preset)
    else:
        if run.exists() and not overwrite:
            raise RunError(f"{run.path} already holds a run; use --resume to continue it or --overwrite to replace it")
        distributed.barrier()  # every rank has seen the directory as it was before rank 0 replaces it
        if run.exists() and distributed.is_main():
            shutil.rmtree(run.path)
        config = asked
    distributed.barrier()
    if distributed.is_main():
        run.write_config(config)
    torch.manual_seed(train.seed)  # before building: initial weights follow --seed
    model, loss_fn = RunDir.build(config)
    return run, model, loss_fn, Stage("fit-up", "image", "text", images, texts, train)


def close_fit_up(run: RunDir, summary: dict) -> dict:
    """Mark the run's modalities aligned and record the kept epoch; :func:`fit_up`'s result."""
    if distributed.is_main():
        config = run.read_config()
        for name in ("image", "text"):
            config["modalities"][name]["status"] = "aligned"
        record_selection(config, "fit-up", summary)
        run.write_config(config)
    return {"run": str(run.path), **summary}


def _resumed_fit_up(run: RunDir, asked: dict, train: TrainConfig, cls_token: bool | None,
                    preset: dict | None) -> tuple[dict, TrainConfig]:
    """The recorded config of the fit-up run to resume and its training settings, after refusing other stores or
    options that differ from the recorded ones (:func:`check_resume`)."""
    config = run.read_config()
    for name, modality in asked["modalities"].items():
        record, before = modality["store"], config["modalities"][name]["store"]
        if before["key"] != record["key"] or before["dim"] != record["dim"]:
            raise RunError(
                f"cannot resume {run.path}: it was trained on {name} store {before['path']} (key {before['key']}),"
                f" not {record['path']} (key {record['key']})"
            )
    given = recorded_options(asked, "fit-up")
    if cls_token is None:  # not asked for: the recorded choice stands
        given.pop("cls_token", None)
    check_resume(run, recorded_options(config, "fit-up"), {**given, "preset": (preset or {}).get("name")})
    train = _resumed_train(config["stages"][0]["train"], train)
    config["stages"][0]["train"] = asdict(train)
    return config, train


def _resumed_train(recorded: dict[str, Any], asked: TrainConfig) -> TrainConfig:
    """The recorded training settings of a stage, with what a resume may change (:data:`RESUME_MAY_CHANGE`)
    taken from ``asked``."""
    known = {f.name for f in fields(TrainConfig)}
    kept = {k: v for k, v in recorded.items() if k in known and k not in RESUME_MAY_CHANGE}
    return TrainConfig(**kept, **{k: getattr(asked, k) for k in RESUME_MAY_CHANGE})


def fit_al(
    run_dir: Path | str,
    modality: str,
    store: Path | str,
    pivot: str,
    pivot_store: Path | str,
    *,
    al: str | None = None,
    train: TrainConfig | None = None,
    preset: dict | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Step 2 (Algorithm 2): align a new modality to an aligned pivot by training only its Alignment Layer and
    modality token; the UP, every other adapter and token, and the pivot stay frozen (byte-identical weights).

    ``al`` is the Alignment Layer kind (``linear``, ``mlp``; default: the head's own default, ``linear`` for the UP).
    The pivot's features go through the pivot's own (frozen) adapter, not the new AL: Algorithm 2 writes AL(X_m1),
    but an AL belongs to one modality and the pivot is already aligned. ``preset`` and ``resume`` as in
    :func:`fit_up`: a resume continues the stage's recorded configuration and refuses options that differ from it.
    """
    from pipeline.training.rundir import check_compatible

    train = train or TrainConfig(epochs=100, batch_size=64)  # Section IV-B: step 2 uses 100 epochs, batch 64
    run = RunDir(run_dir, tensorboard=train.tensorboard)
    config = run.read_config()
    new, pivot_features = FeatureStore.open(store), FeatureStore.open(pivot_store)
    if pivot == modality:
        raise TrainingError(f"the pivot must be another, already aligned modality than {modality!r}")
    check_compatible(config, pivot, pivot_features)
    if new.modality != modality:
        raise TrainingError(f"store {new.path} holds {new.modality!r} features, not {modality!r}")
    check_pivot_refs(new, pivot_features)
    checked_pairs(pivot_features, new, train)  # before the config or weights are touched
    _check_placement(train, [pivot_features, new])
    record = config["modalities"].get(modality)
    stage_name = f"fit-al:{modality}"
    if record is None:
        model, loss_fn, _ = run.load_model()
        torch.manual_seed(train.seed)  # the new Alignment Layer's initial weights follow --seed
        model.add_modality(modality, new.dim, al)
        al = model.config.adapters[modality]
        config["model"] = model.config.to_dict()
        config["modalities"][modality] = {"store": store_record(new), "stage": stage_name, "pivot": pivot, "al": al,
                                          "status": "training"}
        config["stages"].append({"name": stage_name, "anchor": pivot, "partner": modality, "train": asdict(train),
                                 "pivot_store": store_record(pivot_features),
                                 **({"preset": preset} if preset is not None else {})})
        # Config and weights agree at every moment: the bundle stays loadable even if training is interrupted.
        # Under torchrun the new layer's initial weights are rank 0's (DDP broadcasts them), the ones saved here;
        # every rank has read the config and weights before rank 0 rewrites them.
        distributed.barrier()
        if distributed.is_main():
            run.write_config(config)
            run.save_model(model, loss_fn)
    elif not resume:
        raise RunError(f"{run.path} already aligns {modality!r} (with pivot {record.get('pivot')!r}); "
                       "pass --resume to continue that training")
    else:
        if record["store"]["key"] != new.key:
            raise RunError(f"cannot resume: {modality} was being aligned from store {record['store']['path']} "
                           f"(key {record['store']['key']}), not {new.path} (key {new.key})")
        stage_record = next(s for s in config["stages"] if s["name"] == stage_name)
        check_resume(run, recorded_options(config, stage_name),
                     {**asdict(train), "al": al, "preset": (preset or {}).get("name")})
        train = _resumed_train(stage_record["train"], train)
        stage_record["train"] = asdict(train)
        distributed.barrier()
        if distributed.is_main():
            run.write_config(config)
        model, loss_fn, _ = run.load_model()
    trainable = model.freeze_for_alignment(modality)
    torch.manual_seed(train.seed)
    stage = Stage(stage_name, pivot, modality, pivot_features, new, train, trainable)
    summary = run_stage(run, model, loss_fn, stage, resume=resume, progress=progress)
    if distributed.is_main():
        config = run.read_config()
        config["modalities"][modality]["status"] = "aligned"
        record_selection(config, stage_name, summary)
        run.write_config(config)
    return {"run": str(run.path), "trainable_parameters": trainable, **summary}
