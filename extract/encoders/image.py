"""Images through transformers: ``AutoImageProcessor`` (PIL backend) + ``AutoModel`` (or the vision tower)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..manifest import Item
from ..media import DEFAULT_MAX_PIXELS, ImageOptions, MediaError, load_image
from .base import EncoderError
from .hf import (
    HFEncoder,
    _as_tokens,
    _collate_isolated,
    _load_image_processor,
    _quiet_hf,
    _require_path,
    _select_layer,
    _select_tower,
)
from .specs import _read_json

# Bumped when load_image's conversion policy changes, since that changes the pixels every image model sees.
IMAGE_DECODER_VERSION = "extract.media.load_image/1"
_IMAGE_PREPROCESS_KEYS = (
    "image_processor_type", "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale",
    "rescale_factor", "do_normalize", "image_mean", "image_std", "do_convert_rgb", "do_pad",
)


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


class HFImageEncoder(HFEncoder):
    """``AutoImageProcessor`` + ``AutoModel``; conv maps become H*W tokens; fixed layout when the processor
    produces one input size whatever the image's shape (probed once at load with two dummy images)."""

    modality = "image"

    @staticmethod
    def preprocess_identity(folder: Path, config: dict[str, Any], max_tokens: int | None, media: Any) -> dict:
        proc = _read_json(folder / "preprocessor_config.json")
        return {
            **{k: proc[k] for k in _IMAGE_PREPROCESS_KEYS if k in proc},
            "backend": "pil",
            "decoder": IMAGE_DECODER_VERSION,
        }

    @classmethod
    def from_settings(cls, spec: str, layer: int, max_tokens: int | None, media: Any) -> HFImageEncoder:
        return cls(spec, layer=layer, image=media)

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
