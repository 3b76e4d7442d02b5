"""A small Python API for notebooks, thin over the run directory, the stores and the extraction path.

```python
from pipeline import Run, StoreDataset

run = Run.load("runs/up-add")                        # the evaluation weights, in eval mode
texts = run.embed("text", ["a dog on a beach"])      # raw inputs: texts, or file paths for image/audio/video
images = run.embed("image", tokens=features)         # features like a store's: [B, L, D] (+ mask) or pooled [B, D]
gallery = run.embed_store("stores/val-vit")          # every item of a store
scores = texts @ images.T                            # unit vectors: cosine similarity

dataset = StoreDataset("stores/coco-vit")            # a torch Dataset over a feature store
loader = torch.utils.data.DataLoader(dataset, batch_size=64, collate_fn=StoreDataset.collate)
```
Raw inputs go through exactly the extraction the run's store was made with (``pipeline.encode``), so a notebook
embeds what ``cli.py encode`` embeds.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.embed import embed_store
from pipeline.encode import extract_like_run, input_records
from pipeline.training.rundir import RunDir, RunError, check_compatible
from stores import FeatureStore


class Run:
    """A trained run: its head (eval mode) and config. Use :meth:`load`."""

    def __init__(self, path: Path, model: torch.nn.Module, config: dict, device: str) -> None:
        self.path, self.model, self.config, self.device = path, model, config, device

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu") -> Run:
        model, _, config = RunDir(path).load_model(device)
        return cls(Path(path), model, config, device)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, head={self.config['head']}, modalities={self.modalities}, width={self.width})"

    @property
    def modalities(self) -> list[str]:
        """The aligned modalities (``fit-up``'s two, then each ``fit-al`` one)."""
        return sorted(self.config["modalities"])

    @property
    def width(self) -> int:
        return int(self.config["model"]["width"])

    def embed(self, modality: str, inputs: Sequence[str | os.PathLike[str]] | None = None, *,
              tokens: np.ndarray | torch.Tensor | None = None, mask: np.ndarray | torch.Tensor | None = None,
              encoder: str | None = None, batch_size: int = 256) -> np.ndarray:
        """Aligned unit vectors ``[n, W]`` (float32) of either raw ``inputs`` (texts for ``text``, file paths
        otherwise; extracted like the run's store, with ``encoder`` or the one the store recorded) or ``tokens``:
        encoder features ``[B, L, D]`` with an optional bool ``mask`` ``[B, L]`` (True on real tokens), or pooled
        ``[B, D]``. An audio split into segments or a video into clips gives one row per piece."""
        if (inputs is None) == (tokens is None):
            raise RunError("give either inputs (texts or file paths) or tokens")
        if modality not in self.config["modalities"]:
            raise RunError(f"modality {modality!r} is not aligned in this run (aligned: {self.modalities})")
        if tokens is not None:
            return self._embed_tokens(modality, tokens, mask, batch_size)
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        with tempfile.TemporaryDirectory(prefix="run-embed-") as tmp:
            store = extract_like_run(self.config, modality, input_records(modality, inputs), encoder, Path(tmp),
                                     self.device)
            return embed_store(self.model, modality, store, batch_size=batch_size, device=self.device).numpy()

    @torch.no_grad()
    def _embed_tokens(self, modality: str, tokens: Any, mask: Any, batch_size: int) -> np.ndarray:
        tokens = torch.as_tensor(np.asarray(tokens) if not torch.is_tensor(tokens) else tokens, dtype=torch.float32)
        if tokens.dim() == 2:  # pooled features: one token each
            tokens = tokens.unsqueeze(1)
        dim = self.config["modalities"][modality]["store"]["dim"]
        if tokens.dim() != 3 or tokens.shape[-1] != dim:
            raise RunError(f"{modality} tokens must be [B, L, {dim}] or [B, {dim}], got {list(tokens.shape)}")
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
        if mask.shape != tokens.shape[:2]:
            raise RunError(f"mask must be {list(tokens.shape[:2])}, got {list(mask.shape)}")
        out = [torch.nn.functional.normalize(self.model.encode(modality, tokens[s : s + batch_size].to(self.device),
                                                               mask[s : s + batch_size].to(self.device)).float(),
                                             dim=-1).cpu()
               for s in range(0, len(tokens), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.width), np.float32)

    def embed_store(self, store: str | os.PathLike[str] | FeatureStore,
                    indices: Sequence[int] | None = None, batch_size: int = 256) -> np.ndarray:
        """Aligned unit vectors of a store's items (all, or ``indices``), in store order."""
        store = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        check_compatible(self.config, store.modality, store)
        return embed_store(self.model, store.modality, store, indices, batch_size=batch_size,
                           device=self.device).numpy()


class StoreDataset(torch.utils.data.Dataset):
    """A feature store as a torch ``Dataset``: item ``i`` is ``{"id", "tokens" [length, D] float32, "label",
    "ref"}``. Batch with ``collate_fn=StoreDataset.collate`` (padded tokens + mask, as training reads them)."""

    def __init__(self, path: str | os.PathLike[str], **open_options: Any) -> None:
        self.store = FeatureStore.open(path, **open_options)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} of a store with {len(self)} items")
        index %= len(self)
        tokens, mask = self.store.get_batch([index])
        return {"id": self.store.ids[index], "tokens": tokens[0][mask[0]],
                "label": self.store.labels[index] if self.store.labels is not None else None,
                "ref": self.store.refs[index] if self.store.refs is not None else None}

    @staticmethod
    def collate(items: Sequence[dict]) -> dict:
        """``{"ids", "tokens" [B, L, D] zero-padded, "mask" [B, L] True on real tokens, "labels", "refs"}``."""
        tokens = torch.nn.utils.rnn.pad_sequence([item["tokens"] for item in items], batch_first=True)
        lengths = torch.tensor([len(item["tokens"]) for item in items])
        return {"ids": [item["id"] for item in items], "tokens": tokens,
                "mask": torch.arange(tokens.shape[1])[None, :] < lengths[:, None],
                "labels": [item["label"] for item in items], "refs": [item["ref"] for item in items]}
