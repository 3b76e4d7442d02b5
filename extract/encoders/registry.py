"""One table from an encoder kind to how its cache identity is computed and how it is loaded.

A spec resolves to one kind (:func:`encoder_kind`): ``plugin`` (``MODULE:CALLABLE`` or ``file.py:CALLABLE``),
``hf`` (a ``save_pretrained`` directory or hub id, one class per modality in :data:`HF_ENCODERS`) or ``frames``
(``--modality video`` with an image encoder, run frame by frame). :func:`encoder_identity` and
:func:`load_encoder` both go through :data:`ENCODER_KINDS`, so the identity and the loaded encoder cannot drift
apart; a new kind of encoder is one entry here (its own module beside this one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..media import AudioOptions, ImageOptions, VideoOptions
from .audio import HFAudioEncoder
from .base import FrozenEncoder, freeze
from .frames import FrameEncoder, _frame_mode, _frames_identity
from .hf import HFEncoder, hf_identity
from .image import HFImageEncoder
from .specs import (
    EncoderSettings,
    _check_frame_pool,
    _check_hf_args,
    _check_modality,
    _check_video_pool,
    _load_plugin,
    _media_options,
    _plugin_identity,
    _plugin_target,
    require_model_files,
)
from .text import HFTextEncoder
from .video import HFVideoEncoder

__all__ = ["ENCODER_KINDS", "HF_ENCODERS", "EncoderKind", "EncoderSettings", "encoder_identity", "encoder_kind",
           "load_encoder"]

# The transformers wrapper of each modality.
HF_ENCODERS: dict[str, type[HFEncoder]] = {
    "text": HFTextEncoder,
    "image": HFImageEncoder,
    "audio": HFAudioEncoder,
    "video": HFVideoEncoder,
}


@dataclass(frozen=True)
class EncoderKind:
    """How one kind of encoder gives its identity (without loading where it can) and how it loads (on the CPU;
    :func:`load_encoder` moves it to the device)."""

    identity: Callable[[str, str, EncoderSettings], dict[str, Any]]
    load: Callable[[str, str, EncoderSettings], FrozenEncoder]


def _hf_identity(spec: str, modality: str, s: EncoderSettings) -> dict[str, Any]:
    _check_video_pool(spec, modality, s.frame_pool)
    _check_hf_args(spec, modality, s.max_tokens, s.options)
    return hf_identity(spec, HF_ENCODERS[modality], s.layer, s.max_tokens, s.media)


def _hf_load(spec: str, modality: str, s: EncoderSettings) -> FrozenEncoder:
    _check_video_pool(spec, modality, s.frame_pool)
    _check_hf_args(spec, modality, s.max_tokens, s.options)
    return HF_ENCODERS[modality].from_settings(spec, s.layer, s.max_tokens, s.media)


def _plugin_identity_of(spec: str, modality: str, s: EncoderSettings) -> dict[str, Any]:
    _check_video_pool(spec, modality, s.frame_pool)
    return _plugin_identity(spec, modality, s)[0]


def _plugin_load(spec: str, modality: str, s: EncoderSettings) -> FrozenEncoder:
    _check_video_pool(spec, modality, s.frame_pool)
    encoder = _load_plugin(spec, modality, s)
    model = getattr(encoder, "model", None)
    if isinstance(model, nn.Module):
        freeze(model)  # plugins should freeze themselves; make sure anyway
    return encoder


def _frames_identity_of(spec: str, modality: str, s: EncoderSettings) -> dict[str, Any]:
    assert isinstance(s.media, VideoOptions)
    image = encoder_identity(spec, "image", layer=s.layer, max_tokens=s.max_tokens, options=s.options)
    return _frames_identity(image, s.media, s.frame_pool)


def _frames_load(spec: str, modality: str, s: EncoderSettings) -> FrozenEncoder:
    assert isinstance(s.media, VideoOptions)
    image = load_encoder(spec, "image", layer=s.layer, max_tokens=s.max_tokens, options=s.options)
    ident = encoder_identity(spec, "image", layer=s.layer, max_tokens=s.max_tokens, options=s.options)
    return FrameEncoder(image, s.media, s.frame_pool, _frames_identity(ident, s.media, s.frame_pool))


ENCODER_KINDS: dict[str, EncoderKind] = {
    "hf": EncoderKind(_hf_identity, _hf_load),
    "plugin": EncoderKind(_plugin_identity_of, _plugin_load),
    "frames": EncoderKind(_frames_identity_of, _frames_load),
}


def encoder_kind(spec: str, modality: str) -> str:
    """The key of :data:`ENCODER_KINDS` that ``spec`` encoding ``modality`` resolves to."""
    if modality == "video" and _frame_mode(spec):
        return "frames"
    return "plugin" if _plugin_target(spec) is not None else "hf"


def _settings(modality: str, layer: int, max_tokens: int | None, options: dict[str, Any] | None,
              audio: AudioOptions | None, video: VideoOptions | None, image: ImageOptions | None,
              frame_pool: str) -> EncoderSettings:
    _check_modality(modality)
    _check_frame_pool(frame_pool)
    return EncoderSettings(layer, max_tokens, options, _media_options(modality, audio, video, image), frame_pool)


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
    settings = _settings(modality, layer, max_tokens, options, audio, video, image, frame_pool)
    return ENCODER_KINDS[encoder_kind(spec, modality)].identity(spec, modality, settings)


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
    settings = _settings(modality, layer, max_tokens, options, audio, video, image, frame_pool)
    if _plugin_target(spec) is None:
        require_model_files(spec)  # a hub id neither cached nor reachable fails here, in one line
    return ENCODER_KINDS[encoder_kind(spec, modality)].load(spec, modality, settings).to(device)
