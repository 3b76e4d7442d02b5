"""Encoders: freezing, preprocessors, HF text/image wrappers, plugins and identity (real files, no mocks)."""

from __future__ import annotations

import json
import os
import pickle
import textwrap
from pathlib import Path

import pytest
import torch

from extract.encoders import (
    EncoderError,
    EncoderNotCachedError,
    HFImageEncoder,
    HFTextEncoder,
    encoder_identity,
    freeze,
    load_encoder,
)
from extract.filehash import cache_dir
from extract.manifest import Item, read_manifest


def _text_item(i: int, text: str) -> Item:
    return Item(id=str(i), path=None, text=text, label=None, ref=None, line=i + 1)


def test_freeze_text_model_is_eval_without_grads_and_deterministic(tiny_text_model: str) -> None:
    enc = load_encoder(tiny_text_model, "text")
    assert isinstance(enc, HFTextEncoder)
    assert enc.model.training is False
    assert not any(p.requires_grad for p in enc.model.parameters())
    enc.model.train()  # a parent's .train() must not re-enable dropout
    assert not any(m.training for m in enc.model.modules())
    batch = enc.preprocessor([_text_item(0, "a red circle on the left"), _text_item(1, "blue")])
    a, _ = enc.forward(batch)
    b, _ = enc.forward(batch)
    assert torch.equal(a, b)  # dropout inactive
    assert freeze(enc.model) is enc.model  # idempotent


def test_freeze_zeroes_train_only_switches_of_wav2vec2() -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        layerdrop=0.5, mask_time_prob=0.5, mask_time_length=2, hidden_dropout=0.3,
    )
    torch.manual_seed(0)
    model = freeze(Wav2Vec2Model(config))
    assert model.config.layerdrop == 0.0 and model.config.mask_time_prob == 0.0
    assert model.config.apply_spec_augment is False
    model.train()
    wave = torch.randn(1, 1600)
    with torch.inference_mode():
        assert torch.equal(model(wave).last_hidden_state, model(wave).last_hidden_state)


def test_text_preprocessor_failures_padding_and_pickling(tiny_text_model: str, tmp_path: Path) -> None:
    enc = load_encoder(tiny_text_model, "text", max_tokens=8)
    (tmp_path / "t.txt").write_text("green star", encoding="utf-8")
    items = [
        _text_item(0, "a red circle"),
        _text_item(1, "   "),
        _text_item(2, "one two three four five six seven eight nine ten"),
        Item(id="f", path=str(tmp_path / "t.txt"), text=None, label=None, ref=None, line=4),
        Item(id="g", path=str(tmp_path / "absent.txt"), text=None, label=None, ref=None, line=5),
    ]
    pre = pickle.loads(pickle.dumps(enc.preprocessor))  # must survive the trip to a worker process
    batch = pre(items)
    assert [it.id for it in batch["items"]] == ["0", "2", "f"]
    assert [(it.id, reason) for it, reason in batch["failed"]][0] == ("1", "empty text")
    assert batch["failed"][1][0].id == "g" and "cannot read text file" in batch["failed"][1][1]
    assert batch["input_ids"].shape == (3, 8)  # dynamic padding to the longest, truncated at max_tokens
    tokens, lengths = enc.forward(batch)
    assert tokens.shape == (3, 8, 32)
    assert lengths.tolist() == batch["attention_mask"].sum(1).tolist() == [5, 8, 4]
    assert lengths.dtype == torch.int64
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 3  # right padding: real tokens first


def test_text_layers(tiny_text_model: str) -> None:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_model)
    model = AutoModel.from_pretrained(tiny_text_model).eval()
    inputs = tok(["a red circle"], return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True)
    enc = load_encoder(tiny_text_model, "text", layer=1)
    tokens, _ = enc.forward(enc.preprocessor([_text_item(0, "a red circle")]))
    torch.testing.assert_close(tokens, ref.hidden_states[1])
    with pytest.raises(EncoderError, match="layer 9 out of range"):
        load_encoder(tiny_text_model, "text", layer=9)


def test_image_encoder_fixed_tokens_and_bad_images(tiny_image_model: str, image_manifest: str, tmp_path: Path) -> None:
    enc = load_encoder(tiny_image_model, "image")
    assert isinstance(enc, HFImageEncoder)
    assert (enc.dim, enc.fixed_tokens) == (32, 17)  # 4x4 patches + CLS
    items = read_manifest(image_manifest)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    bad = Item(id="bad", path=str(tmp_path / "bad.jpg"), text=None, label=None, ref=None, line=99)
    pre = pickle.loads(pickle.dumps(enc.preprocessor))
    batch = pre([items[0], bad, items[1]])
    assert [it.id for it in batch["items"]] == [items[0].id, items[1].id]
    assert batch["failed"][0][0].id == "bad"
    tokens, lengths = enc.forward(batch)
    assert tokens.shape == (2, 17, 32) and lengths.tolist() == [17, 17]


def test_conv_feature_maps_become_tokens(tmp_path: Path) -> None:
    from transformers import ResNetConfig, ResNetModel

    try:
        from transformers import ConvNextImageProcessorPil as Processor
    except ImportError:  # transformers 4.x
        from transformers import ConvNextImageProcessor as Processor

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ResNetModel(config).save_pretrained(tmp_path)
    Processor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(tmp_path)
    enc = load_encoder(str(tmp_path), "image")
    assert (enc.fixed_tokens, enc.dim) == (16, 16)  # (B, 16, 4, 4) map -> 16 tokens of 16 channels


def test_identity_without_loading_matches_loaded(tiny_text_model: str, tiny_image_model: str) -> None:
    for spec, modality in ((tiny_text_model, "text"), (tiny_image_model, "image")):
        ident = encoder_identity(spec, modality)
        assert ident == load_encoder(spec, modality).identity()
        json.dumps(ident)  # JSON-able
        assert tiny_text_model not in json.dumps(ident)  # no machine-specific paths
    text = encoder_identity(tiny_text_model, "text")
    assert text["preprocess"]["max_tokens"] == 64  # min(tokenizer limit, positions, 512)
    assert set(text["files"]) >= {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"}
    assert encoder_identity(tiny_text_model, "text", max_tokens=16)["preprocess"]["max_tokens"] == 16
    assert encoder_identity(tiny_text_model, "text", layer=1)["layer"] == 1
    image = encoder_identity(tiny_image_model, "image")
    assert image["preprocess"]["size"] == {"height": 32, "width": 32}
    assert image["preprocess"]["image_mean"] == [0.5, 0.5, 0.5]


def test_identity_follows_weight_changes_and_caches_hashes(tiny_text_model: str, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_text_model, copy)
    before = encoder_identity(str(copy), "text")
    cache = json.loads((cache_dir() / "file-hashes.json").read_text())
    weights = os.path.realpath(copy / "model.safetensors")
    assert cache[weights]["sha256"] == before["files"]["model.safetensors"]
    with open(copy / "model.safetensors", "r+b") as f:  # flip one byte of the weights
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    after = encoder_identity(str(copy), "text")
    assert after["files"]["model.safetensors"] != before["files"]["model.safetensors"]
    assert after["files"]["config.json"] == before["files"]["config.json"]


def test_uncached_hub_id_fails_clearly() -> None:
    with pytest.raises(EncoderNotCachedError, match="nor in the local Hugging Face cache"):
        encoder_identity("no-such-org/no-such-model-oneencoder", "text")


def test_file_plugin_with_module_identity(tmp_path: Path) -> None:
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        textwrap.dedent(
            """
            import torch

            def identity(*, modality, layer, max_tokens, width=4, **_):
                return {"name": "const", "width": width}

            class Pre:
                def __call__(self, items):
                    return {"items": list(items), "failed": [], "n": torch.tensor([len(items)])}

            class Enc:
                modality = "text"
                fixed_tokens = 2
                def __init__(self, width):
                    self.dim = width
                    self.preprocessor = Pre()
                def identity(self):
                    return identity(modality="text", layer=-1, max_tokens=None, width=self.dim)
                def forward(self, batch):
                    b = len(batch["items"])
                    return torch.ones(b, 2, self.dim), torch.full((b,), 2, dtype=torch.int64)
                def to(self, device):
                    return self

            def load(*, modality, layer, max_tokens, width=4, **_):
                return Enc(width)
            """
        )
    )
    spec = f"{plugin}:load"
    ident = encoder_identity(spec, "text", options={"width": 3})
    assert ident["plugin"] == {"name": "const", "width": 3}
    assert ident["spec"] == "my_plugin.py:load" and len(ident["file_sha256"]) == 64
    enc = load_encoder(spec, "text", options={"width": 3})
    assert enc.dim == 3
    with pytest.raises(EncoderError, match="encodes 'text', not 'image'"):
        load_encoder(spec, "image")
    with pytest.raises(EncoderError, match="cannot import plugin module"):
        load_encoder("no_such_module_xyz:load", "text")
    with pytest.raises(EncoderError, match="not a callable"):
        load_encoder(f"{plugin}:nope", "text")


def test_hub_id_resolves_from_the_local_hf_cache(
    tiny_text_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id works offline once it is in the HF cache: identity from the snapshot, model via from_pretrained."""
    import shutil

    from huggingface_hub import constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-bert"
    shutil.copytree(tiny_text_model, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    ident = encoder_identity("tiny-org/tiny-bert", "text")
    assert (ident["source"], ident["spec"], ident["revision"]) == ("hub", "tiny-org/tiny-bert", revision)
    assert ident["files"] == encoder_identity(tiny_text_model, "text")["files"]
    encoder = load_encoder("tiny-org/tiny-bert", "text")
    assert encoder.dim == 32 and encoder.identity() == ident


def test_one_table_resolves_every_kind_and_its_identity_is_the_loaded_encoders(
    tiny_text_model: str, tiny_image_model: str
) -> None:
    from extract.encoders import ENCODER_KINDS, HF_ENCODERS, encoder_kind

    assert set(ENCODER_KINDS) == {"hf", "plugin", "frames"}
    assert set(HF_ENCODERS) == {"text", "image", "audio", "video"}
    assert encoder_kind(tiny_text_model, "text") == encoder_kind(tiny_image_model, "image") == "hf"
    assert encoder_kind(tiny_image_model, "video") == "frames"  # an image model asked for video
    assert encoder_kind("extract.plugins.efficientnet_lite0:load", "image") == "plugin"
    for spec, modality, kind in ((tiny_text_model, "text", "hf"), (tiny_image_model, "image", "hf"),
                                 (tiny_image_model, "video", "frames")):
        identity = encoder_identity(spec, modality)
        assert identity["kind"] == kind
        assert load_encoder(spec, modality).identity() == identity  # one table: the two cannot drift apart
