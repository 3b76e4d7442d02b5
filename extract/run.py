"""The extraction loop: manifest -> frozen encoder -> feature store, once per configuration.

The cache identity of an extraction (encoder identity, layer, stored dtype, what is kept, manifest hash, and for
audio/video the decoding options) is computed before any model is loaded; when a complete store with that
identity is already at the path the run is a no-op. Decoding runs in DataLoader workers through the encoder's
picklable preprocessor, so the model never waits on JPEG decoding; the store's writer writes whole shards on its
own thread, so the model never waits on the disk either. An audio segment or video clip is stored as its own
item (``"{id}#seg{k}"``, ``"{id}#clip{k}"``): the preprocessor expands one manifest item into its parts, so a
batch may hold more store items than manifest items; failures to decode are recorded per manifest item.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
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

__all__ = ["DTYPES", "ExtractionError", "ExtractionOptionsError", "ExtractionResult", "run_extraction"]

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


def default_workers() -> int:
    """Decoding workers for ``--workers auto``: half the cores (at most 8) so decoding overlaps the forward pass
    without starving the encoder's own threads on a CPU-only machine (docs/benchmarks.md, P2)."""
    return min(8, max(1, (os.cpu_count() or 2) // 2))


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
    """``run_extraction`` keyword arguments that reproduce the extraction a store's identity describes."""
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


def _encode_into(writer: Any, items: list[Item], encoder: FrozenEncoder, bar: Any, *, batch_size: int, workers: int,
                 device: str, dtype: str, layout: str, pool: str, on_error: str, manifest: str,
                 store_path: str) -> tuple[int, list[str]]:
    """Encode ``items`` in batches of ``batch_size`` (in manifest order) and append them to ``writer``.

    Returns the number of failed items and the first few failure reasons. The caller aborts the writer on error.
    """
    on_cuda = torch.device(device).type == "cuda"
    if workers > 0:
        # Fast tokenizers' own thread pool does not survive fork; workers already give the parallelism.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = DataLoader(
        items,  # a list is a map-style dataset; no shuffling keeps the store in manifest order
        batch_size=batch_size,
        shuffle=False,
        collate_fn=encoder.preprocessor,
        num_workers=workers,
        pin_memory=on_cuda,
        persistent_workers=workers > 0,
    )
    n_failed = 0
    first_failures: list[str] = []
    store_dtype = DTYPES[dtype]
    torch_dtype = as_torch_dtype(store_dtype)
    for batch in loader:
        sources = _sources(batch)
        failures: list[tuple[Item, str]] = list(batch.get("failed", ()))
        good: list[Item] = list(batch["items"])
        metas: list[dict[str, Any]] = []
        if good:
            with inference_context(device, dtype):
                tokens, lengths = encoder.forward(batch)
            lengths = lengths.to(torch.int64)
            values = _pool(tokens, lengths, pool) if layout == "pooled" else tokens
            values = values.to(torch_dtype)  # cast on the device: less to copy back
            ok = _finite_rows(values, None if layout == "pooled" else lengths).cpu()
            if not bool(ok.all()):
                for item in (it for it, fine in zip(good, ok.tolist(), strict=True) if not fine):
                    failures.append((item, f"non-finite features (inf/nan) in {store_dtype}"))
                keep_idx = ok.nonzero().flatten()
                good = [good[i] for i in keep_idx.tolist()]
                values, lengths = values[keep_idx.to(values.device)], lengths[keep_idx.to(lengths.device)]
            metas = [{**item.meta(), "line": item.line} for item in good]  # line: resume point
        if failures and on_error == "fail":
            item, reason = failures[0]
            where = item.path if item.path is not None else f"text {item.text!r}"
            raise ExtractionError(
                f"item {item.id!r} ({where}, {manifest} line {item.line}) failed: {reason}. Stopping because "
                f"on_error='fail'; store {store_path} stays incomplete"
            )
        if failures:  # before the batch's items: the shard committing them then commits these errors too
            writer.add_errors([_error_record(item, reason) for item, reason in failures])
        if metas:
            writer.add_batch(metas, values.cpu(), lengths.cpu())
        n_failed += len(failures)
        first_failures.extend(f"{item.id!r}: {reason}" for item, reason in failures[: 3 - len(first_failures)])
        bar.update(sources)
        bar.set_postfix(failed=n_failed, refresh=False)
    return n_failed, first_failures


def run_extraction(
    manifest: str | os.PathLike[str],
    modality: str,
    encoder_spec: str,
    store: str | os.PathLike[str],
    *,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: str = "fp16",
    keep: str = "tokens",
    pool: str = "mean",
    layer: int = -1,
    max_tokens: int | None = None,
    workers: int = 0,
    overwrite: bool = False,
    shard_mb: float = 64,
    commit_seconds: float | None = 60,
    on_error: str = "skip",
    progress: bool = True,
    encoder_options: dict[str, Any] | None = None,
    sample_rate: int | str | None = None,
    max_seconds: float | None = None,
    segment: str = "drop",
    frames: int = 16,
    sampling: str = "uniform",
    fps: float | None = None,
    clips: int = 1,
    frame_pool: str = "mean",
    resampler: str | None = None,
    max_pixels: int | None = None,
    max_decoded_seconds: float | None = None,
    max_video_pixels: int | None = None,
) -> ExtractionResult:
    """Encode every item of ``manifest`` with a frozen encoder and write the tokens to a feature store.

    ``store`` may contain ``{key}``, replaced by the identity key (one store per configuration). A complete
    store with the same identity makes this a no-op ("up-to-date"); a store made another way raises
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
    """
    from stores import StoreWriter, identity_key, store_status

    started = time.perf_counter()
    manifest = os.fspath(manifest)
    _check_args(modality, dtype, keep, pool, on_error, batch_size, workers)
    audio, video, image = _media_options(
        modality, sample_rate, max_seconds, segment, frames, sampling, fps, clips, resampler,
        {"max_pixels": max_pixels, "max_decoded_seconds": max_decoded_seconds, "max_video_pixels": max_video_pixels},
    )
    items = read_manifest(manifest)  # all validation before any model work
    _check_items_for_modality(manifest, items, modality)

    encoder: FrozenEncoder | None = None
    enc_kwargs: dict[str, Any] = {
        "layer": layer, "max_tokens": max_tokens, "options": encoder_options, "audio": audio, "video": video,
        "frame_pool": frame_pool if modality == "video" else "mean", "image": image,
    }
    try:
        enc_ident = encoder_identity(encoder_spec, modality, **enc_kwargs)
    except EncoderNotCachedError:
        # A hub id never downloaded: loading it downloads it, after which its files can be hashed.
        encoder = load_encoder(encoder_spec, modality, device=device, **enc_kwargs)
        enc_ident = encoder.identity()
    identity: dict[str, Any] = {
        "modality": modality,
        "encoder": enc_ident,
        "layer": layer,
        "dtype": DTYPES[dtype],
        "keep": keep,
        "max_tokens": max_tokens,
        "manifest_sha256": manifest_sha256(manifest),
    }
    media = audio or video or image
    if media is not None:
        identity["media"] = media.identity()  # decoding options and size bounds; text has none
    if keep == "pooled":
        identity["pool"] = pool
    key = identity_key(identity)
    store_path = os.fspath(store).replace("{key}", key)
    if _world_size() > 1 or _started_distributed(store_path):
        return _extract_distributed(
            items, identity, encoder, manifest=manifest, modality=modality, encoder_spec=encoder_spec,
            store_path=store_path, enc_kwargs=enc_kwargs, started=started, batch_size=batch_size, device=device,
            dtype=dtype, keep=keep, pool=pool, workers=workers, overwrite=overwrite, shard_mb=shard_mb,
            on_error=on_error, progress=progress,
        )

    status = store_status(store_path, identity, overwrite=overwrite)
    if status == "complete":
        done = _existing_summary(store_path)
        _say(f"store {store_path} is up to date (key {key}), nothing to do", progress)
        return ExtractionResult(
            "up-to-date", store_path, done["items"], done["failed"], done["tokens"], done["bytes"],
            time.perf_counter() - started, key, identity,
        )
    if status == "mismatch":
        _say(f"replacing store {store_path}: it was built differently (overwrite requested)", progress)
    start_index = 0
    if status == "incomplete":
        # Resume: keep every shard that matches its manifest entry and restart at the batch boundary of the original
        # run (same batch size), so re-extracted items give the same bytes as an uninterrupted run.
        recorded = read_meta_summary(store_path)
        original_batch = int(recorded.get("batch_size") or batch_size)
        if original_batch != batch_size:
            _say(f"resuming with the store's original batch size {original_batch} (not {batch_size}) so the "
                 "result is identical to an uninterrupted run", progress)
            batch_size = original_batch
        done_line = StoreWriter.progress(store_path)["last_line"]
        first_missing = next((i for i, item in enumerate(items) if item.line > done_line), len(items))
        start_index = first_missing // batch_size * batch_size
        _say(f"store {store_path} is incomplete: resuming at item {start_index + 1} of {len(items)} "
             f"(items before it are on disk and verified)", progress)

    if encoder is None:
        encoder = load_encoder(encoder_spec, modality, device=device, **enc_kwargs)
    if encoder.modality != modality:
        raise ExtractionError(f"encoder {encoder_spec!r} encodes {encoder.modality!r}, not {modality!r}")
    model = getattr(encoder, "model", None)
    if isinstance(model, torch.nn.Module):
        freeze(model)  # idempotent; guards plugins that forgot

    layout = "pooled" if keep == "pooled" else ("fixed" if encoder.fixed_tokens is not None else "ragged")
    store_dtype = DTYPES[dtype]
    if status == "incomplete":
        restart_line = items[start_index].line if start_index < len(items) else None
        writer = StoreWriter.reopen(store_path, restart_line=restart_line, shard_mb=shard_mb,
                                    commit_seconds=commit_seconds)
    else:
        writer = StoreWriter.create(
            store_path,
            modality=modality,
            layout=layout,
            dim=int(encoder.dim),
            tokens_per_item=encoder.fixed_tokens if layout == "fixed" else None,
            dtype=store_dtype,
            identity=identity,
            shard_mb=shard_mb,
            overwrite=status == "mismatch",
            extraction={"expected_items": len(items), "batch_size": batch_size,
                        "manifest": os.path.abspath(manifest)},
            commit_seconds=commit_seconds,
        )

    bar = progress_bar(total=len(items), initial=start_index, unit="item", desc=f"extract {modality}",
                       enabled=progress)
    try:
        n_failed, first_failures = _encode_into(
            writer, items[start_index:], encoder, bar, batch_size=batch_size, workers=workers, device=device,
            dtype=dtype, layout=layout, pool=pool, on_error=on_error, manifest=manifest, store_path=store_path)
        if writer.items_written == 0:
            # An empty store trains nothing; every item failing almost always means a wrong manifest or encoder.
            raise ExtractionError(
                f"no item of {manifest} could be encoded ({n_failed} failed), e.g. {'; '.join(first_failures)}"
            )
        bar.close()
        summary = writer.finish(
            extra={
                "encoder_spec": recorded_spec(encoder_spec),
                "device": device,
                "batch_size": batch_size,
                "software": _software(),
            }
        )
    except BaseException as error:
        writer.abort()  # finished shards stay on disk; the store is not marked complete
        if _is_disk_full(error):
            kept = StoreWriter.progress(store_path)["items"]
            raise _disk_full_error(error, store_path, f"The {kept} items written before are on disk and verified") \
                from None
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    result = ExtractionResult(
        "written", store_path, int(summary["items"]), int(summary["failed"]), int(summary["tokens"]),
        int(summary["bytes"]), seconds, key, identity,
    )
    _say(
        f"wrote {store_path} (key {key}): {result.items} items, {result.failed} failed, {result.tokens} tokens, "
        f"{_human_bytes(result.bytes)}, {seconds:.1f} s, {result.items_per_second:.1f} items/s",
        progress,
    )
    return result


# ---- distributed extraction (torchrun) ---------------------------------------------------------------------------
# cli.py joins torchrun's process group (gloo: only control messages travel, a barrier and small pickled objects).
# torch.distributed is used directly here, not through pipeline/distributed.py: extract/ sits upstream of pipeline/.
PARTS_PER_RANK = 4  # parts (runs of whole batches) per rank at creation: some balance, few staging stores


def _group() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def _world_size() -> int:
    dist = _group()
    return dist.get_world_size() if dist else 1


def _rank() -> int:
    dist = _group()
    return dist.get_rank() if dist else 0


def _barrier() -> None:
    dist = _group()
    if dist:
        dist.barrier()


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    dist = _group()
    if not dist:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _started_distributed(store_path: str) -> bool:
    """An unfinished store begun by a distributed extraction: it resumes through its parts, whatever the world."""
    from stores import read_meta

    try:
        meta = read_meta(store_path)
    except (OSError, ValueError):
        return False
    return meta is not None and not meta.complete and "distributed" in (meta.summary or {})


def _prepare_distributed(items: list[Item], identity: dict[str, Any], encoder: FrozenEncoder | None, *,
                         manifest: str, modality: str, encoder_spec: str, store_path: str,
                         enc_kwargs: dict[str, Any], batch_size: int, device: str, dtype: str, keep: str,
                         overwrite: bool, shard_mb: float, progress: bool, world: int) -> tuple[dict, Any, Any]:
    """Rank 0: decide what to do with the store and, unless it is up to date, take its lock and create or reopen
    it. Returns (the plan every rank follows, the final store's writer, the encoder)."""
    from stores import StoreWriter, store_status

    status = store_status(store_path, identity, overwrite=overwrite)
    if status == "complete":
        return {"status": "complete"}, None, encoder
    recorded = read_meta_summary(store_path) if status == "incomplete" else {}
    if status == "incomplete" and "distributed" not in recorded:
        raise ExtractionError(f"store {store_path} was started by a single-process extraction: resume it with one "
                              "process (python cli.py extract ...), not under torchrun")
    if encoder is None:
        encoder = load_encoder(encoder_spec, modality, device=device, **enc_kwargs)
    if encoder.modality != modality:
        raise ExtractionError(f"encoder {encoder_spec!r} encodes {encoder.modality!r}, not {modality!r}")
    if status == "incomplete":
        original_batch = int(recorded.get("batch_size") or batch_size)
        if original_batch != batch_size:
            _say(f"resuming with the store's original batch size {original_batch} (not {batch_size}) so the "
                 "result is identical to an uninterrupted run", progress)
        batch_size, per_part = original_batch, int(recorded["distributed"]["batches_per_part"])
        writer = StoreWriter.reopen_parts(store_path, shard_mb=shard_mb)
        _say(f"store {store_path} is incomplete: resuming; finished parts are kept, the others redone", progress)
    else:
        if status == "mismatch":
            _say(f"replacing store {store_path}: it was built differently (overwrite requested)", progress)
        per_part = max(1, math.ceil(math.ceil(len(items) / batch_size) / (world * PARTS_PER_RANK)))
        layout = "pooled" if keep == "pooled" else ("fixed" if encoder.fixed_tokens is not None else "ragged")
        writer = StoreWriter.create(
            store_path, modality=modality, layout=layout, dim=int(encoder.dim),
            tokens_per_item=encoder.fixed_tokens if layout == "fixed" else None, dtype=DTYPES[dtype],
            identity=identity, shard_mb=shard_mb, overwrite=status == "mismatch",
            extraction={"expected_items": len(items), "batch_size": batch_size,
                        "manifest": os.path.abspath(manifest), "distributed": {"batches_per_part": per_part}},
        )
    plan = {"status": "parts", "batch_size": batch_size, "batches_per_part": per_part, "layout": writer.meta.layout,
            "tokens_per_item": writer.meta.tokens_per_item, "dim": writer.meta.dim}
    return plan, writer, encoder


def _extract_distributed(items: list[Item], identity: dict[str, Any], encoder: FrozenEncoder | None, *,
                         manifest: str, modality: str, encoder_spec: str, store_path: str,
                         enc_kwargs: dict[str, Any], started: float, batch_size: int, device: str, dtype: str,
                         keep: str, pool: str, workers: int, overwrite: bool, shard_mb: float, on_error: str,
                         progress: bool) -> ExtractionResult:
    """One store written by every rank of a torchrun job, identical to a single-process run (stores/parts.py).

    Rank 0 creates (or reopens) the store and holds its lock. The manifest's batches, exactly the batches a single
    process would run, are grouped into parts; part ``i`` is encoded by rank ``i mod world`` into a staging store.
    Then each rank writes the final shards it owns from the parts, and rank 0 writes the tables and marks the
    store complete. A resumed run (any world size) keeps every finished part and verified shard and redoes the rest.
    """
    from stores import StoreMismatchError, StoreWriter, identity_key, read_meta, store_status
    from stores import parts as staging

    rank, world = _rank(), _world_size()
    key = identity_key(identity)
    talk = progress and rank == 0
    writer, plan = None, None
    if rank == 0:
        try:
            plan, writer, encoder = _prepare_distributed(
                items, identity, encoder, manifest=manifest, modality=modality, encoder_spec=encoder_spec,
                store_path=store_path, enc_kwargs=enc_kwargs, batch_size=batch_size, device=device, dtype=dtype,
                keep=keep, overwrite=overwrite, shard_mb=shard_mb, progress=talk, world=world)
        except Exception as exc:
            _broadcast({"status": "error", "message": str(exc)})
            raise
    plan = _broadcast(plan)
    if plan["status"] == "error":
        raise ExtractionError(f"rank 0 stopped the extraction: {plan['message']}")
    if plan["status"] == "complete":
        done = _existing_summary(store_path)
        _say(f"store {store_path} is up to date (key {key}), nothing to do", talk)
        return ExtractionResult("up-to-date", store_path, done["items"], done["failed"], done["tokens"],
                                done["bytes"], time.perf_counter() - started, key, identity)
    try:
        if encoder is None:
            encoder = load_encoder(encoder_spec, modality, device=device, **enc_kwargs)
        model = getattr(encoder, "model", None)
        if isinstance(model, torch.nn.Module):
            freeze(model)
        batch_size, layout = int(plan["batch_size"]), plan["layout"]
        per_part = batch_size * int(plan["batches_per_part"])  # items per part: whole batches, as one process runs
        parts = [staging.part_path(store_path, i) for i in range(math.ceil(len(items) / per_part))]
        mine = list(range(rank, len(parts), world))
        bar = progress_bar(total=sum(len(items[i * per_part:(i + 1) * per_part]) for i in mine), unit="item",
                           desc=f"extract {modality} (rank {rank})", enabled=talk)
        try:
            for i in mine:
                chunk = items[i * per_part:(i + 1) * per_part]
                part_identity = {"part_of": key, "part": i, "items": [i * per_part, i * per_part + len(chunk)],
                                 "batch_size": batch_size}
                try:
                    status = store_status(parts[i], part_identity)
                except StoreMismatchError:
                    status = "mismatch"
                if status == "complete":  # finished before an interruption
                    bar.update(len(chunk))
                    continue
                part = StoreWriter.create(
                    parts[i], modality=modality, layout=layout, dim=int(plan["dim"]),
                    tokens_per_item=plan["tokens_per_item"], dtype=DTYPES[dtype], identity=part_identity,
                    shard_mb=shard_mb, overwrite=status != "absent", extraction={"batch_size": batch_size})
                try:
                    _encode_into(part, chunk, encoder, bar, batch_size=batch_size, workers=workers, device=device,
                                 dtype=dtype, layout=layout, pool=pool, on_error=on_error, manifest=manifest,
                                 store_path=store_path)
                except BaseException:
                    part.abort()
                    raise
                part.finish()
        finally:
            bar.close()
        _barrier()  # every part is finished
        metas = [read_meta(p) for p in parts]
        if sum(m.count for m in metas if m is not None) == 0:
            failed = sum(int((m.summary or {}).get("failed") or 0) for m in metas if m is not None)
            raise ExtractionError(f"no item of {manifest} could be encoded ({failed} failed); see the errors.jsonl "
                                  f"files under {staging.part_path(store_path, 0).parent}")
        if rank == 0:
            staging.size_final(store_path, parts)
        _barrier()  # the final array has its full shape
        staging.write_owned_shards(store_path, parts, rank, world)
        _barrier()  # every final shard is written and recorded
        summary = None
        if rank == 0:
            writer.adopt_parts(parts)
            summary = writer.finish(extra={"encoder_spec": recorded_spec(encoder_spec), "device": device, "batch_size": batch_size,
                                           "software": _software()})
            staging.remove_parts(store_path)
    except BaseException as error:
        if writer is not None:
            writer.abort()  # finished parts and shards stay on disk; the store is not marked complete
        if _is_disk_full(error):
            raise _disk_full_error(error, store_path, "Every finished part and shard is kept") from None
        raise
    summary = _broadcast(summary)
    seconds = time.perf_counter() - started
    result = ExtractionResult("written", store_path, int(summary["items"]), int(summary["failed"]),
                              int(summary["tokens"]), int(summary["bytes"]), seconds, key, identity)
    _say(f"wrote {store_path} (key {key}) with {world} processes: {result.items} items, {result.failed} failed, "
         f"{result.tokens} tokens, {_human_bytes(result.bytes)}, {seconds:.1f} s", talk)
    return result
