"""The extraction flow: manifest -> frozen encoder -> feature store, once per configuration.

One flow for one process and for torchrun: an :class:`ExtractionSpec` says what to extract; :func:`identify`
computes the cache identity (encoder identity, layer, stored dtype, what is kept, manifest hash, and for
audio/video the decoding options) before any model is loaded; :func:`plan` decides once what to do with the store
(up to date, create, replace, resume where and with which batch size); :func:`encode_batches` is the worker that
turns batches of items into rows of a store writer and knows no distribution. A distributor is the only thing
that differs between a single process (:class:`SequentialDistributor`: every batch into the store) and torchrun
(:class:`TorchrunDistributor`: batches grouped into parts, one rank per part, then assembled).

Decoding runs in DataLoader workers through the encoder's picklable preprocessor, so the model never waits on JPEG
decoding; the store's writer writes whole shards on its own thread, so the model never waits on the disk either.
An audio segment or video clip is stored as its own item (``"{id}#seg{k}"``, ``"{id}#clip{k}"``): the
preprocessor expands one manifest item into its parts, so a batch may hold more store items than manifest items;
failures to decode are recorded per manifest item.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils.data import DataLoader

from stores import DTYPES, OneEncoderError, as_torch_dtype

from .encoders import (
    EncoderNotCachedError,
    FrozenEncoder,
    encoder_identity,
    freeze,
    inference_context,
    load_encoder,
)
from .manifest import Item, ManifestError, manifest_sha256, read_manifest
from .media import AudioOptions, ImageOptions, VideoOptions
from .progress import progress_bar
from .ranks import barrier, broadcast_object, rank, world_size

__all__ = [
    "DTYPES", "ExtractionError", "ExtractionOptionsError", "ExtractionPlan", "ExtractionResult", "ExtractionSpec",
    "SequentialDistributor", "Target", "TorchrunDistributor", "encode_batches", "identify", "plan", "run_extraction",
    "run_spec",
]



class ExtractionError(OneEncoderError, RuntimeError):
    """An item failed with ``on_error="fail"``, or the encoder produced unusable output."""


class ExtractionOptionsError(ExtractionError, ValueError):
    """Audio/video options that do not make sense together (e.g. ``segment="split"`` without ``max_seconds``)."""


@dataclass
class ExtractionResult:
    """What a run did. ``status``: "written" or "up-to-date" (nothing was loaded or computed)."""

    status: str
    store: str
    items: int
    failed: int
    tokens: int
    bytes: int
    seconds: float
    key: str
    identity: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def items_per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


logger = logging.getLogger(__name__)


def _say(message: str, enabled: bool) -> None:
    if enabled:
        logger.info(message)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def _disk_full_error(error: OSError, store_path: str, kept: str) -> ExtractionError:
    """One line for a full disk instead of a traceback from deep inside a shard write."""
    return ExtractionError(f"the disk holding {store_path} is full ({error.strerror}). {kept}; free some space "
                           "and run the same command again to resume")


def recorded_spec(spec: str) -> str:
    """The encoder spec as a store records it for later commands (``encode``, zero-shot, repair), which may run in
    another directory: a local model directory or plugin file becomes absolute; hub ids and modules stay as given."""
    if os.path.isdir(spec):
        return os.path.abspath(spec)
    file, sep, name = spec.rpartition(":")
    if sep and file.endswith(".py") and os.path.isfile(file):
        return f"{os.path.abspath(file)}:{name}"
    return spec


def default_workers(device: str = "cpu") -> int:
    """Decoding workers for ``--workers auto``. On a CPU, half the cores (at most 8), so decoding overlaps the
    forward pass without starving the encoder's own threads (docs/benchmarks.md, P2). On a GPU the forward needs
    no CPU threads, so decoding gets every core but one of this process's share of the node (at most 16): decoding
    is then what keeps the GPU fed."""
    cores = os.cpu_count() or 2
    if torch.device(device).type == "cuda":
        per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        return min(16, max(1, per_process - 1))
    return min(8, max(1, cores // 2))


def _check_args(modality: str, dtype: str, keep: str, pool: str, on_error: str, batch_size: int, workers: int) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if keep not in ("tokens", "pooled"):
        raise ValueError(f"keep must be 'tokens' or 'pooled', not {keep!r}")
    if pool not in ("mean", "cls"):
        raise ValueError(f"pool must be 'mean' or 'cls', not {pool!r}")
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', not {on_error!r}")
    if batch_size < 1 or workers < 0:
        raise ValueError("batch_size must be >= 1 and workers >= 0")


def _check_items_for_modality(manifest: str, items: list[Item], modality: str) -> None:
    """Media items need a file; catching a text manifest passed as images here saves a whole failed run."""
    if modality in ("image", "audio", "video"):
        bad = [(it.line, f"{modality} modality needs 'path', this item has 'text'") for it in items if it.path is None]
        if bad:
            raise ManifestError(manifest, bad)


def _media_options(
    modality: str,
    sample_rate: int | str | None,
    max_seconds: float | None,
    segment: str,
    frames: int,
    sampling: str,
    fps: float | None,
    clips: int,
    resampler: str | None = None,
    bounds: dict[str, Any] | None = None,
) -> tuple[AudioOptions | None, VideoOptions | None, ImageOptions | None]:
    """The decoding options of the modality asked for (validated now, before any work); None for the others.
    ``bounds``: the size bounds asked for (``max_pixels``, ``max_decoded_seconds``, ``max_video_pixels``); one left
    out keeps its default."""
    given = {k: v for k, v in (bounds or {}).items() if v is not None}
    try:
        if modality == "audio":
            rate: Any = sample_rate  # "auto", digits or an int: AudioOptions normalises it
            limit = {k: given[k] for k in ("max_decoded_seconds",) if k in given}
            return AudioOptions(sample_rate=rate, max_seconds=max_seconds, segment=segment, resampler=resampler,
                                **limit), None, None
        if modality == "video":
            limit = {k: given[k] for k in ("max_video_pixels",) if k in given}
            return None, VideoOptions(frames=frames, sampling=sampling, fps=fps, clips=clips, **limit), None
        if modality == "image":
            return None, None, ImageOptions(**{k: given[k] for k in ("max_pixels",) if k in given})
    except ValueError as exc:
        raise ExtractionOptionsError(str(exc)) from None
    return None, None, None


def _sources(batch: dict[str, Any]) -> int:
    """Manifest items a batch accounts for (parts of one item count once), for the progress bar."""
    done = {it.source_id or it.id for it in batch["items"]}
    return len(done | {it.source_id or it.id for it, _ in batch.get("failed", ())})


def _pool(tokens: torch.Tensor, lengths: torch.Tensor, pool: str) -> torch.Tensor:
    """[B, L, D] -> [B, D]: masked mean over the real tokens only, or the first token."""
    if pool == "cls":
        return tokens[:, 0]
    mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths.to(tokens.device)[:, None]
    summed = (tokens.float() * mask[..., None]).sum(1)  # fp32 sum: fp16 sums of 512 tokens lose digits
    return summed / lengths.to(tokens.device).clamp(min=1)[:, None].float()


def _finite_rows(values: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Bool [B]: no inf/nan among the item's real values (fp16 overflows at 65504)."""
    ok = torch.isfinite(values)
    if values.dim() == 2:
        return ok.all(1)
    if lengths is not None:
        pad = torch.arange(values.shape[1], device=values.device)[None, :] >= lengths.to(values.device)[:, None]
        ok = ok | pad[..., None]
    return ok.flatten(1).all(1)


def _error_record(item: Item, reason: str) -> dict[str, Any]:
    record: dict[str, Any] = {"id": item.id, "path": item.path}
    if item.text is not None:
        record["text"] = item.text
    if item.source_id is not None:
        record["source_id"] = item.source_id
    record.update(line=item.line, reason=reason)
    return record


def _existing_summary(store: str) -> dict[str, Any]:
    """items/failed/tokens/bytes of a finished store, from its metadata (no token data is read)."""
    try:
        from stores import describe

        info = describe(store)
        summary = info.get("summary") or {}
        return {
            "items": int(info.get("items") or summary.get("items") or 0),
            "failed": int(summary.get("failed") or info.get("failed_items") or 0),
            "tokens": int(info.get("tokens") or summary.get("tokens") or 0),
            "bytes": int(summary.get("bytes") or 0),
        }
    except Exception:  # the summary is informative only; never fail a no-op over it
        return {"items": 0, "failed": 0, "tokens": 0, "bytes": 0}


def settings_from_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """:class:`ExtractionSpec` settings that reproduce the extraction a store's identity describes."""
    to_cli = {stored: cli for cli, stored in DTYPES.items()}
    settings: dict[str, Any] = {k: identity[k] for k in ("layer", "keep", "max_tokens") if k in identity}
    settings["dtype"] = to_cli.get(identity.get("dtype", "float16"), "fp16")
    if "pool" in identity:
        settings["pool"] = identity["pool"]
    for key, value in (identity.get("media") or {}).items():
        settings[key] = value
    frame_pool = (identity.get("encoder") or {}).get("frame_pool")
    if identity.get("modality") == "video" and frame_pool:
        settings["frame_pool"] = frame_pool
    return settings


def read_meta_summary(store: str) -> dict[str, Any]:
    """The summary a store recorded (at creation: expected items, batch size, manifest)."""
    from stores import read_meta

    meta = read_meta(store)
    return dict(meta.summary or {}) if meta else {}


def _software() -> dict[str, str]:
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }

# ---- what to extract -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractionSpec:
    """Everything one extraction is asked to do: built by ``cli.py extract``, by ``encode`` and zero-shot prompts
    (:meth:`like_store`, the settings a trained store was made with) and by ``stores verify --repair``.

    ``store`` may contain ``{key}``, replaced by the identity key (one store per configuration). A complete
    store with the same identity makes the run a no-op ("up-to-date"); a store made another way raises
    ``StoreMismatchError`` unless ``overwrite``. ``keep="pooled"`` stores one vector per item (``pool``: masked
    "mean" or "cls" = token 0). ``on_error="skip"`` records failed items in the store; ``"fail"`` raises
    :class:`ExtractionError` at the first one. ``encoder_options`` are extra keyword arguments for plugins.
    ``progress`` enables the progress (a bar on a terminal, else a line at a steady interval) and the summary
    lines, all through :mod:`logging` (logger ``extract.run``, ``extract.progress``; see :mod:`extract.progress`).
    ``commit_seconds``: what was encoded since the last whole shard is made durable at least this often (None:
    whole shards only), so a killed run resumes from there; the finished store does not depend on it.

    Audio (``docs/media.md``): ``sample_rate`` (None/"auto" = the encoder's), ``max_seconds``, ``segment``
    ("drop" the tail, or "split" into ``"{id}#seg{k}"`` items) and ``resampler`` (None/"auto": torchaudio when
    it loads, else PyAV's libswresample). Video: ``frames`` per clip, ``sampling``
    ("uniform" or "fps" with ``fps``), ``clips`` (> 1: ``"{id}#clip{k}"`` items) and, when the encoder is an
    image encoder (per-frame mode), ``frame_pool`` ("mean" or "keep"). These options are part of the identity
    for their modality and ignored for the others; ``batch_size`` counts manifest items, so with segments or
    clips a batch holds more rows.

    Size bounds (None: the default of :mod:`extract.media`): ``max_pixels`` of one image, ``max_decoded_seconds``
    of audio decoded at once, ``max_video_pixels`` of every sampled frame of one video together. A larger item is
    an error record with its reason; the bounds are part of the identity.

    The settings are checked when the spec is made, before any file is read.
    """

    manifest: str
    modality: str
    encoder_spec: str
    store: str
    batch_size: int = 32
    device: str = "cpu"
    dtype: str = "fp16"
    keep: str = "tokens"
    pool: str = "mean"
    layer: int = -1
    max_tokens: int | None = None
    workers: int = 0
    overwrite: bool = False
    shard_mb: float = 64
    commit_seconds: float | None = 60
    on_error: str = "skip"
    progress: bool = True
    encoder_options: dict[str, Any] | None = None
    sample_rate: int | str | None = None
    max_seconds: float | None = None
    segment: str = "drop"
    frames: int = 16
    sampling: str = "uniform"
    fps: float | None = None
    clips: int = 1
    frame_pool: str = "mean"
    resampler: str | None = None
    max_pixels: int | None = None
    max_decoded_seconds: float | None = None
    max_video_pixels: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "manifest", os.fspath(self.manifest))
        object.__setattr__(self, "store", os.fspath(self.store))
        _check_args(self.modality, self.dtype, self.keep, self.pool, self.on_error, self.batch_size, self.workers)
        self.media_options()  # a bad combination of decoding options fails now, before any work

    @classmethod
    def like_store(cls, identity: dict[str, Any], manifest: str | os.PathLike[str], modality: str,
                   encoder_spec: str, store: str | os.PathLike[str], **options: Any) -> ExtractionSpec:
        """The spec that extracts ``manifest`` exactly as the store with this cache ``identity`` was extracted;
        ``options``: the run's own settings (device, batch size, progress, ...)."""
        return cls(os.fspath(manifest), modality, encoder_spec, os.fspath(store),
                   **{**settings_from_identity(identity), **options})

    def media_options(self) -> tuple[AudioOptions | None, VideoOptions | None, ImageOptions | None]:
        """The decoding options of the spec's modality (validated); None for the others."""
        bounds = {"max_pixels": self.max_pixels, "max_decoded_seconds": self.max_decoded_seconds,
                  "max_video_pixels": self.max_video_pixels}
        return _media_options(self.modality, self.sample_rate, self.max_seconds, self.segment, self.frames,
                              self.sampling, self.fps, self.clips, self.resampler, bounds)

    def encoder_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`encoder_identity` and :func:`load_encoder` for this spec."""
        audio, video, image = self.media_options()
        return {"layer": self.layer, "max_tokens": self.max_tokens, "options": self.encoder_options, "audio": audio,
                "video": video, "frame_pool": self.frame_pool if self.modality == "video" else "mean", "image": image}


# ---- what to do with the store: decided once, before any encoding -------------------------------------------------
PARTS_PER_RANK = 4  # torchrun: parts (runs of whole batches) per rank at creation: some balance, few staging stores


@dataclass
class Target:
    """The store a spec writes: its cache identity and key, the path with ``{key}`` filled in, and the encoder
    when computing the identity had to load it (a hub id not yet downloaded)."""

    identity: dict[str, Any]
    key: str
    store_path: str
    encoder: FrozenEncoder | None = None


@dataclass(frozen=True)
class ExtractionPlan:
    """What a run does to its store. ``status``: "complete" (nothing to do), "absent", "mismatch" (replaced, as
    asked) or "incomplete" (resumed). ``batch_size``: the store's original one when resuming, so the result is
    byte-identical to an uninterrupted run. ``start``: the first manifest item a single process encodes.
    ``batches_per_part``: set for a store written in parts (torchrun, stores/parts.py)."""

    status: str
    batch_size: int
    start: int = 0
    batches_per_part: int | None = None
    shape: tuple[str, int, int | None] | None = None  # parts: the store's (layout, dim, tokens per item)


def read_items(spec: ExtractionSpec) -> list[Item]:
    """The manifest's items, checked against the modality (all validation before any model work)."""
    items = read_manifest(spec.manifest)
    _check_items_for_modality(spec.manifest, items, spec.modality)
    return items


def identify(spec: ExtractionSpec) -> Target:
    """The cache identity of the extraction ``spec`` asks for, computed before any model is loaded where it can."""
    from stores import identity_key

    encoder: FrozenEncoder | None = None
    kwargs = spec.encoder_kwargs()
    try:
        enc_ident = encoder_identity(spec.encoder_spec, spec.modality, **kwargs)
    except EncoderNotCachedError:
        # A hub id never downloaded: loading it downloads it, after which its files can be hashed.
        encoder = load_encoder(spec.encoder_spec, spec.modality, device=spec.device, **kwargs)
        enc_ident = encoder.identity()
    identity: dict[str, Any] = {
        "modality": spec.modality,
        "encoder": enc_ident,
        "layer": spec.layer,
        "dtype": DTYPES[spec.dtype],
        "keep": spec.keep,
        "max_tokens": spec.max_tokens,
        "manifest_sha256": manifest_sha256(spec.manifest),
    }
    media = next((m for m in spec.media_options() if m is not None), None)
    if media is not None:
        identity["media"] = media.identity()  # decoding options and size bounds; text has none
    if spec.keep == "pooled":
        identity["pool"] = spec.pool
    key = identity_key(identity)
    return Target(identity, key, spec.store.replace("{key}", key), encoder)


def plan(spec: ExtractionSpec, items: list[Item], target: Target, *, parts_of: int | None = None,
         talk: bool = True) -> ExtractionPlan:
    """Decide what to do with the target store. ``parts_of``: the world size when the store is written in parts
    (torchrun), None for one process writing batch after batch."""
    from stores import StoreWriter, store_status

    store_path = target.store_path
    status = store_status(store_path, target.identity, overwrite=spec.overwrite)
    if status == "complete":
        return ExtractionPlan(status, spec.batch_size)
    if status == "mismatch":
        _say(f"replacing store {store_path}: it was built differently (overwrite requested)", talk)
    if status != "incomplete":
        per_part = None
        if parts_of is not None:
            batches = math.ceil(len(items) / spec.batch_size)
            per_part = max(1, math.ceil(batches / (parts_of * PARTS_PER_RANK)))
        return ExtractionPlan(status, spec.batch_size, batches_per_part=per_part)
    # Resume: keep every shard that matches its manifest entry and restart at the batch boundary of the original
    # run (same batch size), so re-extracted items give the same bytes as an uninterrupted run.
    recorded = read_meta_summary(store_path)
    if parts_of is not None and "distributed" not in recorded:
        raise ExtractionError(f"store {store_path} was started by a single-process extraction: resume it with one "
                              "process (python cli.py extract ...), not under torchrun")
    batch_size = int(recorded.get("batch_size") or spec.batch_size)
    if batch_size != spec.batch_size:
        _say(f"resuming with the store's original batch size {batch_size} (not {spec.batch_size}) so the "
             "result is identical to an uninterrupted run", talk)
    if parts_of is not None:
        _say(f"store {store_path} is incomplete: resuming; finished parts are kept, the others redone", talk)
        return ExtractionPlan(status, batch_size, batches_per_part=int(recorded["distributed"]["batches_per_part"]))
    done_line = StoreWriter.progress(store_path)["last_line"]
    first_missing = next((i for i, item in enumerate(items) if item.line > done_line), len(items))
    start = first_missing // batch_size * batch_size
    _say(f"store {store_path} is incomplete: resuming at item {start + 1} of {len(items)} "
         f"(items before it are on disk and verified)", talk)
    return ExtractionPlan(status, batch_size, start=start)


def ready_encoder(spec: ExtractionSpec, encoder: FrozenEncoder | None) -> FrozenEncoder:
    """The spec's encoder (loaded unless given), checked to encode the spec's modality, frozen."""
    if encoder is None:
        encoder = load_encoder(spec.encoder_spec, spec.modality, device=spec.device, **spec.encoder_kwargs())
    if encoder.modality != spec.modality:
        raise ExtractionError(f"encoder {spec.encoder_spec!r} encodes {encoder.modality!r}, not {spec.modality!r}")
    model = getattr(encoder, "model", None)
    if isinstance(model, torch.nn.Module):
        freeze(model)  # idempotent; guards plugins that forgot
    return encoder


def store_layout(spec: ExtractionSpec, encoder: FrozenEncoder) -> str:
    """One vector per item when pooled; else fixed when the encoder gives every item the same token count."""
    return "pooled" if spec.keep == "pooled" else ("fixed" if encoder.fixed_tokens is not None else "ragged")


def open_store(spec: ExtractionSpec, decided: ExtractionPlan, items: list[Item], target: Target,
               encoder: FrozenEncoder) -> Any:
    """The writer of the target store: reopened to resume, or created (replacing a mismatch when asked)."""
    from stores import StoreWriter

    store_path, parted = target.store_path, decided.batches_per_part is not None
    if decided.status == "incomplete":
        if parted:
            return StoreWriter.reopen_parts(store_path, shard_mb=spec.shard_mb)
        restart_line = items[decided.start].line if decided.start < len(items) else None
        return StoreWriter.reopen(store_path, restart_line=restart_line, shard_mb=spec.shard_mb,
                                  commit_seconds=spec.commit_seconds)
    layout = store_layout(spec, encoder)
    extraction: dict[str, Any] = {"expected_items": len(items), "batch_size": decided.batch_size,
                                  "manifest": os.path.abspath(spec.manifest)}
    if parted:  # the final store receives whole parts; only the parts' writers commit as they go
        extraction["distributed"] = {"batches_per_part": decided.batches_per_part}
    return StoreWriter.create(
        store_path, modality=spec.modality, layout=layout, dim=int(encoder.dim),
        tokens_per_item=encoder.fixed_tokens if layout == "fixed" else None, dtype=DTYPES[spec.dtype],
        identity=target.identity, shard_mb=spec.shard_mb, overwrite=decided.status == "mismatch",
        extraction=extraction, commit_seconds=None if parted else spec.commit_seconds,
    )


def _finish_extra(spec: ExtractionSpec, batch_size: int) -> dict[str, Any]:
    """What the finished store records about how it was made, for later commands (encode, zero-shot, repair)."""
    return {"encoder_spec": recorded_spec(spec.encoder_spec), "device": spec.device, "batch_size": batch_size,
            "software": _software()}


# ---- the worker: batches of items -> rows of a store writer (knows no distribution) ------------------------------


def _encode_batch(batch: dict[str, Any], encoder: FrozenEncoder, spec: ExtractionSpec, layout: str
                  ) -> tuple[list[Item], torch.Tensor | None, torch.Tensor | None, list[tuple[Item, str]]]:
    """One preprocessed batch through the encoder: (good items, values, lengths, failures). Rows that are not
    finite in the stored dtype become failures."""
    failures: list[tuple[Item, str]] = list(batch.get("failed", ()))
    good: list[Item] = list(batch["items"])
    if not good:
        return good, None, None, failures
    store_dtype = DTYPES[spec.dtype]
    with inference_context(spec.device, spec.dtype):
        tokens, lengths = encoder.forward(batch)
    lengths = lengths.to(torch.int64)
    values = _pool(tokens, lengths, spec.pool) if layout == "pooled" else tokens
    values = values.to(as_torch_dtype(store_dtype))  # cast on the device: less to copy back
    ok = _finite_rows(values, None if layout == "pooled" else lengths).cpu()
    if not bool(ok.all()):
        for item in (it for it, fine in zip(good, ok.tolist(), strict=True) if not fine):
            failures.append((item, f"non-finite features (inf/nan) in {store_dtype}"))
        keep_idx = ok.nonzero().flatten()
        good = [good[i] for i in keep_idx.tolist()]
        values, lengths = values[keep_idx.to(values.device)], lengths[keep_idx.to(lengths.device)]
    return good, values, lengths, failures


def encode_batches(writer: Any, items: list[Item], encoder: FrozenEncoder, bar: Any, spec: ExtractionSpec, *,
                   batch_size: int, store_path: str) -> tuple[int, list[str]]:
    """Encode ``items`` in batches of ``batch_size`` (in manifest order) and append them to ``writer``.

    Returns the number of failed items and the first few failure reasons. The caller aborts the writer on error.
    """
    on_cuda = torch.device(spec.device).type == "cuda"
    if spec.workers > 0:
        # Fast tokenizers' own thread pool does not survive fork; workers already give the parallelism.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = DataLoader(
        items,  # a list is a map-style dataset; no shuffling keeps the store in manifest order
        batch_size=batch_size,
        shuffle=False,
        collate_fn=encoder.preprocessor,
        num_workers=spec.workers,
        pin_memory=on_cuda,
        persistent_workers=spec.workers > 0,
    )
    n_failed = 0
    first_failures: list[str] = []
    for batch in loader:
        sources = _sources(batch)
        good, values, lengths, failures = _encode_batch(batch, encoder, spec, writer.meta.layout)
        if failures and spec.on_error == "fail":
            item, reason = failures[0]
            where = item.path if item.path is not None else f"text {item.text!r}"
            raise ExtractionError(
                f"item {item.id!r} ({where}, {spec.manifest} line {item.line}) failed: {reason}. Stopping because "
                f"on_error='fail'; store {store_path} stays incomplete"
            )
        if failures:  # before the batch's items: the shard committing them then commits these errors too
            writer.add_errors([_error_record(item, reason) for item, reason in failures])
        if good:
            metas = [{**item.meta(), "line": item.line} for item in good]  # line: resume point
            writer.add_batch(metas, values.cpu(), lengths.cpu())
        n_failed += len(failures)
        first_failures.extend(f"{item.id!r}: {reason}" for item, reason in failures[: 3 - len(first_failures)])
        bar.update(sources)
        bar.set_postfix(failed=n_failed, refresh=False)
    return n_failed, first_failures


# ---- distribution strategies: who runs which batches of the same worker ------------------------------------------
# cli.py joins torchrun's process group (gloo: only control messages travel, a barrier and small pickled objects).


class SequentialDistributor:
    """One process: every batch, in order, straight into the store; a resumed run starts at its batch boundary."""

    def __init__(self, spec: ExtractionSpec) -> None:
        self.talk = spec.progress

    def prepare(self, spec: ExtractionSpec, items: list[Item], target: Target
                ) -> tuple[ExtractionPlan, Any, FrozenEncoder | None]:
        """(the plan, the store's writer, the ready encoder); no writer and no encoder when it is up to date."""
        decided = plan(spec, items, target, talk=self.talk)
        if decided.status == "complete":
            return decided, None, target.encoder
        encoder = ready_encoder(spec, target.encoder)
        return decided, open_store(spec, decided, items, target, encoder), encoder

    def encode(self, spec: ExtractionSpec, items: list[Item], decided: ExtractionPlan, encoder: FrozenEncoder,
               writer: Any, target: Target) -> dict[str, Any]:
        """Run the worker over the items not yet in the store, then finish the store; returns its summary."""
        bar = progress_bar(total=len(items), initial=decided.start, unit="item", desc=f"extract {spec.modality}",
                           enabled=self.talk)
        try:
            n_failed, first_failures = encode_batches(writer, items[decided.start:], encoder, bar, spec,
                                                      batch_size=decided.batch_size, store_path=target.store_path)
            if writer.items_written == 0:
                # An empty store trains nothing; every item failing almost always means a wrong manifest or encoder.
                raise ExtractionError(f"no item of {spec.manifest} could be encoded ({n_failed} failed), e.g. "
                                      f"{'; '.join(first_failures)}")
            bar.close()
            return writer.finish(extra=_finish_extra(spec, decided.batch_size))
        finally:
            bar.close()

    def share(self, summary: dict[str, Any]) -> dict[str, Any]:
        return summary

    def kept(self, store_path: str) -> str:
        from stores import StoreWriter

        return f"The {StoreWriter.progress(store_path)['items']} items written before are on disk and verified"

    def done_line(self, result: ExtractionResult) -> str:
        return (f"wrote {result.store} (key {result.key}): {result.items} items, {result.failed} failed, "
                f"{result.tokens} tokens, {_human_bytes(result.bytes)}, {result.seconds:.1f} s, "
                f"{result.items_per_second:.1f} items/s")


class TorchrunDistributor:
    """Every rank of a torchrun job writes part of one store, identical to a single-process run (stores/parts.py).

    Rank 0 plans, creates (or reopens) the store and holds its lock. The manifest's batches, exactly the batches a
    single process would run, are grouped into parts; part ``i`` is encoded by rank ``i mod world`` into a staging
    store by the same worker. Then each rank writes the final shards it owns from the parts, and rank 0 writes the
    tables and marks the store complete. A resumed run (any world size) keeps every finished part and verified
    shard and redoes the rest.
    """

    def __init__(self, spec: ExtractionSpec) -> None:
        self.rank, self.world = rank(), world_size()
        self.talk = spec.progress and self.rank == 0

    def prepare(self, spec: ExtractionSpec, items: list[Item], target: Target
                ) -> tuple[ExtractionPlan, Any, FrozenEncoder | None]:
        """Rank 0 decides (and opens the store) and tells the others; every rank then readies its encoder."""
        decided, writer, encoder = None, None, target.encoder
        if self.rank == 0:
            try:
                decided = plan(spec, items, target, parts_of=self.world, talk=self.talk)
                if decided.status != "complete":
                    encoder = ready_encoder(spec, encoder)
                    writer = open_store(spec, decided, items, target, encoder)
                    meta = writer.meta
                    decided = replace(decided, shape=(meta.layout, int(meta.dim), meta.tokens_per_item))
            except Exception as exc:
                broadcast_object({"error": str(exc)})
                raise
        decided = broadcast_object(decided)
        if isinstance(decided, dict):
            raise ExtractionError(f"rank 0 stopped the extraction: {decided['error']}")
        return decided, writer, encoder

    def encode(self, spec: ExtractionSpec, items: list[Item], decided: ExtractionPlan, encoder: FrozenEncoder,
               writer: Any, target: Target) -> dict[str, Any] | None:
        """Encode this rank's parts, assemble the final store from every rank's parts; rank 0's summary."""
        from stores import parts as staging
        from stores import read_meta

        store_path = target.store_path
        per_part = decided.batch_size * int(decided.batches_per_part)  # items per part: whole batches
        parts = [staging.part_path(store_path, i) for i in range(math.ceil(len(items) / per_part))]
        self._encode_parts(spec, items, decided, encoder, target, parts, per_part)
        barrier()  # every part is finished
        metas = [read_meta(p) for p in parts]
        if sum(m.count for m in metas if m is not None) == 0:
            failed = sum(int((m.summary or {}).get("failed") or 0) for m in metas if m is not None)
            raise ExtractionError(f"no item of {spec.manifest} could be encoded ({failed} failed); see the "
                                  f"errors.jsonl files under {staging.part_path(store_path, 0).parent}")
        if self.rank == 0:
            staging.size_final(store_path, parts)
        barrier()  # the final array has its full shape
        staging.write_owned_shards(store_path, parts, self.rank, self.world)
        barrier()  # every final shard is written and recorded
        if self.rank != 0:
            return None
        writer.adopt_parts(parts)
        summary = writer.finish(extra=_finish_extra(spec, decided.batch_size))
        staging.remove_parts(store_path)
        return summary

    def _encode_parts(self, spec: ExtractionSpec, items: list[Item], decided: ExtractionPlan,
                      encoder: FrozenEncoder, target: Target, parts: list[Any], per_part: int) -> None:
        """Run the worker over each unfinished part of this rank, each into its own staging store."""
        from stores import StoreMismatchError, StoreWriter, store_status

        assert decided.shape is not None
        layout, dim, tokens_per_item = decided.shape
        mine = list(range(self.rank, len(parts), self.world))
        bar = progress_bar(total=sum(len(items[i * per_part:(i + 1) * per_part]) for i in mine), unit="item",
                           desc=f"extract {spec.modality} (rank {self.rank})", enabled=self.talk)
        try:
            for i in mine:
                chunk = items[i * per_part:(i + 1) * per_part]
                part_identity = {"part_of": target.key, "part": i, "items": [i * per_part, i * per_part + len(chunk)],
                                 "batch_size": decided.batch_size}
                try:
                    status = store_status(parts[i], part_identity)
                except StoreMismatchError:
                    status = "mismatch"
                if status == "complete":  # finished before an interruption
                    bar.update(len(chunk))
                    continue
                part = StoreWriter.create(
                    parts[i], modality=spec.modality, layout=layout, dim=dim, tokens_per_item=tokens_per_item,
                    dtype=DTYPES[spec.dtype], identity=part_identity, shard_mb=spec.shard_mb,
                    overwrite=status != "absent", extraction={"batch_size": decided.batch_size})
                try:
                    encode_batches(part, chunk, encoder, bar, spec, batch_size=decided.batch_size,
                                   store_path=target.store_path)
                except BaseException:
                    part.abort()
                    raise
                part.finish()
        finally:
            bar.close()

    def share(self, summary: dict[str, Any] | None) -> dict[str, Any]:
        return broadcast_object(summary)

    def kept(self, store_path: str) -> str:
        return "Every finished part and shard is kept"

    def done_line(self, result: ExtractionResult) -> str:
        return (f"wrote {result.store} (key {result.key}) with {self.world} processes: {result.items} items, "
                f"{result.failed} failed, {result.tokens} tokens, {_human_bytes(result.bytes)}, "
                f"{result.seconds:.1f} s")


def _started_distributed(store_path: str) -> bool:
    """An unfinished store begun by a distributed extraction: it resumes through its parts, whatever the world."""
    from stores import read_meta

    try:
        meta = read_meta(store_path)
    except (OSError, ValueError):
        return False
    return meta is not None and not meta.complete and "distributed" in (meta.summary or {})


# ---- one flow -----------------------------------------------------------------------------------------------------


def run_spec(spec: ExtractionSpec) -> ExtractionResult:
    """Encode every item of the spec's manifest with a frozen encoder and write the tokens to a feature store
    (see :class:`ExtractionSpec`). Under torchrun every rank calls this and writes part of the one store."""
    started = time.perf_counter()
    items = read_items(spec)
    target = identify(spec)
    distributed = world_size() > 1 or _started_distributed(target.store_path)
    distributor = TorchrunDistributor(spec) if distributed else SequentialDistributor(spec)
    decided, writer, encoder = distributor.prepare(spec, items, target)
    if decided.status == "complete":
        done = _existing_summary(target.store_path)
        _say(f"store {target.store_path} is up to date (key {target.key}), nothing to do", distributor.talk)
        return ExtractionResult("up-to-date", target.store_path, done["items"], done["failed"], done["tokens"],
                                done["bytes"], time.perf_counter() - started, target.key, target.identity)
    try:
        summary = distributor.encode(spec, items, decided, ready_encoder(spec, encoder), writer, target)
    except BaseException as error:
        if writer is not None:
            writer.abort()  # finished shards and parts stay on disk; the store is not marked complete
        if _is_disk_full(error):
            raise _disk_full_error(error, target.store_path, distributor.kept(target.store_path)) from None
        raise
    summary = distributor.share(summary)
    result = ExtractionResult("written", target.store_path, int(summary["items"]), int(summary["failed"]),
                              int(summary["tokens"]), int(summary["bytes"]), time.perf_counter() - started,
                              target.key, target.identity)
    _say(distributor.done_line(result), distributor.talk)
    return result


def run_extraction(manifest: str | os.PathLike[str], modality: str, encoder_spec: str,
                   store: str | os.PathLike[str], **options: Any) -> ExtractionResult:
    """:func:`run_spec` of ``ExtractionSpec(manifest, modality, encoder_spec, store, **options)``; the options and
    what they mean are :class:`ExtractionSpec`'s."""
    return run_spec(ExtractionSpec(os.fspath(manifest), modality, encoder_spec, os.fspath(store), **options))
