"""OneEncoder's Universal Projection (UP), its per-modality adapters and the fusion of modality tokens.

Paper (OneEncoder, Section III-A): a frozen encoder gives tokens ``x_m [L, D]``; a learnable modality token
``t_m [N, W]`` is fused with them (addition, cross-attention with ``t_m`` as query, or concatenation) and a shared
transformer (the UP) maps the result into the common space: ``x_hat = UP(t_m (x) x_m)`` (eq 1). A new modality is
added later by training only a small Alignment Layer (AL) in front of the frozen UP (eqs 2-3).

The model never sees padding: padded input positions are zeroed before anything else, attention uses key-padding
masks and pooling is a masked mean, so an item's embedding does not depend on what it is batched with.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from project.base import (
    ConfigMixin,
    FeaturePool,
    Head,
    check_dropout,
    check_feature_pool,
    check_name,
    first_real_index,
    masked_mean,
    normalise_modalities,
)
from project.dropout import Dropout, TransformerEncoderLayer, drop_path, drop_tokens

FUSIONS = ("add", "attention", "concat")
POOLS = ("mean", "token")
# "projection" is the step-1 per-encoder adapter; "linear" / "mlp" are step-2 Alignment Layers.
ADAPTER_KINDS = ("projection", "linear", "mlp")
# With pooled_skip, what trains the linear path (UPConfig.path_loss): "shared", the loss of the UP's embedding,
# which the path and the branch fit together; "own", a contrastive loss of the path's embeddings alone, with the
# UP's embedding reading the path without its gradient, so the path trains exactly as ``--head linear`` does under
# the same seed and the branch fits only what that linear head leaves (docs/training.md, hypothesis 18).
PATH_LOSSES = ("shared", "own")


@dataclass
class UPConfig(ConfigMixin):
    """Everything needed to rebuild a :class:`OneEncoder` (saved as JSON next to the checkpoint)."""

    input_dims: dict[str, int]
    width: int = 256
    blocks: int = 4
    heads: int = 4
    ff_mult: int = 4
    dropout: float = 0.1
    fusion: str = "add"
    modality_tokens: int = 1
    pool: str = "mean"
    # modality -> adapter kind (see ADAPTER_KINDS); modalities left out get "projection".
    adapters: dict[str, str] = field(default_factory=dict)
    # A residual linear path: embedding = Linear_m(masked mean of the raw tokens) + gate * UP(...), gate starting
    # at 0, so training starts from a linear head and the UP adds what it can (docs/training.md). False: the paper.
    pooled_skip: bool = False
    # With pooled_skip: how the linear path pools the raw tokens (project.base.FeaturePool): the masked mean, as
    # the linear head does, or a learned query that starts as the mean (docs/training.md, hypothesis 14).
    skip_pool: str = "mean"
    # Training-time token dropout (project.dropout.drop_tokens): each real token but the first is hidden from
    # both paths with this probability. 0 is the paper.
    token_dropout: float = 0.0
    # With pooled_skip: in training, the UP's whole branch is dropped for each item with this probability
    # (stochastic depth, project.dropout.drop_path), so the linear path also learns to stand alone. 0: never.
    up_drop: float = 0.0
    # With pooled_skip: the gate is ``gate_scale * up_gate``. AdamW moves a parameter by about the lr per step
    # whatever its gradient, so in a run of tens of steps an unscaled gate starting at 0 stays near 0 and the UP
    # hardly contributes (docs/training.md, hypothesis 11); the scale is the gate's lr multiplier. 1: no scaling.
    gate_scale: float = 1.0
    # A LayerNorm on each modality's raw tokens before its adapter (the UP's branch only; the linear path reads
    # them raw), so 1280-wide image and 384-wide text tokens of any scale enter at one scale (docs/training.md,
    # hypothesis 3). False: the paper.
    input_norm: bool = False
    # With pooled_skip: what trains the linear path (PATH_LOSSES). "shared" is how runs saved before it trained.
    path_loss: str = "shared"

    def __post_init__(self) -> None:
        check_transformer_config(self, ("width", "blocks", "heads", "ff_mult", "modality_tokens"))
        check_dropout(self.token_dropout, "token_dropout")
        check_dropout(self.up_drop, "up_drop")
        if self.up_drop and not self.pooled_skip:
            raise ValueError("up_drop drops the UP's branch beside the pooled linear path: it needs pooled_skip")
        check_feature_pool(self.skip_pool, "skip_pool")
        if self.skip_pool != "mean" and not self.pooled_skip:
            raise ValueError("skip_pool pools the raw tokens for the pooled linear path: it needs pooled_skip")
        if not self.gate_scale > 0:
            raise ValueError(f"gate_scale must be > 0, got {self.gate_scale}")
        if self.path_loss not in PATH_LOSSES:
            raise ValueError(f"path_loss must be one of {PATH_LOSSES}, got {self.path_loss!r}")
        if self.path_loss != "shared" and not self.pooled_skip:
            raise ValueError("path_loss trains the pooled linear path: it needs pooled_skip")


def check_transformer_config(config, positive: tuple[str, ...]) -> None:
    """Validate (and normalise the modalities of) the config of a head built on the UP's transformer core:
    adapters, fusion, pooling, the sizes named in ``positive``, heads dividing the width, dropout."""
    config.input_dims, config.adapters = normalise_modalities(
        config.input_dims, config.adapters, ADAPTER_KINDS, "projection"
    )
    if config.fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {config.fusion!r}")
    if config.pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {config.pool!r}")
    if min(getattr(config, name) for name in positive) < 1:
        raise ValueError(f"{', '.join(positive[:-1])} and {positive[-1]} must all be >= 1")
    if config.width % config.heads:
        raise ValueError(f"width ({config.width}) must be divisible by heads ({config.heads})")
    check_dropout(config.dropout)


class InputProjection(nn.Module):
    """Per-encoder token projection of the reference code: Linear -> GELU -> Linear -> Dropout -> LayerNorm."""

    def __init__(self, in_dim: int, width: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, width),
            nn.GELU(),
            nn.Linear(width, width),
            Dropout(dropout),
            nn.LayerNorm(width),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class AlignmentLayer(nn.Module):
    """Step-2 adapter for a new modality in front of the frozen UP.

    ``linear`` is a single Linear(in_dim, width): with in_dim = width = 256 it has the paper's 65,792 parameters.
    ``mlp`` is the reference code's AL, the same stack as :class:`InputProjection` (263,168 params for 768 -> 256).
    """

    def __init__(self, in_dim: int, width: int, kind: str = "linear", dropout: float = 0.1) -> None:
        super().__init__()
        if kind == "linear":
            self.net: nn.Module = nn.Linear(in_dim, width)
        elif kind == "mlp":
            self.net = InputProjection(in_dim, width, dropout)
        else:
            raise ValueError(f"AlignmentLayer kind must be 'linear' or 'mlp', got {kind!r}")
        self.kind = kind

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ModalityFusion(nn.Module):
    """The fusion operator of eq 1: combines tokens ``x [B, L, W]`` with a modality token ``t [N, W]``.

    - ``add``: ``x + t`` broadcast over L. With N > 1 the mean of the N tokens is added (addition has one slot).
    - ``attention``: Q = Linear(t), K = V = Linear(x) (separate weights), softmax(QK^T / sqrt(W)) over the real
      positions only; the context [B, N, W] is averaged over N and added to every token (reference code).
    - ``concat``: the N tokens are prepended to the sequence and the mask gains N ``True`` entries.
    """

    def __init__(self, width: int, kind: str = "add", dropout: float = 0.0) -> None:
        super().__init__()
        if kind not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {kind!r}")
        self.kind = kind
        self.width = width
        if kind == "attention":
            self.q = nn.Linear(width, width)
            self.k = nn.Linear(width, width)
            self.v = nn.Linear(width, width)
            self.drop = Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor, token: Tensor) -> tuple[Tensor, Tensor]:
        if self.kind == "add":
            return x + token.mean(dim=0), mask
        if self.kind == "concat":
            b, n = x.shape[0], token.shape[0]
            prefix = token.unsqueeze(0).expand(b, -1, -1)
            real = torch.ones(b, n, dtype=torch.bool, device=mask.device)
            return torch.cat([prefix, x], dim=1), torch.cat([real, mask], dim=1)
        q = self.q(token)  # [N, W]
        k, v = self.k(x), self.v(x)  # [B, L, W]
        scores = torch.einsum("nw,blw->bnl", q, k) / math.sqrt(self.width)
        # A finite fill (not -inf) keeps an all-padding row NaN-free; multiplying by the mask then gives such a
        # row zero weight everywhere, and a normal row's padded keys get exactly zero weight.
        scores = scores.masked_fill(~mask[:, None, :], torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1) * mask[:, None, :].to(scores.dtype)
        context = torch.einsum("bnl,blw->bnw", self.drop(weights), v).mean(dim=1, keepdim=True)
        return x + context, mask


class UniversalProjection(nn.Module):
    """The shared core: modality tokens, fusion, LayerNorm, a transformer encoder, residual, masked pooling.

    ``forward(modality, x [B, L, W], mask [B, L] bool, True = real) -> [B, W]`` (not normalised).
    """

    def __init__(
        self,
        modalities: list[str],
        width: int = 256,
        blocks: int = 4,
        heads: int = 4,
        ff_mult: int = 4,
        dropout: float = 0.1,
        fusion: str = "add",
        modality_tokens: int = 1,
        pool: str = "mean",
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.width = width
        self.n_tokens = modality_tokens
        self.pool = pool
        self.modality_tokens = nn.ParameterDict()
        for name in modalities:
            self.add_modality_token(name)
        self.fusion = ModalityFusion(width, fusion, dropout)
        self.norm = nn.LayerNorm(width)
        layer = TransformerEncoderLayer(
            d_model=width,
            nhead=heads,
            dim_feedforward=ff_mult * width,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # Nested tensors are off: they are unsupported with norm_first anyway (a warning per build) and would
        # make eval-mode outputs at padded positions differ from train mode; pooling masks them either way.
        self.encoder = nn.TransformerEncoder(layer, num_layers=blocks, enable_nested_tensor=False)

    def add_modality_token(self, name: str, device: torch.device | None = None) -> None:
        check_name(name)
        if name in self.modality_tokens:
            raise ValueError(f"modality {name!r} already has a token")
        token = torch.empty(self.n_tokens, self.width, device=device)
        self.modality_tokens[name] = nn.Parameter(nn.init.normal_(token, std=0.02))

    def forward(self, modality: str, x: Tensor, mask: Tensor) -> Tensor:
        if modality not in self.modality_tokens:
            raise KeyError(f"unknown modality {modality!r}; known: {sorted(self.modality_tokens)}")
        return self.project(x, mask, self.modality_tokens[modality])

    def project(self, x: Tensor, mask: Tensor, token: Tensor) -> Tensor:
        """Fuse ``x [B, L, W]`` with a given modality token ``[N, W]``, encode, pool -> ``[B, W]``.

        ``forward`` passes the modality's own learnable token; LightCRL's DFE passes its expanded context vector.
        """
        token = token.to(x.dtype)
        fused, mask = self.fusion(x, mask, token)
        # Rows with no real token (should not happen) get one visible key: some attention kernels return NaN
        # for a fully masked row (torch 2.11 on CPU does not), and NaN in any row would poison the shared
        # weights' gradients. Pooling still ignores that key.
        key_padding = ~mask
        empty = ~mask.any(dim=1)
        if bool(empty.any()):
            key_padding = key_padding.clone()
            key_padding[empty, 0] = False
        out = self.encoder(self.norm(fused), src_key_padding_mask=key_padding) + fused
        if self.pool == "token":
            # Position 0 is the first modality token under concat; otherwise the first real token.
            first = first_real_index(mask)
            return out[torch.arange(out.shape[0], device=out.device), first]
        return masked_mean(out, mask)


def make_adapter(kind: str, in_dim: int, width: int, dropout: float = 0.1) -> nn.Module:
    """A per-encoder layer of kind ``projection`` (:class:`InputProjection`) or ``linear`` / ``mlp`` (AL)."""
    if kind == "projection":
        return InputProjection(in_dim, width, dropout)
    return AlignmentLayer(in_dim, width, kind, dropout)


def _make_adapter(config: UPConfig, modality: str) -> nn.Module:
    return make_adapter(config.adapters[modality], config.input_dims[modality], config.width, config.dropout)


class OneEncoder(Head):
    """Per-modality adapters (``InputProjection`` or ``AlignmentLayer``) followed by the shared UP.

    With the default config (width 256, 4 blocks, 4 heads, ff 1024) and two 768-dim inputs this is about 3.7M
    parameters (3.9M with attention fusion): the paper's "four Transformer blocks with 4M parameters".
    ``encode``, ``add_modality`` and ``freeze_for_alignment`` come from :class:`project.base.Head`.
    """

    config_class = UPConfig
    al_kinds = ("linear", "mlp")  # step-2 Alignment Layers; "linear" is the paper's

    def __init__(self, config: UPConfig) -> None:
        super().__init__()
        self.config = replace(config, input_dims=dict(config.input_dims), adapters=dict(config.adapters))
        c = self.config
        if c.pooled_skip:
            # Built first, from the same random draws as project.linear.LinearHead's layers: under one seed the UP
            # starts as exactly the linear head of that seed, so the two differ only by what the gated UP adds.
            self.skips = nn.ModuleDict({m: nn.Linear(d, c.width) for m, d in c.input_dims.items()})
            self.up_gate = nn.Parameter(torch.zeros(()))
            self.skip_pools = nn.ModuleDict({m: FeaturePool(c.skip_pool, d) for m, d in c.input_dims.items()})
        self.adapters = nn.ModuleDict({m: _make_adapter(c, m) for m in c.input_dims})
        if c.input_norm:
            self.input_norms = nn.ModuleDict({m: nn.LayerNorm(d) for m, d in c.input_dims.items()})
        self.up = UniversalProjection(
            list(c.input_dims),
            width=c.width,
            blocks=c.blocks,
            heads=c.heads,
            ff_mult=c.ff_mult,
            dropout=c.dropout,
            fusion=c.fusion,
            modality_tokens=c.modality_tokens,
            pool=c.pool,
        )

    def _encode(self, modality: str, tokens: Tensor, mask: Tensor) -> Tensor:
        return self._training_embeddings(modality, tokens, mask)[0]

    def _training_embeddings(self, modality: str, tokens: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
        mask = drop_tokens(mask, self.config.token_dropout, self.training)
        branch_in = self.input_norms[modality](tokens) if self.config.input_norm else tokens
        out = self.up(modality, self.adapters[modality](branch_in), mask)
        if not self.config.pooled_skip:
            return (out,)
        gated = self.config.gate_scale * self.up_gate * drop_path(out, self.config.up_drop, self.training)
        path = self.linear_path(modality, tokens, mask)
        if self.config.path_loss == "own" and self.training:
            return path.detach() + gated, path
        return (path + gated,)

    def linear_path(self, modality: str, tokens: Tensor, mask: Tensor) -> Tensor:
        """With ``pooled_skip``: the UP's pooled linear path alone (the embedding with the gate at 0)."""
        return self.skips[modality](self.skip_pools[modality](tokens, mask))

    def _modality_prefixes(self, modality: str) -> tuple[str, ...]:
        skip = (f"skips.{modality}", f"skip_pools.{modality}") if self.config.pooled_skip else ()
        norm = (f"input_norms.{modality}",) if self.config.input_norm else ()
        return (f"adapters.{modality}", f"up.modality_tokens.{modality}", *skip, *norm)

    def _build_modality(self, config: UPConfig, name: str, device: torch.device) -> None:
        self.adapters[name] = _make_adapter(config, name).to(device)
        self.up.add_modality_token(name, device=device)
        if config.input_norm:
            self.input_norms[name] = nn.LayerNorm(config.input_dims[name]).to(device)
        if config.pooled_skip:
            self.skips[name] = nn.Linear(config.input_dims[name], config.width).to(device)
            self.skip_pools[name] = FeaturePool(config.skip_pool, config.input_dims[name]).to(device)
