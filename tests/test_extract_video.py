"""Video: frame sampling by time with seeks (codecs, variable frame rate, rotation, short files, broken files)
and the video encoders end to end (VideoMAE, per-frame mode with an image encoder or a plugin)."""

from __future__ import annotations

import glob
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import first_codec, gray_frame, sine, write_audio_file, write_video_file
from PIL import Image

from extract.encoders import EncoderError, FrameEncoder, HFVideoEncoder, encoder_identity, load_encoder
from extract.manifest import write_manifest
from extract.media import MediaError, VideoOptions, load_video_frames
from extract.run import run_extraction
from stores import FeatureStore

STEP = 6  # frame k is a flat gray of brightness k * STEP, so a sampled frame tells its own index


def _indices(clip: np.ndarray) -> list[int]:
    return [round(float(frame.mean()) / STEP) for frame in clip]


def _counting_video(path: Path, codec: str, n: int = 40, **kwargs) -> Path:
    return write_video_file(path, [gray_frame(k * STEP) for k in range(n)], codec, **kwargs)


CODECS = [("mp4", ("libx264",)), ("mp4", ("mpeg4",)), ("webm", ("libvpx",)), ("webm", ("libvpx-vp9",))]


@pytest.mark.parametrize(("suffix", "codecs"), CODECS, ids=["h264", "mpeg4", "vp8", "vp9"])
def test_uniform_sampling_picks_the_centre_of_each_slice(tmp_path: Path, suffix: str, codecs: tuple[str]) -> None:
    path = _counting_video(tmp_path / f"v.{suffix}", first_codec(*codecs))  # 40 frames at 10 fps
    (clip,) = load_video_frames(path, 4)
    assert clip.shape == (4, 48, 64, 3) and clip.dtype == np.uint8
    # Centres of 4 slices of 4 s: 0.5, 1.5, 2.5, 3.5 s -> the frames on screen then: 5, 15, 25, 35.
    assert _indices(clip) == [5, 15, 25, 35]
    (all_frames,) = load_video_frames(path, 40)
    assert _indices(all_frames) == list(range(40))


def test_sampling_seeks_instead_of_decoding_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import extract.media as media

    levels = [(k * 7) % 250 for k in range(400)]
    path = write_video_file(tmp_path / "long.mp4", [gray_frame(v) for v in levels], first_codec("libx264", "mpeg4"),
                            fps=25, gop=20)
    decoded = []
    real_decode = media._Cursor._decode

    def counting(self):
        decoded.append(1)
        return real_decode(self)

    monkeypatch.setattr(media._Cursor, "_decode", counting)
    (clip,) = load_video_frames(path, 4)  # 16 s: targets 2, 6, 10, 14 s -> frames 50, 150, 250, 350
    assert [round(float(f.mean())) for f in clip] == [levels[50], levels[150], levels[250], levels[350]]
    assert len(decoded) <= 4 * 22  # from the keyframe before each target to one frame past it, not all 400


def test_variable_frame_rate_is_sampled_by_time(tmp_path: Path) -> None:
    pts_ms = [0, 30, 250, 260, 480, 770, 790, 1240, 1500, 1900]
    path = _counting_video(tmp_path / "vfr.mp4", first_codec("libx264", "mpeg4"), n=10, pts_ms=pts_ms)
    (clip,) = load_video_frames(path, 4)
    # Duration 2.0 s (the last frame lasts 1/10 s); targets 0.25, 0.75, 1.25, 1.75 s -> the frames on screen
    # then started at 0.25, 0.48, 1.24 and 1.5 s. Sampling by index would give frames 1, 3, 6, 8.
    assert _indices(clip) == [2, 4, 7, 8]


def test_clips_and_fps_sampling(tmp_path: Path) -> None:
    path = _counting_video(tmp_path / "v.mp4", first_codec("libx264", "mpeg4"))
    clips = load_video_frames(path, 3, clips=2)  # 6 slices of 4/6 s, consecutive runs of 3
    assert [_indices(c) for c in clips] == [[3, 10, 16], [23, 30, 36]]
    fps = load_video_frames(path, 4, sampling="fps", fps=2)  # 0, 0.5, 1.0, 1.5 s from the start
    assert [_indices(c) for c in fps] == [[0, 5, 10, 15]]
    spread = load_video_frames(path, 2, sampling="fps", fps=5, clips=3)  # starts 0, 1.8 and 3.6 s
    assert [_indices(c) for c in spread] == [[0, 2], [18, 20], [36, 38]]
    with pytest.raises(ValueError, match="needs fps"):
        VideoOptions(sampling="fps")


def test_short_video_repeats_its_last_frame(tmp_path: Path) -> None:
    path = _counting_video(tmp_path / "two.mp4", first_codec("libx264", "mpeg4"), n=2)
    (clip,) = load_video_frames(path, 4)
    assert _indices(clip) == [0, 1, 1, 1]
    assert [_indices(c) for c in load_video_frames(path, 3, clips=2)] == [[0, 1, 1], [0, 1, 1]]


def test_rotation_flag_is_applied(tmp_path: Path) -> None:
    import av

    if not hasattr(av.video.stream.VideoStream, "set_display_rotation"):
        pytest.skip(f"PyAV {av.__version__} cannot write a display matrix (set_display_rotation is PyAV >= 17)")
    frames = [gray_frame(k * STEP, marker=True) for k in range(10)]  # red top-left quarter, 64 wide x 48 high
    path = write_video_file(tmp_path / "r.mp4", frames, first_codec("libx264", "mpeg4"), rotation=90)
    (clip,) = load_video_frames(path, 2)
    assert clip.shape == (2, 64, 48, 3)  # displayed upright: 48 wide x 64 high
    frame = clip[0].astype(int)
    # 90 degrees counter-clockwise moves the top-left corner to the bottom-left.
    assert frame[-4, 4, 0] > 200 and frame[-4, 4, 1] < 60 and frame[4, 4, 0] < 100


def test_unusable_videos_raise_media_error(tmp_path: Path) -> None:
    audio_only = write_audio_file(tmp_path / "audio.mp4", sine(0.5, 44100), 44100, first_codec("aac"))
    with pytest.raises(MediaError, match="^no video stream$"):
        load_video_frames(audio_only, 4)
    (tmp_path / "zero.mp4").write_bytes(b"")
    with pytest.raises(MediaError, match="empty file"):
        load_video_frames(tmp_path / "zero.mp4", 4)
    (tmp_path / "junk.webm").write_bytes(b"\x1a\x45\xdf\xa3" + bytes(200))
    with pytest.raises(MediaError, match="not a readable|no video stream|no decodable"):
        load_video_frames(tmp_path / "junk.webm", 4)
    with pytest.raises(MediaError, match="file not found"):
        load_video_frames(tmp_path / "absent.mp4", 4)


@pytest.fixture(scope="module")
def video_manifest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Two counting videos, a 2-frame one and an audio-only mp4 (a per-item failure)."""
    root = tmp_path_factory.mktemp("videos")
    codec = first_codec("libx264", "mpeg4")
    _counting_video(root / "a.mp4", codec, n=40)
    write_video_file(root / "b.mp4", [gray_frame(255 - k * 5, width=48, height=64) for k in range(24)], codec)
    _counting_video(root / "short.mp4", codec, n=2)
    write_audio_file(root / "sound.mp4", sine(0.5, 44100), 44100, first_codec("aac"))
    return write_manifest(root / "videos.jsonl", [
        {"id": "a", "path": "a.mp4", "ref": "cap-a", "label": "up"},
        {"id": "b", "path": "b.mp4", "ref": "cap-b", "label": "down"},
        {"id": "short", "path": "short.mp4", "ref": "cap-s"},
        {"id": "sound", "path": "sound.mp4"},
    ])


def test_videomae_fixed_store_matches_direct_forward(
    tiny_video_model: str, video_manifest: str, tmp_path: Path
) -> None:
    from transformers import AutoImageProcessor, AutoModel

    result = run_extraction(video_manifest, "video", tiny_video_model, tmp_path / "s", frames=4, batch_size=3,
                            progress=False)
    store = FeatureStore.open(result.store)
    assert (store.layout, store.modality, store.dim) == ("fixed", "video", 32)
    assert store.ids == ["a", "b", "short"] and store.refs == ["cap-a", "cap-b", "cap-s"]
    assert store.lengths.tolist() == [32, 32, 32]  # (4 frames / tubelet 2) x (32 / 8)^2 patches
    (error,) = store.errors()
    assert error["id"] == "sound" and error["reason"] == "no video stream"
    assert result.identity["media"] == {"frames": 4, "sampling": "uniform", "fps": None, "clips": 1,
                                        "max_video_pixels": 150_000_000}

    processor = AutoImageProcessor.from_pretrained(tiny_video_model)
    model = AutoModel.from_pretrained(tiny_video_model).eval()
    (clip,) = load_video_frames(Path(video_manifest).parent / "b.mp4", 4)
    with torch.no_grad():
        reference = model(**processor([clip], return_tensors="pt")).last_hidden_state[0]
    tokens, _ = store.get_batch([1])
    torch.testing.assert_close(tokens[0], reference, rtol=2e-3, atol=2e-3)  # fp16 store

    encoder = load_encoder(tiny_video_model, "video", video=VideoOptions(frames=4))
    assert isinstance(encoder, HFVideoEncoder) and encoder.identity() == encoder_identity(
        tiny_video_model, "video", video=VideoOptions(frames=4))
    with pytest.raises(EncoderError, match="takes 4 frames"):
        load_encoder(tiny_video_model, "video", video=VideoOptions(frames=6))
    with pytest.raises(EncoderError, match="per-frame mode"):
        encoder_identity(tiny_video_model, "video", frame_pool="keep")


def test_clips_are_items_with_derived_ids(tiny_video_model: str, video_manifest: str, tmp_path: Path) -> None:
    result = run_extraction(video_manifest, "video", tiny_video_model, tmp_path / "s", frames=4, clips=2,
                            dtype="fp32", progress=False)
    store = FeatureStore.open(result.store)
    assert store.ids == ["a#clip0", "a#clip1", "b#clip0", "b#clip1", "short#clip0", "short#clip1"]
    assert store.refs == ["cap-a", "cap-a", "cap-b", "cap-b", "cap-s", "cap-s"]
    assert store.labels == ["up", "up", "down", "down", None, None]
    tokens, _ = store.get_batch([0, 1, 4, 5])
    assert not torch.equal(tokens[0], tokens[1])  # different stretches of the video
    torch.testing.assert_close(tokens[2], tokens[3])  # a 2-frame video: both clips are its frames + repeats


def test_per_frame_mode_with_an_image_model(tiny_image_model: str, video_manifest: str, tmp_path: Path) -> None:
    template = str(tmp_path / "s-{key}")
    kw = {"frames": 3, "dtype": "fp32", "progress": False}
    mean = run_extraction(video_manifest, "video", tiny_image_model, template, **kw)
    keep = run_extraction(video_manifest, "video", tiny_image_model, template, frame_pool="keep", **kw)
    more = run_extraction(video_manifest, "video", tiny_image_model, template, **{**kw, "frames": 5})
    assert len({mean.key, keep.key, more.key}) == 3  # pooling and frame count are part of the identity
    assert mean.identity["encoder"]["kind"] == "frames"
    assert mean.identity["encoder"]["image_encoder"] == encoder_identity(tiny_image_model, "image")
    s_mean, s_keep = FeatureStore.open(mean.store), FeatureStore.open(keep.store)
    assert s_mean.layout == s_keep.layout == "fixed"
    assert s_mean.lengths.tolist() == [17] * 3 and s_keep.lengths.tolist() == [3 * 17] * 3  # ViT: 16 + CLS

    image = load_encoder(tiny_image_model, "image")
    (clip,) = load_video_frames(Path(video_manifest).parent / "a.mp4", 3)
    per_frame, _ = image.forward(image.preprocessor.images([Image.fromarray(frame) for frame in clip]))
    t_mean, _ = s_mean.get_batch([0])
    t_keep, _ = s_keep.get_batch([0])
    torch.testing.assert_close(t_keep[0], per_frame.reshape(3 * 17, 32), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t_mean[0], per_frame.mean(0), rtol=1e-5, atol=1e-5)


def test_per_frame_mode_with_an_image_plugin(tmp_path: Path, video_manifest: str) -> None:
    plugin = tmp_path / "frame_plugin.py"
    plugin.write_text(textwrap.dedent(
        """
        import numpy as np
        import torch

        MODALITIES = ("image",)  # an image encoder: --modality video runs it frame by frame

        def identity(**kwargs):
            return {"name": "brightness", "version": 1}

        class Pre:
            def images(self, images):
                arrays = [np.asarray(im.resize((8, 8)), dtype=np.float32) for im in images]
                return {"pixels": torch.from_numpy(np.stack(arrays))}

            def __call__(self, items):
                raise AssertionError("per-frame mode calls images(), not __call__")

        class Enc:
            modality, dim, fixed_tokens = "image", 3, 2
            preprocessor = Pre()
            def identity(self):
                return identity()
            def forward(self, batch):
                x = batch["pixels"]  # [N, H, W, 3]
                tokens = torch.stack([x.mean((1, 2)), x.amax((1, 2))], 1)  # 2 tokens of 3 per image
                return tokens, torch.full((x.shape[0],), 2)
            def to(self, device):
                return self

        def load(**kwargs):
            return Enc()
        """
    ))
    result = run_extraction(video_manifest, "video", f"{plugin}:load", tmp_path / "s", frames=4, dtype="fp32",
                            frame_pool="keep", progress=False)
    store = FeatureStore.open(result.store)
    assert store.lengths.tolist() == [8, 8, 8]  # 4 frames x 2 tokens
    tokens, _ = store.get_batch([0])
    assert [round(v / STEP) for v in tokens[0, ::2, 0].tolist()] == [5, 15, 25, 35]  # frame means, in order
    assert result.identity["encoder"]["image_encoder"]["plugin"] == {"name": "brightness", "version": 1}
    encoder = load_encoder(f"{plugin}:load", "video", video=VideoOptions(frames=4), frame_pool="mean")
    assert isinstance(encoder, FrameEncoder) and encoder.fixed_tokens == 2


def test_real_avis_from_opencv_doc() -> None:
    """Seek-based sampling picks exactly the frames a plain decode of the whole file puts on screen then."""
    import av

    videos = sorted(glob.glob("/usr/share/doc/opencv-doc/examples/data/*.avi"))
    if not videos:
        pytest.skip("no real videos: Debian's opencv-doc (/usr/share/doc/opencv-doc/examples/data/*.avi) is absent")
    for path in videos:  # mpeg4 (pts from 1; one file with a broken index), msmpeg4, cinepak with dropped frames
        with av.open(path) as container:  # pass 1: every frame's time
            stream = container.streams.video[0]
            duration = float(stream.duration * stream.time_base)
            times = [float(f.time) for f in container.decode(stream)]
        targets = [(j + 0.5) * duration / 16 for j in range(16)]
        shown = [max([i for i, t in enumerate(times) if t <= target + 1e-6], default=0) for target in targets]
        # AVI stores no presentation times: with B-frames (Megamind.avi) FFmpeg guesses them, and guesses a
        # frame or two differently after a seek than from the start. Elsewhere the match is exact.
        near = [range(max(0, i - 2), min(len(times), i + 3)) for i in shown]
        wanted = {i for r in near for i in r}
        with av.open(path) as container:  # pass 2: the pixels of the frames around each target
            pixels = {i: f.to_ndarray(format="rgb24") for i, f in enumerate(container.decode(video=0)) if i in wanted}
        clips = load_video_frames(path, 8, clips=2)
        for j, frame in enumerate(np.concatenate(clips)):
            if "Megamind" in path:
                assert any(np.array_equal(frame, pixels[i]) for i in near[j]), (path, j)
            else:
                assert np.array_equal(frame, pixels[shown[j]]), (path, j)
