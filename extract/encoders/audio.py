"""Audio through transformers: ``AutoFeatureExtractor`` + ``AutoModel`` (wav2vec2, HuBERT, WavLM and other
``input_values`` models; the Whisper encoder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..manifest import Item
from ..media import AUDIO_DECODER_VERSION, AudioOptions, MediaError, load_audio_parts
from .base import EncoderError
from .hf import HFEncoder, _derived, _quiet_hf, _require_path, _select_layer, _select_tower
from .specs import _read_json

_AUDIO_PREPROCESS_KEYS = (
    "feature_extractor_type", "sampling_rate", "feature_size", "do_normalize", "return_attention_mask",
    "padding_value", "padding_side", "n_fft", "hop_length", "chunk_length", "n_samples", "dither",
)


def _hf_sample_rate(folder: Path, audio: AudioOptions) -> int:
    """The rate audio is decoded at: the explicit one, else the feature extractor's ``sampling_rate``."""
    if audio.sample_rate is not None:
        return audio.sample_rate
    rate = _read_json(folder / "preprocessor_config.json").get("sampling_rate")
    if not isinstance(rate, int) or rate < 1:
        raise EncoderError(f"{folder}: the feature extractor config names no sampling_rate; pass sample_rate")
    return rate


class HFAudioPreprocessor:
    """Decodes audio items (:func:`load_audio_parts`: mono, resampled, long-audio policy, zero-padded up to the
    receptive field) and runs the feature extractor. Adds ``input_lengths``: samples per row for raw-waveform
    models, mel frames of the real audio for Whisper (whose extractor pads everything to 30 s)."""

    def __init__(
        self,
        extractor: Any,
        sample_rate: int,
        max_seconds: float | None,
        segment: str,
        min_samples: int,
        spectrogram: bool,
        pass_rate: bool,
        resampler: str,
        max_decoded_seconds: float | None = None,
    ) -> None:
        self.extractor = extractor
        self.max_decoded_seconds = max_decoded_seconds
        self.resampler = resampler
        self.sample_rate = sample_rate
        self.max_seconds = max_seconds
        self.segment = segment
        self.min_samples = min_samples
        self.spectrogram = spectrogram
        self.pass_rate = pass_rate  # the extractor refuses a rate other than its own; an override skips the check

    def waves(self, waves: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Batch tensors for decoded mono waveforms at ``sample_rate``."""
        arrays = [w.numpy() for w in waves]
        rate = {"sampling_rate": self.sample_rate} if self.pass_rate else {}
        if self.spectrogram:
            enc = self.extractor(arrays, return_attention_mask=True, return_tensors="pt", **rate)
            return {"input_features": enc["input_features"], "input_lengths": enc["attention_mask"].sum(1)}
        # The mask makes do_normalize use each item's own samples only, whether or not the model takes it.
        enc = self.extractor(arrays, padding="longest", return_attention_mask=True, return_tensors="pt", **rate)
        return {
            "input_values": enc["input_values"],
            "attention_mask": enc["attention_mask"],
            "input_lengths": torch.tensor([len(a) for a in arrays], dtype=torch.int64),
        }

    def __call__(self, items: list[Item]) -> dict[str, Any]:
        good: list[Item] = []
        waves: list[torch.Tensor] = []
        failed: list[tuple[Item, str]] = []
        split = self.segment == "split"
        for item in items:
            if not _require_path(item, "audio", failed):
                continue
            try:
                parts = load_audio_parts(
                    item.path,  # type: ignore[arg-type]
                    self.sample_rate,
                    max_seconds=self.max_seconds,
                    segment=self.segment,
                    min_samples=self.min_samples,
                    resampler=self.resampler,
                    max_decoded_seconds=self.max_decoded_seconds,
                )
            except MediaError as exc:
                failed.append((item, exc.reason))
                continue
            good.extend(_derived(item, "seg", len(parts), split))
            waves.extend(parts)
        batch: dict[str, Any] = {"items": good, "failed": failed}
        if waves:
            batch.update(self.waves(waves))
        return batch


class HFAudioEncoder(HFEncoder):
    """``AutoFeatureExtractor`` + ``AutoModel``: ragged tokens, one per output frame of the real audio.

    Raw-waveform models (wav2vec2, HuBERT, WavLM, data2vec-audio, ...): frame counts come from the model's own
    ``_get_feat_extract_output_lengths``. When the feature extractor asks for an attention mask (layer-norm
    models) the batch is padded and masked; otherwise (group-norm models such as wav2vec2-base, where padding
    zeros would change every frame's normalisation) rows of equal length are run together without padding, so
    the output is exactly that of each item alone (split segments share a length, so they still batch). Whisper:
    the encoder of the seq2seq model; the extractor pads to its 30 s window (longer audio is cut at 30 s, or at
    ``max_seconds``), and only the frames of the real audio are kept (mel frames through the encoder's length
    formula). Audio shorter than the receptive field is zero-padded up to it (see ``load_audio_parts``).
    """

    modality = "audio"
    fixed_tokens = None

    @staticmethod
    def preprocess_identity(folder: Path, config: dict[str, Any], max_tokens: int | None, media: Any) -> dict:
        proc = _read_json(folder / "preprocessor_config.json")
        audio = media or AudioOptions()
        return {
            **{k: proc[k] for k in _AUDIO_PREPROCESS_KEYS if k in proc},
            "sample_rate": _hf_sample_rate(folder, audio),
            "decoder": AUDIO_DECODER_VERSION,
            "resampler": audio.resampler,
        }

    @classmethod
    def from_settings(cls, spec: str, layer: int, max_tokens: int | None, media: Any) -> HFAudioEncoder:
        return cls(spec, layer=layer, audio=media)

    def __init__(self, spec: str, *, layer: int = -1, audio: AudioOptions | None = None) -> None:
        from transformers import AutoFeatureExtractor, AutoModel

        with _quiet_hf():
            extractor = AutoFeatureExtractor.from_pretrained(spec)
            model = AutoModel.from_pretrained(spec)
        super().__init__(spec, _select_tower(model, "audio"), layer)
        self.audio = self.media = audio or AudioOptions()
        native = getattr(extractor, "sampling_rate", None)
        self.sample_rate = int(self.audio.sample_rate or native or 0)
        if self.sample_rate < 1:
            raise EncoderError(f"{spec}: the feature extractor names no sampling_rate; pass sample_rate")
        if not hasattr(self.model, "_get_feat_extract_output_lengths"):
            raise EncoderError(f"{spec}: {type(self.model).__name__} has no frame-length formula; write a plugin")
        self.spectrogram = "input_features" in getattr(extractor, "model_input_names", ())
        max_seconds = self.audio.max_seconds
        if self.spectrogram:
            window = getattr(extractor, "n_samples", None)
            if not window:
                raise EncoderError(f"{spec}: spectrogram models other than Whisper-style 30 s windows need a plugin")
            window_s = window / extractor.sampling_rate
            if self.audio.segment == "split" and max_seconds is not None and max_seconds > window_s:
                raise EncoderError(f"{spec} sees at most {window_s:g} s; split into max_seconds <= {window_s:g}")
            max_seconds = min(max_seconds or window_s, window_s)
        self.use_mask = not self.spectrogram and bool(getattr(extractor, "return_attention_mask", False))
        self.min_samples = self._min_samples()
        self.preprocessor = HFAudioPreprocessor(
            extractor, self.sample_rate, max_seconds, self.audio.segment, self.min_samples, self.spectrogram,
            pass_rate=self.sample_rate == native, resampler=self.audio.resampler,
            max_decoded_seconds=self.audio.max_decoded_seconds,
        )
        probe = self._run(self.preprocessor.waves([torch.zeros(max(self.min_samples, self.sample_rate // 10))]))
        self.dim = int(probe.shape[-1])  # also validates `layer` now, not mid-run

    def _min_samples(self) -> int:
        """Shortest input giving one output frame (wav2vec2: 400 samples), from the model's own formula."""
        if self.spectrogram:
            return 1
        n = torch.arange(1, 1 << 17)
        ok = (self.model._get_feat_extract_output_lengths(n) >= 1).nonzero()
        if len(ok) == 0:
            raise EncoderError(f"{self.spec}: the model needs more than {1 << 17} samples for one frame")
        return int(n[ok[0, 0]])

    def _forward(self, kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(**kwargs, output_hidden_states=self.layer != -1, return_dict=True)
        return _select_layer(out, self.layer)

    def _run(self, batch: dict[str, Any]) -> torch.Tensor:
        with torch.inference_mode():
            if self.spectrogram:
                return self._forward({"input_features": batch["input_features"].to(self.device, non_blocking=True)})
            values = batch["input_values"].to(self.device, non_blocking=True)
            if self.use_mask:
                mask = batch["attention_mask"].to(values.device)
                return self._forward({"input_values": values, "attention_mask": mask})
            lengths = batch["input_lengths"].tolist()
            frames = self._frames(batch["input_lengths"])
            tokens: torch.Tensor | None = None
            for n in sorted(set(lengths)):
                rows = [i for i, m in enumerate(lengths) if m == n]
                part = self._forward({"input_values": values[rows, :n]})
                if tokens is None:
                    tokens = part.new_zeros(len(lengths), int(frames.max()), part.shape[-1])
                tokens[rows, : part.shape[1]] = part
            assert tokens is not None
            return tokens

    def _frames(self, input_lengths: torch.Tensor) -> torch.Tensor:
        return self.model._get_feat_extract_output_lengths(input_lengths.to(torch.int64)).to(torch.int64)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self._run(batch)
        lengths = self._frames(batch["input_lengths"]).clamp(1, tokens.shape[1])
        return tokens, lengths
