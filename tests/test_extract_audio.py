"""Audio: PyAV decoding of real files (codecs, rates, channels, broken files) and the audio encoders end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import first_codec, gray_frame, sine, write_audio_file, write_video_file

from extract.encoders import EncoderError, HFAudioEncoder, encoder_identity, load_encoder
from extract.manifest import read_manifest, write_manifest
from extract.media import (
    RESAMPLERS,
    AudioOptions,
    MediaError,
    default_resampler,
    load_audio,
    load_audio_parts,
    torchaudio_problem,
)
from extract.run import run_extraction
from stores import FeatureStore

RATE = 16000

# Every resampler this environment can run: both where torchaudio loads, PyAV's alone where it is not installed.
RUNNABLE = [pytest.param(r, marks=pytest.mark.skipif(r == "torchaudio" and torchaudio_problem() is not None,
                                                    reason=str(torchaudio_problem()))) for r in RESAMPLERS]


def _peak_hz(wave: torch.Tensor, rate: int = RATE) -> float:
    spectrum = np.abs(np.fft.rfft(wave.numpy()))
    return float(np.argmax(spectrum) * rate / len(wave))


def _rms(wave: torch.Tensor) -> float:
    return float(wave.pow(2).mean().sqrt())


# (suffix, encoder candidates, native rate, channels); 1 s of a 440 Hz sine at amplitude 0.5 in each.
FORMATS = [
    ("wav", ("pcm_s16le",), 8000, 1),
    ("flac", ("flac",), 22050, 2),
    ("ogg", ("libvorbis", "vorbis"), 44100, 2),
    ("mp3", ("libmp3lame",), 48000, 2),
    ("m4a", ("aac",), 44100, 1),
    ("mp4", ("aac",), 48000, 2),  # an mp4 with only an audio track
]


@pytest.mark.parametrize("resampler", RUNNABLE)
@pytest.mark.parametrize(("suffix", "codecs", "rate", "channels"), FORMATS, ids=[f[0] for f in FORMATS])
def test_formats_rates_and_channels_decode_to_16k_mono(
    tmp_path: Path, suffix: str, codecs: tuple[str, ...], rate: int, channels: int, resampler: str
) -> None:
    codec = first_codec(*codecs)
    x = sine(1.0, rate)
    signal = np.stack([x, x]) if channels == 2 else x
    path = write_audio_file(tmp_path / f"a.{suffix}", signal, rate, codec)
    wave = load_audio(path, RATE, resampler=resampler)
    assert wave.dtype == torch.float32 and wave.dim() == 1
    # Resampled to exactly ceil(n * 16000 / rate) = 16000; lossy codecs' padding is cut at the declared end.
    # FFmpeg's experimental Vorbis encoder (used when libvorbis is missing) declares its last block's padding
    # (60 samples at 44.1 kHz) as audio, so the file itself is that much longer.
    assert abs(len(wave) - RATE) <= (2 if codec != "vorbis" else 32), len(wave)
    assert abs(_peak_hz(wave) - 440) < 3
    body = wave[RATE // 10 : -RATE // 10]  # lossy codecs ramp in and out
    assert _rms(body) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


def test_audio_track_of_a_video_file(tmp_path: Path) -> None:
    path = write_video_file(
        tmp_path / "v.mp4", [gray_frame(k * 8) for k in range(10)], first_codec("libx264", "mpeg4"),
        audio=(sine(1.0, 44100, freq=1000), 44100),
    )
    wave = load_audio(path, RATE)
    assert abs(len(wave) - RATE) <= 2 and abs(_peak_hz(wave) - 1000) < 3


def test_stereo_downmix_is_the_channel_mean(tmp_path: Path) -> None:
    x = sine(0.5, 22050)
    for suffix, codec in (("wav", "pcm_s16le"), ("flac", "flac")):
        opposite = write_audio_file(tmp_path / f"opp.{suffix}", np.stack([x, -x]), 22050, codec)
        assert load_audio(opposite, 22050).abs().max() < 1e-4  # L = +x, R = -x cancels
    left_only = write_audio_file(tmp_path / "left.wav", np.stack([x, np.zeros_like(x)]), 22050, "pcm_s16le")
    assert _rms(load_audio(left_only, 22050)) == pytest.approx(_rms(torch.from_numpy(x)) / 2, rel=1e-3)


@pytest.mark.parametrize("resampler", RUNNABLE)
def test_resampling_keeps_the_signal(tmp_path: Path, resampler: str) -> None:
    x = sine(1.0, 44100, freq=1000)
    path = write_audio_file(tmp_path / "a.wav", x, 44100, "pcm_s16le")
    wave = load_audio(path, RATE, resampler=resampler)
    reference = torch.from_numpy(sine(1.0, RATE, freq=1000))
    assert len(wave) == RATE
    assert (wave[100:-100] - reference[100:-100]).abs().max() < 2e-3  # band-limited sine: resampling is ~exact
    for rate in (8000, 48000):
        assert len(load_audio(path, rate, resampler=resampler)) == rate
    # A clip shorter than the resampling filter keeps torchaudio's length convention, ceil(n * new / old).
    tiny = write_audio_file(tmp_path / "tiny.wav", x[:5], 44100, "pcm_s16le")
    assert len(load_audio(tiny, RATE, resampler=resampler)) == 2


def test_resampler_choice_follows_torchaudio_and_is_checked() -> None:
    import importlib.util

    installed = importlib.util.find_spec("torchaudio") is not None
    assert default_resampler() == ("torchaudio" if installed and torchaudio_problem() is None else "swr")
    assert AudioOptions().resampler == default_resampler() == AudioOptions(resampler="auto").resampler
    assert AudioOptions(resampler="swr").resampler == "swr"
    with pytest.raises(ValueError, match="resampler must be one of"):
        AudioOptions(resampler="sox")
    if torchaudio_problem() is not None:
        with pytest.raises(ValueError, match="use --resampler swr"):
            AudioOptions(resampler="torchaudio")


@pytest.mark.skipif(torchaudio_problem() is not None, reason="needs both resamplers")
def test_both_resamplers_give_the_same_signal(tmp_path: Path) -> None:
    path = write_audio_file(tmp_path / "a.flac", np.stack([sine(1.0, 22050, freq=300), sine(1.0, 22050)]),
                            22050, "flac")
    swr, sinc = load_audio(path, RATE, resampler="swr"), load_audio(path, RATE, resampler="torchaudio")
    assert swr.shape == sinc.shape and (swr[100:-100] - sinc[100:-100]).abs().max() < 1e-3


def test_long_audio_drop_split_and_short_audio_padding(tmp_path: Path) -> None:
    path = write_audio_file(tmp_path / "long.wav", sine(2.5, RATE), RATE, "pcm_s16le")
    full = load_audio(path, RATE)
    (dropped,) = load_audio_parts(path, RATE, max_seconds=1.0, segment="drop")
    assert len(dropped) == RATE and torch.equal(dropped, full[:RATE])  # the tail is dropped
    parts = load_audio_parts(path, RATE, max_seconds=1.0, segment="split")
    assert [len(p) for p in parts] == [RATE, RATE, RATE // 2]
    assert torch.equal(torch.cat(parts), full)  # consecutive, nothing lost or repeated

    short = write_audio_file(tmp_path / "short.wav", sine(150 / RATE, RATE), RATE, "pcm_s16le")
    (padded,) = load_audio_parts(short, RATE, min_samples=400)
    assert len(padded) == 400 and not padded[150:].any() and padded[:150].abs().max() > 0.1

    with pytest.raises(ValueError, match="split' needs max_seconds"):
        AudioOptions(segment="split")
    assert AudioOptions(sample_rate="auto").sample_rate is None and AudioOptions(sample_rate="8000").sample_rate == 8000


def test_broken_audio_files_raise_media_error(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="file not found"):
        load_audio(tmp_path / "absent.wav", RATE)
    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(MediaError, match="empty file"):
        load_audio(tmp_path / "zero.wav", RATE)
    (tmp_path / "text.mp3").write_text("this is not audio at all " * 20)
    with pytest.raises(MediaError, match="not a readable audio/video file"):
        load_audio(tmp_path / "text.mp3", RATE)

    flac = write_audio_file(tmp_path / "full.flac", np.random.default_rng(0).uniform(-0.5, 0.5, 44100), 44100, "flac")
    data = flac.read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="cannot decode audio"):
        load_audio(tmp_path / "cut.flac", RATE)
    m4a = write_audio_file(tmp_path / "full.m4a", sine(1.0, 44100), 44100, first_codec("aac"))
    data = m4a.read_bytes()
    (tmp_path / "cut.m4a").write_bytes(data[: len(data) // 2])  # the moov atom sits at the end: unreadable
    with pytest.raises(MediaError, match="not a readable|cannot decode"):
        load_audio(tmp_path / "cut.m4a", RATE)
    with wave.open(str(tmp_path / "empty.wav"), "wb") as empty:  # a valid wav header and no samples
        empty.setnchannels(1)
        empty.setsampwidth(2)
        empty.setframerate(RATE)
    with pytest.raises(MediaError, match="no audio samples decoded"):
        load_audio(tmp_path / "empty.wav", RATE)

    video = write_video_file(tmp_path / "silent.mp4", [gray_frame(0)] * 3, first_codec("libx264", "mpeg4"))
    with pytest.raises(MediaError, match="^no audio stream$"):
        load_audio(video, RATE)


def _audio_manifest(tmp_path: Path) -> str:
    """Files of different lengths, rates and codecs, one shorter than the receptive field, one broken."""
    specs = [("a", 0.3, 16000, "pcm_s16le", "wav"), ("b", 1.0, 44100, "flac", "flac"),
             ("c", 0.7, 22050, "pcm_s16le", "wav"), ("tiny", 150 / 16000, 16000, "pcm_s16le", "wav")]
    records = []
    for name, seconds, rate, codec, suffix in specs:
        write_audio_file(tmp_path / f"{name}.{suffix}", sine(seconds, rate, freq=300 + 100 * len(records)), rate, codec)
        records.append({"id": name, "path": f"{name}.{suffix}", "ref": f"img-{name}", "label": name})
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really")
    records.append({"id": "broken", "path": "broken.wav"})
    return write_manifest(tmp_path / "audio.jsonl", records)


def test_wav2vec2_store_matches_single_item_forward(tiny_audio_model: str, tmp_path: Path) -> None:
    from transformers import AutoFeatureExtractor, AutoModel

    manifest = _audio_manifest(tmp_path)
    result = run_extraction(manifest, "audio", tiny_audio_model, tmp_path / "store", batch_size=4, progress=False)
    assert (result.items, result.failed) == (4, 1)
    store = FeatureStore.open(result.store)
    assert store.layout == "ragged" and store.modality == "audio" and store.dim == 32
    assert store.ids == ["a", "b", "c", "tiny"] and store.refs == ["img-a", "img-b", "img-c", "img-tiny"]
    (error,) = store.errors()
    assert error["id"] == "broken" and error["reason"]

    extractor = AutoFeatureExtractor.from_pretrained(tiny_audio_model)
    model = AutoModel.from_pretrained(tiny_audio_model).eval()
    tokens, mask = store.get_batch(list(range(len(store))))
    for i, item in enumerate(read_manifest(manifest)[:4]):
        wave = load_audio(item.path, RATE)
        n = max(len(wave), 400)  # "tiny" is 150 samples: zero-padded to the 400-sample receptive field
        expected_len = int(model._get_feat_extract_output_lengths(torch.tensor(n)))
        assert store.lengths[i] == expected_len == mask[i].sum()
        single = extractor(torch.nn.functional.pad(wave, (0, n - len(wave))).numpy(), sampling_rate=RATE,
                           return_tensors="pt")
        with torch.no_grad():
            reference = model(single["input_values"]).last_hidden_state[0]  # alone, no padding
        assert reference.shape[0] == expected_len
        torch.testing.assert_close(tokens[i, :expected_len], reference, rtol=2e-3, atol=2e-3)  # fp16 store
    assert store.lengths.tolist()[:3] == [14, 49, 34]


def test_split_segments_are_items_with_derived_ids(tiny_audio_model: str, tmp_path: Path) -> None:
    write_audio_file(tmp_path / "long.wav", sine(1.2, RATE), RATE, "pcm_s16le")
    write_audio_file(tmp_path / "short.wav", sine(0.3, RATE), RATE, "pcm_s16le")
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"id": "long", "path": "long.wav", "ref": "cap-1", "label": "speech"},
        {"id": "short", "path": "short.wav", "ref": "cap-2"},
    ])
    template = str(tmp_path / "s-{key}")
    split = run_extraction(manifest, "audio", tiny_audio_model, template, max_seconds=0.5, segment="split",
                           dtype="fp32", progress=False)
    store = FeatureStore.open(split.store)
    assert store.ids == ["long#seg0", "long#seg1", "long#seg2", "short#seg0"]
    assert store.refs == ["cap-1", "cap-1", "cap-1", "cap-2"]
    assert store.labels == ["speech", "speech", "speech", None]
    assert store.lengths.tolist() == [24, 24, 9, 14]  # 8000, 8000, 3200 and 4800 samples
    assert split.identity["media"] == {
        "sample_rate": None, "max_seconds": 0.5, "segment": "split", "resampler": default_resampler(),
        "max_decoded_seconds": 3600.0,
    }
    assert split.identity["encoder"]["preprocess"]["sample_rate"] == 16000  # "auto": the extractor's rate

    # A segment is encoded exactly as that stretch of audio alone.
    encoder = load_encoder(tiny_audio_model, "audio")
    wave = load_audio(tmp_path / "long.wav", RATE)
    alone, _ = encoder.forward(encoder.preprocessor.waves([wave[8000:16000]]))
    tokens, _ = store.get_batch([1])
    torch.testing.assert_close(tokens[0], alone[0], rtol=1e-4, atol=1e-4)

    drop = run_extraction(manifest, "audio", tiny_audio_model, template, max_seconds=0.5, progress=False)
    assert drop.key != split.key and FeatureStore.open(drop.store).ids == ["long", "short"]
    assert FeatureStore.open(drop.store).lengths.tolist() == [24, 14]
    rate = run_extraction(manifest, "audio", tiny_audio_model, template, max_seconds=0.5, sample_rate=8000,
                          progress=False)
    assert rate.key != drop.key and rate.identity["encoder"]["preprocess"]["sample_rate"] == 8000
    assert FeatureStore.open(rate.store).lengths.tolist() == [12, 7]  # 4000 and 2400 samples at 8 kHz
    # Caches made by different resamplers never mix: the one that ran is in the identity and the key.
    other = "swr" if default_resampler() == "torchaudio" else "torchaudio"
    if other == "swr" or torchaudio_problem() is None:
        swr = run_extraction(manifest, "audio", tiny_audio_model, template, max_seconds=0.5, sample_rate=8000,
                             resampler=other, progress=False)
        assert swr.key != rate.key and swr.identity["media"]["resampler"] == other
        assert swr.identity["encoder"]["preprocess"]["resampler"] == other


def test_group_norm_model_batches_without_padding_effects(tmp_path: Path) -> None:
    """wav2vec2-base style (group norm, no attention mask): every row equals that item encoded alone."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    config = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(16,) * 7, feat_extract_norm="group", num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=2, vocab_size=8)
    torch.manual_seed(0)
    Wav2Vec2Model(config).save_pretrained(tmp_path / "gn")
    Wav2Vec2FeatureExtractor(sampling_rate=RATE, return_attention_mask=False).save_pretrained(tmp_path / "gn")
    encoder = load_encoder(str(tmp_path / "gn"), "audio")
    assert isinstance(encoder, HFAudioEncoder) and not encoder.use_mask
    rng = torch.Generator().manual_seed(0)
    waves = [torch.randn(n, generator=rng) * 0.1 for n in (8000, 3000, 8000, 5000)]
    tokens, lengths = encoder.forward(encoder.preprocessor.waves(waves))
    for i, one in enumerate(waves):
        alone, alone_len = encoder.forward(encoder.preprocessor.waves([one]))
        assert lengths[i] == alone_len[0] == alone.shape[1]
        torch.testing.assert_close(tokens[i, : lengths[i]], alone[0], rtol=1e-5, atol=1e-5)
        assert not tokens[i, lengths[i] :].any()


def test_audio_encoder_is_really_frozen(tiny_audio_model: str) -> None:
    encoder = load_encoder(tiny_audio_model, "audio")
    config = encoder.model.config
    assert config.mask_time_prob == 0.0 and config.layerdrop == 0.0 and config.apply_spec_augment is False
    parent = torch.nn.Sequential(encoder.model)
    parent.train()  # a training loop around the frozen encoder must not switch dropout or SpecAugment back on
    assert not any(m.training for m in encoder.model.modules())
    batch = encoder.preprocessor.waves([torch.randn(RATE) * 0.1, torch.randn(6000) * 0.1])
    first, _ = encoder.forward(batch)
    second, _ = encoder.forward(batch)
    assert torch.equal(first, second)


def test_whisper_keeps_only_the_frames_of_the_real_audio(tiny_whisper_model: str, tmp_path: Path) -> None:
    from transformers import AutoFeatureExtractor, AutoModel

    records = []
    for name, seconds in (("half", 0.5), ("longer", 1.3)):
        write_audio_file(tmp_path / f"{name}.wav", sine(seconds, RATE), RATE, "pcm_s16le")
        records.append({"id": name, "path": f"{name}.wav"})
    manifest = write_manifest(tmp_path / "m.jsonl", records)
    result = run_extraction(manifest, "audio", tiny_whisper_model, tmp_path / "s", dtype="fp32", progress=False)
    store = FeatureStore.open(result.store)
    # 30 s window -> 1500 frames always; the real audio: ceil(n / 160) mel frames, then the stride-2 conv.
    assert store.lengths.tolist() == [25, 65]

    extractor = AutoFeatureExtractor.from_pretrained(tiny_whisper_model)
    encoder = AutoModel.from_pretrained(tiny_whisper_model).eval().get_encoder()
    features = extractor(load_audio(tmp_path / "longer.wav", RATE).numpy(), sampling_rate=RATE, return_tensors="pt")
    with torch.no_grad():
        reference = encoder(features["input_features"]).last_hidden_state[0, :65]
    tokens, _ = store.get_batch([1])
    torch.testing.assert_close(tokens[0, :65], reference, rtol=1e-4, atol=1e-4)

    with pytest.raises(EncoderError, match="at most 30 s"):
        load_encoder(tiny_whisper_model, "audio", audio=AudioOptions(max_seconds=40, segment="split"))


def test_audio_identity_without_loading_matches_loaded(tiny_audio_model: str) -> None:
    ident = encoder_identity(tiny_audio_model, "audio")
    assert ident == load_encoder(tiny_audio_model, "audio").identity()
    assert ident["preprocess"]["decoder"] == "extract.media.load_audio/1"
    assert encoder_identity(tiny_audio_model, "audio", audio=AudioOptions(sample_rate=8000)) != ident
    with pytest.raises(EncoderError, match="max_tokens applies to text"):
        encoder_identity(tiny_audio_model, "audio", max_tokens=8)


def test_cli_extract_audio_split(tiny_audio_model: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cli import main

    write_audio_file(tmp_path / "x.wav", sine(1.0, RATE), RATE, "pcm_s16le")
    manifest = write_manifest(tmp_path / "m.jsonl", [{"id": "x", "path": "x.wav"}])
    store = tmp_path / "cli-store"
    out = CliRunner().invoke(main, [
        "extract", "--modality", "audio", "--encoder", tiny_audio_model, "--manifest", manifest, "--store",
        str(store), "--max-seconds", "0.4", "--segment", "split", "--sample-rate", "auto",
    ])
    assert out.exit_code == 0, out.output
    assert FeatureStore.open(store).ids == ["x#seg0", "x#seg1", "x#seg2"]
    bad = CliRunner().invoke(main, ["extract", "--modality", "audio", "--encoder", tiny_audio_model, "--manifest",
                                    manifest, "--store", str(tmp_path / "b"), "--segment", "split"])
    assert bad.exit_code == 1 and "needs max_seconds" in bad.output  # one clear line, no traceback


@pytest.mark.skipif(shutil.which("espeak-ng") is None,
                    reason="Debian's espeak-ng is not installed (apt-get install espeak-ng) to speak test captions")
def test_spoken_captions_from_espeak(tiny_audio_model: str, tmp_path: Path) -> None:
    captions = ["a red circle", "two green triangles on a white background"]
    records = []
    for i, text in enumerate(captions):
        wav = tmp_path / f"say{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
        records.append({"id": f"say{i}", "path": wav.name, "ref": f"c{i}", "label": text})
    manifest = write_manifest(tmp_path / "spoken.jsonl", records)
    result = run_extraction(manifest, "audio", tiny_audio_model, tmp_path / "s", progress=False)
    store = FeatureStore.open(result.store)
    assert store.ids == ["say0", "say1"] and result.failed == 0
    assert store.lengths[1] > store.lengths[0] > 10  # the longer caption takes longer to say
    assert json.loads(json.dumps(store.identity))["media"]["segment"] == "drop"
