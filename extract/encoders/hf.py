"""What the transformers wrappers share: the model folder and its files, the identity computed from them, the
tower and layer of the model that encode a modality, batching with one bad input failing alone, and the base class
of the per-modality encoders (:mod:`.text`, :mod:`.image`, :mod:`.audio`, :mod:`.video`).

A spec that is a local directory saved with ``save_pretrained`` or a Hugging Face hub id loads with ``AutoModel``
plus the modality's processor from the same spec. ``layer=-1`` means the model's final output,
``last_hidden_state``, including any final norm the model applies; any other value indexes ``hidden_states``
(0 = embeddings), which for some models (e.g. ViT) is before that norm.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..filehash import files_sha256
from ..manifest import Item
from .base import EncoderError, freeze
from .specs import _read_json, _resolve_hf_dir

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_CONFIG_SUFFIXES = (".json", ".txt", ".model", ".tiktoken")  # .model: sentencepiece tokenizers


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


def _model_files(folder: Path) -> list[Path]:
    """Weight and config/tokenizer/processor files in the model folder (top level: what from_pretrained reads)."""
    files = [
        p for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix in _WEIGHT_SUFFIXES + _CONFIG_SUFFIXES and p.name.lower() != "readme.txt"
    ]
    if not any(p.suffix in _WEIGHT_SUFFIXES for p in files):
        raise EncoderError(f"no weight files ({', '.join(_WEIGHT_SUFFIXES)}) in {folder}")
    return files


def hf_identity(
    spec: str, encoder_class: type[HFEncoder], layer: int, max_tokens: int | None, media: Any = None
) -> dict[str, Any]:
    """Identity of a transformers model used as ``encoder_class`` (one of the HF modality classes): the sha256 of
    its weight and config files, the layer, and what the class's preprocessing reads from the model folder."""
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
        "modality": encoder_class.modality,
        "layer": layer,
    }
    ident["preprocess"] = encoder_class.preprocess_identity(folder, config, max_tokens, media)
    return ident


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


def _derived(item: Item, kind: str, count: int, split: bool) -> list[Item]:
    """The store items one manifest item becomes: itself, or ``count`` parts ``{id}#{kind}{k}``."""
    return [item.part(kind, k) for k in range(count)] if split else [item]


class HFEncoder:
    """What the transformers wrappers of every modality share: the frozen model (or its tower), the layer asked
    for, the device, and the identity computed from the model folder (:func:`hf_identity`)."""

    modality: str
    dim: int
    fixed_tokens: int | None
    preprocessor: Any
    media: Any = None  # the decoding options that are part of the identity (audio only)

    @staticmethod
    def preprocess_identity(folder: Path, config: dict[str, Any], max_tokens: int | None, media: Any) -> dict:
        """The ``preprocess`` part of the identity: the settings read from the model folder that shape the input."""
        raise NotImplementedError

    @classmethod
    def from_settings(cls, spec: str, layer: int, max_tokens: int | None, media: Any) -> HFEncoder:
        """The encoder for ``spec`` with the extraction's settings (each modality takes the ones it uses)."""
        raise NotImplementedError

    def __init__(self, spec: str, model: nn.Module, layer: int, max_tokens: int | None = None) -> None:
        self.spec = spec
        self.model = freeze(model)
        self.layer = layer
        self.requested_max_tokens = max_tokens  # as asked (None = default); the identity resolves it
        self.device = torch.device("cpu")

    def identity(self) -> dict[str, Any]:
        return hf_identity(self.spec, type(self), self.layer, self.requested_max_tokens, self.media)

    def to(self, device: str | torch.device) -> HFEncoder:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def _inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}


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
