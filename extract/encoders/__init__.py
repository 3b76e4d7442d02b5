"""Frozen encoders: loading, freezing, preprocessing and the cache identity of an encoder.

- :mod:`.base`: the protocol every encoder meets (:class:`FrozenEncoder`, :class:`Preprocessor`), the errors,
  :func:`freeze` and :func:`inference_context`.
- :mod:`.specs`: what a spec names (plugin, local directory, hub id), the checks on the settings, plugins.
- :mod:`.hf`: what the transformers wrappers share; :mod:`.text`, :mod:`.image`, :mod:`.audio`, :mod:`.video`:
  one module per modality.
- :mod:`.frames`: per-frame video mode, any fixed-layout image encoder run on sampled frames.
- :mod:`.registry`: one table from an encoder kind to its identity and its loader (:func:`encoder_identity`,
  :func:`load_encoder`).

Audio and video decoding policies (sample rate, long audio, frame sampling, clips) are :class:`AudioOptions`
and :class:`VideoOptions` from :mod:`extract.media`; ``docs/media.md`` explains them.
"""

from __future__ import annotations

from .audio import HFAudioEncoder, HFAudioPreprocessor
from .base import (
    FRAME_POOLS,
    MODALITIES,
    EncoderError,
    EncoderNotCachedError,
    FrozenEncoder,
    Preprocessor,
    freeze,
    inference_context,
)
from .frames import FrameEncoder, FramePreprocessor
from .image import (
    CLS_FIRST_MODEL_TYPES,
    IMAGE_DECODER_VERSION,
    HFImageEncoder,
    HFImagePreprocessor,
    image_tokens_start_with_cls,
)
from .registry import (
    ENCODER_KINDS,
    HF_ENCODERS,
    EncoderKind,
    EncoderSettings,
    encoder_identity,
    encoder_kind,
    load_encoder,
)
from .specs import SHIPPED_PLUGINS, check_recorded_spec, is_foreign_plugin, require_model_files
from .text import DEFAULT_MAX_TOKENS, HFTextEncoder, HFTextPreprocessor
from .video import HFVideoEncoder, HFVideoPreprocessor

__all__ = [
    "CLS_FIRST_MODEL_TYPES",
    "DEFAULT_MAX_TOKENS",
    "ENCODER_KINDS",
    "EncoderError",
    "EncoderKind",
    "EncoderNotCachedError",
    "EncoderSettings",
    "FRAME_POOLS",
    "FrameEncoder",
    "FramePreprocessor",
    "FrozenEncoder",
    "HF_ENCODERS",
    "HFAudioEncoder",
    "HFAudioPreprocessor",
    "HFImageEncoder",
    "HFImagePreprocessor",
    "HFTextEncoder",
    "HFTextPreprocessor",
    "HFVideoEncoder",
    "HFVideoPreprocessor",
    "IMAGE_DECODER_VERSION",
    "MODALITIES",
    "Preprocessor",
    "SHIPPED_PLUGINS",
    "check_recorded_spec",
    "encoder_identity",
    "encoder_kind",
    "freeze",
    "image_tokens_start_with_cls",
    "inference_context",
    "is_foreign_plugin",
    "load_encoder",
    "require_model_files",
]
