"""project/dropout.py: the CPU mask draw is Bernoulli(1 - p) per element, independent across the lanes of a word,
scaled like torch's dropout, seeded by torch.manual_seed; the encoder layer keeps torch's parameters and eval
path, and its written-out training attention is torch's attention plus dropout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from project.dropout import LANE_VALUES, Dropout, TransformerEncoderLayer, dropout, lane_drops

N = 1 << 20


def _sigmas(observed: float, expected: float, n: int) -> float:
    return abs(observed - expected) / math.sqrt(expected * (1 - expected) / n)


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_masks_drop_at_p_and_scale_the_rest(p):
    torch.manual_seed(0)
    x = torch.rand(N) + 0.5
    y = dropout(x, p)
    kept = y != 0
    drops = lane_drops(p)
    assert abs(drops / LANE_VALUES - p) <= 0.5 / LANE_VALUES
    assert _sigmas(kept.float().mean().item(), 1 - drops / LANE_VALUES, N) < 5
    # Kept elements are scaled by exactly 1 / (1 - p as drawn): the expectation of every element is x.
    assert torch.equal(y[kept], x[kept] * (LANE_VALUES / (LANE_VALUES - drops)))
    # The four 16-bit lanes of one random word are independent: each pair is kept together at (1 - p)^2.
    words = kept.view(-1, 4)
    for a, b in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        both = (words[:, a] & words[:, b]).float().mean().item()
        assert _sigmas(both, (1 - drops / LANE_VALUES) ** 2, N // 4) < 5


def test_masks_follow_the_seed_and_have_shape_dtype_and_gradient():
    x = torch.randn(3, 5, 7, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(3)
    a = dropout(x, 0.3)
    torch.manual_seed(3)
    b = dropout(x, 0.3)
    assert torch.equal(a, b) and a.dtype == torch.bfloat16 and a.shape == x.shape
    assert not torch.equal(a, dropout(x, 0.3))
    a.float().sum().backward()
    # d(sum)/dx is the scaled keep mask: zero exactly where the output was dropped.
    assert torch.equal(x.grad == 0, (a == 0) & (x != 0))
    assert torch.all((x.grad == 0) | (x.grad == x.grad.max()))


def test_eval_zero_and_unrepresentable_probabilities_behave_like_torch():
    x = torch.randn(64, 64)
    assert dropout(x, 0.5, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))  # rounds to 1: torch's dropout drops everything
    assert lane_drops(1e-6) is None and lane_drops(1 - 1e-6) is None and lane_drops(0.1) == 6554
    module = Dropout(0.2)
    assert isinstance(module, nn.Dropout) and module.p == 0.2
    assert torch.equal(module.eval()(x), x)
    assert (module.train()(x) == 0).any()


def _pair(seed: int = 0, **kwargs) -> tuple[TransformerEncoderLayer, nn.TransformerEncoderLayer]:
    options = {"d_model": 32, "nhead": 4, "dim_feedforward": 64, "dropout": 0.1, "activation": "gelu",
               "batch_first": True, "norm_first": True, **kwargs}
    torch.manual_seed(seed)
    ours = TransformerEncoderLayer(**options)
    theirs = nn.TransformerEncoderLayer(**options)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _inputs(batch: int = 3, length: int = 9, width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(batch, length, width)
    padded = torch.zeros(batch, length, dtype=torch.bool)
    padded[0, 6:] = True
    padded[2, 3:] = True
    return x, padded


def test_layer_has_torchs_parameters_and_eval_outputs():
    ours, theirs = _pair()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x, padded = _inputs()
    with torch.no_grad():
        assert torch.equal(ours.eval()(x, src_key_padding_mask=padded), theirs.eval()(x, src_key_padding_mask=padded))


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_written_out_attention_is_torchs_attention(mask_kind):
    ours, theirs = _pair()
    x, padded = _inputs()
    mask = padded if mask_kind == "bool" else torch.zeros(padded.shape).masked_fill(padded, float("-inf"))
    expected = theirs.eval().self_attn(x, x, x, key_padding_mask=padded, need_weights=False)[0]
    assert torch.allclose(ours.attention(x, mask, 0.0), expected, atol=1e-6)


def test_training_attention_ignores_padded_keys_and_is_unbiased():
    ours, theirs = _pair()
    ours.train()
    x, padded = _inputs()
    float_mask = torch.zeros(padded.shape).masked_fill(padded, float("-inf"))
    # Same seed, different values at padded positions: real positions see the same output.
    changed = x.clone()
    changed[padded] = 100.0
    torch.manual_seed(5)
    a = ours._sa_block(x, None, float_mask)
    torch.manual_seed(5)
    b = ours._sa_block(changed, None, float_mask)
    assert torch.equal(a[~padded], b[~padded])
    # With dropout the block is torch's eval-mode block in expectation (dropout is linear and rescaled).
    draws = torch.stack([ours._sa_block(x, None, float_mask) for _ in range(2000)])
    expected = theirs.eval()._sa_block(x, None, float_mask)
    z = (draws.mean(0) - expected) / (draws.std(0) / math.sqrt(len(draws)))
    assert z.abs().max() < 6 and 0.6 < z.abs().mean() < 1.0, (z.abs().max(), z.abs().mean())


def test_layer_trains_through_the_written_path():
    ours, _ = _pair()
    x, padded = _inputs()
    x.requires_grad_(True)
    ours.train()(x, src_key_padding_mask=padded).sum().backward()
    grads = [p.grad for p in ours.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert ours.self_attn.in_proj_weight.grad.abs().sum() > 0
