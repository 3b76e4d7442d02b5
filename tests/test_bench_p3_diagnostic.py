"""P3's dropout diagnostic (docs/benchmarks.md, finding 5): the bench times the same head with dropout 0 beside the
real one, so the two must differ in dropout only. Fast: tiny widths, no stores, no timing asserted."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.tools.bench import BENCH_UP, _bench_head

DIMS = {"image": 24, "text": 16}


def _dropout_rates(model: nn.Module) -> set[float]:
    rates = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    rates |= {m.dropout for m in model.modules() if isinstance(m, nn.MultiheadAttention)}  # attention probabilities
    return rates


def _embed(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model.encode("image", tokens, mask)


def test_dropout_zero_head_is_the_same_head_without_dropout(one_thread):
    real, _, _ = _bench_head(DIMS, "cpu")
    diagnostic, _, optimizer = _bench_head(DIMS, "cpu", dropout=0.0)
    assert _dropout_rates(real) == {0.1} and _dropout_rates(diagnostic) == {0.0}
    assert real.config.width == diagnostic.config.width == BENCH_UP["width"]
    # Same seed, same weights: the diagnostic differs from the timed head in its dropout alone.
    expected = real.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in diagnostic.state_dict().items())
    assert set(expected) == set(diagnostic.state_dict())

    torch.manual_seed(1)
    tokens, mask = torch.randn(4, 7, DIMS["image"]), torch.rand(4, 7) > 0.3
    mask[:, 0] = True
    assert real.training and diagnostic.training and optimizer.param_groups[0]["lr"] == 1e-3
    # In train mode the real head draws masks (two calls differ); the diagnostic's calls agree exactly.
    assert not torch.equal(_embed(real, tokens, mask), _embed(real, tokens, mask))
    assert torch.equal(_embed(diagnostic, tokens, mask), _embed(diagnostic, tokens, mask))

