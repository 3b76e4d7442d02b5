"""ContrastiveLoss against loop-by-loop transcriptions of the paper's equations (eqs 4-8) and of InfoNCE."""

from __future__ import annotations

import math

import pytest
import torch

from project.losses import ContrastiveLoss


def _cos_matrix(x: torch.Tensor, y: torch.Tensor) -> list[list[float]]:
    """Cosine similarities computed in plain Python doubles."""
    xs, ys = x.double().tolist(), y.double().tolist()

    def cos(u: list[float], v: list[float]) -> float:
        dot = sum(p * q for p, q in zip(u, v, strict=True))
        return dot / (math.sqrt(sum(p * p for p in u)) * math.sqrt(sum(q * q for q in v)))

    return [[cos(u, v) for v in ys] for u in xs]


def _paper_loss(a, b, tau, a_feats=None, b_feats=None, mix=0.0) -> float:
    """Eqs 4-8 transcribed literally, with the targets' exponent divided by tau."""
    k = a.shape[0]
    s_ab = _cos_matrix(a, b)
    s_aa = _cos_matrix(a if a_feats is None else a_feats, a if a_feats is None else a_feats)
    s_bb = _cos_matrix(b if b_feats is None else b_feats, b if b_feats is None else b_feats)

    def l_ij(i: int, j: int) -> float:  # eq 4
        den = sum(math.exp(s_ab[i][kk] / tau) for kk in range(k))
        return -math.log(math.exp(s_ab[i][j] / tau) / den)

    def l_ji(i: int, j: int) -> float:  # eq 5
        den = sum(math.exp(s_ab[kk][j] / tau) for kk in range(k))
        return -math.log(math.exp(s_ab[i][j] / tau) / den)

    def m(i: int, j: int) -> float:
        return (s_aa[i][j] + s_bb[i][j]) / 2

    def t_ij(i: int, j: int) -> float:  # eq 6
        den = sum(math.exp(m(i, kk) / tau) for kk in range(k))
        soft = math.exp(m(i, j) / tau) / den
        return (1 - mix) * soft + mix * (1.0 if i == j else 0.0)

    def t_ji(i: int, j: int) -> float:  # eq 7: same numerator, normalised over row j
        den = sum(math.exp(m(j, kk) / tau) for kk in range(k))
        soft = math.exp(m(i, j) / tau) / den
        return (1 - mix) * soft + mix * (1.0 if i == j else 0.0)

    total = 0.0
    for i in range(k):
        for j in range(k):
            total += t_ij(i, j) * l_ij(i, j) + t_ji(i, j) * l_ji(i, j)
    return total / (2 * k)  # eq 8


def _infonce_loop(a, b, tau) -> float:
    k = a.shape[0]
    s = _cos_matrix(a, b)
    img = sum(-s[i][i] / tau + math.log(sum(math.exp(s[i][j] / tau) for j in range(k))) for i in range(k))
    txt = sum(-s[j][j] / tau + math.log(sum(math.exp(s[i][j] / tau) for i in range(k))) for j in range(k))
    return (img / k + txt / k) / 2


def _loss(kind: str, tau: float, **kw) -> ContrastiveLoss:
    return ContrastiveLoss(kind, init_temperature=tau, min_temperature=1e-3, max_temperature=10.0, **kw)


def _close(x: float, y: float) -> bool:
    return math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 5, 9])
@pytest.mark.parametrize("tau", [0.02, 0.07, 0.3, 1.0])
def test_soft_matches_paper_loops(k: int, tau: float) -> None:
    gen = torch.Generator().manual_seed(k * 100 + int(tau * 1000))
    for width in (3, 16):
        a, b = torch.randn(k, width, generator=gen), torch.randn(k, width, generator=gen)
        got = _loss("soft", tau)(a, b).item()
        assert _close(got, _paper_loss(a, b, tau)), (got, _paper_loss(a, b, tau))


@pytest.mark.parametrize("k", [2, 6])
@pytest.mark.parametrize("mix", [0.3, 0.8])
def test_soft_with_mix_and_target_feats_matches_loops(k: int, mix: float) -> None:
    gen = torch.Generator().manual_seed(7 + k)
    a, b = torch.randn(k, 8, generator=gen), torch.randn(k, 8, generator=gen)
    fa, fb = torch.randn(k, 5, generator=gen), torch.randn(k, 11, generator=gen)  # any dims
    tau = 0.1
    got = _loss("soft", tau, target_mix=mix)(a, b, fa, fb).item()
    assert _close(got, _paper_loss(a, b, tau, fa, fb, mix))
    # Only one side given: the other side falls back to its projected embeddings.
    got_a = _loss("soft", tau)(a, b, a_target_feats=fa).item()
    assert _close(got_a, _paper_loss(a, b, tau, a_feats=fa))
    # And the target features really are used.
    assert not _close(got_a, _loss("soft", tau)(a, b).item())


@pytest.mark.parametrize("k", [1, 4, 10])
@pytest.mark.parametrize("tau", [0.03, 0.5])
def test_infonce_matches_loops(k: int, tau: float) -> None:
    gen = torch.Generator().manual_seed(k)
    a, b = torch.randn(k, 12, generator=gen), torch.randn(k, 12, generator=gen)
    assert _close(_loss("infonce", tau)(a, b).item(), _infonce_loop(a, b, tau))


@pytest.mark.parametrize("k", [3, 16])
def test_target_mix_one_is_infonce(k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    a, b = torch.randn(k, 10, generator=gen), torch.randn(k, 10, generator=gen)
    feats = torch.randn(k, 4, generator=gen)
    ref = ContrastiveLoss("infonce")(a, b)
    soft = ContrastiveLoss("soft", target_mix=1.0)
    torch.testing.assert_close(soft(a, b), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(soft(a, b, feats, feats), ref, atol=1e-6, rtol=1e-6)
    # With collinear target features the soft targets are uniform (as at initialisation), so the plain soft loss
    # is far from InfoNCE there, and target_mix=1 still brings it back exactly.
    same = torch.ones(k, 4)
    assert abs(ContrastiveLoss("soft")(a, b, same, same).item() - ref.item()) > 0.1
    torch.testing.assert_close(soft(a, b, same, same), ref, atol=1e-6, rtol=1e-6)


def test_infonce_ignores_target_feats_and_scale() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 6, generator=gen), torch.randn(5, 6, generator=gen)
    loss = ContrastiveLoss("infonce")
    torch.testing.assert_close(loss(a, b), loss(a, b, torch.randn(5, 3), torch.randn(5, 3)))
    # Cosine similarities: rescaling the embeddings changes nothing.
    torch.testing.assert_close(loss(a, b), loss(a * 7.0, b * 0.1))


@pytest.mark.parametrize("kind", ["soft", "infonce"])
def test_gradient_reaches_learnable_temperature(kind: str) -> None:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(6, 8, generator=gen, requires_grad=True)
    b = torch.randn(6, 8, generator=gen)
    loss = ContrastiveLoss(kind)
    assert [n for n, _ in loss.named_parameters()] == ["log_temperature"]
    loss(a, b).backward()
    assert loss.log_temperature.grad is not None and loss.log_temperature.grad.abs().item() > 0
    assert a.grad is not None and a.grad.abs().sum().item() > 0


def test_fixed_temperature_is_a_buffer() -> None:
    loss = ContrastiveLoss("soft", init_temperature=0.2, learn_temperature=False)
    assert list(loss.parameters()) == []
    assert "log_temperature" in loss.state_dict()
    assert loss.temperature == pytest.approx(0.2)


def test_temperature_clamped() -> None:
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    loss = ContrastiveLoss("soft", min_temperature=0.01, max_temperature=1.0)
    at_max = ContrastiveLoss("soft", init_temperature=1.0, min_temperature=0.01, max_temperature=1.0)
    with torch.no_grad():
        loss.log_temperature.fill_(math.log(50.0))
    assert loss.temperature == pytest.approx(1.0)
    torch.testing.assert_close(loss(a, b), at_max(a, b))
    with torch.no_grad():
        loss.log_temperature.fill_(math.log(1e-6))
    assert loss.temperature == pytest.approx(0.01)
    # An optimiser pushing hard in one direction never takes the temperature used out of range.
    loss = ContrastiveLoss("infonce", min_temperature=0.05, max_temperature=0.5)
    opt = torch.optim.SGD(loss.parameters(), lr=10.0)
    seen = []
    for _ in range(20):
        opt.zero_grad()
        loss(a, b).backward()
        opt.step()
        seen.append(loss.temperature)
    assert all(0.05 - 1e-7 <= t <= 0.5 + 1e-7 for t in seen)
    assert min(seen) == pytest.approx(0.05) or max(seen) == pytest.approx(0.5)


@pytest.mark.parametrize("bound", ["min", "max"])
def test_temperature_at_a_bound_still_gets_a_gradient_and_leaves_it(bound: str) -> None:
    """A temperature pushed to a bound must keep learning: its gradient is non-zero there, a step in the other
    direction moves it back inside, and clamp_temperature_ keeps the parameter itself within the bounds."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)
    low, high = 0.05, 0.5
    loss = ContrastiveLoss("infonce", init_temperature=low if bound == "min" else high, min_temperature=low,
                           max_temperature=high)
    with torch.no_grad():  # one optimiser step overshot the bound
        loss.log_temperature.fill_(math.log(low / 2 if bound == "min" else high * 2))
    assert loss.temperature == pytest.approx(low if bound == "min" else high)
    loss(a, b).backward()
    grad = loss.log_temperature.grad
    assert grad is not None and grad.abs().item() > 1e-6
    # The step the gradient asks for, taken from the bound itself, in whichever direction leads inside.
    loss.clamp_temperature_()
    assert loss.log_temperature.item() == pytest.approx(math.log(low if bound == "min" else high))
    sign = 1.0 if bound == "min" else -1.0
    with torch.no_grad():
        loss.log_temperature.add_(sign * 0.1)
    inside = loss.temperature
    assert low < inside < high


def test_training_loop_clamps_the_temperature_parameter_in_place(tmp_path) -> None:
    """The fit loop keeps log_temperature itself in bounds after every step, even with a huge learning rate."""
    from toy_stores import make_toy_pair

    from pipeline.training.fit import LossConfig, TrainConfig, fit_up
    from pipeline.training.rundir import RunDir

    image_store, text_store = make_toy_pair(tmp_path, n_images=24)
    fit_up(image_store, text_store, tmp_path / "run", width=16, blocks=1,
           loss=LossConfig(init_temperature=0.05),
           train=TrainConfig(epochs=2, batch_size=8, lr=5.0, tensorboard=False), progress=False)
    _, loss, _ = RunDir(tmp_path / "run").load_model()
    assert math.log(0.01) - 1e-6 <= loss.log_temperature.item() <= math.log(1.0) + 1e-6


def test_detach_targets_stops_target_gradient() -> None:
    gen = torch.Generator().manual_seed(3)
    a0, b0 = torch.randn(5, 6, generator=gen), torch.randn(5, 6, generator=gen)

    def grads(detach: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
        a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        loss = ContrastiveLoss("soft", detach_targets=detach)
        value = loss(a, b)
        value.backward()
        return value.item(), a.grad, loss.log_temperature.grad

    v_full, ga_full, gt_full = grads(False)
    v_det, ga_det, gt_det = grads(True)
    assert v_full == pytest.approx(v_det)
    assert not torch.allclose(ga_full, ga_det)

    # With detached targets the gradient equals that of the loss with T taken as a constant.
    a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    log_t = torch.tensor(math.log(0.07), requires_grad=True)
    an, bn = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    tau = log_t.exp()
    with torch.no_grad():
        targets = torch.softmax(((an @ an.T + bn @ bn.T) / 2) / tau, dim=1)
    logits = an @ bn.T / tau
    manual = -(targets * logits.log_softmax(1)).sum() - (targets.T * logits.log_softmax(0)).sum()
    (manual / 10).backward()
    torch.testing.assert_close(ga_det, a.grad)
    torch.testing.assert_close(gt_det, log_t.grad)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ContrastiveLoss("hinge")
    with pytest.raises(ValueError):
        ContrastiveLoss(init_temperature=2.0, max_temperature=1.0)
    loss = ContrastiveLoss("soft")
    with pytest.raises(ValueError):
        loss(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(ValueError):
        loss(torch.randn(3, 4), torch.randn(3, 4), a_target_feats=torch.randn(2, 4))
    loss.target_mix = 1.5
    with pytest.raises(ValueError):
        loss(torch.randn(3, 4), torch.randn(3, 4))
