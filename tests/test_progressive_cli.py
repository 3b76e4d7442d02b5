"""Progressive alignment end to end through the CLI, in real subprocesses, on real media written in the test:
extract image/text/audio/video with tiny frozen encoders, fit-up on image-text, fit-al audio (pivot text), fit-al
video (pivot audio), transitive retrieval, and ``encode`` on raw inputs against the cached path (no train/serve
skew)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import first_codec, gray_frame, run_cli, sine, write_audio_file, write_video_file
from PIL import Image
from safetensors.torch import load_file

from extract.manifest import write_manifest
from pipeline.embed import embed_store
from pipeline.encode import encode as encode_api
from pipeline.training.rundir import RunDir
from stores import FeatureStore

# One concept per class: the caption's words, the image colour, the tone, the video's gray level.
CONCEPTS = [
    ("red", "circle", (220, 30, 30), 220.0, 40),
    ("green", "square", (30, 200, 40), 440.0, 110),
    ("blue", "triangle", (30, 40, 220), 880.0, 180),
    ("yellow", "star", (230, 220, 20), 1760.0, 240),
]
PER_CLASS = 4
POSITIONS = ["top left", "top right", "bottom left", "bottom right"]
# (suffix, codec, native rate, channels): three containers/codecs, rates and a stereo file among the items.
AUDIO_FORMATS = [("wav", "pcm_s16le", 16000, 1), ("flac", "flac", 22050, 2), ("wav", "pcm_s16le", 8000, 1)]


cli = run_cli


def _make_dataset(root: Path) -> dict[str, Path]:
    """Paired items of four concepts: images, captions (``ref`` = image), audio and video (``ref`` = image)."""
    video_codec = first_codec("libx264", "mpeg4")
    images, captions, audio, video = [], [], [], []
    for c, (colour, shape, rgb, freq, level) in enumerate(CONCEPTS):
        for k in range(PER_CLASS):
            i = c * PER_CLASS + k
            image_id = f"img{i:02d}"
            pixels = np.zeros((32, 32, 3), dtype=np.uint8)
            pixels[...] = rgb
            y, x = divmod(k, 2)
            pixels[y * 16 : y * 16 + 16, x * 16 : x * 16 + 16] = 255  # the item's position: a white quarter
            Image.fromarray(pixels).save(root / f"{image_id}.png")
            images.append({"id": image_id, "path": f"{image_id}.png", "label": colour})
            captions.append({"id": f"cap{i:02d}", "text": f"a {colour} {shape} at the {POSITIONS[k]}",
                             "ref": image_id, "label": colour})

            suffix, codec, rate, channels = AUDIO_FORMATS[i % len(AUDIO_FORMATS)]
            tone = sine(0.4 + 0.1 * k, rate, freq=freq * (1 + 0.05 * k))
            signal = np.stack([tone, 0.5 * tone]) if channels == 2 else tone
            write_audio_file(root / f"snd{i:02d}.{suffix}", signal, rate, codec)
            audio.append({"id": f"snd{i:02d}", "path": f"snd{i:02d}.{suffix}", "ref": image_id, "label": colour})

            frames = [gray_frame(level, width=32, height=32, marker=(t + k) % 2 == 0) for t in range(6)]
            write_video_file(root / f"vid{i:02d}.mp4", frames, video_codec)
            video.append({"id": f"vid{i:02d}", "path": f"vid{i:02d}.mp4", "ref": image_id, "label": colour})
    return {name: Path(write_manifest(root / f"{name}.jsonl", records))
            for name, records in (("image", images), ("text", captions), ("audio", audio), ("video", video))}


def _model_tensor_digests(weights: Path) -> dict[str, str]:
    """sha256 of every model tensor's bytes. The bundle is one file that gains each new AL and that also holds the
    loss temperature (fit-al trains it), so the file's own hash must change; the UP's tensors must not."""
    return {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in load_file(weights).items()
            if k.startswith("model.")}


@pytest.fixture(scope="module")
def progressive(tmp_path_factory, tiny_image_model, tiny_text_model, tiny_audio_model, tiny_video_model) -> dict:
    root = tmp_path_factory.mktemp("progressive")
    media = root / "media"
    media.mkdir()
    manifests = _make_dataset(media)
    encoders = {"image": tiny_image_model, "text": tiny_text_model, "audio": tiny_audio_model,
                "video": tiny_video_model}
    stores = {m: root / f"{m}-store" for m in encoders}
    for modality, encoder in encoders.items():
        extra = ("--frames", 4) if modality == "video" else ()
        cli("extract", "--modality", modality, "--encoder", encoder, "--manifest", manifests[modality],
            "--store", stores[modality], "--batch-size", 5, *extra)

    run = root / "run"
    cli("fit-up", "--image-store", stores["image"], "--text-store", stores["text"], "--out", run, "--epochs", 3,
        "--batch-size", 8, "--width", 32, "--blocks", 1, "--val-fraction", 0.25)
    before = _model_tensor_digests(run / "model.safetensors")
    cli("fit-al", "--run", run, "--modality", "audio", "--store", stores["audio"], "--pivot", "text",
        "--pivot-store", stores["text"], "--epochs", 3, "--batch-size", 8, "--val-fraction", 0.25)
    after_audio = _model_tensor_digests(run / "model.safetensors")
    cli("fit-al", "--run", run, "--modality", "video", "--store", stores["video"], "--pivot", "audio",
        "--pivot-store", stores["audio"], "--epochs", 3, "--batch-size", 8, "--val-fraction", 0.25)
    after = _model_tensor_digests(run / "model.safetensors")

    reports = {}
    for a, b in (("audio", "video"), ("image", "audio")):  # audio and image were never trained together
        out = cli("eval", "retrieval", "--run", run, f"--{a}-store", stores[a], f"--{b}-store", stores[b], "--json")
        reports[(a, b)] = json.loads(out.stdout)
    return {"root": root, "media": media, "manifests": manifests, "stores": stores, "run": run, "before": before,
            "after_audio": after_audio, "after": after, "reports": reports}


def test_run_bundle_lists_every_modality_with_its_pivot_and_store(progressive):
    config = json.loads((progressive["run"] / "config.json").read_text())
    modalities = config["modalities"]
    assert set(modalities) == {"image", "text", "audio", "video"}
    assert all(m["status"] == "aligned" for m in modalities.values())
    assert modalities["audio"]["pivot"] == "text" and modalities["video"]["pivot"] == "audio"
    for name, store in progressive["stores"].items():
        assert modalities[name]["store"]["key"] == FeatureStore.open(store).key
    assert [s["name"] for s in config["stages"]] == ["fit-up", "fit-al:audio", "fit-al:video"]
    stages = [(m["stage"], m["epoch"]) for m in RunDir(progressive["run"]).metrics()]
    assert stages == [(s, e) for s in ("fit-up", "fit-al:audio", "fit-al:video") for e in (1, 2, 3)]


def test_fit_al_leaves_the_up_and_earlier_modalities_byte_identical(progressive):
    before, after_audio, after = progressive["before"], progressive["after_audio"], progressive["after"]
    assert any(k.startswith("model.up.") for k in before)
    assert {k: after[k] for k in before} == before  # the UP, image and text adapters: the same bytes
    audio_keys = set(after_audio) - set(before)
    assert audio_keys and {k: after[k] for k in audio_keys} == {k: after_audio[k] for k in audio_keys}
    video_keys = set(after) - set(after_audio)
    assert video_keys and all("audio" in k for k in audio_keys) and all("video" in k for k in video_keys)


def test_transitive_retrieval_reports_finite_metrics_both_ways(progressive):
    n = PER_CLASS * len(CONCEPTS)
    for (a, b), report in progressive["reports"].items():
        assert report["pairs"] == n and set(report["stores"]) == {a, b}
        assert set(report["metrics"]) == {f"{a}->{b}", f"{b}->{a}"}
        for direction, m in report["metrics"].items():
            assert m["queries"] == n, direction
            for key in ("R@1", "R@5", "R@10", "P@1", "recall@1", "mAP"):
                assert math.isfinite(m[key]) and 0.0 <= m[key] <= 1.0, (direction, key, m[key])
            assert m["R@1"] <= m["R@5"] <= m["R@10"]
            assert 1.0 <= m["median_rank"] <= n and 1.0 <= m["mean_rank"] <= n, (direction, m)
        saved = json.loads(Path(report["report_path"]).read_text())
        assert saved["metrics"] == report["metrics"]


def test_transitive_ranks_match_a_direct_computation_from_refs(progressive, one_thread):
    """audio->image ranks recomputed here from the stores' ids and refs, without the pairing code."""
    run, stores = progressive["run"], progressive["stores"]
    audio, image = FeatureStore.open(stores["audio"]), FeatureStore.open(stores["image"])
    similarity = (_cached_embeddings(run, "audio", stores["audio"], audio.ids)
                  @ _cached_embeddings(run, "image", stores["image"], image.ids).T)
    target = np.asarray([image.ids.index(ref) for ref in audio.refs])
    own = similarity[np.arange(len(target)), target]
    ranks = (similarity >= own[:, None]).sum(1)  # ties count against the query, the target itself counts once
    reported = progressive["reports"][("image", "audio")]["metrics"]["audio->image"]
    assert reported["mean_rank"] == pytest.approx(ranks.mean())
    assert reported["R@1"] == pytest.approx(np.mean(ranks == 1))
    assert reported["R@5"] == pytest.approx(np.mean(ranks <= 5))


# ---- encode: raw inputs -> the same embeddings as the cached path --------------------------------------------------


def _cached_embeddings(run: Path, modality: str, store: Path, ids: list[str]) -> np.ndarray:
    """What evaluation sees: the stored tokens of ``ids`` through the run's model (pipeline.embed.embed_store)."""
    model, _, _ = RunDir(run).load_model()
    features = FeatureStore.open(store)
    return embed_store(model, modality, features, [features.index_of(i) for i in ids]).numpy()


# Tight: observed differences are 0 (text, image, video) and ~6e-7 (audio: batch-composition float noise). Storing
# the served tokens in fp32 instead of the store's fp16 alone moves the embeddings by 2e-5 to 5e-5, and different
# rows differ by more than 0.1, so any real skew in decoding, preprocessing or settings fails this.
TOLERANCE = {"rtol": 0, "atol": 1e-5}


def _inputs(progressive: dict, modality: str, every: int) -> tuple[list[str], list[str]]:
    """(store ids, raw inputs) of every ``every``-th item from offset 1: a subset, batched unlike the store."""
    records = [json.loads(line) for line in progressive["manifests"][modality].read_text().splitlines()][1::every]
    if modality == "text":
        return [r["id"] for r in records], [r["text"] for r in records]
    return [r["id"] for r in records], [str(progressive["media"] / r["path"]) for r in records]


def _check_served(served: np.ndarray, cached: np.ndarray) -> None:
    assert served.dtype == np.float32 and served.shape == cached.shape and served.shape[1] == 32
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(served, cached, **TOLERANCE)
    assert np.abs(served[0] - served[1]).max() > 1e-2  # distinct rows: the match is not vacuous


@pytest.mark.parametrize("modality", ["text", "audio"])
def test_cli_encode_equals_the_cached_path(progressive, modality, tmp_path):
    ids, inputs = _inputs(progressive, modality, 3)  # audio: wav 16 kHz, flac 22.05 kHz stereo and wav 8 kHz
    out = tmp_path / f"{modality}.npy"
    cli("encode", "--run", progressive["run"], "--modality", modality, *inputs, "--out", out)
    assert json.loads(Path(f"{out}.ids.json").read_text()) == [str(i) for i in range(len(inputs))]
    _check_served(np.load(out), _cached_embeddings(progressive["run"], modality, progressive["stores"][modality], ids))


@pytest.mark.parametrize("modality", ["image", "video"])
def test_python_encode_api_equals_the_cached_path(progressive, modality, one_thread):
    ids, inputs = _inputs(progressive, modality, 4)
    served_ids, served = encode_api(progressive["run"], modality, inputs)
    assert served_ids == [str(i) for i in range(len(inputs))]
    _check_served(served, _cached_embeddings(progressive["run"], modality, progressive["stores"][modality], ids))
