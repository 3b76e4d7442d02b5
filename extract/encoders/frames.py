"""Per-frame video mode, for users without a video model: any fixed-layout image encoder (a transformers image
model, or a plugin whose module declares ``MODALITIES = ("image",)``) runs on each sampled frame."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..media import VIDEO_DECODER_VERSION, VideoOptions
from .base import EncoderError, EncoderNotCachedError, FrozenEncoder
from .specs import (
    _check_frame_pool,
    _import_plugin_module,
    _plugin_target,
    _read_json,
    _resolve_hf_dir,
    require_model_files,
)
from .video import _VIDEO_PROCESSOR_FILE, _ClipPreprocessor


def _frames_identity(image_identity: dict[str, Any], video: VideoOptions, frame_pool: str) -> dict[str, Any]:
    return {
        "kind": "frames",
        "frame_pool": frame_pool,
        "frames": video.frames,  # also in the run's media options; here because L depends on it with "keep"
        "decoder": VIDEO_DECODER_VERSION,
        "image_encoder": image_identity,
    }


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
