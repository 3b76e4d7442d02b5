"""Video through transformers: ``AutoImageProcessor`` (PIL backend, e.g. VideoMAE's) or ``AutoVideoProcessor`` +
``AutoModel`` (VideoMAE, TimeSformer, ViViT, ...); clips are sampled by :func:`extract.media.load_video_frames`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..manifest import Item
from ..media import VIDEO_DECODER_VERSION, MediaError, VideoOptions, load_video_frames
from .base import EncoderError
from .hf import (
    HFEncoder,
    _as_tokens,
    _derived,
    _load_image_processor,
    _quiet_hf,
    _require_path,
    _select_layer,
    _select_tower,
)
from .image import _IMAGE_PREPROCESS_KEYS
from .specs import _read_json, _resolve_hf_dir

_VIDEO_PREPROCESS_KEYS = (*_IMAGE_PREPROCESS_KEYS, "video_processor_type", "num_frames", "do_sample_frames")


_VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"


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


class HFVideoEncoder(HFEncoder):
    """``AutoImageProcessor`` (PIL backend, e.g. VideoMAE's) or ``AutoVideoProcessor`` + ``AutoModel``; fixed
    layout: the model's tokens per clip, probed once at load with two dummy clips of ``frames`` frames."""

    modality = "video"

    @staticmethod
    def preprocess_identity(folder: Path, config: dict[str, Any], max_tokens: int | None, media: Any) -> dict:
        video_proc = (folder / _VIDEO_PROCESSOR_FILE).is_file()
        proc = _read_json(folder / (_VIDEO_PROCESSOR_FILE if video_proc else "preprocessor_config.json"))
        return {
            **{k: proc[k] for k in _VIDEO_PREPROCESS_KEYS if k in proc},
            **({} if video_proc else {"backend": "pil"}),
            "decoder": VIDEO_DECODER_VERSION,
        }

    @classmethod
    def from_settings(cls, spec: str, layer: int, max_tokens: int | None, media: Any) -> HFVideoEncoder:
        return cls(spec, layer=layer, video=media)

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
