"""Dropout with a cheap mask draw on the CPU and the transformer encoder layer that uses it; below them, the UP's two
coarser training-time drops: token dropout (:func:`drop_tokens`) and stochastic depth of a branch (:func:`drop_path`).

torch's CPU dropout draws every mask element with its own call to the default generator (ATen uses MKL's
parallel generator on Intel CPUs only): on a 2-core AMD machine the masks took about half of a cached UP
training step (docs/benchmarks.md, findings 5 and 12). Here a CPU mask is built from the 16-bit lanes of
64-bit random words, so one draw of the default generator gives four mask elements and the comparison with a
threshold runs vectorised: the same Bernoulli keep mask, with the drop probability rounded to a multiple of
1/65536 (0.1 becomes 0.100006), 5-6x cheaper to draw. It follows ``torch.manual_seed`` like any CPU random
op. On other devices (CUDA draws its masks in parallel with Philox), and for p within 1/131072 of 0 or 1,
torch's own dropout runs. Eval mode is the identity, as with ``nn.Dropout``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from project.base import first_real_index

LANE_VALUES = 1 << 16
_LANE_MIN = -(1 << 15)


def lane_drops(p: float) -> int | None:
    """How many of the 65536 lane values drop an element at probability ``p`` (p rounded to a multiple of
    1/65536, at most 7.6e-6 away), or None where that rounds to 0 or 1 (then torch's dropout runs)."""
    drops = round(p * LANE_VALUES)
    return drops if 0 < drops < LANE_VALUES else None


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` in distribution: zero each element with probability p, scale the rest."""
    if not training or p == 0.0:
        return x
    drops = lane_drops(p) if x.device.type == "cpu" else None
    if drops is None:
        return F.dropout(x, p, training)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(torch.iinfo(torch.int64).min, None)
    keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= _LANE_MIN + drops
    # The mask needs no gradient, so it is scaled in place; autograd keeps it for the backward multiply.
    return x * keep.to(x.dtype).mul_(LANE_VALUES / (LANE_VALUES - drops))


class Dropout(nn.Dropout):
    """``nn.Dropout`` drawing its masks with :func:`dropout` (no parameters: state dicts are unchanged)."""

    def __init__(self, p: float = 0.5) -> None:  # no ``inplace``: the mask multiply makes a new tensor
        super().__init__(p)

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


class TransformerEncoderLayer(nn.TransformerEncoderLayer):
    """torch's encoder layer (same parameters and state dict, same eval path) whose training-mode dropouts,
    the attention probabilities' included, are drawn by :func:`dropout`.

    The attention is written out (projections, scaled scores, additive padding mask, softmax, dropout, values)
    only in training on the CPU with attention dropout, self-attention without ``attn_mask`` or causality and
    ``batch_first``: what torch's own path computes there (its fused kernels take no dropout). Anything else
    runs torch's code.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, **kwargs) -> None:
        super().__init__(d_model, nhead, dim_feedforward, dropout, **kwargs)
        self.dropout = Dropout(dropout)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)

    def _sa_block(self, x: Tensor, attn_mask: Tensor | None, key_padding_mask: Tensor | None,
                  is_causal: bool = False) -> Tensor:
        attention = self.self_attn
        if (not self.training or attention.dropout == 0.0 or x.device.type != "cpu" or attn_mask is not None
                or is_causal or not attention.batch_first or not attention._qkv_same_embed_dim):
            return super()._sa_block(x, attn_mask, key_padding_mask, is_causal)
        return self.dropout1(self.attention(x, key_padding_mask, attention.dropout))

    def attention(self, x: Tensor, key_padding_mask: Tensor | None, p: float) -> Tensor:
        """Self-attention of ``x [B, L, W]`` with attention-probability dropout ``p`` drawn by :func:`dropout`
        (the projected output, before the layer's residual dropout)."""
        attention = self.self_attn
        batch, length, width = x.shape
        heads = attention.num_heads
        q, k, v = (F.linear(x, attention.in_proj_weight, attention.in_proj_bias)
                   .view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4))
        scores = (q * (width // heads) ** -0.5) @ k.transpose(-2, -1)
        if key_padding_mask is not None:
            # The layer passes padding as an additive float mask (0 / -inf); a boolean one marks padded keys.
            if key_padding_mask.dtype == torch.bool:
                scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            else:
                scores = scores + key_padding_mask[:, None, None, :].to(scores.dtype)
        probs = dropout(scores.softmax(dim=-1), p, p > 0)
        return attention.out_proj((probs @ v).transpose(1, 2).reshape(batch, length, width))


def drop_tokens(mask: Tensor, p: float, training: bool = True) -> Tensor:
    """Token dropout: the padding mask ``[B, L]`` (True = real) with each real token but the first of every row
    hidden with probability ``p``.

    An augmentation of the cached features (as FLIP masks patches): every epoch sees another subset of each
    item's tokens, which is what a head on a few hundred fixed feature tensors lacks. The first real token is
    always kept, so no row is left empty and a CLS / modality token that ``pool="token"`` reads survives.
    Eval mode returns ``mask`` unchanged."""
    if not training or p == 0.0:
        return mask
    first = torch.zeros_like(mask)
    first[torch.arange(mask.shape[0], device=mask.device), first_real_index(mask)] = True
    kept = torch.rand(mask.shape, device=mask.device) >= p
    return mask & (kept | first)


def drop_path(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Stochastic depth for a residual branch (Huang et al., 2016): each row of ``x [B, ...]`` is zeroed with
    probability ``p`` and the rest scaled by ``1 / (1 - p)``, so the expected output is unchanged. Rows whose
    branch is dropped train what the branch is added to on its own. Eval mode is the identity."""
    if not training or p == 0.0:
        return x
    keep = (torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= p).to(x.dtype)
    return x * keep / (1.0 - p)
