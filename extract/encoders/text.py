"""Text through transformers: ``AutoTokenizer`` + ``AutoModel`` (or the text tower of a dual encoder)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..manifest import Item, escape_surrogates, unicode_problem
from .hf import HFEncoder, _quiet_hf, _select_layer, _select_tower
from .specs import _read_json

DEFAULT_MAX_TOKENS = 512


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


class HFTextEncoder(HFEncoder):
    """``AutoTokenizer`` + ``AutoModel`` from the same spec; ragged tokens, ``lengths = attention_mask.sum(1)``."""

    modality = "text"
    fixed_tokens = None

    @staticmethod
    def preprocess_identity(folder: Path, config: dict[str, Any], max_tokens: int | None, media: Any) -> dict:
        tok_cfg = _read_json(folder / "tokenizer_config.json")
        return {
            "max_tokens": _effective_max_tokens(
                max_tokens, tok_cfg.get("model_max_length"), _text_config(config).get("max_position_embeddings")
            ),
            "padding_side": "right",
        }

    @classmethod
    def from_settings(cls, spec: str, layer: int, max_tokens: int | None, media: Any) -> HFTextEncoder:
        return cls(spec, layer=layer, max_tokens=max_tokens)

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
