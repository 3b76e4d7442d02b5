"""OneEncoder / Universal Projection: padding safety, parameter counts, step-2 freezing, a toy training run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from project import (
    HEADS,
    AlignmentLayer,
    ContrastiveLoss,
    InputProjection,
    ModalityFusion,
    OneEncoder,
    UPConfig,
    build_head,
)
from project.base import FeaturePool, masked_mean
from project.dropout import drop_tokens

D_IMG, D_TXT = 12, 7


def _small(fusion: str = "add", pool: str = "mean", n_tokens: int = 1, dropout: float = 0.1) -> OneEncoder:
    torch.manual_seed(0)
    cfg = UPConfig(
        {"image": D_IMG, "text": D_TXT},
        width=32,
        blocks=2,
        heads=4,
        ff_mult=2,
        dropout=dropout,
        fusion=fusion,
        modality_tokens=n_tokens,
        pool=pool,
    )
    return OneEncoder.from_config(cfg)


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- parameter counts


@pytest.mark.parametrize("fusion", ["add", "attention", "concat"])
def test_default_config_is_about_4m_params(fusion: str) -> None:
    model = OneEncoder.from_config(UPConfig({"image": 768, "text": 768}, fusion=fusion))
    total = _n_params(model)
    assert 3_500_000 <= total <= 4_500_000, total
    # Two reference-code input projections of 263,168 each; the rest is the shared UP.
    assert _n_params(model.adapters) == 2 * 263_168
    extra = 3 * 65_792 if fusion == "attention" else 0
    assert _n_params(model.up) == 4 * 789_760 + 512 + 2 * 256 + extra


def test_alignment_layer_sizes() -> None:
    assert _n_params(AlignmentLayer(256, 256, "linear")) == 65_792  # the paper's AL
    assert _n_params(AlignmentLayer(768, 256, "mlp")) == 263_168  # the reference code's AL
    assert _n_params(InputProjection(768, 256)) == 263_168
    with pytest.raises(ValueError):
        AlignmentLayer(4, 4, "conv")


# ---------------------------------------------------------------- padding safety


def _item(length: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(length, dim, generator=torch.Generator().manual_seed(seed))


def _pad(items: list[torch.Tensor], length: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad with huge garbage (never zeros) so any leak shows."""
    gen = torch.Generator().manual_seed(99)
    tokens = torch.randn(len(items), length, items[0].shape[1], generator=gen) * 1e4
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    for row, item in enumerate(items):
        sl = slice(length - len(item), length) if left else slice(0, len(item))
        tokens[row, sl] = item
        mask[row, sl] = True
    return tokens, mask


@pytest.mark.parametrize("fusion", ["add", "attention", "concat"])
@pytest.mark.parametrize("pool", ["mean", "token"])
@pytest.mark.parametrize("n_tokens", [1, 3])
@pytest.mark.parametrize("grad", [False, True])
def test_embedding_does_not_depend_on_padding(fusion: str, pool: str, n_tokens: int, grad: bool) -> None:
    model = _small(fusion, pool, n_tokens).eval()
    item, longer = _item(5, D_IMG, 1), _item(11, D_IMG, 2)
    # grad=False exercises the transformer's inference fast path, grad=True the regular path.
    with torch.set_grad_enabled(grad):
        alone = model.encode("image", *_pad([item], 5))
        padded = model.encode("image", *_pad([item], 9))
        left_padded = model.encode("image", *_pad([item], 9, left=True))
        batched = model.encode("image", *_pad([item, longer], 11))
        batched_rev = model.encode("image", *_pad([longer, item], 14))
        longer_alone = model.encode("image", *_pad([longer], 11))
    assert alone.shape == (1, 32)
    for other in (padded, left_padded, batched[:1], batched_rev[1:]):
        torch.testing.assert_close(other, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1:], longer_alone, atol=1e-5, rtol=0)
    # The padded positions carried 1e4 garbage: the outputs must look like real embeddings.
    assert batched.abs().max() < 100


def test_nan_padding_does_not_leak() -> None:
    model = _small("attention").eval()
    item = _item(4, D_TXT, 3)
    tokens, mask = _pad([item], 8)
    tokens[0, 4:] = float("nan")
    torch.testing.assert_close(
        model.encode("text", tokens, mask), model.encode("text", item[None]), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("fusion", ["add", "attention", "concat"])
@pytest.mark.parametrize("pool", ["mean", "token"])
def test_all_padding_row_is_finite_and_harmless(fusion: str, pool: str) -> None:
    model = _small(fusion, pool).train()
    model.up.encoder.layers[0].dropout.p = 0.0  # keep the row comparison deterministic below
    torch.manual_seed(0)
    tokens, mask = _pad([_item(6, D_IMG, 4), _item(6, D_IMG, 5)], 6)
    mask[1] = False
    out = model.encode("image", tokens, mask)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    torch.testing.assert_close(
        model.encode("image", tokens, mask)[:1], model.encode("image", tokens[:1]), atol=1e-5, rtol=0
    )


def test_pooled_store_input() -> None:
    model = _small("attention").eval()
    pooled = torch.randn(4, D_TXT)
    as_tokens = model.encode("text", pooled[:, None, :], torch.ones(4, 1, dtype=torch.bool))
    assert as_tokens.shape == (4, 32) and torch.isfinite(as_tokens).all()
    torch.testing.assert_close(model.encode("text", pooled[:, None, :]), as_tokens)
    torch.testing.assert_close(model.encode("text", pooled), as_tokens)
    # Each row is encoded on its own: batching pooled items changes nothing either.
    torch.testing.assert_close(model.encode("text", pooled[2:3]), as_tokens[2:3], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- fusion and pooling semantics


def test_fusion_variants() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    token = torch.randn(3, 8)

    out, out_mask = ModalityFusion(8, "add")(x, mask, token)
    torch.testing.assert_close(out, x + token.mean(0))  # N > 1: the mean of the N tokens
    assert torch.equal(out_mask, mask)

    out, out_mask = ModalityFusion(8, "concat")(x, mask, token)
    assert out.shape == (2, 8, 8)
    torch.testing.assert_close(out[:, :3], token.expand(2, 3, 8))
    torch.testing.assert_close(out[:, 3:], x)
    assert out_mask[:, :3].all() and torch.equal(out_mask[:, 3:], mask)

    attn = ModalityFusion(8, "attention").eval()
    out, out_mask = attn(x, mask, token)
    assert torch.equal(out_mask, mask)
    # Explicit softmax(QK^T / sqrt(W)) V over the real keys, averaged over the N queries, added to every token.
    q = attn.q(token)
    for row, length in ((0, 5), (1, 2)):
        k, v = attn.k(x[row, :length]), attn.v(x[row, :length])
        context = (torch.softmax(q @ k.T / 8**0.5, dim=-1) @ v).mean(0)
        torch.testing.assert_close(out[row], x[row] + context)
    with pytest.raises(ValueError):
        ModalityFusion(8, "multiply")


@pytest.mark.parametrize("fusion", ["add", "attention", "concat"])
def test_modality_token_switches_the_projection(fusion: str) -> None:
    model = _small(fusion, dropout=0.0)
    model.add_modality("audio", D_IMG, "mlp")
    with torch.no_grad():
        # Same adapter weights: only the modality token differs between "image" and "audio".
        model.adapters["audio"].net.load_state_dict(model.adapters["image"].state_dict())
        x = torch.randn(3, 6, D_IMG)
        a, b = model.encode("image", x), model.encode("audio", x)
        assert (a - b).abs().max() > 1e-4
        model.up.modality_tokens["audio"].copy_(model.up.modality_tokens["image"])
        torch.testing.assert_close(model.encode("audio", x), a)


def test_token_pool_under_concat_reads_the_modality_token_output() -> None:
    model = _small("concat", "token", n_tokens=2).eval()
    seen = {}
    model.up.encoder.register_forward_hook(lambda _m, _i, out: seen.update(out=out))
    tokens, mask = _pad([_item(4, D_TXT, 6)], 7)
    emb = model.encode("text", tokens, mask)
    first_token = model.up.modality_tokens["text"][0]
    torch.testing.assert_close(emb[0], seen["out"][0, 0] + first_token)
    mean_model = _small("concat", "mean", n_tokens=2).eval()
    assert (mean_model.encode("text", tokens, mask) - emb).abs().max() > 1e-3


# ---------------------------------------------------------------- config, registry, step 2


def test_config_round_trip_and_validation() -> None:
    cfg = UPConfig({"image": 768, "text": 384}, fusion="attention", pool="token", modality_tokens=2)
    assert cfg.adapters == {"image": "projection", "text": "projection"}
    assert UPConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError):
        UPConfig.from_dict({**cfg.to_dict(), "widht": 3})
    for bad in (
        {"fusion": "mul"},
        {"pool": "max"},
        {"width": 30, "heads": 4},
        {"adapters": {"audio": "linear"}},
    ):
        with pytest.raises(ValueError):
            UPConfig({"image": 8}, **bad)
    with pytest.raises(ValueError):
        UPConfig({"im.age": 8})


def test_saved_config_rebuilds_model_after_add_modality() -> None:
    model = _small("attention").eval()
    model.add_modality("audio", 20, "linear")
    model.add_modality("video", 9, "mlp")
    assert model.config.adapters == {
        "image": "projection",
        "text": "projection",
        "audio": "linear",
        "video": "mlp",
    }
    assert model.config.input_dims["audio"] == 20
    restored = build_head("up", json.loads(json.dumps(model.config.to_dict()))).eval()
    restored.load_state_dict(model.state_dict())  # strict: same modules, same shapes
    x = torch.randn(2, 5, 20)
    torch.testing.assert_close(restored.encode("audio", x), model.encode("audio", x))
    assert isinstance(build_head("up", model.config), OneEncoder) and HEADS["up"] is OneEncoder
    with pytest.raises(KeyError):
        build_head("lightcrl", model.config)


def test_add_modality_rejects_bad_input_and_leaves_model_unchanged() -> None:
    model = _small()
    before = (model.config, sorted(model.state_dict()))
    with pytest.raises(ValueError):
        model.add_modality("image", 8)
    with pytest.raises(ValueError):
        model.add_modality("bad name", 8)
    with pytest.raises(ValueError):
        model.add_modality("audio", 8, "projection")
    assert (model.config, sorted(model.state_dict())) == before


def test_freeze_for_alignment_trains_only_the_new_modality() -> None:
    model = _small("attention")
    model.add_modality("audio", 10, "linear")
    expected = ["adapters.audio.net.weight", "adapters.audio.net.bias", "up.modality_tokens.audio"]
    names = model.freeze_for_alignment("audio")
    assert sorted(names) == sorted(expected)
    # Idempotent, and it re-freezes anything unfrozen in between.
    model.up.norm.weight.requires_grad_(True)
    assert model.freeze_for_alignment("audio") == names
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(expected)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # All parameters handed to the optimiser, weight decay on: frozen ones must still not move.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    loss_fn = ContrastiveLoss("soft")
    a = model.encode("audio", torch.randn(6, 4, 10))
    b = model.encode("text", torch.randn(6, 3, D_TXT))
    loss_fn(a, b).backward()
    opt.step()
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    assert changed == sorted(expected)
    with pytest.raises(KeyError):
        model.freeze_for_alignment("video")


# ---------------------------------------------------------------- training sanity

N_CLASSES, D_A, D_B = 8, 24, 16


def _toy_pairs(n: int, gen: torch.Generator, centers: tuple[torch.Tensor, torch.Tensor]):
    """Paired token sequences (length 3..12, garbage padding) sharing a class signal under per-token noise."""
    labels = torch.randint(0, N_CLASSES, (n,), generator=gen)
    sides = []
    for center in centers:
        lengths = torch.randint(3, 13, (n,), generator=gen)
        mask = torch.arange(12)[None] < lengths[:, None]
        tokens = center[labels][:, None, :] + 2.0 * torch.randn(n, 12, center.shape[1], generator=gen)
        tokens = torch.where(mask[..., None], tokens, 1e3 * torch.randn(tokens.shape, generator=gen))
        sides.append((tokens, mask))
    return labels, sides[0], sides[1]


def _r_at_1(model: OneEncoder, labels: torch.Tensor, image, text) -> float:
    """Image -> text R@1 over the held-out gallery; a hit is a retrieved text of the image's class."""
    model.eval()
    with torch.no_grad():
        a = F.normalize(model.encode("image", *image), dim=-1)
        b = F.normalize(model.encode("text", *text), dim=-1)
    return (labels[(a @ b.T).argmax(dim=1)] == labels).float().mean().item()


@pytest.mark.parametrize("kind", ["soft", "infonce"])
def test_toy_problem_is_learned(kind: str, one_thread) -> None:
    gen = torch.Generator().manual_seed(1)
    centers = (torch.randn(N_CLASSES, D_A, generator=gen), torch.randn(N_CLASSES, D_B, generator=gen))
    y_train, img_train, txt_train = _toy_pairs(2048, gen, centers)
    y_test, img_test, txt_test = _toy_pairs(256, gen, centers)
    torch.manual_seed(0)
    cfg = UPConfig({"image": D_A, "text": D_B}, width=32, blocks=1, heads=4, ff_mult=2, dropout=0.0)
    model = OneEncoder.from_config(cfg)
    loss_fn = ContrastiveLoss(kind)  # the literal paper loss for "soft"
    assert _r_at_1(model, y_test, img_test, txt_test) < 0.4  # untrained: near chance (1/8)
    params = list(model.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=1e-3)
    model.train()
    for _ in range(250):
        idx = torch.randint(0, 2048, (64,), generator=gen)
        a = model.encode("image", img_train[0][idx], img_train[1][idx])
        b = model.encode("text", txt_train[0][idx], txt_train[1][idx])
        loss = loss_fn(a, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _r_at_1(model, y_test, img_test, txt_test) > 0.9


# ---------------------------------------------------------------- the pooled linear path (docs/training.md)


def test_pooled_skip_starts_as_a_linear_head_and_lets_the_up_in_through_its_gate() -> None:
    torch.manual_seed(0)
    model = OneEncoder.from_config(UPConfig({"image": D_IMG, "text": D_TXT}, width=32, blocks=1, pooled_skip=True))
    tokens, mask = torch.randn(3, 5, D_IMG), torch.tensor([[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]], dtype=torch.bool)
    out = model.encode("image", tokens, mask)
    means = torch.stack([tokens[i, mask[i]].mean(0) for i in range(3)])
    assert torch.allclose(out, model.skips["image"](means), atol=1e-6)  # gate 0: exactly the linear head
    F.normalize(out, dim=-1).sum().backward()
    assert model.up_gate.grad is not None and float(model.up_gate.grad.abs()) > 0  # the UP's way in
    with torch.no_grad():
        model.up_gate.fill_(0.5)
    assert not torch.allclose(model.encode("image", tokens, mask), out)
    # step 2: a new modality gets its own linear path, and only it (with the AL and token) trains
    model.add_modality("audio", 6)
    trainable = model.freeze_for_alignment("audio")
    assert "skips.audio.weight" in trainable and not any("image" in n or n == "up_gate" for n in trainable)
    rebuilt = OneEncoder.from_config(UPConfig.from_dict(model.config.to_dict()))
    rebuilt.load_state_dict(model.state_dict())  # strict: the saved config rebuilds the same modules


def test_under_one_seed_the_up_starts_as_exactly_the_linear_head() -> None:
    # fit-up seeds, then builds: the UP's linear path takes the linear head's random draws, so `--head linear` is
    # the exact ablation of the gated UP (same start, same batches), not another draw of the initial weights.
    tokens, mask = torch.randn(3, 5, D_IMG), torch.ones(3, 5, dtype=torch.bool)
    texts = torch.randn(3, 4, D_TXT)
    embeddings = {}
    for name, config in (("up", UPConfig({"image": D_IMG, "text": D_TXT}, width=32, blocks=1, pooled_skip=True)),
                         ("linear", HEADS["linear"].config_class({"image": D_IMG, "text": D_TXT}, width=32))):
        torch.manual_seed(7)
        model = build_head(name, config)
        embeddings[name] = (model.encode("image", tokens, mask), model.encode("text", texts))
    for up, linear in zip(embeddings["up"], embeddings["linear"], strict=True):
        assert torch.equal(up, linear)


def test_gate_scale_multiplies_how_far_an_adamw_step_moves_the_gate() -> None:
    # AdamW moves a parameter by about the lr per step whatever its gradient's size, so the scale is what lets a
    # gate that starts at 0 open within a short run (docs/training.md, hypothesis 11).
    tokens, mask = torch.randn(4, 5, D_IMG), torch.ones(4, 5, dtype=torch.bool)
    for scale in (1.0, 10.0):
        torch.manual_seed(0)
        model = OneEncoder.from_config(UPConfig({"image": D_IMG, "text": D_TXT}, width=32, blocks=1, dropout=0.0,
                                                pooled_skip=True, gate_scale=scale))
        before = model.encode("image", tokens, mask).detach()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        F.normalize(model.encode("image", tokens, mask), dim=-1)[:, 0].sum().backward()
        optimizer.step()
        assert abs(scale * float(model.up_gate.detach())) == pytest.approx(scale * 1e-3, rel=1e-3)
        assert not torch.allclose(model.encode("image", tokens, mask), before)
    # A config saved before the option existed rebuilds the unscaled gate it was trained with.
    saved = UPConfig({"image": D_IMG}, pooled_skip=True).to_dict()
    del saved["gate_scale"]
    assert UPConfig.from_dict(saved).gate_scale == 1.0
    with pytest.raises(ValueError, match="gate_scale must be > 0"):
        UPConfig({"image": D_IMG}, pooled_skip=True, gate_scale=0.0)


def test_a_query_pool_starts_as_the_masked_mean_and_weights_the_tokens_its_query_points_at() -> None:
    tokens = torch.randn(3, 5, D_IMG)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5, [0] * 5], dtype=torch.bool)
    pool = FeaturePool("query", D_IMG)
    assert torch.allclose(pool(tokens, mask), masked_mean(tokens, mask), atol=1e-6)  # zero query: uniform weights
    assert torch.equal(pool(tokens, mask)[2], torch.zeros(D_IMG))  # no real token: zeros, as the mean gives
    with torch.no_grad():
        pool.query.copy_(100 * tokens[1, 3])  # a query aligned with one token
    assert torch.allclose(pool(tokens, mask)[1], tokens[1, 3], atol=1e-4)
    padded = tokens.clone()
    padded[0, 3:] = float("inf")  # padding never counts, whatever it holds
    assert torch.equal(pool(padded, mask)[0], pool(tokens, mask)[0])
    assert not list(FeaturePool("mean", D_IMG).parameters())  # the mean pool adds nothing to a checkpoint
    with torch.autocast("cpu", dtype=torch.bfloat16):  # --precision bf16: the scores are bf16, the tokens not
        low = pool(tokens, mask)
    assert torch.equal(low[2].float(), torch.zeros(D_IMG))
    assert torch.allclose(low[:2].float(), pool(tokens, mask)[:2], atol=0.05)
    with pytest.raises(ValueError, match="pool must be one of"):
        FeaturePool("max", D_IMG)


def _linear_head_and_pooled_up(**options) -> tuple[torch.nn.Module, OneEncoder]:
    """The linear head and a pooled-path UP with ``options``, each built under the same seed (as fit-up builds)."""
    dims = {"image": D_IMG, "text": D_TXT}
    torch.manual_seed(7)
    linear = build_head("linear", HEADS["linear"].config_class(dims, width=32))
    torch.manual_seed(7)
    return linear, OneEncoder.from_config(UPConfig(dims, width=32, blocks=1, pooled_skip=True, **options))


def test_a_query_pooled_linear_path_starts_as_the_linear_head_and_trains_its_query() -> None:
    dims = {"image": D_IMG, "text": D_TXT}
    tokens, mask = torch.randn(3, 5, D_IMG), torch.ones(3, 5, dtype=torch.bool)
    linear, model = _linear_head_and_pooled_up(skip_pool="query")
    out = model.encode("image", tokens, mask)
    assert torch.allclose(out, linear.encode("image", tokens, mask), atol=1e-6)
    F.normalize(out, dim=-1)[:, 0].sum().backward()
    assert float(model.skip_pools["image"].query.grad.abs().sum()) > 0
    # --head linear with the same pool: its own query, trained the same way
    torch.manual_seed(7)
    pooled = build_head("linear", HEADS["linear"].config_class(dims, width=32, pool="query"))
    assert torch.allclose(pooled.encode("image", tokens, mask), out, atol=1e-6)
    assert "adapters.image.pool.query" in dict(pooled.named_parameters())
    model.add_modality("audio", 6)
    trainable = model.freeze_for_alignment("audio")
    assert "skip_pools.audio.query" in trainable and "skip_pools.image.query" not in trainable
    rebuilt = OneEncoder.from_config(UPConfig.from_dict(model.config.to_dict()))
    rebuilt.load_state_dict(model.state_dict())  # strict: the saved config rebuilds the query pools
    with pytest.raises(ValueError, match="skip_pool must be one of"):
        UPConfig(dims, pooled_skip=True, skip_pool="max")
    with pytest.raises(ValueError, match="needs pooled_skip"):
        UPConfig(dims, skip_pool="query")


def test_an_input_norm_puts_the_branchs_tokens_at_one_scale_and_leaves_the_linear_path_raw() -> None:
    dims = {"image": D_IMG, "text": D_TXT}
    tokens, mask = torch.randn(3, 5, D_IMG), torch.ones(3, 5, dtype=torch.bool)
    linear, model = _linear_head_and_pooled_up(input_norm=True)
    model.eval()
    assert torch.equal(model.encode("image", tokens, mask), linear.encode("image", tokens, mask))  # same start
    with torch.no_grad():
        model.up_gate.fill_(1.0)
        model.skips["image"].weight.zero_()
        model.skips["image"].bias.zero_()  # the branch alone
        branch = model.encode("image", tokens, mask)
        # Each token scaled and shifted as a whole (an encoder of another scale): the branch reads the same.
        assert torch.allclose(model.encode("image", 40 * tokens + 3, mask), branch, atol=1e-3)  # up to LayerNorm's eps
        plain = OneEncoder.from_config(UPConfig(dims, width=32, blocks=1, pooled_skip=True)).eval()
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("input_norms.")})
        assert not torch.allclose(plain.encode("image", 40 * tokens + 3, mask), plain.encode("image", tokens, mask))
    model.add_modality("audio", 6)
    trainable = model.freeze_for_alignment("audio")
    assert "input_norms.audio.weight" in trainable and "input_norms.image.weight" not in trainable
    rebuilt = OneEncoder.from_config(UPConfig.from_dict(model.config.to_dict()))
    rebuilt.load_state_dict(model.state_dict())  # strict: the saved config rebuilds the norms
    saved = UPConfig(dims).to_dict()
    del saved["input_norm"]
    assert UPConfig.from_dict(saved).input_norm is False  # a config saved before the option: the paper's UP


# ---------------------------------------------------------------- token dropout (docs/training.md)


def test_token_dropout_hides_tokens_in_training_only_and_never_empties_a_row() -> None:
    torch.manual_seed(0)
    config = UPConfig({"image": D_IMG, "text": D_TXT}, width=32, blocks=1, dropout=0.0, pooled_skip=True,
                      token_dropout=0.5)
    model = OneEncoder.from_config(config)
    with torch.no_grad():
        model.up_gate.fill_(0.5)  # both paths count
    tokens = torch.randn(64, 6, D_IMG)
    mask = torch.ones(64, 6, dtype=torch.bool)
    mask[:, 4:] = False  # 4 real tokens per row
    mask[0, 1:] = False  # a row of one token keeps it
    kept = drop_tokens(mask, 0.5)
    assert bool((kept & ~mask).any()) is False  # padding stays padding
    assert bool(kept.any(dim=1).all()) and bool(kept[:, 0].all())  # the first real token always stays
    hidden = (mask & ~kept)[1:, 1:4].float().mean()
    assert 0.35 < float(hidden) < 0.65  # the others drop at about p
    # Training: the embedding is that of a random subset of the tokens, so two passes differ; both paths see it.
    model.train()
    assert not torch.allclose(model.encode("image", tokens, mask), model.encode("image", tokens, mask))
    # Eval: every real token, deterministic, identical to the same model without token dropout.
    model.eval()
    plain = OneEncoder.from_config(replace(config, token_dropout=0.0))
    plain.load_state_dict(model.state_dict())
    plain.eval()
    assert torch.equal(model.encode("image", tokens, mask), plain.encode("image", tokens, mask))
    with pytest.raises(ValueError, match="token_dropout must be in"):
        UPConfig({"image": D_IMG}, token_dropout=1.0)


def test_up_drop_drops_the_whole_up_branch_per_item_in_training_only() -> None:
    torch.manual_seed(0)
    config = UPConfig({"image": D_IMG, "text": D_TXT}, width=32, blocks=1, dropout=0.0, pooled_skip=True, up_drop=0.5)
    model = OneEncoder.from_config(config)
    with torch.no_grad():
        model.up_gate.fill_(0.5)
    tokens, mask = torch.randn(64, 5, D_IMG), torch.ones(64, 5, dtype=torch.bool)
    skip = model.skips["image"](tokens.mean(dim=1))
    model.eval()
    full = model.encode("image", tokens, mask)
    branch = (full - skip) / 0.5  # the UP's own output (dropout 0: the same in training)
    model.train()
    out = model.encode("image", tokens, mask)
    dropped = torch.isclose(out, skip, atol=1e-5).all(dim=1)
    kept = torch.isclose(out, skip + 0.5 * branch / 0.5, atol=1e-5).all(dim=1)
    assert bool((dropped ^ kept).all())  # every item: its branch dropped, or kept and scaled by 1 / (1 - p)
    assert 16 < int(dropped.sum()) < 48
    plain = OneEncoder.from_config(replace(config, up_drop=0.0))
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    assert torch.equal(model.encode("image", tokens, mask), plain.encode("image", tokens, mask))  # eval: identity
    with pytest.raises(ValueError, match="needs pooled_skip"):
        UPConfig({"image": D_IMG}, up_drop=0.5)


def test_a_path_loss_of_its_own_adds_the_paths_embedding_in_training_and_changes_no_embedding() -> None:
    tokens, mask = torch.randn(3, 5, D_IMG), torch.ones(3, 5, dtype=torch.bool)
    _, shared = _linear_head_and_pooled_up(dropout=0.0)
    _, own = _linear_head_and_pooled_up(dropout=0.0, path_loss="own")
    own.load_state_dict(shared.state_dict())
    with torch.no_grad():
        for model in (shared, own):
            model.up_gate.fill_(0.5)
    for training in (True, False):
        shared.train(training)
        own.train(training)
        embeddings = own.training_embeddings("image", tokens, mask)
        assert len(shared.training_embeddings("image", tokens, mask)) == 1
        assert len(embeddings) == (2 if training else 1)  # evaluation embeds as any UP does
        assert torch.allclose(embeddings[0], shared.encode("image", tokens, mask), atol=1e-6)
        assert torch.allclose(own.encode("image", tokens, mask), embeddings[0], atol=1e-6)
    path = own.train().training_embeddings("image", tokens, mask)[1]
    assert torch.allclose(path, own.linear_path("image", tokens, mask))
    with pytest.raises(ValueError, match="path_loss trains the pooled linear path: it needs pooled_skip"):
        UPConfig({"image": D_IMG}, path_loss="own")
    with pytest.raises(ValueError, match="path_loss must be one of"):
        UPConfig({"image": D_IMG}, pooled_skip=True, path_loss="both")
