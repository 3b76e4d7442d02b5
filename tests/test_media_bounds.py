"""A decoded image, video frame set or audio clip has a default size bound a user can raise: a small hostile file
cannot take gigabytes of memory, and an item over the bound is an error record with its reason."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import first_codec, gray_frame, sine, write_audio_file, write_video_file
from PIL import Image

from extract.media import (
    DEFAULT_MAX_PIXELS,
    AudioOptions,
    MediaError,
    load_audio,
    load_image,
    load_video_frames,
)
from extract.run import run_extraction
from stores import FeatureStore


def png_declaring(path: Path, width: int, height: int) -> Path:
    """A few hundred bytes of PNG whose header declares ``width`` x ``height`` gray pixels (only 4 rows of data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"".join(b"\x00" + bytes(width) for _ in range(4)), 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def test_an_image_over_the_pixel_bound_is_refused_from_its_header(tmp_path):
    # 10000 x 10000: under Pillow's own bomb limit, so before the bound Pillow decoded (and converted) it whole.
    bomb = png_declaring(tmp_path / "bomb.png", 10_000, 10_000)
    assert bomb.stat().st_size < 2_000
    with pytest.raises(MediaError, match=r"image too large: 10000x10000 = 100,000,000 pixels, over the bound of "
                                         r"50,000,000 \(raise it with --max-pixels\)"):
        load_image(bomb)
    Image.new("RGB", (40, 30)).save(tmp_path / "small.png")
    assert load_image(tmp_path / "small.png", max_pixels=1200).size == (40, 30)
    with pytest.raises(MediaError, match="1,200 pixels, over the bound of 1,199"):
        load_image(tmp_path / "small.png", max_pixels=1199)


def test_extraction_records_an_oversized_image_and_the_bound_is_in_the_identity(tmp_path, tiny_image_model):
    rng = np.random.default_rng(0)
    for name, side in (("ok", 32), ("small", 16)):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    png_declaring(tmp_path / "bomb.png", 12_000, 12_000)
    manifest = tmp_path / "images.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "path": f"{i}.png"}) + "\n" for i in ("ok", "bomb", "small")))
    default = run_extraction(manifest, "image", tiny_image_model, tmp_path / "default", progress=False)
    store = FeatureStore.open(default.store)
    assert store.ids == ["ok", "small"]
    (error,) = store.errors()
    assert error["id"] == "bomb" and "over the bound of 50,000,000" in error["reason"]
    assert store.identity["media"] == {"max_pixels": DEFAULT_MAX_PIXELS}
    tight = run_extraction(manifest, "image", tiny_image_model, tmp_path / "tight", max_pixels=500, progress=False)
    assert tight.key != default.key  # a store made with another bound is another store
    tight_store = FeatureStore.open(tight.store)
    assert tight_store.ids == ["small"] and [e["id"] for e in tight_store.errors()] == ["ok", "bomb"]


def test_audio_over_the_decoding_bound_is_refused(tmp_path):
    audio = write_audio_file(tmp_path / "a.wav", sine(2.0, 8000), 8000, first_codec("pcm_s16le"))
    with pytest.raises(MediaError, match=r"audio 2 s long, over the decoding bound of 1.5 s \(raise it with "
                                         r"--max-decoded-seconds, or keep only the start with --max-seconds"):
        load_audio(audio, 8000, max_decoded_seconds=1.5)
    assert len(load_audio(audio, 8000, max_seconds=1.0, max_decoded_seconds=1.5)) == 8000  # only the start decoded
    assert len(load_audio(audio, 8000, max_decoded_seconds=2.5)) == 16000
    assert AudioOptions().identity()["max_decoded_seconds"] == 3600.0  # the default: one hour


def test_video_frames_over_the_pixel_bound_are_refused(tmp_path):
    video = write_video_file(tmp_path / "v.mp4", [gray_frame(10 * i) for i in range(8)], first_codec("mpeg4"))
    assert len(load_video_frames(video, 4, max_video_pixels=4 * 64 * 48)) == 1
    with pytest.raises(MediaError, match=r"video too large: 8 frames of 64x48 = 24,576 pixels, over the bound of "
                                         r"24,575 \(raise it with --max-video-pixels\)"):
        load_video_frames(video, 4, clips=2, max_video_pixels=8 * 64 * 48 - 1)


def test_a_run_accepts_a_store_made_with_other_size_bounds_but_not_other_decoding(tmp_path):
    from toy_stores import _write

    from pipeline.training.rundir import RunError, check_compatible

    base = {"encoder": {"id": "toy"}, "modality": "audio", "layer": -1, "keep": "tokens",
            "media": {"sample_rate": None, "max_seconds": 2.0, "segment": "drop", "resampler": "swr"}}
    config = {"modalities": {"audio": {"store": {"identity": base, "dim": 3, "path": "trained"}}}}
    item = [torch.zeros(2, 3)]

    def store(name: str, media: dict):
        path = _write(tmp_path / name, "audio", "ragged", item, [{"id": "a"}], 3, None, {**base, "media": media})
        return FeatureStore.open(path)

    check_compatible(config, "audio", store("bounded", {**base["media"], "max_decoded_seconds": 60.0}))
    with pytest.raises(RunError, match="max_seconds"):
        check_compatible(config, "audio", store("other", {**base["media"], "max_seconds": 5.0}))
