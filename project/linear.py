"""LiT-style linear baseline: one ``nn.Linear(D_m, W)`` per modality on the masked mean of the tokens.

Nothing is shared between modalities, so step 2 (``add_modality``) trains just the new modality's layer against
the frozen layers of the others. Mean-then-linear equals linear-then-mean, so a pooled store and a token store
of the same features give the same embedding (with the default ``pool="mean"``; a learned ``query`` pool needs the
tokens). Two 768-dim inputs at width 256: 2 x 196,864 = 393,728 params.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from project.base import ConfigMixin, FeaturePool, Head, check_feature_pool, normalise_modalities
from project.up import make_adapter

LINEAR_KINDS = ("linear", "mlp")  # "mlp": the reference-code AL stack on the pooled feature


@dataclass
class LinearConfig(ConfigMixin):
    """``adapters``: modality -> ``linear`` (default, the baseline) or ``mlp``. ``pool``: how the tokens are pooled
    (project.base.FeaturePool): the masked mean (the baseline) or a learned query that starts as the mean."""

    input_dims: dict[str, int]
    width: int = 256
    adapters: dict[str, str] = field(default_factory=dict)
    pool: str = "mean"

    def __post_init__(self) -> None:
        self.input_dims, self.adapters = normalise_modalities(
            self.input_dims, self.adapters, LINEAR_KINDS, "linear"
        )
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        check_feature_pool(self.pool)


class PooledAdapter(nn.Module):
    """A :class:`FeaturePool` over the tokens, then a ``linear`` (one nn.Linear) or ``mlp`` Alignment Layer."""

    def __init__(self, kind: str, in_dim: int, width: int, dropout: float = 0.1, pool: str = "mean") -> None:
        super().__init__()
        if kind not in LINEAR_KINDS:
            raise ValueError(f"PooledAdapter kind must be one of {LINEAR_KINDS}, got {kind!r}")
        self.layer = make_adapter(kind, in_dim, width, dropout)
        self.pool = FeaturePool(pool, in_dim)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.layer(self.pool(tokens, mask))


class LinearHead(Head):
    """One :class:`PooledAdapter` per modality; see the module docstring."""

    config_class = LinearConfig
    al_kinds = LINEAR_KINDS

    def __init__(self, config: LinearConfig) -> None:
        super().__init__()
        self.config = replace(config)  # replace re-validates and copies the dicts
        c = self.config
        self.adapters = nn.ModuleDict(
            {m: PooledAdapter(c.adapters[m], c.input_dims[m], c.width, pool=c.pool) for m in c.input_dims}
        )

    def _encode(self, modality: str, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.adapters[modality](tokens, mask)

    def _modality_prefixes(self, modality: str) -> tuple[str, ...]:
        return (f"adapters.{modality}",)

    def _build_modality(self, config: LinearConfig, name: str, device: torch.device) -> None:
        self.adapters[name] = PooledAdapter(config.adapters[name], config.input_dims[name], config.width,
                                            pool=config.pool).to(device)
