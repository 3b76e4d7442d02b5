"""``cli.py bench``: the performance suite, on data it generates itself (targets and findings: docs/benchmarks.md).

Everything runs through the real code paths: random tensors written with :class:`stores.StoreWriter`, real PNG
files decoded by :func:`extract.run.run_extraction`, randomly initialised ``transformers`` models saved with
``save_pretrained`` and loaded back by the extraction, minibatches from :meth:`stores.FeatureStore.get_batch` fed to
:class:`project.OneEncoder` and :class:`project.ContrastiveLoss`.

The machine this runs on may be shared, so absolute times drift and jump (5x between two runs of one training
step was seen). Every comparison therefore runs its variants side by side in one process, interleaved round by
round (A B, B A, A B, ...; :func:`interleaved`, the one timing helper), and reports the median of the per-round
ratios (:func:`ratios`); the ratio of least times, an estimate for a quiet machine, is reported beside it. Nothing
here asserts a timing; the table says pass or fail.
"""

from __future__ import annotations

import json
import math
import operator
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.training.prefetch import prefetched, to_device, token_batch

REPO = Path(__file__).resolve().parents[2]

# The head trained in P1 (and P3_small): a smaller UP than the paper's, so the suite finishes on a 2-core CPU. It
# has about a seventh of the FLOPs per token, so store overhead weighs MORE against it: stricter.
BENCH_UP = {"width": 128, "blocks": 2, "heads": 4}
# P3's head: what fit-up trains by default, the paper's UP (width 256, 4 blocks, 4 heads; UPConfig's defaults).
PAPER_UP: dict[str, int] = {}
IMAGE_TOKENS, IMAGE_DIM, TEXT_DIM = 197, 768, 768  # a ViT-B/16 image store and a BERT-base caption store
CAPTION_LENGTHS = (8, 40)  # uniform token counts of generated captions (COCO captions average ~12 words)
READ_BATCH = 256
# P5's shard size: the writer holds up to a shard or two in memory whatever the dataset's size, so N must span
# several shards or the N run has not reached that steady state and the ratio measures the buffer, not growth.
P5_SHARD_MB = 8


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does; ``full`` is the reported run, ``quick`` the CI smoke test."""

    name: str
    reps: int  # interleaved rounds per comparison
    p1_reps: int  # P1's rounds: one epoch ratio varies by +-0.07 round to round here, so its median needs more
    p1_images: int  # P1a: images (2 captions each) in the fixed + ragged token stores
    p1_batch: int
    p1_pooled_images: int  # P1b
    p1_pooled_batch: int
    vit_layers: int  # P2/P3 image encoder depth (ViT-Small has 12)
    p2_images: int
    p2_batch: int
    p3_steps: int  # P3 steps per epoch (batch p2_batch, images from the P2 set)
    p4_captions: int
    p5_items: int  # N of P5 (the second run has 4N)
    p6_items: int
    read_items: int  # random-read store size (items of 197x768)
    read_batches: int  # batches of 256 per timed call
    up_batch: int  # the GPU rows' paper-UP step: batch (fit-up's default in full)
    up_steps: int  # and its timed steps per round
    p8_epochs: int  # epochs of each P8 run (stores and batch of P1a)


SIZES = {
    "full": Sizes("full", reps=6, p1_reps=12, p1_images=256, p1_batch=64, p1_pooled_images=8192, p1_pooled_batch=256,
                  vit_layers=12, p2_images=128, p2_batch=32, p3_steps=3, p4_captions=10_000, p5_items=448,
                  p6_items=10_000, read_items=2048, read_batches=4, up_batch=128, up_steps=10, p8_epochs=2),
    "quick": Sizes("quick", reps=2, p1_reps=2, p1_images=16, p1_batch=8, p1_pooled_images=1024, p1_pooled_batch=256,
                   vit_layers=2, p2_images=32, p2_batch=16, p3_steps=1, p4_captions=1000, p5_items=32,
                   p6_items=1000, read_items=256, read_batches=1, up_batch=4, up_steps=1, p8_epochs=1),
}


# ---- results -----------------------------------------------------------------------------------------------------
@dataclass
class Metric:
    """One row of the table. ``passed`` is None for a metric reported without a target; ``value`` is None for a
    row not measured on this machine (the GPU rows without a CUDA device), ``notes`` saying why."""

    key: str
    name: str
    value: float | None
    unit: str
    target: str
    passed: bool | None
    notes: str
    details: dict[str, Any] = field(default_factory=dict)


_COMPARE = {"<=": operator.le, ">=": operator.ge, "<": operator.lt}


def _check(value: float, op: str, bound: float) -> bool:
    return bool(math.isfinite(value) and _COMPARE[op](value, bound))


def format_table(metrics: list[Metric]) -> str:
    """The one table: metric, measured, target, pass/fail, notes."""
    rows = [("metric", "measured", "target", "result", "notes")]
    for m in metrics:
        if m.value is None:
            value = "not measured"
        else:
            value = f"{m.value:.3g} {m.unit}".strip() if abs(m.value) < 1e4 else f"{m.value:,.0f} {m.unit}".strip()
        result = "info" if m.passed is None else ("pass" if m.passed else "FAIL")
        rows.append((f"{m.key} {m.name}", value, m.target, result, m.notes))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4] for r in rows]
    lines.insert(1, "-" * (sum(widths) + 8 + 5))
    return "\n".join(lines)


# ---- the timing helper -------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(variants: dict[str, Callable[[int], object]], rounds: int, device: str = "cpu",
                prepare: dict[str, Callable[[], object]] | None = None) -> dict[str, list[float]]:
    """Seconds of each variant in each of ``rounds`` rounds. Within a round the variants run back to back, in
    alternating order (A B, B A, ...), so the drift of a shared machine hits every variant alike. A variant is
    called with the round number (e.g. to run that round's training step); ``prepare[name]`` runs untimed first."""
    names, prepare = list(variants), prepare or {}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if name in prepare:
                prepare[name]()
            _sync(device)
            started = time.perf_counter()
            variants[name](r)
            _sync(device)
            times[name].append(time.perf_counter() - started)
    return times


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator/denominator: each round timed both side by side, so a burst of load from
    another job spoils a round or two, not the estimate."""
    return float(np.median(np.asarray(numerator) / np.asarray(denominator)))


def best_total(times: list[float], period: int = 1) -> float:
    """The least time of a whole. With ``period`` p, round r did piece r mod p of it (training step k of an
    epoch): each piece's least time over the repetitions, summed over the pieces (a best epoch)."""
    return sum(min(times[k::period]) for k in range(period))


def best_ratio(numerator: list[float], denominator: list[float], period: int = 1) -> float:
    """Ratio of the least times (:func:`best_total`) of two variants timed side by side."""
    return best_total(numerator, period) / best_total(denominator, period)


def ratios(numerator: list[float], denominator: list[float], period: int = 1) -> dict[str, float]:
    """``median``: :func:`median_ratio`, the reported value. ``best``: :func:`best_ratio`, what a quiet machine
    would give if each piece met a quiet moment in some repetition (with few repetitions it is the noisier one)."""
    return {"median": median_ratio(numerator, denominator), "best": best_ratio(numerator, denominator, period)}


# ---- generated data ----------------------------------------------------------------------------------------------
def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _caption(rng: random.Random) -> str:
    from extract.tiny import TINY_WORDS

    return " ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(6, 30)))


def make_png_dataset(root: Path, n_images: int, seed: int = 0, size: tuple[int, int] = (640, 480)) -> dict[str, Path]:
    """``n_images`` photo-sized PNG files (smooth colour fields plus noise, so decoding costs what a photo's does)
    with ``images.jsonl`` and ``captions.jsonl`` (two captions per image, each ``ref`` its image)."""
    from PIL import Image

    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, captions = [], []
    for i in range(n_images):
        coarse = Image.fromarray(nprng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)
        pixels = np.asarray(coarse, dtype=np.int16) + nprng.integers(-12, 13, (size[1], size[0], 3))
        name = f"images/im{i:05d}.png"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name)
        images.append({"id": f"im{i:05d}", "path": name})
        captions += [{"id": f"im{i:05d}-c{k}", "text": _caption(rng), "ref": f"im{i:05d}"} for k in range(2)]
    return {"images": write_jsonl(root / "images.jsonl", images), "captions": write_jsonl(root / "captions.jsonl",
                                                                                          captions)}


def _quiet_saves() -> None:
    """No "Writing model shards" progress bars in the bench output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def save_vit(directory: Path, layers: int) -> str:
    """A ViT-Small-sized ``ViTModel`` (224 px, patch 16 -> 197 tokens, hidden 384, 6 heads) with random weights."""
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    _quiet_saves()
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=layers,
                       num_attention_heads=6, intermediate_size=1536)
    ViTModel(config).save_pretrained(directory)
    ViTImageProcessorPil(do_resize=True, size={"height": 224, "width": 224}, do_rescale=True, do_normalize=True,
                         image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(directory)
    return str(directory)


def save_text_encoder(directory: Path) -> str:
    """A MiniLM-L6-sized ``BertModel`` (hidden 384, 6 layers, 12 heads) with random weights and the tiny
    WordPiece vocabulary of ``extract.tiny`` (the captions use only its words)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from extract.tiny import tiny_vocab

    _quiet_saves()
    directory.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocab()
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True,
                      model_max_length=64).save_pretrained(directory)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, max_position_embeddings=64)).save_pretrained(directory)
    return str(directory)


def write_random_store(path: Path, layout: str, n: int, dim: int, *, tokens: int | None = None,
                       lengths: np.ndarray | None = None, metas: list[dict] | None = None, seed: int = 0,
                       batch: int = 64, also: np.ndarray | None = None) -> Path:
    """A store of random fp16 features written through the real StoreWriter (``also``: the same values are copied
    into this array too, e.g. a memmap)."""
    from stores import StoreWriter

    gen = torch.Generator().manual_seed(seed)
    writer = StoreWriter.create(path, modality="image" if layout == "fixed" else "text", layout=layout, dim=dim,
                                tokens_per_item=tokens, dtype="float16", identity={"bench": path.name, "seed": seed},
                                overwrite=True)
    metas = metas or [{"id": f"x{i}"} for i in range(n)]
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        if layout == "pooled":
            writer.add_batch(metas[start:stop], torch.randn(stop - start, dim, generator=gen))
            continue
        lens = torch.full((stop - start,), tokens) if lengths is None else torch.as_tensor(lengths[start:stop])
        values = torch.randn(stop - start, int(lens.max()), dim, generator=gen).half()
        if also is not None:
            also[start:stop] = values.numpy()
        writer.add_batch(metas[start:stop], values, lens)
    writer.finish()
    return path


def caption_lengths(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(CAPTION_LENGTHS[0], CAPTION_LENGTHS[1] + 1, n)


# ---- shared pieces -----------------------------------------------------------------------------------------------
class Bench:
    """Working directory, sizes and device of one run, plus the generated inputs several measurements share."""

    def __init__(self, root: Path, sizes: Sizes, device: str):
        self.root, self.sizes, self.device = root, sizes, device
        self._cache: dict[str, Any] = {}

    def once(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    @property
    def media(self) -> dict[str, Path]:
        return self.once("media", lambda: make_png_dataset(self.root / "media", self.sizes.p2_images))

    @property
    def vit(self) -> str:
        return self.once("vit", lambda: save_vit(self.root / "models" / "vit-small", self.sizes.vit_layers))

    @property
    def text_encoder(self) -> str:
        return self.once("text_encoder", lambda: save_text_encoder(self.root / "models" / "minilm-sized"))


def _bench_head(input_dims: dict[str, int], device: str, up: dict[str, Any] = BENCH_UP, **changes: Any):
    """A P1/P3 head (UPConfig fields ``up``), loss and optimiser (the fit loop's builder with the paper's AdamW
    settings, constant learning rate), freshly seeded; ``changes`` override UPConfig fields (P3's dropout-0
    diagnostic)."""
    from pipeline.training.loop import TrainConfig, build_optimizer
    from project import ContrastiveLoss, OneEncoder, UPConfig

    torch.manual_seed(0)
    model = OneEncoder(UPConfig(input_dims=input_dims, **{**up, **changes})).to(device).train()
    loss = ContrastiveLoss(kind="infonce").to(device)
    optimizer = build_optimizer([*model.parameters(), *loss.parameters()], TrainConfig())
    return model, loss, optimizer


def _train_step(head, batch, device: str, precision: str = "fp32") -> None:
    """One step of the fit loop (:class:`pipeline.training.fit.FitStep`, the step ``run_stage`` runs) on a single-process
    batch ``((image tokens, mask), (text tokens, mask))``, its forward in ``precision``."""
    from pipeline.training.distributed import PairEncoder
    from pipeline.training.fit import FitStep

    model, loss_fn, optimizer = head
    FitStep(PairEncoder(model, "image", "text"), loss_fn, optimizer, device,
            precision=precision)(batch, len(batch[0][0]), "in the bench")


def _epoch_batches(image_store, text_store, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The index batches of one fit-up epoch (one caption per image), fixed by a seed: every variant sees these."""
    from pipeline.training.pairs import epoch_batches, pair_stores

    pairs = pair_stores(image_store, text_store)
    return list(epoch_batches(pairs, batch_size, torch.Generator().manual_seed(0), "one-per-anchor"))


def _fetch_from(image_store, text_store) -> Callable[[int, np.ndarray, np.ndarray], tuple]:
    """Reads a step's batches as the fit loop does (:func:`pipeline.training.prefetch.token_batch`)."""
    return lambda step, a, b: (token_batch(image_store, a), token_batch(text_store, b))


def _stepper(head, batches: list, fetch: Callable[[int, np.ndarray, np.ndarray], tuple],
             device: str) -> Callable[[int], None]:
    """Round ``r`` runs training step ``r mod steps``: epochs are timed step by step, so that the variants'
    steps run seconds apart rather than an epoch apart (the load of a shared machine swings within minutes)."""

    def step(r: int) -> None:
        k = r % len(batches)
        _train_step(head, fetch(k, *batches[k]), device)

    return step


def _best_epochs(times: dict[str, list[float]], steps: int) -> dict[str, float]:
    return {name: best_total(t, steps) for name, t in times.items()}


# ---- P1 ----------------------------------------------------------------------------------------------------------
def _training_overhead(bench: Bench, image_path: Path, text_path: Path, batch_size: int, label: str,
                       keys: tuple[str, str], disk_targeted: bool = True, cold_key: str | None = None) -> list[Metric]:
    """Epoch time reading minibatches from the stores the way the fit loop does (:func:`pipeline.training.prefetch.
    prefetched`: the next batches are read in a thread while this one trains), in RAM mode (the default at this
    size) and disk mode, over the same epoch with every batch already in RAM as torch tensors; same head, same
    batches. Whole epochs are interleaved (A B C, C B A, ...): prefetching only shows over an epoch. ``cold_key``
    adds disk mode with the stores' files evicted from the page cache before every epoch (untimed), as when a
    store is larger than RAM."""
    from stores import FeatureStore

    device, reps = bench.device, bench.sizes.p1_reps
    stores = FeatureStore.open(image_path), FeatureStore.open(text_path)
    on_disk = FeatureStore.open(image_path, ram_budget_gb=0), FeatureStore.open(text_path, ram_budget_gb=0)
    batches = _epoch_batches(*stores, batch_size)
    resident = [tuple(to_device(side, device) for side in _fetch_from(*stores)(0, a, b)) for a, b in batches]
    head = _bench_head({"image": stores[0].dim, "text": stores[1].dim}, device)

    def from_ram(_: int) -> None:
        for batch in resident:
            _train_step(head, batch, device)

    def from_stores(image_store, text_store) -> Callable[[int], None]:
        def epoch(_: int) -> None:
            read = _fetch_from(image_store, text_store)
            for _pair, batch in prefetched(batches, lambda pair: read(0, *pair)):
                _train_step(head, batch, device)

        return epoch

    def reads_only(_: int) -> None:  # what the prefetch thread has to hide in disk mode
        read = _fetch_from(*on_disk)
        for a, b in batches:
            read(0, a, b)

    def evict() -> list:
        return [store.evict_from_page_cache() for store in on_disk]

    epochs = {"in RAM": from_ram, "store, RAM mode": from_stores(*stores), "store, disk mode": from_stores(*on_disk),
              "disk reads alone": reads_only}
    prepare: dict[str, Callable[[], object]] = {}
    if cold_key:
        epochs |= {"store, disk mode, cold": from_stores(*on_disk), "disk reads alone, cold": reads_only}
        prepare = {"store, disk mode, cold": evict, "disk reads alone, cold": evict}
    for name, epoch in epochs.items():  # warm-up epoch: allocator, kernels, page cache
        prepare.get(name, lambda: None)()
        epoch(0)
    times = interleaved(epochs, reps, device, prepare=prepare)
    ram = ratios(times["store, RAM mode"], times["in RAM"])
    disk = ratios(times["store, disk mode"], times["in RAM"])
    read_share = median_ratio(times["disk reads alone"], times["in RAM"])
    steps = len(batches)
    what = (f"{reps} interleaved epochs x {steps} steps of batch {batch_size}, median epoch ratio; UP width "
            f"{BENCH_UP['width']} x {BENCH_UP['blocks']} blocks; median epoch in RAM {np.median(times['in RAM']):.2f}s")
    details = {"steps": steps, "batch": batch_size, "seconds": times, "ratios": {"ram": ram, "disk": disk, "reads_alone": read_share},
               "in_memory": [s.in_memory for s in stores], "store_items": [len(s) for s in stores],
               "store_mb": [round(s.nbytes / 2**20, 1) for s in stores]}
    metrics = [
        Metric(keys[0], f"cached-training overhead, {label}", ram["median"], "x", "<= 1.10",
               _check(ram["median"], "<=", 1.10),
               f"{what}; stores loaded whole into RAM (default under 4 GiB); best-of {ram['best']:.3f}", details),
        Metric(keys[1], f"cached-training overhead, {label}, disk mode", disk["median"], "x",
               "<= 1.10" if disk_targeted else "report", _check(disk["median"], "<=", 1.10) if disk_targeted else None,
               f"same, ram_budget_gb=0 (large-store path: TensorStore reads, prefetched), warm page cache; the "
               f"reads alone take {read_share:.3f} of the in-RAM epoch; best-of {disk['best']:.3f}"
               + ("" if disk_targeted else "; a pooled store is read from RAM unless it exceeds the RAM budget: this "
                  "row shows the fallback (docs/benchmarks.md, finding 13)"), details),
    ]
    if cold_key:
        metrics.append(_cold_metric(cold_key, label, times, evict(), what))
    return metrics


def _cold_metric(key: str, label: str, times: dict[str, list[float]], evicted: list, what: str) -> Metric:
    """The cold-page-cache row of :func:`_training_overhead`; without a way to evict (a platform without
    posix_fadvise) it is reported, not judged: its epochs read a warm cache."""
    cold = ratios(times["store, disk mode, cold"], times["in RAM"])
    cold_reads = median_ratio(times["disk reads alone, cold"], times["in RAM"])
    skipped = next((e.skipped for e in evicted if e.skipped), None)
    files, size = sum(e.files for e in evicted), sum(e.bytes for e in evicted)
    how = (f"eviction not possible ({skipped}): warm cache, not judged" if skipped else
           f"both stores' {files} files ({size / 2**20:.0f} MiB) evicted from the page cache before every epoch "
           "(fsync + POSIX_FADV_DONTNEED, untimed)")
    return Metric(key, f"cached-training overhead, {label}, disk mode, cold cache", cold["median"], "x",
                  "report" if skipped else "<= 1.10", None if skipped else _check(cold["median"], "<=", 1.10),
                  f"{what}; disk mode, {how}; the cold reads alone take {cold_reads:.3f} of the in-RAM epoch; "
                  f"best-of {cold['best']:.3f}",
                  {"ratios": {"cold": cold, "cold_reads_alone": cold_reads}, "evicted_files": files,
                   "evicted_bytes": size, "eviction_skipped": skipped, "seconds": times})


def token_stores(bench: Bench) -> tuple[Path, Path]:
    """P1a's stores: fixed 197x768 fp16 image tokens + ragged 768-wide caption tokens (2 captions per image)."""
    def build() -> tuple[Path, Path]:
        n = bench.sizes.p1_images
        root = bench.root / "p1-tokens"
        image = write_random_store(root / "image", "fixed", n, IMAGE_DIM, tokens=IMAGE_TOKENS,
                                   metas=[{"id": f"im{i}"} for i in range(n)])
        text = write_random_store(root / "text", "ragged", 2 * n, TEXT_DIM, lengths=caption_lengths(2 * n, 1),
                                  seed=1, metas=[{"id": f"im{i // 2}-c{i % 2}", "ref": f"im{i // 2}"}
                                                 for i in range(2 * n)])
        return image, text

    return bench.once("token_stores", build)


def measure_p1_tokens(bench: Bench) -> list[Metric]:
    """P1a: the token stores (:func:`token_stores`); P1a_cold the disk mode from a cold page cache."""
    image, text = token_stores(bench)
    return _training_overhead(bench, image, text, bench.sizes.p1_batch, "tokens", ("P1a", "P1a_disk"),
                              cold_key="P1a_cold")


def measure_p1_pooled(bench: Bench) -> list[Metric]:
    """P1b: pooled stores (one 768-wide vector per image and per caption)."""
    n = bench.sizes.p1_pooled_images
    root = bench.root / "p1-pooled"
    image = write_random_store(root / "image", "pooled", n, IMAGE_DIM, metas=[{"id": f"im{i}"} for i in range(n)],
                               batch=1024)
    text = write_random_store(root / "text", "pooled", 2 * n, TEXT_DIM, seed=1, batch=1024,
                              metas=[{"id": f"im{i // 2}-c{i % 2}", "ref": f"im{i // 2}"} for i in range(2 * n)])
    return _training_overhead(bench, image, text, bench.sizes.p1_pooled_batch, "pooled", ("P1b", "P1b_disk"),
                              disk_targeted=False)


# ---- P8 ----------------------------------------------------------------------------------------------------------
# P8's four configurations of the P1 head: one seed, so the sweep trains them together on batches read once.
P8_GRID = {"lr": [1e-3, 5e-4], "fusion": ["add", "attention"]}


def measure_p8_sweep(bench: Bench) -> Metric:
    """P8: ``fit-up --sweep`` of four configurations (:data:`P8_GRID`) / four separate ``fit_up`` runs of the same
    configurations, on P1a's token stores, each variant the whole job (stores opened, pairs, training, validation,
    the run directories written), interleaved round by round."""
    from pipeline.training.fit import TrainConfig, fit_up
    from pipeline.training.sweep import configured, fit_up_sweep, grid_configurations

    image, text = token_stores(bench)
    sizes, root = bench.sizes, bench.root / "p8"
    configurations = grid_configurations(P8_GRID)
    shared = {"width": BENCH_UP["width"], "blocks": BENCH_UP["blocks"],
              "train": TrainConfig(epochs=sizes.p8_epochs, batch_size=sizes.p1_batch, lr_schedule="cosine",
                                   select="mean-rank", device=bench.device, tensorboard=False)}

    def sweep(r: int) -> None:
        fit_up_sweep(image, text, root / f"sweep-{r}", configurations, progress=False, **shared)

    def separate(r: int) -> None:
        for k, options in enumerate(configurations):
            fit_up(image, text, root / f"separate-{r}-{k}", progress=False, **configured(options, shared))

    variants = {"sweep of 4": sweep, "4 separate runs": separate}
    for name, variant in variants.items():  # warm-up: allocator, kernels, page cache
        variant(-1 if name.startswith("sweep") else -2)
    times = interleaved(variants, sizes.reps, bench.device)
    shutil.rmtree(root, ignore_errors=True)
    ratio = ratios(times["sweep of 4"], times["4 separate runs"])
    notes = (f"{sizes.reps} interleaved rounds, median ratio; 4 configurations ({', '.join(P8_GRID)} of "
             f"{P8_GRID}), UP width {BENCH_UP['width']} x {BENCH_UP['blocks']} blocks, {sizes.p8_epochs} epoch(s) of "
             f"batch {sizes.p1_batch} on P1a's stores (RAM mode, fit-up's default at this size); median sweep "
             f"{np.median(times['sweep of 4']):.1f}s; best-of {ratio['best']:.3f}")
    return Metric("P8", "sweep of 4 / 4 separate fit-up runs", ratio["median"], "x", "<= 0.8",
                  _check(ratio["median"], "<=", 0.8), notes,
                  {"seconds": times, "ratios": ratio, "grid": P8_GRID, "epochs": sizes.p8_epochs})


# ---- P2 ----------------------------------------------------------------------------------------------------------
def image_store(bench: Bench) -> Path:
    """The ViT store of the generated images (P2 leaves it behind; a finished store makes this a no-op)."""
    from extract.run import run_extraction

    path = bench.root / "stores" / "vit-images"
    run_extraction(bench.media["images"], "image", bench.vit, path, batch_size=bench.sizes.p2_batch,
                   device=bench.device, progress=False)
    return path


def measure_p2_extraction(bench: Bench) -> Metric:
    """P2: run_extraction throughput (decode PNG, preprocess, forward, write) over the encoder's forward alone on
    pre-decoded batches: same model, batch size and device."""
    from extract.encoders import inference_context, load_encoder
    from extract.manifest import read_manifest
    from extract.run import default_workers, run_extraction

    s, device = bench.sizes, bench.device
    manifest, vit = bench.media["images"], bench.vit
    encoder = load_encoder(vit, "image", device=device)
    items = read_manifest(manifest)
    batches = [encoder.preprocessor(items[i : i + s.p2_batch]) for i in range(0, len(items), s.p2_batch)]
    store = bench.root / "stores" / "vit-images"

    def forward_only() -> None:
        with inference_context(device, "fp16"):  # what run_extraction uses for its default --dtype fp16
            for batch in batches:
                encoder.forward(batch)

    workers = default_workers(device)  # what `cli.py extract` uses unless told otherwise

    def end_to_end() -> None:
        run_extraction(manifest, "image", vit, store, batch_size=s.p2_batch, device=device, progress=False,
                       workers=workers)

    forward_only()  # warm-up
    times = interleaved({"forward": lambda _: forward_only(), "run_extraction": lambda _: end_to_end()}, s.reps,
                        device, prepare={"run_extraction": lambda: shutil.rmtree(store, ignore_errors=True)})
    ratio = ratios(times["forward"], times["run_extraction"])
    bound = 0.95 if device.startswith("cuda") else 0.8
    layers = f"{s.vit_layers} layers" + ("" if s.vit_layers == 12 else " (fewer than ViT-S's 12: --quick)")
    notes = (f"{device}; ViT-S-sized ({layers}), {len(items)} PNG 640x480, batch {s.p2_batch}, workers {workers} (auto), "
             f"{s.reps} rounds; median {len(items) / np.median(times['run_extraction']):.1f} vs "
             f"{len(items) / np.median(times['forward']):.1f} items/s, incl. model load; best-of {ratio['best']:.3f}")
    return Metric("P2", "extraction efficiency", ratio["median"], "x", f">= {bound}",
                  _check(ratio["median"], ">=", bound), notes,
                  {"seconds": times, "ratios": ratio, "items": len(items), "batch": s.p2_batch, "device": device,
                   "vit_layers": s.vit_layers, "workers": workers})


# ---- P3 ----------------------------------------------------------------------------------------------------------
def measure_p3_cached_vs_uncached(bench: Bench) -> list[Metric]:
    """P3: epoch time re-running both frozen encoders on raw media every step over epoch time from the cache,
    against the FLOP limit (encoders + head) / head for the same batches. P3 trains the paper's UP (fit-up's
    default); P3_small, reported beside it, the P1 head (docs/benchmarks.md, finding 12)."""
    from torch.utils.flop_counter import FlopCounterMode

    from extract.encoders import inference_context, load_encoder
    from extract.manifest import read_manifest
    from extract.run import run_extraction
    from stores import FeatureStore

    s, device = bench.sizes, bench.device
    images_path = image_store(bench)
    texts_path = bench.root / "stores" / "minilm-captions"
    run_extraction(bench.media["captions"], "text", bench.text_encoder, texts_path, batch_size=64, device=device,
                   progress=False)
    images, texts = FeatureStore.open(images_path), FeatureStore.open(texts_path)
    dims = {"image": images.dim, "text": texts.dim}
    image_items = {it.id: it for it in read_manifest(bench.media["images"])}
    caption_items = {it.id: it for it in read_manifest(bench.media["captions"])}
    image_encoder = load_encoder(bench.vit, "image", device=device)
    text_encoder = load_encoder(bench.text_encoder, "text", device=device)
    batches = _epoch_batches(images, texts, s.p2_batch)[: s.p3_steps]

    def encode_raw(step: int, a: np.ndarray, b: np.ndarray) -> tuple:
        """What training without a cache does every step: decode, preprocess and run both frozen encoders."""
        out = []
        for encoder, items in ((image_encoder, [image_items[images.ids[i]] for i in a]),
                               (text_encoder, [caption_items[texts.ids[i]] for i in b])):
            with inference_context(device, "fp16"):  # as the extraction runs them (autocast on CUDA only)
                tokens, lengths = encoder.forward(encoder.preprocessor(items))
            mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths.to(tokens.device)[:, None]
            out.append((tokens.float().clone(), mask))  # a copy: inference tensors cannot enter autograd
        return tuple(out)

    with FlopCounterMode(display=False) as counter:
        raw = encode_raw(0, *batches[0])
    encoder_flops = counter.get_total_flops()
    heads = {"P3": PAPER_UP, "P3_small": BENCH_UP}
    head_flops: dict[str, int] = {}
    steppers: dict[str, Callable[[int], None]] = {}
    for key, up in heads.items():
        head = _bench_head(dims, device, up)
        with FlopCounterMode(display=False) as counter:
            _train_step(_bench_head(dims, device, up), raw, device)  # a throwaway copy: the timed head starts fresh
        head_flops[key] = counter.get_total_flops()
        # Beside the two timed variants, a diagnostic that is not part of P3: the same head with dropout 0 says
        # how much of the cached step the dropout masks take (docs/benchmarks.md, findings 5 and 12).
        no_dropout = _bench_head(dims, device, up, dropout=0.0)
        steppers |= {f"{key} uncached": _stepper(head, batches, encode_raw, device),
                     f"{key} cached": _stepper(head, batches, _fetch_from(images, texts), device),
                     f"{key} cached, dropout 0": _stepper(no_dropout, batches, _fetch_from(images, texts), device)}
    # Every variant of both heads runs in every round (A B C ..., ... C B A), so the shares compare like with like.
    times = interleaved(steppers, s.reps * len(batches), device)
    return [_p3_metric(key, up, times, len(batches), encoder_flops, head_flops[key], s, device)
            for key, up in heads.items()]


def _p3_metric(key: str, up: dict[str, Any], all_times: dict[str, list[float]], steps: int, encoder_flops: int,
               head_flops: int, s: Sizes, device: str) -> Metric:
    from project import UPConfig

    config = UPConfig(input_dims={}, **up)
    times = {name.removeprefix(f"{key} "): t for name, t in all_times.items() if name.startswith(f"{key} ")}
    limit = (encoder_flops + head_flops) / head_flops
    speedup = ratios(times["uncached"], times["cached"], steps)
    fraction = speedup["median"] / limit
    unc, cached, cached0 = (np.asarray(times[k]) for k in ("uncached", "cached", "cached, dropout 0"))
    dropout_share = float(np.median(1 - cached0 / cached))
    # The share P3 would reach if the masks were free: the encoders' time of each round over the dropout-0 step.
    without_dropout = float(np.median((unc - cached + cached0) / cached0)) / limit
    # Achieved FLOP rates explain a miss: the limit assumes the head trains at the encoders' FLOP/s.
    encoders_s = float(np.median(unc - cached))
    rates = {"encoders_gflops": encoder_flops / 1e9 / encoders_s, "head_gflops": head_flops / 1e9 /
             float(np.median(cached))}
    which = "the paper's, fit-up's default" if key == "P3" else "the P1 head"
    notes = (f"UP width {config.width} x {config.blocks} blocks ({which}); "
             f"speedup {speedup['median']:.2f}x of FLOP limit {limit:.2f}x (encoders {encoder_flops / 1e9:.0f} + "
             f"head {head_flops / 1e9:.1f} GFLOP per step, head fwd+bwd); achieved {rates['encoders_gflops']:.0f} "
             f"GFLOP/s in the encoders vs {rates['head_gflops']:.0f} in the head; best-of "
             f"{100 * speedup['best'] / limit:.0f} %; dropout masks take {100 * dropout_share:.0f} % of the cached step "
             f"(vs the same head with dropout 0; without them {100 * without_dropout:.0f} %); {s.reps} epochs x "
             f"{steps} steps of batch {s.p2_batch}, ViT-S-sized {s.vit_layers} layers + MiniLM-sized text "
             f"encoder, {device}")
    target, passed = (">= 80 %", _check(fraction, ">=", 0.8)) if key == "P3" else ("report", None)
    return Metric(key, "cached vs uncached, share of FLOP limit" + ("" if key == "P3" else ", small head"),
                  100 * fraction, "%", target, passed, notes,
                  {"up": {"width": config.width, "blocks": config.blocks, "heads": config.heads},
                   "speedup": speedup, "flop_limit": limit, "encoder_flops": encoder_flops, "head_flops": head_flops,
                   "achieved": rates, "dropout_share": dropout_share, "share_without_dropout": without_dropout,
                   "seconds": times, "best_epoch_s": _best_epochs(times, steps), "steps": steps,
                   "batch": s.p2_batch})


# ---- P4 ----------------------------------------------------------------------------------------------------------
def _disk_usage(path: Path) -> tuple[int, int]:
    """(allocated bytes, apparent bytes) of every file under ``path``."""
    files = [f.stat() for f in path.rglob("*") if f.is_file()]
    return sum(getattr(f, "st_blocks", math.ceil(f.st_size / 4096) * 8) * 512 for f in files), sum(
        f.st_size for f in files)


def measure_p4_storage(bench: Bench) -> Metric:
    """P4: bytes on disk of a ragged caption store over the bytes of its real tokens in fp16 (no padding stored)."""
    n = bench.sizes.p4_captions
    lengths = caption_lengths(n, 4)
    path = write_random_store(bench.root / "p4-ragged", "ragged", n, TEXT_DIM, lengths=lengths, seed=4,
                              metas=[{"id": f"cap{i}", "ref": f"im{i // 2}"} for i in range(n)])
    allocated, apparent = _disk_usage(path)
    real = int(lengths.sum()) * TEXT_DIM * 2
    ratio = allocated / real
    notes = (f"{n} captions of {CAPTION_LENGTHS[0]}-{CAPTION_LENGTHS[1]} tokens x {TEXT_DIM} fp16, "
             f"{real / 2**20:.1f} MiB of tokens; allocated blocks incl. items.jsonl and manifests "
             f"(apparent size {apparent / real:.4f}x)")
    return Metric("P4", "storage, ragged store", ratio, "x", "<= 1.02", _check(ratio, "<=", 1.02), notes,
                  {"allocated_bytes": allocated, "apparent_bytes": apparent, "token_bytes": real, "items": n})


# ---- P5 and P6: fresh subprocesses ---------------------------------------------------------------------------------
_CHILD = """
import json, os, sys, time
started = time.perf_counter()
sys.path.insert(0, {repo!r})
from extract.run import run_extraction
imported = time.perf_counter()
result = run_extraction(**json.loads({kwargs!r}))
done = time.perf_counter()
status = open("/proc/self/status").read() if os.path.exists("/proc/self/status") else ""
hwm = [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")]
if not hwm:
    import resource
    hwm = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss]  # KiB on Linux
print(json.dumps({{"status": result.status, "items": result.items, "call_s": done - imported,
                  "import_s": imported - started, "peak_rss_kib": hwm[0]}}))
"""


def run_extraction_in_child(**kwargs: Any) -> dict[str, Any]:
    """``run_extraction(**kwargs)`` in a fresh interpreter: its timings, peak RSS, and the wall time including
    interpreter start-up."""
    code = _CHILD.format(repo=str(REPO), kwargs=json.dumps({k: str(v) if isinstance(v, Path) else v
                                                            for k, v in kwargs.items()}))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=1800)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-4000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def measure_p5_memory(bench: Bench) -> Metric:
    """P5: peak RSS of an image extraction of 4N items over one of N items, each in a fresh process."""
    n = bench.sizes.p5_items
    vit = bench.once("vit1", lambda: save_vit(bench.root / "models" / "vit-1layer", 1))
    files = [json.loads(line)["path"] for line in bench.media["images"].read_text().splitlines()]
    runs = {}
    for count in (n, 4 * n):  # the same PNG files cycled: decoding stays real, generating stays cheap
        manifest = write_jsonl(bench.root / "media" / f"p5-{count}.jsonl",
                               [{"id": f"p5-{i}", "path": files[i % len(files)]} for i in range(count)])
        runs[count] = run_extraction_in_child(manifest=manifest, modality="image", encoder_spec=vit,
                                              store=bench.root / "stores" / f"p5-{count}", batch_size=32,
                                              device=bench.device, progress=False, shard_mb=P5_SHARD_MB)
    ratio = runs[4 * n]["peak_rss_kib"] / runs[n]["peak_rss_kib"]
    item_mb = IMAGE_TOKENS * 384 * 2 / 2**20
    notes = (f"{n} vs {4 * n} images (197x384 fp16 = {item_mb * n:.0f} vs {item_mb * 4 * n:.0f} MiB of features, "
             f"{P5_SHARD_MB} MiB shards, so both runs span many), 1-layer ViT-S-width encoder, workers 0; peak "
             f"{runs[n]['peak_rss_kib'] / 1024:.0f} vs {runs[4 * n]['peak_rss_kib'] / 1024:.0f} MiB")
    return Metric("P5", "memory, peak RSS 4N / N", ratio, "x", "<= 1.2", _check(ratio, "<=", 1.2), notes,
                  {str(k): v for k, v in runs.items()})


def measure_p6_noop(bench: Bench) -> Metric:
    """P6: a finished extraction started again (fresh process) finds its store up to date and returns."""
    from extract.run import run_extraction
    from extract.tiny import save_tiny_text_model

    n = bench.sizes.p6_items
    rng = random.Random(6)
    manifest = write_jsonl(bench.root / "media" / "p6-captions.jsonl",
                           [{"id": f"t{i}", "text": _caption(rng)} for i in range(n)])
    model = save_tiny_text_model(bench.root / "models" / "tiny-bert")
    store = bench.root / "stores" / "p6-text"
    kwargs = {"manifest": manifest, "modality": "text", "encoder_spec": model, "store": store, "batch_size": 256,
              "progress": False}
    run_extraction(**kwargs)  # the finished extract (not timed)
    runs = [run_extraction_in_child(**kwargs) for _ in range(max(1, bench.sizes.reps))]
    if any(r["status"] != "up-to-date" for r in runs):
        raise RuntimeError(f"P6: the re-run was not a no-op: {runs}")
    call = float(np.median([r["call_s"] for r in runs]))
    wall = float(np.median([r["wall_s"] for r in runs]))
    notes = (f"{n} text items, tiny BERT" + ("" if n >= 10_000 else " (fewer than 10k: --quick)") +
             f"; the run_extraction call; whole command incl. interpreter start and imports {wall:.2f}s "
             f"(imports {np.median([r['import_s'] for r in runs]):.2f}s)")
    return Metric("P6", "no-op re-run", call, "s", "< 2 s", _check(call, "<", 2.0), notes,
                  {"runs": runs, "items": n})


# ---- random reads ------------------------------------------------------------------------------------------------
def measure_random_reads(bench: Bench) -> Metric:
    """Samples/s of ``get_batch`` in disk mode (batches of 256 random indices, fp16 out so no cast is timed)
    next to zarr-python reading the same store and a numpy memmap of the same bytes."""
    from stores import FeatureStore

    n, s = bench.sizes.read_items, bench.sizes
    root = bench.root / "reads"
    root.mkdir(parents=True, exist_ok=True)
    memmap = np.lib.format.open_memmap(root / "tokens.npy", mode="w+", dtype=np.float16,
                                       shape=(n, IMAGE_TOKENS, IMAGE_DIM))
    path = write_random_store(root / "store", "fixed", n, IMAGE_DIM, tokens=IMAGE_TOKENS, also=memmap)
    memmap.flush()
    direct = FeatureStore.open(path, ram_budget_gb=0)
    via_zarr = FeatureStore.open(path, ram_budget_gb=0, fast_reads=False)
    rng = np.random.default_rng(7)
    rounds = [[rng.choice(n, READ_BATCH, replace=n < READ_BATCH) for _ in range(s.read_batches)]
              for _ in range(s.reps)]

    def reader(read: Callable[[np.ndarray], torch.Tensor]) -> Callable[[int], None]:
        def one_round(r: int) -> None:  # the same indices for every reader, round by round
            for idx in rounds[r]:
                read(idx)

        return one_round

    def from_memmap(idx: np.ndarray) -> torch.Tensor:
        order = np.argsort(idx)  # sorted gather, then back to batch order, like the store (numpy, like it too)
        return torch.from_numpy(memmap[idx[order]][np.argsort(order)])

    variants = {"get_batch": reader(lambda idx: direct.get_batch(idx, dtype=torch.float16)[0]),
                "zarr-python": reader(lambda idx: via_zarr.get_batch(idx, dtype=torch.float16)[0]),
                "memmap": reader(from_memmap)}
    for read in variants.values():  # warm-up round (page cache, first shard indexes)
        read(0)
    times = interleaved(variants, s.reps)
    rate = {name: READ_BATCH * s.read_batches / float(np.median(t)) for name, t in times.items()}
    notes = (f"{n} items of 197x768 fp16 ({n * IMAGE_TOKENS * IMAGE_DIM * 2 / 2**20:.0f} MiB), warm page cache; "
             f"memmap {rate['memmap']:,.0f}/s ({rate['get_batch'] / rate['memmap']:.2f}x of it), zarr-python "
             f"{rate['zarr-python']:,.0f}/s ({rate['get_batch'] / rate['zarr-python']:.0f}x slower than get_batch)")
    return Metric("read", "random reads, get_batch disk mode", rate["get_batch"], "samples/s", "report", None, notes,
                  {"samples_per_s": rate, "seconds": times, "items": n, "batch": READ_BATCH})


# ---- on a GPU ------------------------------------------------------------------------------------------------
GPU_ROWS = {
    "P1_gpu": ("cached-training overhead, tokens, GPU, stores resident on it", "x", "<= 1.05"),
    "P1_gpu_disk": ("cached-training overhead, tokens, GPU, disk mode, pinned prefetch", "x", "<= 1.05"),
    "UP_bf16": ("paper's UP training step under bf16 autocast, GPU", "images/s", "report"),
}


def gpu_overhead_times(bench: Bench, device: str) -> dict[str, Any]:
    """P1a's epoch on ``device`` three ways, interleaved: every batch already on the device as float32 (the
    bound), gathered from the stores held whole on the device (``--store-device``), and read from disk in the
    prefetch thread into pinned memory (``ram_budget_gb=0``, pinned when ``device`` is CUDA), as the fit loop
    does; same head (the P1 UP), same batches, fp32."""
    from pipeline.training.resident import ResidentStore
    from stores import FeatureStore

    image_path, text_path = token_stores(bench)
    stores = FeatureStore.open(image_path), FeatureStore.open(text_path)
    on_disk = FeatureStore.open(image_path, ram_budget_gb=0), FeatureStore.open(text_path, ram_budget_gb=0)
    batches = _epoch_batches(*stores, bench.sizes.p1_batch)
    pin = torch.device(device).type == "cuda"
    on_device = [tuple(to_device(side, device) for side in _fetch_from(*stores)(0, a, b)) for a, b in batches]
    resident = ResidentStore(stores[0], device), ResidentStore(stores[1], device)
    head = _bench_head({"image": stores[0].dim, "text": stores[1].dim}, device)

    def epoch(fetch: Callable[[tuple], tuple] | None) -> Callable[[int], None]:
        def run(_: int) -> None:
            source = ((None, b) for b in on_device) if fetch is None else prefetched(batches, fetch)
            for _pair, batch in source:
                _train_step(head, batch, device)

        return run

    epochs = {"on the device": epoch(None),
              "resident": epoch(lambda pair: (resident[0].batch(pair[0]), resident[1].batch(pair[1]))),
              "disk, pinned": epoch(lambda pair: (token_batch(on_disk[0], pair[0], pin),
                                                  token_batch(on_disk[1], pair[1], pin)))}
    for run in epochs.values():  # warm-up epoch: allocator, kernels, page cache
        run(0)
    times = interleaved(epochs, bench.sizes.p1_reps, device)
    return {"seconds": times, "steps": len(batches), "batch": bench.sizes.p1_batch,
            "resident_bytes": [r.nbytes for r in resident],
            "resident": ratios(times["resident"], times["on the device"]),
            "disk": ratios(times["disk, pinned"], times["on the device"])}


def up_step_rates(bench: Bench, device: str) -> dict[str, Any]:
    """Images/s of the paper's UP (fit-up's default head) training step on ``device`` under bf16 autocast and in
    fp32, interleaved, on random 197x768 image / 8-40 x 768 caption batches already on the device."""
    s = bench.sizes
    gen = torch.Generator().manual_seed(0)
    lengths = torch.from_numpy(caption_lengths(s.up_batch, 2))
    text_mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    batch = ((torch.randn(s.up_batch, IMAGE_TOKENS, IMAGE_DIM, generator=gen),
              torch.ones(s.up_batch, IMAGE_TOKENS, dtype=torch.bool)),
             (torch.randn(s.up_batch, text_mask.shape[1], TEXT_DIM, generator=gen) * text_mask[..., None], text_mask))
    batch = tuple(to_device(side, device) for side in batch)
    dims = {"image": IMAGE_DIM, "text": TEXT_DIM}
    heads = {precision: _bench_head(dims, device, PAPER_UP) for precision in ("bf16", "fp32")}

    def steps(precision: str) -> Callable[[int], None]:
        def run(_: int) -> None:
            for _step in range(s.up_steps):
                _train_step(heads[precision], batch, device, precision)

        return run

    variants = {precision: steps(precision) for precision in heads}
    for run in variants.values():
        run(0)
    times = interleaved(variants, s.reps, device)
    rates = {p: s.up_batch * s.up_steps / float(np.median(t)) for p, t in times.items()}
    return {"images_per_s": rates, "bf16_speedup": rates["bf16"] / rates["fp32"], "seconds": times,
            "batch": s.up_batch, "steps": s.up_steps}


def measure_gpu(bench: Bench) -> list[Metric]:
    """The GPU rows: P1 with the stores resident on the GPU and from disk through pinned prefetch (target 1.05),
    and the paper UP step's images/s under bf16. Without a CUDA device they are reported, unmeasured."""
    device = bench.device
    if torch.device(device).type != "cuda":
        why = ("not measured: no CUDA device" if not torch.cuda.is_available() else
               f"not measured: the bench runs on {device} (--device cuda measures it)")
        return [Metric(key, name, None, unit, target, None, why) for key, (name, unit, target) in GPU_ROWS.items()]
    p1, up = gpu_overhead_times(bench, device), up_step_rates(bench, device)
    gpu = torch.cuda.get_device_name(torch.device(device))
    what = (f"{bench.sizes.p1_reps} interleaved epochs x {p1['steps']} steps of batch {p1['batch']}, median epoch "
            f"ratio against the same batches already on the GPU; UP width {BENCH_UP['width']} x "
            f"{BENCH_UP['blocks']} blocks, fp32; {gpu}")
    (name_r, unit_r, target_r), (name_d, unit_d, target_d), (name_u, unit_u, target_u) = GPU_ROWS.values()
    return [
        Metric("P1_gpu", name_r, p1["resident"]["median"], unit_r, target_r,
               _check(p1["resident"]["median"], "<=", 1.05),
               f"{what}; batches gathered from the stores held whole on the GPU "
               f"({sum(p1['resident_bytes']) / 2**20:.0f} MiB); best-of {p1['resident']['best']:.3f}", p1),
        Metric("P1_gpu_disk", name_d, p1["disk"]["median"], unit_d, target_d, _check(p1["disk"]["median"], "<=", 1.05),
               f"{what}; disk mode (TensorStore reads in the prefetch thread, pinned, copied non-blocking); "
               f"best-of {p1['disk']['best']:.3f}", p1),
        Metric("UP_bf16", name_u, up["images_per_s"]["bf16"], unit_u, target_u, None,
               f"paper's UP (width 256 x 4 blocks), batch {up['batch']} of 197x768 image tokens and 8-40 caption "
               f"tokens on the GPU, fwd+bwd+AdamW; fp32 {up['images_per_s']['fp32']:,.0f} images/s, bf16 "
               f"{up['bf16_speedup']:.2f}x of it; {gpu}", up),
    ]


# ---- the suite ---------------------------------------------------------------------------------------------------
MEASUREMENTS: list[Callable[[Bench], Metric | list[Metric]]] = [
    measure_p1_tokens, measure_p1_pooled, measure_p2_extraction, measure_p3_cached_vs_uncached, measure_p4_storage,
    measure_p5_memory, measure_p6_noop, measure_random_reads, measure_p8_sweep, measure_gpu,
]


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: how busy the (possibly shared) machine was."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def cpu_vendor() -> str:
    """``GenuineIntel``, ``AuthenticAMD``, ...: torch draws dropout masks with MKL (in parallel) on Intel CPUs only."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("vendor_id")),
                platform.processor())


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu_vendor": cpu_vendor(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_bench(mode: str = "full", out: Path | str = "bench.json", device: str = "auto",
              workdir: Path | str | None = None, echo: Callable[[str], object] = print,
              gpu_only: bool = False) -> dict[str, Any]:
    """Run every measurement (``gpu_only``: the GPU rows alone), print the table, write the JSON report to
    ``out``; return the report."""
    sizes = SIZES[mode]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    root = Path(tempfile.mkdtemp(prefix="oneencoder-bench-", dir=workdir))
    saved_env = {k: os.environ.get(k) for k in ("ONEENCODER_CACHE_DIR", "TOKENIZERS_PARALLELISM")}
    # Weight-hash cache inside the work dir: temporary models must not pile up in the user's cache.
    os.environ["ONEENCODER_CACHE_DIR"] = str(root / "cache")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started, load_before = time.perf_counter(), load_average()
    metrics: list[Metric] = []
    try:
        bench = Bench(root, sizes, device)
        for measure in [measure_gpu] if gpu_only else MEASUREMENTS:
            began = time.perf_counter()
            result = measure(bench)
            for metric in result if isinstance(result, list) else [result]:
                metric.details["measure_seconds"] = round(time.perf_counter() - began, 1)
                metrics.append(metric)
                value = "not measured" if metric.value is None else f"{metric.value:.4g} {metric.unit}"
                echo(f"  {metric.key}: {value} ({time.perf_counter() - began:.0f}s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    report = {"suite": "oneencoder-cache bench", "mode": mode, "device": device, "machine": machine(),
              "sizes": asdict(sizes), "bench_up": BENCH_UP, "seconds": round(time.perf_counter() - started, 1),
              "load_average": {"start": load_before, "end": load_average()},
              "metrics": {m.key: asdict(m) for m in metrics}}
    echo(format_table(metrics))
    echo(f"{mode} run on {device}, {report['machine']['cpus']} CPUs, load average {load_before} -> "
         f"{report['load_average']['end']}, {report['seconds']:.0f}s; report: {out}")
    Path(out).write_text(json.dumps(report, indent=2, default=float), encoding="utf-8")
    return report
