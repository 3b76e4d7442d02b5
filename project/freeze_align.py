"""The freeze-align projector (Maniparambil et al., "Harnessing Frozen Unimodal Encoders"): per-modality MLPs.

Reference code (``clip_adjustable_combined_vis_cls.py`` with the best config's ``patch`` projections):

- ``ResidualProjector`` ("patch"): ``LayerNorm -> Dropout(0.1) -> Linear(x) + Linear(GELU(Linear(x)))``.
- A modality with a CLS token at position 0 (vision): the local projector on every token, mean over the
  patch tokens (CLS excluded), plus a separate projector on the CLS token; the two are summed.
- A modality without one (text): the local projector on every token, attention-masked mean, then the residual
  MLP head ``ResidualHead`` ("mlp": ``p = Linear(x); LayerNorm(p + Dropout(Linear(GELU(p))))``).

The paper projects to 1024 dims (``embed_dim``); ``width`` defaults to 256 here because our users align small
data sets (a 1024-wide head has about 4x the parameters per layer); set ``width=1024`` for the paper's setting.
The embedding is not normalised here (the loss normalises), and nothing is shared between modalities: step 2
(``add_modality``) trains the new modality's projector against the frozen projectors of the others.
Width 256, a 768-dim vision input with CLS and a 768-dim text input: 922,112 + 593,152 = 1,515,264 params.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from project.base import ConfigMixin, Head, check_dropout, first_real_index, masked_mean, normalise_modalities
from project.dropout import Dropout
from project.linear import PooledAdapter

# "projector": the paper's projector above; "linear": one Linear on the masked mean (the LiT baseline's layer).
FREEZE_ALIGN_KINDS = ("projector", "linear")


@dataclass
class FreezeAlignConfig(ConfigMixin):
    """``cls_token``: modality -> whether its tokens carry a CLS token at the first real position (default no)."""

    input_dims: dict[str, int]
    width: int = 256
    cls_token: dict[str, bool] = field(default_factory=dict)
    dropout: float = 0.1
    adapters: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_dims, self.adapters = normalise_modalities(
            self.input_dims, self.adapters, FREEZE_ALIGN_KINDS, "projector"
        )
        unknown = set(self.cls_token) - set(self.input_dims)
        if unknown:
            raise ValueError(f"cls_token given for modalities without an input dim: {sorted(unknown)}")
        self.cls_token = {m: bool(self.cls_token.get(m, False)) for m in self.input_dims}
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        check_dropout(self.dropout)


class ResidualProjector(nn.Module):
    """The paper's token projector: ``LayerNorm -> Dropout -> Linear(x) + Linear(GELU(Linear(x)))``."""

    def __init__(self, in_dim: int, width: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.pre = nn.Sequential(nn.LayerNorm(in_dim), Dropout(dropout))
        self.linear = nn.Linear(in_dim, width)
        self.mlp = nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x)
        return self.linear(x) + self.mlp(x)


class ResidualHead(nn.Module):
    """The reference's residual MLP head on the pooled text feature: ``LayerNorm(p + Dropout(fc(GELU(p))))``."""

    def __init__(self, width: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.fc = nn.Sequential(nn.GELU(), nn.Linear(width, width), Dropout(dropout))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        projected = self.proj(x)
        return self.norm(projected + self.fc(projected))


class FreezeAlignProjector(nn.Module):
    """One modality's projector: local tokens (+ CLS projector, or + residual head); see the module doc."""

    def __init__(self, in_dim: int, width: int, cls_token: bool, dropout: float = 0.1) -> None:
        super().__init__()
        self.has_cls = cls_token
        self.local = ResidualProjector(in_dim, width, dropout)
        self.cls: nn.Module | None = ResidualProjector(in_dim, width, dropout) if cls_token else None
        self.head: nn.Module | None = None if cls_token else ResidualHead(width, dropout)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        local = self.local(tokens)
        if self.cls is None:
            assert self.head is not None
            return self.head(masked_mean(local, mask))
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        first = first_real_index(mask)  # the CLS token (first real position, so left padding works too)
        patches = mask.clone()
        patches[rows, first] = False
        # An item with no patch tokens (a pooled [B, D] input) gets a zero local term: CLS projector only.
        return masked_mean(local, patches) + self.cls(tokens[rows, first])


def _make_projector(config: FreezeAlignConfig, modality: str) -> nn.Module:
    in_dim = config.input_dims[modality]
    if config.adapters[modality] == "linear":
        return PooledAdapter("linear", in_dim, config.width)
    return FreezeAlignProjector(in_dim, config.width, config.cls_token[modality], config.dropout)


class FreezeAlignHead(Head):
    """One :class:`FreezeAlignProjector` per modality (or a pooled Linear for ``adapters[m] == "linear"``)."""

    config_class = FreezeAlignConfig
    al_kinds = FREEZE_ALIGN_KINDS

    def __init__(self, config: FreezeAlignConfig) -> None:
        super().__init__()
        self.config = replace(config)  # replace re-validates and copies the dicts
        self.adapters = nn.ModuleDict({m: _make_projector(self.config, m) for m in self.config.input_dims})

    def add_modality(self, name: str, in_dim: int, al_kind: str | None = None, *, cls_token: bool = False) -> None:
        """Step 2: a new projector (``al_kind`` ``projector`` by default, or ``linear``) for modality ``name``."""
        self._add_modality(name, in_dim, al_kind, cls_token={**self.config.cls_token, name: bool(cls_token)})

    def _encode(self, modality: str, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.adapters[modality](tokens, mask)

    def _modality_prefixes(self, modality: str) -> tuple[str, ...]:
        return (f"adapters.{modality}",)

    def _build_modality(self, config: Any, name: str, device: torch.device) -> None:
        self.adapters[name] = _make_projector(config, name).to(device)
