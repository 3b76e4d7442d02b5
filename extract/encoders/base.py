"""The encoder protocol every extraction needs, and freezing.

An encoder is anything with this small interface (Hugging Face models are wrapped by the classes of
:mod:`extract.encoders.text`, ``image``, ``audio`` and ``video``; :class:`~extract.encoders.frames.FrameEncoder`
runs any image encoder over video frames; plugins return their own object, see ``docs/plugins.md``)::

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
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from stores import OneEncoderError

from ..manifest import Item

MODALITIES = ("image", "text", "audio", "video")
FRAME_POOLS = ("mean", "keep")


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
