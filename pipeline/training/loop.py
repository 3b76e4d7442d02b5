"""What every training loop shares: fit-up / fit-al (:func:`pipeline.training.fit.run_stage`), fit-base, fit-vqa and the
probe / fine-tune (:func:`pipeline.evaluation.probe.classify`), and the benchmark suite's timed step.

One epoch of each trainer is the same few moves, each written once here: draw the epoch's batches from a
generator seeded by the run's seed and the epoch alone (:func:`epoch_generator`, so a resumed run draws the same
batches), one optimiser step per batch that stops on a non-finite loss before it touches the weights
(:func:`train_epoch`, :func:`optimiser_step`), score the epoch by the trainer's selection rule
(:func:`selection_score`), keep the best epoch (:class:`BestEpoch`) and print one line (:func:`epoch_line`).
What differs between trainers (what a batch is, what is evaluated, what is saved) stays in their own modules.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from pipeline.training.defaults import SELECTIONS
from stores import OneEncoderError

Batch = TypeVar("Batch")


class TrainingError(OneEncoderError, RuntimeError):
    """Training cannot start or cannot go on (bad inputs, non-finite loss)."""


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3  # AdamW settings of the paper (Section IV-B)
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 1e-3
    val_fraction: float = 0.1
    seed: int = 0
    sampling: str = "one-per-anchor"
    warmup_epochs: int = 0  # epochs with one-hot targets before the soft targets take over
    # Learning-rate schedule per step: "constant" (the paper's) or "cosine" (linear warm-up over lr_warmup of the
    # steps, then cosine to 0, as open_clip trains). fit-up defaults to cosine (FIT_UP_SCHEDULE, docs/training.md).
    lr_schedule: str = "constant"
    lr_warmup: float = 0.1
    # What picks the kept epoch on the validation split (SELECTIONS): "rsum" (sum of R@1/5/10 both ways),
    # "mean-rank" (mean rank of the true partner, both ways; finer on small validation splits) or "mean-rank-1se"
    # (the latest epoch within one standard error of the lowest mean rank; fit-up's default).
    select: str = "rsum"
    device: str = "cpu"
    tensorboard: bool = True  # also mirror metrics.jsonl into RUN/tb/ event files
    strict_pairs: bool = False  # refuse items whose partner is absent (e.g. failed extraction) instead of dropping them
    # The forward's precision (PRECISIONS): fp32, or autocast to bf16 / fp16 with the loss in fp32 (docs/training.md).
    precision: str = "fp32"
    # Where fit-up / fit-al hold the stores whole (STORE_DEVICES in pipeline/training/resident.py): none reads them
    # as the store's RAM budget says; cpu / cuda loads each once and gathers minibatches there.
    store_device: str = "none"


# ---- batches and steps -------------------------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s random draws: a function of the run's seed and the epoch only."""
    return seed * 1_000_003 + epoch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that draws epoch ``epoch``'s batches: the same batches after a resume."""
    return torch.Generator().manual_seed(epoch_seed(seed, epoch))


def build_optimizer(params: Iterable[Any], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with ``cfg``'s learning rate, betas and weight decay: every trainer's optimiser. ``params`` may be
    parameter groups, each with its own ``lr``."""
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


LR_SCHEDULES = ("cosine", "constant")


def lr_factor(step: int, total: int, schedule: str, warmup: float) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based) of ``total``."""
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    warm = max(1, round(warmup * total)) if warmup > 0 else 0
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step learning-rate schedule ``cfg.lr_schedule`` over ``total_steps`` optimiser steps."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg.lr_schedule, cfg.lr_warmup))


def optimiser_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, where: str, hint: str,
                   scaler: torch.amp.GradScaler | None = None) -> float:
    """One step on ``loss``, shared by every training loop; a non-finite loss stops training with a clear error
    before it can touch the weights. Returns the loss value. ``scaler`` (fp16, :func:`grad_scaler`) scales the
    loss before backward and skips a step whose gradients overflowed."""
    if not torch.isfinite(loss):
        raise TrainingError(f"loss became {loss.item()} {where}; stopping ({hint})")
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.item()


# ---- precision ---------------------------------------------------------------------------------------------------
PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: str) -> None:
    """Refuse a precision that is unknown or that ``device`` does not train in. fp16 needs CUDA: torch documents
    CPU autocast for bfloat16 (fp16's loss scaling is the GPU recipe), and CPUs run few fp16 kernels fast; bf16,
    with fp32's exponent range, needs no scaler and runs anywhere."""
    if precision not in PRECISIONS:
        raise TrainingError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp16" and torch.device(device).type != "cuda":
        raise TrainingError(f"--precision fp16 needs a CUDA device, not {device!r}: use --precision bf16 there")


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """The context a forward runs in: nothing for fp32, else ``torch.autocast`` to bf16 / fp16 on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_AUTOCAST_DTYPES[precision])


def grad_scaler(precision: str, device: str) -> torch.amp.GradScaler | None:
    """The loss scaler fp16 training needs against gradient underflow (on CUDA); None for fp32 and bf16."""
    return torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None


def train_epoch(batches: Iterable[Batch], step: Callable[[Batch, str], tuple[float, int]], where: str) -> float:
    """The mean loss of one epoch: ``step(batch, where)`` trains on each batch and returns its loss and its size;
    ``where`` names the epoch and the step in an error (``at epoch 3, step 7``)."""
    total, count = 0.0, 0
    for number, batch in enumerate(batches, 1):
        value, size = step(batch, f"{where}, step {number}")
        total += value * size
        count += size
    return total / max(count, 1)


class RandomState:
    """The global random state (CPU, and the device's on CUDA) of one model being trained, swapped in around its
    work: ``with state: ...`` runs with the model's own state and keeps where it left it. Models trained side by
    side then draw the dropout masks each draws alone; one model alone sees no difference. Starts from the global
    state as it stands."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(self.device) if self.cuda else None

    def __enter__(self) -> RandomState:
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu_state = torch.get_rng_state()
        if self.cuda:
            self.cuda_state = torch.cuda.get_rng_state(self.device)


# ---- choosing the kept epoch -------------------------------------------------------------------------------------
# How every trainer (fit-up, fit-al, fit-base) chooses the weights it keeps, by TrainConfig.select; recorded with
# each stage.
SELECTION_RULES = {
    "rsum": "best validation rsum (R@1 + R@5 + R@10, both directions, on the held-out anchors)",
    "mean-rank": "lowest validation mean rank of the true partner (mean of both directions, on the held-out anchors)",
    "mean-rank-1se": "the latest epoch whose validation mean rank of the true partner (mean of both directions, on "
                     "the held-out anchors) is within one standard error of the lowest",
}


def selection_rule(select: str) -> str:
    """The recorded wording of the rule ``select`` names."""
    return SELECTION_RULES[select] + "; the last epoch when there is no validation split"


def add_selection_scores(metrics: dict) -> dict:
    """Add the scores :func:`selection_score` and :func:`selection_tolerance` read (``rsum``, ``mean_rank``,
    ``mean_rank_se``) to validation retrieval metrics."""
    directions = [m for m in metrics.values() if isinstance(m, dict)]
    metrics["rsum"] = sum(m[k] for m in directions for k in ("R@1", "R@5", "R@10"))
    metrics["mean_rank"] = float(np.mean([m["mean_rank"] for m in directions]))
    # The mean of the directions' means, their errors taken as independent.
    metrics["mean_rank_se"] = float(np.sqrt(sum(m["mean_rank_se"] ** 2 for m in directions)) / len(directions))
    return metrics


def selection_score(val: dict, select: str, epoch: int) -> float:
    """Higher is better. Without validation the last epoch wins."""
    if not val:
        return float(epoch)
    if select in ("mean-rank", "mean-rank-1se"):
        return -val["mean_rank"]
    if select == "rsum":
        return val["rsum"]
    raise ValueError(f"select must be one of {SELECTIONS}, got {select!r}")


def selection_tolerance(val: dict, select: str) -> float | None:
    """How far below the best score a later epoch's may fall and still be kept: under ``mean-rank-1se`` one standard
    error of the validation mean rank (so ties keep the later epoch); None under the other rules, where a later
    epoch must beat the best. On a small validation split neighbouring epochs' mean ranks differ by less than their
    noise; the rule then keeps the end of the schedule, and an earlier epoch only when the split shows it better
    beyond that noise (docs/training.md, model selection)."""
    if select != "mean-rank-1se":
        return None
    return float(val["mean_rank_se"]) if val else 0.0


@dataclass
class BestEpoch:
    """The best score seen so far, with its tolerance (:func:`selection_tolerance`), and the kept epoch (0: none
    yet). A later epoch is kept when it beats the best score, or, when the best has a tolerance, when it falls
    short by no more than that; with none (None) it must beat the best, not equal it."""

    score: float = -math.inf
    epoch: int = 0
    tolerance: float | None = None

    def offer(self, score: float, epoch: int, tolerance: float | None = None) -> bool:
        """Keep ``epoch`` (of score ``score`` and tolerance ``tolerance``) if the rule says so; True when it does
        (its weights are to be saved)."""
        if score > self.score:
            self.score, self.tolerance, self.epoch = score, tolerance, epoch
            return True
        if self.tolerance is not None and score >= self.score - self.tolerance:
            self.epoch = epoch
            return True
        return False

    def offer_validation(self, val: dict, select: str, epoch: int) -> bool:
        """:meth:`offer` an epoch by its validation metrics ``val`` under the rule ``select`` (SELECTIONS)."""
        return self.offer(selection_score(val, select, epoch), epoch, selection_tolerance(val, select))


# ---- what an epoch reports ---------------------------------------------------------------------------------------
def seconds_since(started: float) -> float:
    """An epoch's duration as recorded (milliseconds)."""
    return round(time.perf_counter() - started, 3)


def retrieval_parts(val: dict, ks: Sequence[int] = (1, 5)) -> list[str]:
    """``image->text R@1 0.500 R@5 0.900`` for each direction of validation retrieval metrics."""
    return [direction + "".join(f" R@{k} {m[f'R@{k}']:.3f}" for k in ks)
            for direction, m in val.items() if isinstance(m, dict)]


def epoch_line(name: str | None, epoch: int, loss: float, parts: Iterable[str] = (), seconds: float | None = None,
               width: int = 3) -> str:
    """The line a trainer prints after each epoch: ``[name] epoch   3  loss 0.1234  <parts>  (1.2s)``."""
    line = (f"[{name}] " if name else "") + f"epoch {epoch:>{width}}  loss {loss:.4f}"
    line += "".join(f"  {part}" for part in parts)
    return line + (f"  ({seconds:.1f}s)" if seconds is not None else "")
