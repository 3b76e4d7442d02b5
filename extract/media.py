"""Media decoding: images, audio and video (decisions and their reasons in ``docs/media.md``).

- images become 8-bit RGB PIL images whatever their mode, orientation or bit depth (:func:`load_image`);
- audio becomes a mono float32 waveform at the encoder's sample rate (:func:`load_audio`: PyAV decodes, torchaudio
  or PyAV's libswresample resamples, whichever :func:`default_resampler` finds; the choice is in the identity);
- video becomes clips of RGB frames sampled by timestamp with seeks, never by decoding the whole file into RAM
  (:func:`load_video_frames`).

Every unusable file raises :class:`MediaError` with a short reason, which ends up in the store's error table.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from stores import OneEncoderError

__all__ = [
    "AUDIO_DECODER_VERSION",
    "VIDEO_DECODER_VERSION",
    "AudioOptions",
    "DEFAULT_MAX_DECODED_SECONDS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_VIDEO_PIXELS",
    "ImageOptions",
    "MediaError",
    "RESAMPLERS",
    "VideoOptions",
    "check_resampler",
    "default_resampler",
    "load_audio",
    "load_audio_parts",
    "load_image",
    "load_video_frames",
    "torchaudio_problem",
]

# Bumped whenever the decoding policy below changes (what every model sees), so cached stores stop matching.
AUDIO_DECODER_VERSION = "extract.media.load_audio/1"
VIDEO_DECODER_VERSION = "extract.media.load_video_frames/1"
SEGMENT_POLICIES = ("drop", "split")
SAMPLINGS = ("uniform", "fps")
# torchaudio's windowed-sinc resampler, or FFmpeg's libswresample through PyAV (no torchaudio needed).
RESAMPLERS = ("torchaudio", "swr")
# Default bounds on what one decoded item may hold in memory, so a small hostile file (a 97 KB PNG declaring
# 20000 x 20000 pixels, a 10-hour audio file) cannot take gigabytes; each can be raised (docs/media.md).
DEFAULT_MAX_PIXELS = 50_000_000  # one image: 150 MB as 8-bit RGB (a 50-megapixel photo)
DEFAULT_MAX_VIDEO_PIXELS = 150_000_000  # every sampled frame of one video together: 16 frames of 4K
DEFAULT_MAX_DECODED_SECONDS = 3600.0  # audio decoded at once: one hour (about 700 MB at 48 kHz)


class MediaError(OneEncoderError):
    """A media file cannot be used; ``reason`` says why (it ends up in the store's error table)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)

    def __reduce__(self):  # picklable with its reason (raised in DataLoader workers)
        return (type(self), (self.reason,))


def _check_file(path: str | os.PathLike[str]) -> str:
    """The path as a string; MediaError when it is missing, unreadable or empty."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise MediaError(f"file not found: {path}") from None
    except OSError as exc:
        raise MediaError(f"cannot read file: {exc.strerror or exc}") from None
    if size == 0:
        raise MediaError("empty file (0 bytes)")
    return path


# Modes with an alpha channel: composite on white so transparent pixels do not turn black (PIL drops alpha).
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float grayscale image to 8-bit (PIL's convert('L') just clips at 255)."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        arr8 = arr.astype(np.float64) / 257.0  # 65535 -> 255 exactly
    elif im.mode == "I":
        # 16-bit PNGs open as 'I' in some Pillow versions: treat >255 data as 16-bit, else as already 8-bit.
        arr = arr.astype(np.float64)
        arr8 = arr / 257.0 if arr.max(initial=0) > 255 else arr
    else:  # "F"
        arr = arr.astype(np.float64)
        arr8 = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
    return Image.fromarray(np.clip(np.rint(arr8), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode == "P":
        # Palette images may carry transparency; route through RGBA so it is composited, not dropped.
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        if im.mode == "RGB":
            return im
    if im.mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        return _to_8bit_gray(im).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


@contextlib.contextmanager
def _pixel_bound_replaces_pil_bomb_check() -> Iterator[None]:
    """Pillow's own decompression-bomb check (a fixed global) is off while our bound, which a user can raise,
    is checked from the header instead."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def load_image(path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image as 8-bit RGB with its EXIF orientation applied; raise :class:`MediaError` on failure.

    CMYK, palette (with transparency), LA/RGBA (alpha composited on white) and 16-bit grayscale are
    converted properly. Multi-frame files (GIF, TIFF) give their first frame. An image of more than
    ``max_pixels`` pixels (read from its header, before any decoding; None: no bound) is refused.
    """
    path = _check_file(path)
    try:
        with _pixel_bound_replaces_pil_bomb_check(), Image.open(path) as im:
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise MediaError(f"image too large: {width}x{height} = {width * height:,} pixels, over the bound of "
                                 f"{max_pixels:,} (raise it with --max-pixels)")
            im.load()  # decode now, inside the try: truncated data only shows up here
            im = ImageOps.exif_transpose(im) or im
            out = _to_rgb(im)
            if out is im:
                out = im.copy()  # detach from the file handle the `with` closes
    except UnidentifiedImageError:
        raise MediaError("not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image too large: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL signals truncated or corrupt data with these (e.g. "image file is truncated").
        raise MediaError(f"cannot decode image: {exc}") from None
    return out


# --------------------------------------------------------------------------------------------- options


def _positive(name: str, value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not value > 0 or not math.isfinite(value)):
        raise ValueError(f"{name} must be a positive number, not {value!r}")


def _positive_int(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer, not {value!r}")


@dataclass(frozen=True)
class ImageOptions:
    """How image items are decoded; part of a store's cache identity. ``max_pixels``: the largest image (width x
    height) decoded; a larger one is an error record (None: no bound)."""

    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        _positive_int("max_pixels", self.max_pixels)

    def identity(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AudioOptions:
    """How audio items are decoded and cut; part of a store's cache identity.

    ``sample_rate``: Hz to decode at; ``None`` (or ``"auto"``) = the encoder's own rate. ``max_seconds``: the
    longest audio given to the encoder (``None`` = all of it). ``segment``: what happens past ``max_seconds``:
    ``"drop"`` keeps the first ``max_seconds`` (the tail is dropped); ``"split"`` cuts the whole audio into
    consecutive ``max_seconds`` pieces, each stored as its own item ``"{id}#seg{k}"`` (k from 0; the last piece
    may be shorter). ``resampler``: ``"torchaudio"`` or ``"swr"`` (PyAV's libswresample); ``None`` (or
    ``"auto"``) = :func:`default_resampler`, resolved here so the identity names the one that ran.
    """

    sample_rate: int | None = None
    max_seconds: float | None = None
    segment: str = "drop"
    resampler: str | None = None
    max_decoded_seconds: float | None = DEFAULT_MAX_DECODED_SECONDS

    def __post_init__(self) -> None:
        rate: Any = self.sample_rate
        if isinstance(rate, str):  # the CLI passes "auto" or digits through unchanged
            rate = None if rate.strip().lower() == "auto" else int(rate) if rate.strip().isdigit() else rate
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate < 1):
            raise ValueError(f"sample_rate must be a positive integer (Hz) or 'auto', not {self.sample_rate!r}")
        object.__setattr__(self, "sample_rate", rate)
        _positive("max_seconds", self.max_seconds)
        _positive("max_decoded_seconds", self.max_decoded_seconds)
        if self.segment not in SEGMENT_POLICIES:
            raise ValueError(f"segment must be one of {', '.join(SEGMENT_POLICIES)}, not {self.segment!r}")
        if self.segment == "split" and self.max_seconds is None:
            raise ValueError("segment='split' needs max_seconds (the length of each segment)")
        object.__setattr__(self, "resampler", check_resampler(self.resampler))

    def identity(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VideoOptions:
    """Which frames of a video an encoder sees; part of a store's cache identity.

    ``frames``: frames per clip. ``sampling``: ``"uniform"`` spreads them evenly over the video (the centres of
    equal time slices); ``"fps"`` takes them ``1/fps`` seconds apart from the start of the clip. ``clips`` > 1:
    several evenly spaced clips per video, each stored as its own item ``"{id}#clip{k}"``.
    """

    frames: int = 16
    sampling: str = "uniform"
    fps: float | None = None
    clips: int = 1
    max_video_pixels: int | None = DEFAULT_MAX_VIDEO_PIXELS

    def __post_init__(self) -> None:
        for name in ("frames", "clips"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, not {self.sampling!r}")
        _positive("fps", self.fps)
        _positive_int("max_video_pixels", self.max_video_pixels)
        if self.sampling == "fps" and self.fps is None:
            raise ValueError("sampling='fps' needs fps (frames per second to sample at)")
        if self.sampling == "uniform" and self.fps is not None:
            raise ValueError("fps applies to sampling='fps' only")

    def identity(self) -> dict[str, Any]:
        return asdict(self)


def _av_reason(exc: BaseException) -> str:
    """FFmpeg's message without the errno and file name PyAV adds around it."""
    return str(getattr(exc, "strerror", None) or exc).strip() or type(exc).__name__


def _open_av(path: str) -> Any:
    import av

    try:
        return av.open(path)
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise MediaError(f"not a readable audio/video file: {_av_reason(exc)}") from None


# --------------------------------------------------------------------------------------------- audio


@functools.cache
def torchaudio_problem() -> str | None:
    """Why torchaudio cannot resample here (not installed, or a build that does not load with this torch); None
    when it can. A torchaudio build loads only with the torch release it was built for."""
    try:
        from torchaudio.transforms import Resample  # noqa: F401
    except ImportError as exc:
        if getattr(exc, "name", None) == "torchaudio":
            return "torchaudio is not installed"
        return f"torchaudio does not load with torch {torch.__version__}: {str(exc).splitlines()[0]}"
    except OSError as exc:  # libtorchaudio.so built against another torch: undefined symbol
        return f"torchaudio does not load with torch {torch.__version__}: {str(exc).splitlines()[0]}"
    return None


def default_resampler() -> str:
    """``"torchaudio"`` when a build matching torch loads, else ``"swr"`` (PyAV's libswresample, always there)."""
    return "swr" if torchaudio_problem() else "torchaudio"


def check_resampler(name: str | None) -> str:
    """The resampler to use: ``None``/``"auto"`` resolved by :func:`default_resampler`; an unusable one refused."""
    if name is None or name == "auto":
        return default_resampler()
    if name not in RESAMPLERS:
        raise ValueError(f"resampler must be one of auto, {', '.join(RESAMPLERS)}, not {name!r}")
    if name == "torchaudio" and (problem := torchaudio_problem()):
        raise ValueError(f"resampler 'torchaudio' cannot run: {problem} (use --resampler swr)")
    return name


@functools.lru_cache(maxsize=16)
def _torchaudio_resampler(orig: int, new: int) -> Any:
    """torchaudio's windowed-sinc resampler with its kernel built once per rate pair (building it dominates)."""
    from torchaudio.transforms import Resample

    return Resample(orig, new)


def _swr_resample(wave: np.ndarray, orig: int, new: int) -> np.ndarray:
    """libswresample through PyAV, flushed, to the same length as torchaudio's: ``ceil(n * new / orig)``."""
    import av

    frame = av.AudioFrame.from_ndarray(wave[None, :], format="fltp", layout="mono")
    frame.sample_rate = orig
    resampler = av.AudioResampler(format="fltp", layout="mono", rate=new)
    out = [f.to_ndarray()[0] for f in [*resampler.resample(frame), *resampler.resample(None)]]
    size = math.ceil(len(wave) * new / orig)
    got = np.concatenate(out) if out else np.zeros(0, np.float32)
    # A clip shorter than the filter (a few samples) comes back short or empty: zero-pad like the encoders do.
    return np.pad(got[:size], (0, max(0, size - len(got))))


def resample(wave: torch.Tensor, orig: int, new: int, resampler: str) -> torch.Tensor:
    """Mono float32 ``wave`` from ``orig`` Hz to ``new`` Hz with the named resampler (:data:`RESAMPLERS`)."""
    if orig == new:
        return wave
    if resampler == "torchaudio":
        with torch.inference_mode():
            return _torchaudio_resampler(orig, new)(wave).clone()  # clone: a normal tensor for workers
    return torch.from_numpy(_swr_resample(np.ascontiguousarray(wave.numpy(), dtype=np.float32), orig, new))


def _declared_seconds(stream: Any) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return None


def load_audio(
    path: str | os.PathLike[str],
    sample_rate: int,
    *,
    max_seconds: float | None = None,
    resampler: str | None = None,
    max_decoded_seconds: float | None = DEFAULT_MAX_DECODED_SECONDS,
) -> torch.Tensor:
    """Decode the first audio stream of any file PyAV reads to mono float32 ``[samples]`` at ``sample_rate``.

    Works for audio files (wav, flac, ogg, mp3, m4a, ...) and the audio track of video files. Channels are
    averaged (mono = mean of all channels), then the signal is resampled by ``resampler`` (:data:`RESAMPLERS`;
    ``None`` = :func:`default_resampler`; output length ``ceil(n * sample_rate / native_rate)`` for both). Samples a codec pads after the end (AAC
    frames) are cut at the stream's declared duration. ``max_seconds`` stops decoding early and returns at most
    ``round(max_seconds * sample_rate)`` samples. Raises :class:`MediaError` for a missing, empty or undecodable
    file, a file with no audio stream, or one that yields no samples.
    """
    import av

    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 1:
        raise ValueError(f"sample_rate must be a positive integer, not {sample_rate!r}")
    _positive("max_seconds", max_seconds)
    resampler = check_resampler(resampler)
    path = _check_file(path)
    chunks: list[np.ndarray] = []
    n = 0
    with _open_av(path) as container:
        if not container.streams.audio:
            raise MediaError("no audio stream")
        stream = container.streams.best("audio") or container.streams.audio[0]
        native = int(stream.codec_context.sample_rate or stream.sample_rate or 0)
        if native < 1:
            raise MediaError("audio stream has no sample rate")
        # Decode a little past the limit so the resampling filter sees real samples at the cut, not an edge.
        limit = None if max_seconds is None else math.ceil(max_seconds * native) + native // 100
        # What may be held in memory at once: more than that is refused, by the declared duration before decoding,
        # and while decoding (a declared duration may lie).
        bound = None if max_decoded_seconds is None else math.ceil(max_decoded_seconds * native)
        if bound is not None and (limit is None or limit > bound):
            declared_s = _declared_seconds(stream)
            if declared_s is not None and declared_s * native > bound:
                raise MediaError(_too_long(declared_s, max_decoded_seconds))
        # Planar float32 at the stream's own layout and rate: downmix and resampling are done below.
        converter = av.AudioResampler(format="fltp")

        def take(frames: list[Any]) -> None:
            nonlocal n
            for out in frames:
                planes = out.to_ndarray()  # [channels, samples]
                chunks.append(planes.mean(0, dtype=np.float32) if planes.shape[0] > 1 else planes[0])
                n += planes.shape[1]

        try:
            for frame in container.decode(stream):
                take(converter.resample(frame))
                if limit is not None and n >= limit:
                    break
                if bound is not None and n > bound:
                    raise MediaError(_too_long(None, max_decoded_seconds))
            else:
                take(converter.resample(None))  # flush
        except av.error.FFmpegError as exc:
            raise MediaError(f"cannot decode audio (corrupt or truncated file): {_av_reason(exc)}") from None
        declared = _declared_seconds(stream)
    if n == 0:
        raise MediaError("no audio samples decoded (empty, corrupt or truncated audio stream)")
    wave = np.concatenate(chunks).astype(np.float32, copy=False)
    if declared is not None:
        # Codec padding (AAC rounds up to 1024-sample frames) sits after the declared end; a gap larger than
        # 0.1 s is not padding, so an inaccurate declared duration never cuts real audio.
        exact = round(declared * native)
        if 0 < exact < len(wave) <= exact + native // 10:
            wave = wave[:exact]
    if limit is not None:
        wave = wave[:limit]
    tensor = torch.from_numpy(np.ascontiguousarray(wave))
    tensor = resample(tensor, native, sample_rate, resampler)
    if max_seconds is not None:
        tensor = tensor[: max(1, round(max_seconds * sample_rate))]
    return tensor.contiguous()


def _too_long(seconds: float | None, bound: float | None) -> str:
    length = "longer than" if seconds is None else f"{seconds:.0f} s long, over"
    return (f"audio {length} the decoding bound of {bound:g} s (raise it with --max-decoded-seconds, or keep only the "
            "start with --max-seconds and --segment drop)")


def load_audio_parts(
    path: str | os.PathLike[str],
    sample_rate: int,
    *,
    max_seconds: float | None = None,
    segment: str = "drop",
    min_samples: int = 1,
    resampler: str | None = None,
    max_decoded_seconds: float | None = DEFAULT_MAX_DECODED_SECONDS,
) -> list[torch.Tensor]:
    """:func:`load_audio` plus the long/short audio policy; one waveform per item to store.

    ``segment="drop"``: one waveform of at most ``max_seconds``. ``"split"``: consecutive ``max_seconds`` pieces
    of the whole file (the last one may be shorter), stored as ``"{id}#seg{k}"``. Any waveform shorter than
    ``min_samples`` (the encoder's receptive field, e.g. 400 samples = 25 ms for wav2vec2) is padded with zeros
    at the end up to it, so a very short sound still gives one frame instead of failing.
    """
    options = AudioOptions(sample_rate=sample_rate, max_seconds=max_seconds, segment=segment, resampler=resampler,
                           max_decoded_seconds=max_decoded_seconds)
    wave = load_audio(
        path, sample_rate, max_seconds=max_seconds if segment == "drop" else None, resampler=options.resampler,
        max_decoded_seconds=max_decoded_seconds,
    )
    if options.segment == "split" and max_seconds is not None:
        step = max(1, round(max_seconds * sample_rate))
        parts = [wave[i : i + step] for i in range(0, len(wave), step)]
    else:
        parts = [wave]
    return [torch.nn.functional.pad(p, (0, min_samples - len(p))) if len(p) < min_samples else p for p in parts]


# --------------------------------------------------------------------------------------------- video

_EPS = 1e-6  # seconds; frame times and targets are floats computed from exact rationals
# Without a keyframe index, keep decoding forward when the next target is this close instead of seeking.
_SEEK_GAP_S = 1.0


def _video_duration(container: Any, stream: Any) -> float | None:
    declared = _declared_seconds(stream)
    if declared:
        return declared
    if container.duration:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _clip_times(duration: float, options: VideoOptions) -> list[list[float]]:
    """Target times (seconds from the start of the video) of every frame of every clip."""
    t, k = options.frames, options.clips
    if options.sampling == "uniform":
        # Centres of t*k equal time slices; clip c takes slices c*t .. c*t+t-1 (consecutive windows).
        step = duration / (t * k)
        flat = [(j + 0.5) * step for j in range(t * k)]
        return [flat[c * t : (c + 1) * t] for c in range(k)]
    assert options.fps is not None
    span = t / options.fps  # seconds one clip covers
    last_start = max(0.0, duration - span)
    starts = [0.0] if k == 1 else [last_start * c / (k - 1) for c in range(k)]
    return [[s + i / options.fps for i in range(t)] for s in starts]


def _rotation(frame: Any, stream: Any) -> int:
    """Counter-clockwise degrees (0, 90, 180 or 270) that display the frame upright; mirroring is ignored."""
    try:
        degrees = float(frame.rotation or 0)  # display matrix side data, counter-clockwise
    except Exception:  # older PyAV or a malformed matrix: fall back to the tag
        degrees = 0.0
    if not degrees:
        tag = (stream.metadata or {}).get("rotate")
        try:
            degrees = -float(tag) if tag else 0.0  # the legacy tag is clockwise
        except ValueError:
            degrees = 0.0
    return int(round(degrees / 90.0)) % 4 * 90


def _frame_budget(options: VideoOptions) -> int | None:
    """Pixels one sampled frame may have: the video bound shared by every frame of every clip."""
    n = options.frames * options.clips
    return None if options.max_video_pixels is None else max(1, options.max_video_pixels // n)


def _check_frame_size(width: int, height: int, options: VideoOptions) -> None:
    budget = _frame_budget(options)
    if budget is not None and width * height > budget:
        n = options.frames * options.clips
        raise MediaError(f"video too large: {n} frames of {width}x{height} = {n * width * height:,} pixels, over "
                         f"the bound of {options.max_video_pixels:,} (raise it with --max-video-pixels)")


def _rgb(frame: Any, stream: Any, options: VideoOptions) -> np.ndarray:
    _check_frame_size(frame.width, frame.height, options)  # the stream's header may understate it
    array = frame.to_ndarray(format="rgb24")
    turns = _rotation(frame, stream) // 90
    return np.ascontiguousarray(np.rot90(array, k=turns)) if turns else array


def _frame_time(frame: Any, previous: float | None, step: float) -> float:
    if frame.pts is not None and frame.time_base is not None:
        return float(frame.pts * frame.time_base)
    return 0.0 if previous is None else previous + step  # no pts: assume the nominal rate


def _keyframe_times(stream: Any) -> list[float]:
    """Keyframe times from the container's index (mp4, mkv cues, avi); [] when there is none."""
    try:
        tb = stream.time_base
        times = sorted(float(e.timestamp * tb) for e in stream.index_entries if e.is_keyframe)
    except Exception:  # no index API or no index: the seek heuristic falls back to a gap
        return []
    return times


def _stack(frames: list[np.ndarray]) -> np.ndarray:
    try:
        return np.stack(frames)
    except ValueError:
        raise MediaError("video frames change size mid-stream") from None


class _Cursor:
    """A decoder position in one video stream: the frame on screen (``shown``) and the next one, decoded ahead."""

    def __init__(self, container: Any, stream: Any, step: float) -> None:
        self.container, self.stream, self.step = container, stream, step
        self.frames: Any = None
        self.shown: tuple[Any, float] | None = None
        self.ahead: tuple[Any, float] | None = None
        self.eof = False

    def seek(self, target: float) -> None:
        # backward=True lands on the keyframe at or before the target: decoding forward from it reaches it.
        self.container.seek(max(0, int(target / self.stream.time_base)), stream=self.stream, backward=True)
        self.frames, self.shown, self.ahead, self.eof = self.container.decode(self.stream), None, None, False

    def _decode(self) -> tuple[Any, float] | None:
        try:
            frame = next(self.frames)
        except StopIteration:
            self.eof = True
            return None
        last = self.ahead or self.shown
        return frame, _frame_time(frame, None if last is None else last[1], self.step)

    def frame_at(self, target: float) -> Any:
        """The frame on screen at ``target``: the last one with pts <= target (the first one when it starts
        later). Decodes forward until the first frame after ``target``, which is kept for the next call."""
        while True:
            if self.ahead is None and not self.eof:
                self.ahead = self._decode()
            if self.ahead is not None and (self.shown is None or self.ahead[1] <= target + _EPS):
                self.shown, self.ahead = self.ahead, None
                continue
            if self.shown is None:
                raise MediaError("no decodable video frame")
            return self.shown[0]


def _seek_frames(container: Any, stream: Any, targets: list[float], step: float,
                 options: VideoOptions) -> list[np.ndarray]:
    """RGB frames on screen at each (sorted, absolute) target time. Seeks only when a keyframe lies between the
    current position and the target (else the seek would re-decode as much as decoding forward does)."""
    keyframes = _keyframe_times(stream)
    cursor = _Cursor(container, stream, step)
    out: list[np.ndarray] = []
    cached: tuple[Any, np.ndarray] | None = None
    for target in targets:
        here = None if cursor.shown is None else (cursor.ahead or cursor.shown)[1]  # decoded up to here
        if here is None:
            need_seek = True
        elif target <= here + _EPS or cursor.eof:
            need_seek = False
        elif keyframes:
            i = bisect.bisect_right(keyframes, here + _EPS)
            need_seek = i < len(keyframes) and keyframes[i] <= target + _EPS
        else:
            need_seek = target - here > _SEEK_GAP_S
        if need_seek:
            cursor.seek(target)
        frame = cursor.frame_at(target)
        if cached is None or cached[0] is not frame:
            cached = (frame, _rgb(frame, stream, options))  # consecutive targets often share a frame: convert once
        out.append(cached[1])
    return out


def _sequential_frames(path: str, options: VideoOptions, step: float) -> list[np.ndarray]:
    """Two passes without seeking, for very short videos and files without a known duration: first the frame
    times (no pixels kept), then only the chosen frames. Fewer frames than asked: the last one is repeated."""
    with _open_av(path) as container:
        stream = container.streams.video[0]
        times: list[float] = []
        for frame in container.decode(stream):
            times.append(_frame_time(frame, times[-1] if times else None, step))
    if not times:
        raise MediaError("no decodable video frame")
    n = len(times)
    if n < options.frames:
        clips = [[*range(n), *[n - 1] * (options.frames - n)]] * options.clips
    else:
        origin = times[0]
        relative = [t - origin for t in times]
        gaps = sorted(b - a for a, b in zip(relative, relative[1:], strict=False) if b > a)
        duration = relative[-1] + (gaps[len(gaps) // 2] if gaps else step)  # the last frame lasts a typical gap
        clips = [  # the frame on screen at t: the last one starting at or before it
            [max(bisect.bisect_right(relative, t + _EPS) - 1, 0) for t in clip]
            for clip in _clip_times(duration, options)
        ]
    wanted = {i for clip in clips for i in clip}
    arrays: dict[int, np.ndarray] = {}
    with _open_av(path) as container:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                arrays[i] = _rgb(frame, stream, options)
            if i >= max(wanted):
                break
    if len(arrays) < len(wanted):
        raise MediaError("video decoded differently on the second pass (corrupt file)")
    return [_stack([arrays[i] for i in clip]) for clip in clips]


def load_video_frames(
    path: str | os.PathLike[str],
    num_frames: int,
    sampling: str = "uniform",
    fps: float | None = None,
    clips: int = 1,
    max_video_pixels: int | None = DEFAULT_MAX_VIDEO_PIXELS,
) -> list[np.ndarray]:
    """Sample ``clips`` clips of ``num_frames`` RGB frames each from the first video stream: ``[T, H, W, 3]`` uint8.

    Frames are chosen by time, not index (variable frame rates stay correct): each target time gets the frame on
    screen then, the last one whose pts is at or before it. The decoder seeks to the keyframe before a target
    (only when a keyframe lies ahead of the current position) and decodes forward to the first frame after it,
    so only the needed stretches are decoded and only the chosen frames are converted and kept.

    ``sampling="uniform"``: targets at the centres of ``clips * num_frames`` equal slices of the duration (stream
    duration, else the container's), clip k taking the k-th run of ``num_frames`` (for a constant frame rate:
    frame ``floor((j + 1/2) * N / T)``). ``"fps"``: targets ``1/fps`` s apart; one clip starts at 0, several
    start evenly spaced so the last one ends at the end. The stream's rotation (display matrix, else the legacy
    ``rotate`` tag) is applied, in multiples of 90 degrees. A video with fewer frames than ``num_frames`` gives
    all its frames with the last one repeated. Raises :class:`MediaError` for unusable files, "no video stream",
    "no decodable video frame", and a video whose sampled frames would hold more than ``max_video_pixels`` pixels
    together (checked from the stream's header, then on every decoded frame; None: no bound).
    """
    import av

    options = VideoOptions(frames=num_frames, sampling=sampling, fps=fps, clips=clips,
                           max_video_pixels=max_video_pixels)
    path = _check_file(path)
    try:
        with _open_av(path) as container:
            if not container.streams.video:
                raise MediaError("no video stream")
            stream = container.streams.video[0]
            _check_frame_size(stream.codec_context.width or 0, stream.codec_context.height or 0, options)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            step = 1.0 / float(rate) if rate else 1.0 / 25
            duration = _video_duration(container, stream)
            estimated = stream.frames or (duration / step if duration else 0)
            if duration and estimated >= options.frames:
                tb = stream.time_base
                start = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
                per_clip = _clip_times(duration, options)
                targets = sorted({start + t for clip in per_clip for t in clip})
                chosen = dict(zip(targets, _seek_frames(container, stream, targets, step, options), strict=True))
                return [_stack([chosen[start + t] for t in clip]) for clip in per_clip]
        return _sequential_frames(path, options, step)
    except av.error.FFmpegError as exc:
        raise MediaError(f"cannot decode video (corrupt or truncated file): {_av_reason(exc)}") from None
