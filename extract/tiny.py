"""Tiny, deterministic Hugging Face models for tests and the offline demo.

No model hub is reachable offline, so tests and the demo build small random-initialised models from a config,
save them with ``save_pretrained`` and load them back through the same ``from_pretrained(path)`` code path that
real checkpoints use. Seeds are fixed, so the saved bytes (and therefore the cache identity) are the same on
every run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .encoders.hf import _quiet_hf

__all__ = [
    "TINY_WORDS",
    "save_tiny_audio_model",
    "save_tiny_image_model",
    "save_tiny_text_model",
    "save_tiny_video_model",
    "tiny_vocab",
]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# ~200 common English words, biased to what the demo's synthetic captions use (colours, shapes, positions).
TINY_WORDS = ["a", "an", "the", "of", "on", "in", "at", "to", "and", "or", "with", "without", "is", "are", "was", "be", "this", "that", "these", "those", "there", "here", "it", "its", "photo", "picture", "image", "drawing", "painting", "sketch", "view", "close", "up", "small", "large", "big", "tiny", "huge", "little", "long", "short", "tall", "red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray", "grey", "cyan", "magenta", "gold", "silver", "dark", "light", "bright", "circle", "square", "triangle", "rectangle", "star", "heart", "diamond", "oval", "line", "dot", "cross", "ring", "shape", "shapes", "box", "ball", "cube", "left", "right", "top", "bottom", "center", "centre", "middle", "corner", "side", "upper", "lower", "above", "below", "near", "far", "next", "between", "behind", "front", "over", "under", "inside", "outside", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "many", "some", "several", "few", "cat", "dog", "bird", "fish", "horse", "cow", "sheep", "car", "bus", "truck", "bike", "train", "plane", "boat", "person", "man", "woman", "child", "people", "tree", "flower", "grass", "sky", "sun", "moon", "cloud", "water", "river", "sea", "beach", "mountain", "road", "street", "house", "building", "city", "room", "table", "chair", "bed", "door", "window", "wall", "floor", "cup", "plate", "food", "pizza", "apple", "banana", "cake", "bowl", "bottle", "book", "phone", "sitting", "standing", "walking", "running", "playing", "eating", "holding", "looking", "flying", "riding", "lying", "jumping", "background", "foreground", "empty", "plain", "striped", "spotted", "round", "flat", "bright", "sharp", "blurry", "soft", "digit", "number", "letter", "word", "text", "written", "handwritten"]

# WordPiece continuation pieces let every lowercase word be tokenized (no [UNK] for unseen words).
_LETTERS = list("abcdefghijklmnopqrstuvwxyz")
_DIGITS = list("0123456789")
_PUNCT = list(".,!?;:'\"-()/&")


def tiny_vocab() -> list[str]:
    """The WordPiece vocabulary of the tiny text model: specials, punctuation, characters, pieces, words."""
    vocab: list[str] = []
    seen: set[str] = set()
    for tok in [*SPECIAL_TOKENS, *_PUNCT, *_LETTERS, *_DIGITS, *(f"##{c}" for c in _LETTERS + _DIGITS), *TINY_WORDS]:
        if tok not in seen:  # a word list may repeat a letter like "a"
            seen.add(tok)
            vocab.append(tok)
    return vocab


def save_tiny_text_model(directory: str | os.PathLike[str]) -> str:
    """Save a tiny random BertModel (hidden 32, 2 layers, 2 heads) and its WordPiece tokenizer; return the dir."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(tiny_vocab()) + "\n", encoding="utf-8")
    vocab = {tok: i for i, tok in enumerate(tiny_vocab())}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=64)
    with _quiet_hf():
        tokenizer.save_pretrained(out)

    config = BertConfig(
        vocab_size=len(tiny_vocab()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    torch.manual_seed(0)  # deterministic weights -> stable bytes -> stable cache identity
    model = BertModel(config)
    with _quiet_hf():
        model.save_pretrained(out)
    return str(out)


def save_tiny_image_model(directory: str | os.PathLike[str]) -> str:
    """Save a tiny random ViTModel (32 px, patch 8 -> 16 patches + CLS, hidden 32) and its processor."""
    import torch
    from transformers import ViTConfig, ViTModel

    try:  # transformers 5 names the PIL backend explicitly; 4.x calls it ViTImageProcessor
        from transformers import ViTImageProcessorPil as _Processor
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers import ViTImageProcessor as _Processor

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    model = ViTModel(config)
    with _quiet_hf():
        model.save_pretrained(out)
    processor = _Processor(
        do_resize=True,
        size={"height": 32, "width": 32},
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    with _quiet_hf():
        processor.save_pretrained(out)
    return str(out)


def save_tiny_audio_model(directory: str | os.PathLike[str], architecture: str = "wav2vec2") -> str:
    """Save a tiny random audio encoder and its feature extractor (16 kHz); return the dir.

    ``"wav2vec2"``: Wav2Vec2Model, hidden 32, 2 layers, 2 heads, the real conv strides (5,2,2,2,2,2,2) with 16
    channels (so 400-sample receptive field and 320-sample hop like wav2vec2-base), layer-norm feature encoder
    with an attention mask (``feat_extract_norm="layer"``, ``return_attention_mask=True``).
    ``"whisper"``: WhisperModel (d_model 32, 2+1 layers, 80 mel bins, the real 30 s window / 1500 positions)
    with a WhisperFeatureExtractor; the extraction uses its encoder.
    """
    import torch

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if architecture == "wav2vec2":
        from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

        config = Wav2Vec2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(16,) * 7,
            conv_kernel=(10, 3, 3, 3, 3, 2, 2),
            conv_stride=(5, 2, 2, 2, 2, 2, 2),
            feat_extract_norm="layer",
            do_stable_layer_norm=True,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
            vocab_size=8,
        )
        model: Any = Wav2Vec2Model(config)
        extractor: Any = Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
        )
    elif architecture == "whisper":
        from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

        config = WhisperConfig(
            d_model=32,
            encoder_layers=2,
            encoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_layers=1,
            decoder_attention_heads=2,
            decoder_ffn_dim=64,
            num_mel_bins=80,
            max_source_positions=1500,
            max_target_positions=16,
            vocab_size=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
        )
        model = WhisperModel(config)
        extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000)
    else:
        raise ValueError(f"architecture must be 'wav2vec2' or 'whisper', not {architecture!r}")
    with _quiet_hf():
        model.save_pretrained(out)
        extractor.save_pretrained(out)
    return str(out)


def save_tiny_video_model(directory: str | os.PathLike[str]) -> str:
    """Save a tiny random VideoMAEModel (32 px, patch 8, 4 frames, tubelet 2 -> 2x4x4 = 32 tokens, hidden 32,
    2 layers) and its PIL VideoMAE image processor (shorter side 32, centre crop 32); return the dir."""
    import torch
    from transformers import VideoMAEConfig, VideoMAEModel

    try:  # transformers 5 names the PIL backend explicitly
        from transformers import VideoMAEImageProcessorPil as _Processor
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers import VideoMAEImageProcessor as _Processor

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = VideoMAEConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        num_frames=4,
        tubelet_size=2,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    model = VideoMAEModel(config)
    processor = _Processor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    with _quiet_hf():
        model.save_pretrained(out)
        processor.save_pretrained(out)
    return str(out)
