"""Linear CKA: the HSIC formula, its invariances, the minibatch estimator, the pair matrix and the heatmap."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from pipeline.evaluation.cka import (
    cka_matrix,
    heatmap_colour,
    linear_cka,
    minibatch_cka,
    rank_pairs,
    render_heatmap_png,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _direct_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """The textbook form: HSIC with an explicit centring matrix H = I - 11^T / n."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n
    k, gram_l = x @ x.T, y @ y.T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    return float(hsic(k, gram_l) / torch.sqrt(hsic(k, k) * hsic(gram_l, gram_l)))


def _related(n: int, seed: int, p: int = 12, q: int = 7, noise: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of one latent code (CKA well inside (0, 1))."""
    g = _gen(seed)
    z = torch.randn(n, 5, generator=g)
    x = z @ torch.randn(5, p, generator=g) + noise * torch.randn(n, p, generator=g)
    y = z @ torch.randn(5, q, generator=g) + noise * torch.randn(n, q, generator=g) + 3.0  # offset: centring
    return x, y


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=torch.float64))
    return q


@pytest.mark.parametrize("n, p, q, seed", [(8, 3, 5, 0), (20, 12, 7, 1), (15, 40, 2, 2)])
def test_linear_cka_matches_the_direct_hsic_formula(n: int, p: int, q: int, seed: int) -> None:
    g = _gen(seed)
    x = torch.randn(n, p, generator=g)
    y = x[:, :1] * torch.randn(1, q, generator=g) + torch.randn(n, q, generator=g)
    assert linear_cka(x, y) == pytest.approx(_direct_cka(x, y), abs=1e-10)
    assert linear_cka(x.numpy(), y.numpy()) == pytest.approx(_direct_cka(x, y), abs=1e-10)  # numpy in too


def test_identical_features_give_one_and_independent_noise_gives_near_zero() -> None:
    x, y = _related(500, 3)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert 0.2 < linear_cka(x, y) < 0.95
    g = _gen(4)
    a, b = torch.randn(20000, 6, generator=g), torch.randn(20000, 4, generator=g)
    assert linear_cka(a, b) < 0.01


def test_invariances() -> None:
    x, y = (t.double() for t in _related(300, 5))  # float64 inputs, so only the CKA's own error shows
    base = linear_cka(x, y)
    assert linear_cka(x @ _orthogonal(12, 6), y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, y @ _orthogonal(7, 7)) == pytest.approx(base, abs=1e-10)
    assert linear_cka(37.5 * x, 0.01 * y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x + 100.0, y - 5.0) == pytest.approx(base, abs=1e-10)  # centring removes offsets


def test_not_invariant_to_anisotropic_scaling() -> None:
    # Stretch one feature of x: the similarity structure changes, so CKA must change (the checks above can fail).
    x, y = _related(300, 8)
    scale = torch.ones(12)
    scale[0] = 30.0
    assert abs(linear_cka(x * scale, y) - linear_cka(x, y)) > 0.05
    assert linear_cka(x * scale, x) < 0.6


def test_minibatch_unbiased_estimator_is_close_to_the_full_cka() -> None:
    x, y = _related(8192, 9)
    full = linear_cka(x, y)
    batches = [(x[i : i + 256], y[i : i + 256]) for i in range(0, 8192, 256)]
    unbiased = minibatch_cka(batches)
    biased = minibatch_cka(iter(batches), unbiased=False)  # any iterable, e.g. a generator over a store
    print(f"full {full:.4f}, minibatch unbiased {unbiased:.4f}, minibatch biased {biased:.4f}")
    assert unbiased == pytest.approx(full, abs=0.01)
    # Small batches: the unbiased estimate stays put, the biased one drifts (a reason to default to unbiased).
    small = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 8192, 16)]
    assert minibatch_cka(small) == pytest.approx(full, abs=0.02)
    assert abs(minibatch_cka(small, unbiased=False) - full) > 0.03
    # One batch of independent noise: near 0 (the unbiased estimate may dip below 0).
    g = _gen(10)
    assert abs(minibatch_cka([(torch.randn(4000, 6, generator=g), torch.randn(4000, 4, generator=g))])) < 0.01


def test_minibatch_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        minibatch_cka([])
    with pytest.raises(ValueError):
        minibatch_cka([(torch.randn(3, 2), torch.randn(3, 2))])  # the unbiased HSIC needs n >= 4
    with pytest.raises(ValueError):
        minibatch_cka([(torch.randn(8, 2), torch.randn(7, 2))])
    with pytest.raises(ValueError):
        linear_cka(torch.randn(5, 2), torch.randn(6, 2))
    with pytest.raises(ValueError):
        linear_cka(torch.ones(5, 2), torch.randn(5, 2))  # constant features: undefined
    with pytest.raises(ValueError):
        linear_cka(torch.randn(5, 2, 3), torch.randn(5, 2))


def test_cka_matrix_and_ranking() -> None:
    x, y = _related(400, 11)
    noise = torch.randn(400, 9, generator=_gen(12))
    a = {"enc-x": x, "noise": noise}
    b = {"enc-y": y, "enc-x-rotated": x.double() @ _orthogonal(12, 13), "noise-b": torch.randn(400, 3)}
    rows, cols, matrix = cka_matrix(a, b)
    assert rows == ["enc-x", "noise"] and cols == ["enc-y", "enc-x-rotated", "noise-b"]
    assert matrix.shape == (2, 3)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            assert float(matrix[i, j]) == pytest.approx(linear_cka(a[r], b[c]), abs=1e-12)
    ranked = rank_pairs(rows, cols, matrix)
    assert len(ranked) == 6 and ranked[0][:2] == ("enc-x", "enc-x-rotated") and ranked[0][2] == pytest.approx(1.0)
    assert ranked[1][:2] == ("enc-x", "enc-y")
    assert [s for _, _, s in ranked] == sorted((s for _, _, s in ranked), reverse=True)
    with pytest.raises(ValueError):
        cka_matrix({"x": x}, {"short": y[:100]})
    with pytest.raises(ValueError):
        cka_matrix({}, b)


def test_heatmap_png_is_written_and_readable(tmp_path) -> None:
    rows, cols = ["dinov2-base", "vit-b16"], ["minilm", "roberta-large-v1", "bert"]
    matrix = torch.tensor([[1.0, 0.5, 0.0], [0.25, float("nan"), 0.75]])
    path = tmp_path / "cka.png"
    render_heatmap_png(matrix, rows, cols, path, title="linear CKA")
    with Image.open(path) as image:
        assert image.format == "PNG"
        image = image.convert("RGB")
        width, height = image.size
        assert width > 3 * 72 and height > 2 * 40
        colours = {colour for _, colour in image.getcolors(maxcolors=width * height)}
    # Cells are filled with the colour of their value (vmax yellow, vmin dark purple, NaN grey).
    for value in (1.0, 0.0, 0.25, 0.75, float("nan")):
        assert heatmap_colour(value) in colours
    assert heatmap_colour(1.0) == (253, 231, 36) and heatmap_colour(0.0) == (68, 1, 84)  # viridis' ends
    assert heatmap_colour(2.0) == heatmap_colour(1.0)  # clipped
    assert not math.isclose(sum(heatmap_colour(0.3)), sum(heatmap_colour(0.6)))
    with pytest.raises(ValueError):
        render_heatmap_png(matrix, rows, cols[:2], tmp_path / "bad.png")
