"""Extraction: run frozen pretrained encoders over raw media once and write token tensors to feature stores.

Public API (imported lazily, so ``import extract`` does not import torch or transformers)::

    from extract import read_manifest, write_manifest, manifest_sha256, Item, ManifestError
    from extract import coco_captions_to_manifests, image_folder_to_manifest
    from extract import load_image, load_audio, load_audio_parts, load_video_frames, MediaError
    from extract import AudioOptions, ImageOptions, VideoOptions
    from extract import load_encoder, encoder_identity, freeze, FrozenEncoder, Preprocessor
    from extract import run_extraction, run_spec, ExtractionSpec, ExtractionResult, ExtractionError
    from extract import save_tiny_text_model, save_tiny_image_model, save_tiny_audio_model, save_tiny_video_model

This package writes only through the ``stores`` API; it never imports zarr.
"""

from __future__ import annotations

from stores import lazy_exports

_EXPORTS = {
    "Item": "manifest",
    "ManifestError": "manifest",
    "manifest_sha256": "manifest",
    "read_manifest": "manifest",
    "write_manifest": "manifest",
    "coco_captions_to_manifests": "adapters",
    "image_folder_to_manifest": "adapters",
    "AudioOptions": "media",
    "ImageOptions": "media",
    "MediaError": "media",
    "VideoOptions": "media",
    "load_audio": "media",
    "load_audio_parts": "media",
    "load_image": "media",
    "load_video_frames": "media",
    "EncoderError": "encoders",
    "EncoderNotCachedError": "encoders",
    "FrozenEncoder": "encoders",
    "Preprocessor": "encoders",
    "encoder_identity": "encoders",
    "freeze": "encoders",
    "inference_context": "encoders",
    "load_encoder": "encoders",
    "ExtractionError": "run",
    "ExtractionResult": "run",
    "ExtractionSpec": "run",
    "run_extraction": "run",
    "run_spec": "run",
    "save_tiny_audio_model": "tiny",
    "save_tiny_image_model": "tiny",
    "save_tiny_text_model": "tiny",
    "save_tiny_video_model": "tiny",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
