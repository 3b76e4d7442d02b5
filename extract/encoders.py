"""Frozen encoders: loading, freezing, preprocessing and the cache identity of an encoder.

An encoder is anything with this small interface (Hugging Face models are wrapped by :class:`HFTextEncoder`,
:class:`HFImageEncoder`, :class:`HFAudioEncoder` and :class:`HFVideoEncoder`; :class:`FrameEncoder` runs any
image encoder over video frames; plugins return their own object, see ``docs/plugins.md``)::

    modality: str                 # "image" | "text" | "audio" | "video"
    dim: int                      # D, the token width
    fixed_tokens: int | None      # L when every item gives L tokens (fixed layout), None for ragged output
    preprocessor: Preprocessor    # picklable callable list[Item] -> batch dict, runs in DataLoader workers
    identity() -> dict            # JSON-able; everything that changes the output (weights hash, preprocessing)
    forward(batch) -> (tokens [B, L, D] float, lengths [B] int64)   # first lengths[b] rows are real tokens
    to(device) -> self

The preprocessor never holds the model: it decodes and tokenizes on CPU in worker processes and returns
``{"items": [good Items, in order], "failed": [(Item, reason), ...], <tensors for the good items>}`` so that one
bad file fails one item, not the batch.

Specs understood by :func:`load_encoder` and :func:`encoder_identity`:

- ``MODULE:CALLABLE`` or ``path/to/file.py:CALLABLE``: a plugin. The callable is called with keyword arguments
  ``modality``, ``layer``, ``max_tokens`` plus any user ``options`` and returns an encoder object. An optional
  module-level ``identity(**same_kwargs) -> dict`` lets the no-op check skip loading the plugin.
- a local directory saved with ``save_pretrained`` or a Hugging Face hub id: ``AutoModel`` plus
  ``AutoTokenizer`` (text), ``AutoImageProcessor`` (image), ``AutoFeatureExtractor`` (audio: wav2vec2, HuBERT,
  WavLM and other ``input_values`` models; the Whisper encoder) or ``AutoImageProcessor``/``AutoVideoProcessor``
  (video: VideoMAE, TimeSformer, ViViT, ...) from the same spec.
- ``--modality video`` with an IMAGE encoder (HF image model, or a plugin whose module declares
  ``MODALITIES = ("image",)``): per-frame mode, see :class:`FrameEncoder`.

Audio and video decoding policies (sample rate, long audio, frame sampling, clips) are :class:`AudioOptions`
and :class:`VideoOptions` from :mod:`extract.media`; ``docs/media.md`` explains them.

``layer=-1`` means the model's final output, ``last_hidden_state``, including any final norm the model applies;
any other value indexes ``hidden_states`` (0 = embeddings), which for some models (e.g. ViT) is before that norm.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from stores import OneEncoderError

from .filehash import file_sha256, files_sha256
from .manifest import Item, escape_surrogates, unicode_problem
from .media import (
    AUDIO_DECODER_VERSION,
    DEFAULT_MAX_PIXELS,
    VIDEO_DECODER_VERSION,
    AudioOptions,
    ImageOptions,
    MediaError,
    VideoOptions,
    load_audio_parts,
    load_image,
    load_video_frames,
)

__all__ = [
    "EncoderError",
    "EncoderNotCachedError",
    "FRAME_POOLS",
    "FrameEncoder",
    "FramePreprocessor",
    "FrozenEncoder",
    "HFAudioEncoder",
    "HFAudioPreprocessor",
    "HFImageEncoder",
    "HFImagePreprocessor",
    "HFTextEncoder",
    "HFTextPreprocessor",
    "HFVideoEncoder",
    "HFVideoPreprocessor",
    "MODALITIES",
    "Preprocessor",
    "check_recorded_spec",
    "encoder_identity",
    "freeze",
    "image_tokens_start_with_cls",
    "inference_context",
    "is_foreign_plugin",
    "load_encoder",
]

MODALITIES = ("image", "text", "audio", "video")
FRAME_POOLS = ("mean", "keep")
DEFAULT_MAX_TOKENS = 512
# Bumped when load_image's conversion policy changes, since that changes the pixels every image model sees.
IMAGE_DECODER_VERSION = "extract.media.load_image/1"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_CONFIG_SUFFIXES = (".json", ".txt", ".model", ".tiktoken")  # .model: sentencepiece tokenizers
_IMAGE_PREPROCESS_KEYS = (
    "image_processor_type", "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
    "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb", "do_pad",
)
_VIDEO_PREPROCESS_KEYS = (*_IMAGE_PREPROCESS_KEYS, "video_processor_type", "num_frames", "do_sample_frames")
_AUDIO_PREPROCESS_KEYS = (
    "feature_extractor_type", "sampling_rate", "feature_size", "do_normalize", "return_attention_mask",
    "padding_value", "padding_side", "n_fft", "hop_length", "chunk_length", "n_samples", "dither",
)
_VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"


# transformers vision models whose token sequence (last_hidden_state and every hidden_states[N]) starts with a CLS
# token; DeiT's second token is its distillation token.
CLS_FIRST_MODEL_TYPES = frozenset({
    "vit", "vit_hybrid", "vit_msn", "vit_mae", "deit", "beit", "data2vec-vision", "dinov2", "dinov2_with_registers",
    "clip", "clip_vision_model", "chinese_clip", "chinese_clip_vision_model", "blip", "blip_vision_model",
})


def image_tokens_start_with_cls(identity: dict[str, Any]) -> bool:
    """Whether a store with this cache identity holds image tokens whose first one is a CLS token: a transformers
    model of :data:`CLS_FIRST_MODEL_TYPES`, tokens kept (not pooled). False for anything else, plugins included
    (their token layout is not known)."""
    encoder = identity.get("encoder") or {}
    return (identity.get("modality") == "image" and identity.get("keep") == "tokens" and encoder.get("kind") == "hf"
            and encoder.get("model_type") in CLS_FIRST_MODEL_TYPES)


class EncoderError(OneEncoderError, RuntimeError):
    """An encoder spec cannot be resolved, loaded or used as asked."""


class EncoderNotCachedError(EncoderError):
    """A hub id is not in the local Hugging Face cache, so its identity cannot be computed without a download."""


@runtime_checkable
class Preprocessor(Protocol):
    """Picklable CPU-side callable run in DataLoader workers: items -> batch dict (see module docstring)."""

    def __call__(self, items: list[Item]) -> dict[str, Any]: ...


@runtime_checkable
class FrozenEncoder(Protocol):
    """The interface the extraction loop needs from an encoder (HF wrappers and plugins alike)."""

    modality: str
    dim: int
    fixed_tokens: int | None
    preprocessor: Preprocessor

    def identity(self) -> dict[str, Any]: ...

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def to(self, device: str | torch.device) -> FrozenEncoder: ...


# --------------------------------------------------------------------------------------------- freezing

# Config fields that change behaviour between train and eval beyond dropout. eval() already disables them in
# current transformers, but zeroing them too keeps a cached feature valid if someone later calls .train().
_TRAIN_ONLY_CONFIG = {
    "layerdrop": 0.0,
    "encoder_layerdrop": 0.0,
    "decoder_layerdrop": 0.0,
    "mask_time_prob": 0.0,
    "mask_feature_prob": 0.0,
    "apply_spec_augment": False,
}


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    # A frozen encoder placed inside a parent module must not be switched back to train mode by parent.train().
    return self


def freeze(module: nn.Module) -> nn.Module:
    """Freeze a model in place and return it: eval mode, no gradients, train-only config switches off.

    Idempotent. ``module.train()`` becomes a no-op afterwards, so a parent's ``.train()`` cannot undo it.
    """
    nn.Module.train(module, False)  # the class method: works even when .train was already overridden
    module.requires_grad_(False)
    seen: set[int] = set()
    for sub in module.modules():
        config = getattr(sub, "config", None)
        if config is None or id(config) in seen:
            continue
        seen.add(id(config))
        for cfg in (config, *(getattr(config, n, None) for n in ("text_config", "vision_config", "audio_config"))):
            if cfg is None:
                continue
            for name, value in _TRAIN_ONLY_CONFIG.items():
                if hasattr(cfg, name):
                    setattr(cfg, name, value)
    module.train = _stay_in_eval.__get__(module)  # bound method, so deepcopy rebinds it to the copy
    return module


@contextlib.contextmanager
def inference_context(device: str | torch.device, dtype: str = "fp32") -> Iterator[None]:
    """``torch.inference_mode()``, plus ``torch.autocast`` to fp16/bf16 on CUDA when asked."""
    dev = torch.device(device)
    with torch.inference_mode():
        if dev.type == "cuda" and dtype in ("fp16", "bf16"):
            with torch.autocast("cuda", dtype=torch.float16 if dtype == "fp16" else torch.bfloat16):
                yield
        else:
            yield  # CPU autocast is slow and lossy for most ops: compute in fp32, the store casts


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """Silence transformers' per-load progress bars ("Loading weights") while we load or save."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------- spec resolution


def _plugin_target(spec: str) -> tuple[str, str] | None:
    """(module or file, callable) when ``spec`` names a plugin; None for a directory or hub id."""
    if os.path.exists(spec) or ":" not in spec:
        return None
    module, _, attr = spec.rpartition(":")
    if not module or not attr.isidentifier():
        return None
    return module, attr


SHIPPED_PLUGINS = "extract.plugins."  # plugins that come with this project: code the user installed


def is_foreign_plugin(spec: str) -> bool:
    """Whether loading ``spec`` runs plugin code other than the plugins shipped with this project. Transformers
    directories and hub ids load without remote code (``trust_remote_code`` stays off) and are not plugins."""
    target = _plugin_target(spec)
    return target is not None and not target[0].startswith(SHIPPED_PLUGINS)


def check_recorded_spec(spec: str, source: str, *, trust_plugins: bool) -> None:
    """Refuse to run a plugin whose spec was read from ``source`` (a store or run directory, which may come from
    someone else) rather than given by the user, unless ``trust_plugins``: importing a plugin runs its code."""
    if is_foreign_plugin(spec) and not trust_plugins:
        raise EncoderError(
            f"{source} records the encoder plugin {spec!r}; running it would execute that code. If you trust whoever "
            "made it, pass --trust-plugins; or give the encoder spec yourself (see SECURITY.md)")


def _import_plugin_module(module: str) -> Any:
    if module.endswith(".py"):
        path = os.path.abspath(module)
        if not os.path.isfile(path):
            raise EncoderError(f"plugin file not found: {module}")
        # A stable module name per file, so repeated loads reuse one module object (and its state).
        name = "oneencoder_plugin_" + hashlib.sha256(path.encode()).hexdigest()[:12]
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise EncoderError(f"cannot import plugin file {module}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception:
            del sys.modules[name]
            raise
        return mod
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EncoderError(f"cannot import plugin module {module!r}: {exc}") from exc


MediaOptions = AudioOptions | VideoOptions | ImageOptions


def _media_options(
    modality: str, audio: AudioOptions | None, video: VideoOptions | None, image: ImageOptions | None = None
) -> MediaOptions | None:
    """The decoding options that apply to ``modality`` (defaults when not given); None for text."""
    if modality == "audio":
        return audio or AudioOptions()
    if modality == "video":
        return video or VideoOptions()
    if modality == "image":
        return image or ImageOptions()
    return None


def _plugin_kwargs(
    modality: str,
    layer: int,
    max_tokens: int | None,
    options: dict[str, Any] | None,
    media: MediaOptions | None = None,
) -> dict:
    """Keyword arguments of a plugin's callable and identity: image/audio/video plugins also get the decoding
    options (``max_pixels`` / ``sample_rate``, ``max_seconds``, ``segment``, ``max_decoded_seconds`` / ``frames``,
    ``sampling``, ``fps``, ``clips``, ``max_video_pixels``)."""
    extra = media.identity() if media is not None else {}
    clash = sorted(set(extra) & set(options or {}))
    if clash:
        raise EncoderError(f"encoder options {clash} clash with the extraction's own {modality} options; use those")
    return {"modality": modality, "layer": layer, "max_tokens": max_tokens, **extra, **(options or {})}


def _resolve_hf_dir(spec: str) -> tuple[Path, dict[str, Any]]:
    """Local folder holding the model files plus source info: the dir itself, or the cached hub snapshot."""
    if os.path.isdir(spec):
        return Path(spec), {"source": "local"}
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError as exc:  # pragma: no cover - transformers depends on huggingface_hub
        raise EncoderError(f"{spec!r} is not a directory and huggingface_hub is not installed") from exc
    cached = try_to_load_from_cache(spec, "config.json")
    if not isinstance(cached, str):
        raise EncoderNotCachedError(
            f"encoder {spec!r} is neither a local directory nor in the local Hugging Face cache; download it first "
            f"(e.g. `hf download {spec}`) or pass a directory saved with save_pretrained"
        )
    snapshot = Path(cached).parent
    return snapshot, {"source": "hub", "spec": spec, "revision": snapshot.name}


_LOCAL_HINT = ("pass a directory saved with save_pretrained instead (--encoder path/to/model), or download the model "
               "into the Hugging Face cache where there is network (`hf download ID`)")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in {"1", "ON", "YES",
                                                                                                     "TRUE"}


def require_model_files(spec: str) -> None:
    """Before transformers would download ``spec``: nothing to do for a local directory or a cached hub id; else
    fail at once with one line when offline (``HF_HUB_OFFLINE``), when the hub cannot be reached, or when it has
    no such model (a mistyped id), instead of minutes of retries and a long traceback. One request, no retries."""
    if os.path.isdir(spec):
        return
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(spec, "config.json"), str):
            return
    except HFValidationError:
        raise EncoderError(f"encoder {spec!r} is neither a local directory nor a Hugging Face model id; "
                           f"{_LOCAL_HINT}") from None
    if _offline():
        raise EncoderNotCachedError(f"encoder {spec!r} is neither a local directory nor in the local Hugging Face "
                                    f"cache, and HF_HUB_OFFLINE is set; {_LOCAL_HINT}")
    try:
        HfApi().model_info(spec, timeout=10)
    except GatedRepoError:
        raise EncoderError(f"encoder {spec!r} is a gated model: accept its terms on the hub and log in "
                           f"(`hf auth login`), or {_LOCAL_HINT}") from None
    except RepositoryNotFoundError:
        raise EncoderError(f"encoder {spec!r}: no such local directory and no such model on the Hugging Face hub "
                           f"(mistyped?); {_LOCAL_HINT}") from None
    except Exception as exc:  # DNS, refused connection, proxy, timeout: anything that is not the hub's answer
        raise EncoderNotCachedError(f"encoder {spec!r} is not in the local Hugging Face cache and the hub cannot be "
                                    f"reached ({type(exc).__name__}: {' '.join(str(exc).split())}); set HF_HUB_OFFLINE=1 on machines "
                                    f"without network and {_LOCAL_HINT}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _model_files(folder: Path) -> list[Path]:
    """Weight and config/tokenizer/processor files in the model folder (top level: what from_pretrained reads)."""
    files = [
        p for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in _WEIGHT_SUFFIXES + _CONFIG_SUFFIXES and p.name.lower() != "readme.txt"
    ]
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in files):
        raise EncoderError(f"no weight files ({', '.join(_WEIGHT_SUFFIXES)}) in {folder}")
    return files


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config") or config


def _effective_max_tokens(requested: int | None, tokenizer_max: Any, position_max: Any) -> int:
    """Truncation length: requested, else min(tokenizer limit, 512); never beyond the position table."""
    limits = [DEFAULT_MAX_TOKENS if requested is None else int(requested)]
    if requested is None and isinstance(tokenizer_max, int) and 0 < tokenizer_max < 1_000_000:
        limits.append(tokenizer_max)  # transformers uses a huge int for "no limit"
    if isinstance(position_max, int) and position_max > 0:
        limits.append(position_max)  # positions past the table would crash (or silently wrap) the model
    return min(limits)


def _hf_sample_rate(folder: Path, audio: AudioOptions) -> int:
    """The rate audio is decoded at: the explicit one, else the feature extractor's ``sampling_rate``."""
    if audio.sample_rate is not None:
        return audio.sample_rate
    rate = _read_json(folder / "preprocessor_config.json").get("sampling_rate")
    if not isinstance(rate, int) or rate < 1:
        raise EncoderError(f"{folder}: the feature extractor config names no sampling_rate; pass sample_rate")
    return rate


def _hf_identity(
    spec: str, modality: str, layer: int, max_tokens: int | None, audio: AudioOptions | None = None
) -> dict[str, Any]:
    folder, source = _resolve_hf_dir(spec)
    files = _model_files(folder)
    hashes = files_sha256([str(p) for p in files])
    config = _read_json(folder / "config.json")
    ident: dict[str, Any] = {
        "kind": "hf",
        **source,
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "files": {Path(p).name: h for p, h in hashes.items()},
        "modality": modality,
        "layer": layer,
    }
    if modality == "text":
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        ident["preprocess"] = {
            "max_tokens": _effective_max_tokens(
                max_tokens, tok_cfg.get("model_max_length"), _text_config(config).get("max_position_embeddings")
            ),
            "padding_side": "right",
        }
    elif modality == "audio":
        proc = _read_json(folder / "preprocessor_config.json")
        ident["preprocess"] = {
            **{k: proc[k] for k in _AUDIO_PREPROCESS_KEYS if k in proc},
            "sample_rate": _hf_sample_rate(folder, audio := audio or AudioOptions()),
            "decoder": AUDIO_DECODER_VERSION,
            "resampler": audio.resampler,
        }
    elif modality == "video":
        video_proc = (folder / _VIDEO_PROCESSOR_FILE).is_file()
        proc = _read_json(folder / (_VIDEO_PROCESSOR_FILE if video_proc else "preprocessor_config.json"))
        ident["preprocess"] = {
            **{k: proc[k] for k in _VIDEO_PREPROCESS_KEYS if k in proc},
            **({} if video_proc else {"backend": "pil"}),
            "decoder": VIDEO_DECODER_VERSION,
        }
    else:
        proc = _read_json(folder / "preprocessor_config.json")
        ident["preprocess"] = {
            **{k: proc[k] for k in _IMAGE_PREPROCESS_KEYS if k in proc},
            "backend": "pil",
            "decoder": IMAGE_DECODER_VERSION,
        }
    return ident


def _plugin_identity(
    spec: str,
    modality: str,
    layer: int,
    max_tokens: int | None,
    options: dict[str, Any] | None,
    media: MediaOptions | None = None,
) -> tuple[dict[str, Any], FrozenEncoder | None]:
    """Plugin identity, and the loaded encoder when identity needed loading it (so the caller can reuse it)."""
    target = _plugin_target(spec)
    assert target is not None
    module_name, attr = target
    mod = _import_plugin_module(module_name)
    kwargs = _plugin_kwargs(modality, layer, max_tokens, options, media)
    # A file plugin's path differs between machines; its name plus content hash identifies it portably.
    if module_name.endswith(".py"):
        shown = {"spec": f"{os.path.basename(module_name)}:{attr}", "file_sha256": file_sha256(module_name)}
    else:
        shown = {"spec": spec}
    base = {"kind": "plugin", **shown, "options": {k: v for k, v in kwargs.items() if k != "modality"}}
    ident_fn = getattr(mod, "identity", None)
    if callable(ident_fn):
        return {**base, "plugin": ident_fn(**kwargs)}, None
    encoder = _load_plugin(spec, modality, layer, max_tokens, options, media)
    return {**base, "plugin": encoder.identity()}, encoder


def _frames_identity(image_identity: dict[str, Any], video: VideoOptions, frame_pool: str) -> dict[str, Any]:
    return {
        "kind": "frames",
        "frame_pool": frame_pool,
        "frames": video.frames,  # also in the run's media options; here because L depends on it with "keep"
        "decoder": VIDEO_DECODER_VERSION,
        "image_encoder": image_identity,
    }


def encoder_identity(
    spec: str,
    modality: str,
    *,
    layer: int = -1,
    max_tokens: int | None = None,
    options: dict[str, Any] | None = None,
    audio: AudioOptions | None = None,
    video: VideoOptions | None = None,
    frame_pool: str = "mean",
    image: ImageOptions | None = None,
) -> dict[str, Any]:
    """JSON-able identity of an encoder configuration, computed without loading the model where possible.

    HF dirs and cached hub snapshots: sha256 of weight and config/tokenizer/processor files (cached by size and
    mtime, see :mod:`extract.filehash`) plus the preprocessing settings and layer. Plugins: the module-level
    ``identity(**kwargs)`` if present, else the loaded encoder's ``identity()``. Per-frame video mode: the image
    encoder's identity wrapped with the frame pooling. ``audio``/``video`` only matter for those modalities.
    """
    _check_modality(modality)
    _check_frame_pool(frame_pool)
    media = _media_options(modality, audio, video, image)
    if modality == "video" and _frame_mode(spec):
        assert isinstance(media, VideoOptions)
        image = encoder_identity(spec, "image", layer=layer, max_tokens=max_tokens, options=options)
        return _frames_identity(image, media, frame_pool)
    _check_video_pool(spec, modality, frame_pool)
    if _plugin_target(spec) is not None:
        return _plugin_identity(spec, modality, layer, max_tokens, options, media)[0]
    _check_hf_args(spec, modality, max_tokens, options)
    return _hf_identity(spec, modality, layer, max_tokens, audio=media if isinstance(media, AudioOptions) else None)


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise EncoderError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")


def _check_frame_pool(frame_pool: str) -> None:
    if frame_pool not in FRAME_POOLS:
        raise EncoderError(f"frame_pool must be one of {', '.join(FRAME_POOLS)}, not {frame_pool!r}")


def _check_video_pool(spec: str, modality: str, frame_pool: str) -> None:
    # Silently ignoring "keep" for a real video model would store something other than what was asked for.
    if modality == "video" and frame_pool != "mean":
        raise EncoderError(f"frame_pool={frame_pool!r} applies to per-frame mode (an image encoder), not {spec!r}")


def _check_hf_args(spec: str, modality: str, max_tokens: int | None, options: dict[str, Any] | None) -> None:
    """Settings that make no sense for a transformers model; checked before identity so a run fails early."""
    if options:
        raise EncoderError(f"encoder options {sorted(options)} are only for plugins, not {spec!r}")
    if modality != "text" and max_tokens is not None:
        raise EncoderError("max_tokens applies to text encoders only")


def _is_video_config(config: dict[str, Any], has_video_processor: bool) -> bool:
    """Whether a transformers config describes a video model (else an image model used frame by frame)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES

    if has_video_processor or config.get("model_type") in MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES:
        return True
    # Video transformers name their clip length; image models have no such field.
    return any(k in config for k in ("num_frames", "frames_per_clip", "tubelet_size"))


def _frame_mode(spec: str) -> bool:
    """True when ``spec`` (asked to encode video) is an image encoder, to be run frame by frame.

    Plugins opt in by declaring ``MODALITIES`` without "video" but with "image" at module level; HF models by
    being image models (see :func:`_is_video_config`)."""
    target = _plugin_target(spec)
    if target is not None:
        modalities = getattr(_import_plugin_module(target[0]), "MODALITIES", None)
        return modalities is not None and "video" not in modalities and "image" in modalities
    try:
        folder, _ = _resolve_hf_dir(spec)
        config, has_video_processor = _read_json(folder / "config.json"), (folder / _VIDEO_PROCESSOR_FILE).is_file()
    except EncoderNotCachedError:
        from transformers import AutoConfig

        require_model_files(spec)  # offline or unreachable: one line now, not retries and a traceback
        config, has_video_processor = AutoConfig.from_pretrained(spec).to_dict(), False  # downloads the config
    return not _is_video_config(config, has_video_processor)


# --------------------------------------------------------------------------------------------- HF encoders


_TOWERS = {"image": "vision_model", "text": "text_model", "audio": "audio_model"}


def _select_tower(model: nn.Module, modality: str) -> nn.Module:
    """The part of a model that encodes ``modality``: the vision/text/audio tower of a dual encoder (CLIP,
    SigLIP, CLAP), the encoder of an encoder-decoder model (Whisper), else the model itself."""
    tower = getattr(model, _TOWERS.get(modality, ""), None)
    if isinstance(tower, nn.Module):
        return tower
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return model.get_encoder()
    return model


def _select_layer(out: Any, layer: int) -> torch.Tensor:
    if layer == -1:
        return out.last_hidden_state
    hidden = getattr(out, "hidden_states", None)
    if hidden is None:
        raise EncoderError("the model returned no hidden_states, so only layer=-1 is available")
    if not -len(hidden) <= layer < len(hidden):
        raise EncoderError(f"layer {layer} out of range: the model has {len(hidden)} hidden states (0 = embeddings)")
    return hidden[layer]


def _as_tokens(x: torch.Tensor) -> torch.Tensor:
    """[B, L, D] tokens; conv feature maps [B, C, H, W] become H*W tokens of C."""
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    if x.dim() != 3:
        raise EncoderError(f"expected [B, L, D] or [B, C, H, W] features, got shape {tuple(x.shape)}")
    return x


class HFTextPreprocessor:
    """Tokenizes text items (or reads ``path`` items as UTF-8 text files) with dynamic right padding."""

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # stores keep the FIRST lengths[b] rows: padding must trail
        self.max_tokens = max_tokens

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}

    def __call__(self, items: list[Item]) -> dict[str, Any]:
        good: list[Item] = []
        texts: list[str] = []
        failed: list[tuple[Item, str]] = []
        for item in items:
            text = item.text
            if text is None and item.path is not None:
                try:
                    text = Path(item.path).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    failed.append((item, f"cannot read text file: {exc}"))
                    continue
            if text is None or not text.strip():
                failed.append((item, "empty text"))
                continue
            problem = unicode_problem(text)
            if problem is not None:
                # The error table is UTF-8 JSON: it records the text with the bad code point escaped.
                shown = replace(item, text=escape_surrogates(item.text))
                failed.append((shown, f"text is not valid Unicode: {problem}"))
                continue
            good.append(item)
            texts.append(text)
        batch: dict[str, Any] = {"items": good, "failed": failed}
        if not texts:
            return batch
        try:
            batch.update(self._tokenize(texts))
        except Exception:
            # One text the tokenizer refuses fails alone; the others are tokenized together again, so their
            # padding (and their tokens) are exactly what the batch would have given them.
            kept = []
            for item, text in zip(good, texts, strict=True):
                try:
                    self._tokenize([text])
                    kept.append((item, text))
                except Exception as exc:
                    failed.append((item, f"tokenizer failed: {type(exc).__name__}: {exc}"))
            batch["items"] = [item for item, _ in kept]
            if kept:
                batch.update(self._tokenize([text for _, text in kept]))
        return batch


def _collate_isolated(
    process: Any, items: list[Item], inputs: list[Any], failed: list[tuple[Item, str]], what: str
) -> dict[str, Any]:
    """``{"items", "failed", **process(inputs)}``; when the batched call fails, retry input by input so one odd
    input (e.g. a 1x1 image) fails alone. ``process`` maps a list of inputs to a dict of batched tensors."""
    batch: dict[str, Any] = {"items": items, "failed": failed}
    if not inputs:
        return batch
    try:
        batch.update(process(inputs))
        return batch
    except Exception:
        kept_items: list[Item] = []
        parts: list[dict[str, torch.Tensor]] = []
        for item, x in zip(items, inputs, strict=True):
            try:
                parts.append(process([x]))
                kept_items.append(item)
            except Exception as exc:
                failed.append((item, f"{what} failed: {type(exc).__name__}: {exc}"))
        batch["items"] = kept_items
        if parts:
            batch.update({k: torch.cat([part[k] for part in parts]) for k in parts[0]})
        return batch


def _require_path(item: Item, kind: str, failed: list[tuple[Item, str]]) -> bool:
    if item.path is None:
        failed.append((item, f"item has no 'path' ({kind} encoder)"))
        return False
    return True


class HFImagePreprocessor:
    """Decodes image items with :func:`load_image` and runs the HF image processor on the good ones."""

    def __init__(self, processor: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.processor = processor
        self.max_pixels = max_pixels

    def _process(self, images: list[Any]) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def images(self, images: list[Any]) -> dict[str, torch.Tensor]:
        """Batch tensors for already decoded RGB PIL images (used by per-frame video mode)."""
        return {"pixel_values": self._process(images)}

    def __call__(self, items: list[Item]) -> dict[str, Any]:
        good: list[Item] = []
        images: list[Any] = []
        failed: list[tuple[Item, str]] = []
        for item in items:
            if not _require_path(item, "image", failed):
                continue
            try:
                images.append(load_image(item.path, self.max_pixels))  # type: ignore[arg-type]
                good.append(item)
            except MediaError as exc:
                failed.append((item, exc.reason))
        return _collate_isolated(self.images, good, images, failed, "image processor")


class _HFEncoder:
    modality: str
    dim: int
    fixed_tokens: int | None
    preprocessor: Any

    def __init__(self, spec: str, model: nn.Module, layer: int, max_tokens: int | None = None) -> None:
        self.spec = spec
        self.model = freeze(model)
        self.layer = layer
        self.requested_max_tokens = max_tokens  # as asked (None = default); the identity resolves it
        self.device = torch.device("cpu")

    def identity(self) -> dict[str, Any]:
        audio = getattr(self, "audio", None)
        return _hf_identity(self.spec, self.modality, self.layer, self.requested_max_tokens, audio=audio)

    def to(self, device: str | torch.device) -> _HFEncoder:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def _inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


class HFTextEncoder(_HFEncoder):
    """``AutoTokenizer`` + ``AutoModel`` from the same spec; ragged tokens, ``lengths = attention_mask.sum(1)``."""

    modality = "text"
    fixed_tokens = None

    def __init__(self, spec: str, *, layer: int = -1, max_tokens: int | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        with _quiet_hf():
            tokenizer = AutoTokenizer.from_pretrained(spec)
            model = AutoModel.from_pretrained(spec)
        super().__init__(spec, _select_tower(model, "text"), layer, max_tokens)
        # Truncate exactly where the identity (computed from the files, without loading) says we do, capped by
        # what the loaded tokenizer and model know, so a cached store never claims a length it did not use.
        self.max_tokens = min(
            self.identity()["preprocess"]["max_tokens"],
            _effective_max_tokens(
                max_tokens, tokenizer.model_max_length, getattr(self.model.config, "max_position_embeddings", None)
            ),
        )
        self.preprocessor = HFTextPreprocessor(tokenizer, self.max_tokens)
        probe = self.preprocessor([Item(id="probe", path=None, text="a", label=None, ref=None, line=0)])
        self.dim = int(self._run(probe).shape[-1])  # also validates `layer` now, not mid-run

    def _run(self, batch: dict[str, Any]) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(**self._inputs(batch), output_hidden_states=self.layer != -1, return_dict=True)
            return _select_layer(out, self.layer)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self._run(batch)
        lengths = batch["attention_mask"].sum(1).to(torch.int64)
        return tokens, lengths


class HFImageEncoder(_HFEncoder):
    """``AutoImageProcessor`` + ``AutoModel``; conv maps become H*W tokens; fixed layout when the processor
    produces one input size whatever the image's shape (probed once at load with two dummy images)."""

    modality = "image"

    def __init__(self, spec: str, *, layer: int = -1, image: ImageOptions | None = None) -> None:
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModel

        with _quiet_hf():
            processor = _load_image_processor(AutoImageProcessor, spec)
            model = AutoModel.from_pretrained(spec)
        super().__init__(spec, _select_tower(model, "image"), layer)
        self.preprocessor = HFImagePreprocessor(processor, (image or ImageOptions()).max_pixels)
        wide = self.preprocessor._process([Image.new("RGB", (96, 64))])
        tall = self.preprocessor._process([Image.new("RGB", (64, 96))])
        if wide.shape != tall.shape:
            raise EncoderError(
                f"{spec}: the image processor keeps aspect ratio (inputs {tuple(wide.shape)} vs {tuple(tall.shape)}), "
                "so images cannot be batched; write a plugin for variable-resolution models"
            )
        probe = self._run({"pixel_values": wide})
        self.fixed_tokens = int(probe.shape[1])
        self.dim = int(probe.shape[2])

    def _run(self, batch: dict[str, Any]) -> torch.Tensor:
        with torch.inference_mode():
            pixels = batch["pixel_values"].to(self.device, non_blocking=True)
            out = self.model(pixel_values=pixels, output_hidden_states=self.layer != -1, return_dict=True)
            return _as_tokens(_select_layer(out, self.layer))

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self._run(batch)
        lengths = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.int64)
        return tokens, lengths


def _derived(item: Item, kind: str, count: int, split: bool) -> list[Item]:
    """The store items one manifest item becomes: itself, or ``count`` parts ``{id}#{kind}{k}``."""
    return [item.part(kind, k) for k in range(count)] if split else [item]


class HFAudioPreprocessor:
    """Decodes audio items (:func:`load_audio_parts`: mono, resampled, long-audio policy, zero-padded up to the
    receptive field) and runs the feature extractor. Adds ``input_lengths``: samples per row for raw-waveform
    models, mel frames of the real audio for Whisper (whose extractor pads everything to 30 s)."""

    def __init__(
        self,
        extractor: Any,
        sample_rate: int,
        max_seconds: float | None,
        segment: str,
        min_samples: int,
        spectrogram: bool,
        pass_rate: bool,
        resampler: str,
        max_decoded_seconds: float | None = None,
    ) -> None:
        self.extractor = extractor
        self.max_decoded_seconds = max_decoded_seconds
        self.resampler = resampler
        self.sample_rate = sample_rate
        self.max_seconds = max_seconds
        self.segment = segment
        self.min_samples = min_samples
        self.spectrogram = spectrogram
        self.pass_rate = pass_rate  # the extractor refuses a rate other than its own; an override skips the check

    def waves(self, waves: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Batch tensors for decoded mono waveforms at ``sample_rate``."""
        arrays = [w.numpy() for w in waves]
        rate = {"sampling_rate": self.sample_rate} if self.pass_rate else {}
        if self.spectrogram:
            enc = self.extractor(arrays, return_attention_mask=True, return_tensors="pt", **rate)
            return {"input_features": enc["input_features"], "input_lengths": enc["attention_mask"].sum(1)}
        # The mask makes do_normalize use each item's own samples only, whether or not the model takes it.
        enc = self.extractor(arrays, padding="longest", return_attention_mask=True, return_tensors="pt", **rate)
        return {
            "input_values": enc["input_values"],
            "attention_mask": enc["attention_mask"],
            "input_lengths": torch.tensor([len(a) for a in arrays], dtype=torch.int64),
        }

    def __call__(self, items: list[Item]) -> dict[str, Any]:
        good: list[Item] = []
        waves: list[torch.Tensor] = []
        failed: list[tuple[Item, str]] = []
        split = self.segment == "split"
        for item in items:
            if not _require_path(item, "audio", failed):
                continue
            try:
                parts = load_audio_parts(
                    item.path,  # type: ignore[arg-type]
                    self.sample_rate,
                    max_seconds=self.max_seconds,
                    segment=self.segment,
                    min_samples=self.min_samples,
                    resampler=self.resampler,
                    max_decoded_seconds=self.max_decoded_seconds,
                )
            except MediaError as exc:
                failed.append((item, exc.reason))
                continue
            good.extend(_derived(item, "seg", len(parts), split))
            waves.extend(parts)
        batch: dict[str, Any] = {"items": good, "failed": failed}
        if waves:
            batch.update(self.waves(waves))
        return batch


class HFAudioEncoder(_HFEncoder):
    """``AutoFeatureExtractor`` + ``AutoModel``: ragged tokens, one per output frame of the real audio.

    Raw-waveform models (wav2vec2, HuBERT, WavLM, data2vec-audio, ...): frame counts come from the model's own
    ``_get_feat_extract_output_lengths``. When the feature extractor asks for an attention mask (layer-norm
    models) the batch is padded and masked; otherwise (group-norm models such as wav2vec2-base, where padding
    zeros would change every frame's normalisation) rows of equal length are run together without padding, so
    the output is exactly that of each item alone (split segments share a length, so they still batch). Whisper:
    the encoder of the seq2seq model; the extractor pads to its 30 s window (longer audio is cut at 30 s, or at
    ``max_seconds``), and only the frames of the real audio are kept (mel frames through the encoder's length
    formula). Audio shorter than the receptive field is zero-padded up to it (see ``load_audio_parts``).
    """

    modality = "audio"
    fixed_tokens = None

    def __init__(self, spec: str, *, layer: int = -1, audio: AudioOptions | None = None) -> None:
        from transformers import AutoFeatureExtractor, AutoModel

        with _quiet_hf():
            extractor = AutoFeatureExtractor.from_pretrained(spec)
            model = AutoModel.from_pretrained(spec)
        super().__init__(spec, _select_tower(model, "audio"), layer)
        self.audio = audio or AudioOptions()
        native = getattr(extractor, "sampling_rate", None)
        self.sample_rate = int(self.audio.sample_rate or native or 0)
        if self.sample_rate < 1:
            raise EncoderError(f"{spec}: the feature extractor names no sampling_rate; pass sample_rate")
        if not hasattr(self.model, "_get_feat_extract_output_lengths"):
            raise EncoderError(f"{spec}: {type(self.model).__name__} has no frame-length formula; write a plugin")
        self.spectrogram = "input_features" in getattr(extractor, "model_input_names", ())
        max_seconds = self.audio.max_seconds
        if self.spectrogram:
            window = getattr(extractor, "n_samples", None)
            if not window:
                raise EncoderError(f"{spec}: spectrogram models other than Whisper-style 30 s windows need a plugin")
            window_s = window / extractor.sampling_rate
            if self.audio.segment == "split" and max_seconds is not None and max_seconds > window_s:
                raise EncoderError(f"{spec} sees at most {window_s:g} s; split into max_seconds <= {window_s:g}")
            max_seconds = min(max_seconds or window_s, window_s)
        self.use_mask = not self.spectrogram and bool(getattr(extractor, "return_attention_mask", False))
        self.min_samples = self._min_samples()
        self.preprocessor = HFAudioPreprocessor(
            extractor, self.sample_rate, max_seconds, self.audio.segment, self.min_samples, self.spectrogram,
            pass_rate=self.sample_rate == native, resampler=self.audio.resampler,
            max_decoded_seconds=self.audio.max_decoded_seconds,
        )
        probe = self._run(self.preprocessor.waves([torch.zeros(max(self.min_samples, self.sample_rate // 10))]))
        self.dim = int(probe.shape[-1])  # also validates `layer` now, not mid-run

    def _min_samples(self) -> int:
        """Shortest input giving one output frame (wav2vec2: 400 samples), from the model's own formula."""
        if self.spectrogram:
            return 1
        n = torch.arange(1, 1 << 17)
        ok = (self.model._get_feat_extract_output_lengths(n) >= 1).nonzero()
        if len(ok) == 0:
            raise EncoderError(f"{self.spec}: the model needs more than {1 << 17} samples for one frame")
        return int(n[ok[0, 0]])

    def _forward(self, kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(**kwargs, output_hidden_states=self.layer != -1, return_dict=True)
        return _select_layer(out, self.layer)

    def _run(self, batch: dict[str, Any]) -> torch.Tensor:
        with torch.inference_mode():
            if self.spectrogram:
                return self._forward({"input_features": batch["input_features"].to(self.device, non_blocking=True)})
            values = batch["input_values"].to(self.device, non_blocking=True)
            if self.use_mask:
                mask = batch["attention_mask"].to(values.device)
                return self._forward({"input_values": values, "attention_mask": mask})
            lengths = batch["input_lengths"].tolist()
            frames = self._frames(batch["input_lengths"])
            tokens: torch.Tensor | None = None
            for n in sorted(set(lengths)):
                rows = [i for i, m in enumerate(lengths) if m == n]
                part = self._forward({"input_values": values[rows, :n]})
                if tokens is None:
                    tokens = part.new_zeros(len(lengths), int(frames.max()), part.shape[-1])
                tokens[rows, : part.shape[1]] = part
            assert tokens is not None
            return tokens

    def _frames(self, input_lengths: torch.Tensor) -> torch.Tensor:
        return self.model._get_feat_extract_output_lengths(input_lengths.to(torch.int64)).to(torch.int64)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self._run(batch)
        lengths = self._frames(batch["input_lengths"]).clamp(1, tokens.shape[1])
        return tokens, lengths


class _ClipPreprocessor:
    """Samples clips with :func:`load_video_frames` and turns them into tensors item by item, so only one
    video's full-resolution frames are in memory at a time (a 4K clip of 16 frames is 400 MB)."""

    video: VideoOptions

    def clips(self, clips: list[np.ndarray]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, items: list[Item]) -> dict[str, Any]:
        good: list[Item] = []
        parts: list[dict[str, torch.Tensor]] = []
        failed: list[tuple[Item, str]] = []
        v = self.video
        for item in items:
            if not _require_path(item, "video", failed):
                continue
            try:
                path: str = item.path  # type: ignore[assignment]  # checked by _require_path
                item_clips = load_video_frames(path, v.frames, v.sampling, v.fps, v.clips, v.max_video_pixels)
            except MediaError as exc:
                failed.append((item, exc.reason))
                continue
            try:
                parts.append(self.clips(item_clips))
            except Exception as exc:  # one odd video must not fail the batch
                failed.append((item, f"video preprocessing failed: {type(exc).__name__}: {exc}"))
                continue
            good.extend(_derived(item, "clip", len(item_clips), v.clips > 1))
        batch: dict[str, Any] = {"items": good, "failed": failed}
        if parts:
            batch.update({k: torch.cat([part[k] for part in parts]) for k in parts[0]})
        return batch


class HFVideoPreprocessor(_ClipPreprocessor):
    """Clips through the model's video processor, or a video-aware image processor (VideoMAE's)."""

    def __init__(self, processor: Any, video: VideoOptions, video_processor: bool) -> None:
        self.processor = processor
        self.video = video
        self.video_processor = video_processor

    def clips(self, clips: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Batch tensors for decoded clips ``[T, H, W, 3]`` uint8."""
        if self.video_processor:
            out = self.processor(videos=list(clips), return_tensors="pt")
        else:  # VideoMAE-style image processors take a list of videos as their images argument
            out = self.processor(list(clips), return_tensors="pt")
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


class HFVideoEncoder(_HFEncoder):
    """``AutoImageProcessor`` (PIL backend, e.g. VideoMAE's) or ``AutoVideoProcessor`` + ``AutoModel``; fixed
    layout: the model's tokens per clip, probed once at load with two dummy clips of ``frames`` frames."""

    modality = "video"

    def __init__(self, spec: str, *, layer: int = -1, video: VideoOptions | None = None) -> None:
        from transformers import AutoModel

        self.video = video or VideoOptions()
        with _quiet_hf():
            model = AutoModel.from_pretrained(spec)  # first: it downloads an uncached hub id
            processor, video_processor = _load_video_processor(spec)
        super().__init__(spec, _select_tower(model, "video"), layer)
        self.preprocessor = HFVideoPreprocessor(processor, self.video, video_processor)
        t = self.video.frames
        wide = self.preprocessor.clips([np.zeros((t, 64, 96, 3), dtype=np.uint8)])
        tall = self.preprocessor.clips([np.zeros((t, 96, 64, 3), dtype=np.uint8)])
        if {k: v.shape for k, v in wide.items()} != {k: v.shape for k, v in tall.items()}:
            raise EncoderError(f"{spec}: the processor keeps aspect ratio, so clips cannot be batched; write a plugin")
        try:
            probe = self._run(wide)
        except EncoderError:
            raise
        except Exception as exc:
            config = self.model.config
            wanted = getattr(config, "num_frames", None) or getattr(config, "frames_per_clip", None)
            hint = f"; this model takes {wanted} frames (pass frames={wanted})" if wanted else ""
            raise EncoderError(
                f"{spec}: cannot encode a clip of {t} frames: {type(exc).__name__}: {exc}{hint}"
            ) from exc
        self.fixed_tokens = int(probe.shape[1])
        self.dim = int(probe.shape[2])

    def _run(self, batch: dict[str, Any]) -> torch.Tensor:
        with torch.inference_mode():
            inputs = {k: v for k, v in self._inputs(batch).items() if k.startswith("pixel_values")}
            out = self.model(**inputs, output_hidden_states=self.layer != -1, return_dict=True)
            return _as_tokens(_select_layer(out, self.layer))

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self._run(batch)
        lengths = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.int64)
        return tokens, lengths


class FramePreprocessor(_ClipPreprocessor):
    """Per-frame video mode, CPU side: sample clips, then run the image encoder's preprocessor ``images()`` on
    every frame (as RGB PIL images, exactly what :func:`load_image` gives the image encoder)."""

    def __init__(self, image_preprocessor: Any, video: VideoOptions) -> None:
        self.image_preprocessor = image_preprocessor
        self.video = video

    def clips(self, clips: list[np.ndarray]) -> dict[str, torch.Tensor]:
        from PIL import Image

        frames = [Image.fromarray(frame) for clip in clips for frame in clip]  # clip-major: [B * T]
        return dict(self.image_preprocessor.images(frames))


class FrameEncoder:
    """Per-frame video mode for users without a video model: any fixed-layout image encoder (HF or plugin) runs
    on each sampled frame. ``frame_pool="mean"``: the mean over frames of each token position (L = the image
    encoder's tokens); ``"keep"``: the frames' tokens concatenated in time order (L = frames x image tokens).
    Fixed layout either way."""

    modality = "video"

    def __init__(
        self, image_encoder: FrozenEncoder, video: VideoOptions, frame_pool: str, identity: dict[str, Any]
    ) -> None:
        _check_frame_pool(frame_pool)
        if image_encoder.fixed_tokens is None:
            raise EncoderError("per-frame video mode needs an image encoder with a fixed token count")
        if not callable(getattr(image_encoder.preprocessor, "images", None)):
            raise EncoderError(
                "per-frame video mode needs the image encoder's preprocessor to offer images(list of PIL images) "
                "-> dict (see docs/plugins.md)"
            )
        self.image = image_encoder
        self.model = getattr(image_encoder, "model", None)  # so the loop's freeze() reaches it
        self.video = video
        self.frame_pool = frame_pool
        self.dim = int(image_encoder.dim)
        self.image_tokens = int(image_encoder.fixed_tokens)
        self.fixed_tokens = self.image_tokens * (video.frames if frame_pool == "keep" else 1)
        self.preprocessor = FramePreprocessor(image_encoder.preprocessor, video)
        self._identity = identity

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def to(self, device: str | torch.device) -> FrameEncoder:
        self.image.to(device)
        return self

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(batch["items"])
        frames_batch = {k: v for k, v in batch.items() if k not in ("items", "failed")}
        tokens, _ = self.image.forward(frames_batch)  # [n * T, L, D], clip-major
        t, length, dim = self.video.frames, self.image_tokens, tokens.shape[-1]
        tokens = tokens.reshape(n, t, length, dim)
        # Mean in fp32: fp16 sums over many frames lose digits (same reason as the loop's pooling).
        if self.frame_pool == "mean":
            tokens = tokens.float().mean(1).to(tokens.dtype)
        else:
            tokens = tokens.reshape(n, t * length, dim)  # frame-major: all of frame 0's tokens first
        return tokens, torch.full((n,), tokens.shape[1], dtype=torch.int64)


def _load_video_processor(spec: str) -> tuple[Any, bool]:
    """(processor, is_video_processor): the video processor when the model ships one (the identity hashes the
    same file), else its image processor (PIL backend; VideoMAE's takes clips)."""
    from transformers import AutoImageProcessor

    folder, _ = _resolve_hf_dir(spec)
    if (folder / _VIDEO_PROCESSOR_FILE).is_file():
        try:
            from transformers import AutoVideoProcessor  # transformers >= 4.52

            return AutoVideoProcessor.from_pretrained(spec), True
        except Exception as exc:  # e.g. torchvision missing: video processors need it
            raise EncoderError(f"{spec}: cannot load its video processor: {exc}") from exc
    return _load_image_processor(AutoImageProcessor, spec), False


def _load_image_processor(auto_cls: Any, spec: str) -> Any:
    """Prefer the PIL backend: it exists everywhere, so the pixels (and the identity) do not depend on whether
    torchvision happens to be installed."""
    if "backend" in inspect.signature(auto_cls.from_pretrained).parameters or _transformers_major() >= 5:
        try:
            return auto_cls.from_pretrained(spec, backend="pil")
        except Exception:
            pass  # a processor without a PIL backend: take the default (errors resurface from that call)
    return auto_cls.from_pretrained(spec)


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".", 1)[0])


# --------------------------------------------------------------------------------------------- loading


def _load_plugin(
    spec: str,
    modality: str,
    layer: int,
    max_tokens: int | None,
    options: dict[str, Any] | None,
    media: MediaOptions | None = None,
) -> FrozenEncoder:
    target = _plugin_target(spec)
    assert target is not None
    mod = _import_plugin_module(target[0])
    factory = getattr(mod, target[1], None)
    if not callable(factory):
        raise EncoderError(f"plugin {spec!r}: {target[1]!r} is not a callable in {target[0]}")
    encoder = factory(**_plugin_kwargs(modality, layer, max_tokens, options, media))
    missing = [a for a in ("modality", "dim", "fixed_tokens", "preprocessor", "identity", "forward", "to")
               if not hasattr(encoder, a)]
    if missing:
        raise EncoderError(f"plugin {spec!r} returned an object without {', '.join(missing)} (see docs/plugins.md)")
    if encoder.modality != modality:
        raise EncoderError(f"plugin {spec!r} encodes {encoder.modality!r}, not {modality!r}")
    return encoder


def load_encoder(
    spec: str,
    modality: str,
    *,
    layer: int = -1,
    max_tokens: int | None = None,
    device: str | torch.device = "cpu",
    options: dict[str, Any] | None = None,
    audio: AudioOptions | None = None,
    video: VideoOptions | None = None,
    frame_pool: str = "mean",
    image: ImageOptions | None = None,
) -> FrozenEncoder:
    """Load a frozen encoder from a plugin spec, a local ``save_pretrained`` dir or a hub id; move it to device.

    ``audio``/``video``: decoding options for those modalities (defaults when None). ``--modality video`` with an
    image encoder gives a :class:`FrameEncoder` pooling frames with ``frame_pool``.
    """
    _check_modality(modality)
    _check_frame_pool(frame_pool)
    media = _media_options(modality, audio, video, image)
    if _plugin_target(spec) is None:
        require_model_files(spec)  # a hub id neither cached nor reachable fails here, in one line
    if modality == "video" and _frame_mode(spec):
        assert isinstance(media, VideoOptions)
        image = load_encoder(spec, "image", layer=layer, max_tokens=max_tokens, device=device, options=options)
        ident = encoder_identity(spec, "image", layer=layer, max_tokens=max_tokens, options=options)
        return FrameEncoder(image, media, frame_pool, _frames_identity(ident, media, frame_pool)).to(device)
    _check_video_pool(spec, modality, frame_pool)
    encoder: Any
    if _plugin_target(spec) is not None:
        encoder = _load_plugin(spec, modality, layer, max_tokens, options, media)
        model = getattr(encoder, "model", None)
        if isinstance(model, nn.Module):
            freeze(model)  # plugins should freeze themselves; make sure anyway
    else:
        _check_hf_args(spec, modality, max_tokens, options)
        if modality == "text":
            encoder = HFTextEncoder(spec, layer=layer, max_tokens=max_tokens)
        elif modality == "audio":
            encoder = HFAudioEncoder(spec, layer=layer, audio=media)  # type: ignore[arg-type]
        elif modality == "video":
            encoder = HFVideoEncoder(spec, layer=layer, video=media)  # type: ignore[arg-type]
        else:
            encoder = HFImageEncoder(spec, layer=layer, image=media)  # type: ignore[arg-type]
    return encoder.to(device)
