"""Adapters: turn datasets' own on-disk layouts into manifests (``docs/manifest.md``, ``docs/datasets.md``).

One module per family: :mod:`.image` (COCO captions, image folders, Karpathy splits / Flickr30k, CIFAR-10/100,
DAQUAR questions, TextCaps, Oxford-IIIT Pets, Caltech-101, Tiny ImageNet), :mod:`.audio` (LibriSpeech, ESC-50,
UrbanSound8K, GTZAN), :mod:`.video` (MSR-VTT, MSVD, LSMDC), :mod:`.text`
(SST-2, TREC, Emotion, any text table), :mod:`.table` (any media + caption CSV or Parquet). Malformed input raises :class:`DatasetError` naming the file and line (or entry).
Media paths are written relative to the manifest's folder when possible, so the pair can be moved together.
"""

from .audio import esc50_to_manifests, gtzan_to_manifests, librispeech_to_manifests, urbansound8k_to_manifests
from .common import AUDIO_EXTENSIONS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, DatasetError
from .image import (
    caltech101_to_manifests,
    cifar_to_manifests,
    coco_captions_to_manifests,
    daquar_to_manifests,
    flickr30k_to_manifests,
    image_folder_to_manifest,
    karpathy_to_manifests,
    oxford_pets_to_manifests,
    textcaps_to_manifests,
    tiny_imagenet_to_manifests,
)
from .table import table_to_manifests
from .text import TEXT_FORMATS, text_classification_to_manifests
from .video import lsmdc_to_manifests, msrvtt_1ka_to_manifests, msrvtt_to_manifests, msvd_to_manifests

__all__ = [
    "AUDIO_EXTENSIONS",
    "DatasetError",
    "IMAGE_EXTENSIONS",
    "TEXT_FORMATS",
    "VIDEO_EXTENSIONS",
    "caltech101_to_manifests",
    "cifar_to_manifests",
    "coco_captions_to_manifests",
    "daquar_to_manifests",
    "esc50_to_manifests",
    "flickr30k_to_manifests",
    "gtzan_to_manifests",
    "image_folder_to_manifest",
    "karpathy_to_manifests",
    "librispeech_to_manifests",
    "lsmdc_to_manifests",
    "msrvtt_1ka_to_manifests",
    "msrvtt_to_manifests",
    "msvd_to_manifests",
    "oxford_pets_to_manifests",
    "table_to_manifests",
    "text_classification_to_manifests",
    "textcaps_to_manifests",
    "tiny_imagenet_to_manifests",
    "urbansound8k_to_manifests",
]
