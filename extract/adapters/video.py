"""Video datasets with captions: MSR-VTT (caption JSON), MSVD (YouTubeClips + description list), LSMDC (movie clips +
audio-description TSV)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .common import (
    VIDEO_EXTENSIONS,
    DatasetError,
    PathLike,
    check_some_exist,
    files_with,
    load_json,
    read_table,
    read_text_lines,
    require_dir,
    write_splits,
)


def _videos_by_stem(root: Path) -> dict[str, Path]:
    """Every video file under ``root`` by its name without extension (the first in sorted walk order wins)."""
    found: dict[str, Path] = {}
    for path in files_with(root, VIDEO_EXTENSIONS):
        found.setdefault(path.stem, path)
    return found


def msrvtt_to_manifests(annotation_files: Sequence[PathLike], videos_dir: PathLike, out_dir: PathLike,
                        ) -> list[str]:
    """MSR-VTT annotation JSON file(s) + a videos folder -> per split ``{split}.videos.jsonl`` and
    ``{split}.captions.jsonl``.

    Each file is ``{"videos": [{"video_id", "split", "category"?}], "sentences": [{"video_id", "caption",
    "sen_id"?}]}`` (``train_val_videodatainfo.json``, ``test_videodatainfo.json``, ``MSRVTT_data.json``); without a
    ``videos`` list every video of the file goes to a split named after the file. Video ids are ``video_id``
    (``video0``), found as ``<video_id>.<ext>`` anywhere under ``videos_dir`` (e.g. ``TrainValVideo/``,
    ``TestVideo/``); ``label`` = ``category`` when given. Caption ids are ``sen_id`` (else ``{video_id}_{k}``), each
    caption's ``ref`` is its video. A single ``MSRVTT_JSFUSION_test.csv`` gives the 1k-A test split instead
    (:func:`msrvtt_1ka_to_manifests`).
    """
    if not annotation_files:
        raise DatasetError("no MSR-VTT annotation file given")
    if len(annotation_files) == 1 and Path(annotation_files[0]).suffix.lower() == ".csv":
        return msrvtt_1ka_to_manifests(annotation_files[0], videos_dir, out_dir)
    videos_root = require_dir(videos_dir, "videos folder")
    splits = _MsrvttSplits(videos_root, _videos_by_stem(videos_root))
    for source in annotation_files:
        splits.add_file(source)
    check_some_exist([r["path"] for split in splits.videos.values() for r in split],
                     ", ".join(map(os.fspath, annotation_files)), videos_root)
    written = []
    for split in splits.videos:
        written += write_splits(out_dir, {split: splits.videos[split]}, "videos")
        written += write_splits(out_dir, {split: splits.captions.get(split, [])}, "captions")
    return written


@dataclass
class _MsrvttSplits:
    """The video and caption records of MSR-VTT annotation files by split, and where each id was first seen (an id
    listed twice, even across files, is an error naming both places)."""

    videos_root: Path
    on_disk: dict[str, Path]
    videos: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    captions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    video_where: dict[str, str] = field(default_factory=dict)
    caption_where: dict[str, str] = field(default_factory=dict)
    per_video: dict[str, int] = field(default_factory=dict)

    def add_file(self, source: PathLike) -> None:
        if Path(source).suffix.lower() == ".csv":
            raise DatasetError(f"{source}: a CSV file; the MSR-VTT annotation JSON (train_val_videodatainfo.json, "
                               "MSRVTT_data.json) is expected here, or MSRVTT_JSFUSION_test.csv alone (1k-A split)")
        data = load_json(source, "the MSR-VTT annotation JSON (train_val_videodatainfo.json, MSRVTT_data.json)")
        sentences = data.get("sentences") if isinstance(data, dict) else None
        if not isinstance(sentences, list):
            raise DatasetError(f"{source}: expected a JSON object with a 'sentences' list (MSR-VTT format)")
        listed = data.get("videos")
        if listed is None:  # captions only: the videos are those the sentences name, in first-seen order
            listed = [{"video_id": s.get("video_id")} for s in sentences if isinstance(s, dict)]
            default_split = Path(source).stem
        else:
            default_split = None
        if not isinstance(listed, list):
            raise DatasetError(f"{source}: 'videos' must be a list")
        split_of = self._add_videos(source, listed, default_split)
        self._add_sentences(source, sentences, split_of)

    def _add_videos(self, source: PathLike, listed: list, default_split: str | None) -> dict[str, str]:
        """Record the file's videos; returns the split of each."""
        split_of: dict[str, str] = {}
        for k, video in enumerate(listed):
            video_id = video.get("video_id") if isinstance(video, dict) else None
            if not isinstance(video_id, str) or not video_id:
                raise DatasetError(f"{source}: videos[{k}] has no 'video_id'")
            if video_id in split_of and default_split is not None:
                continue  # captions-only file: a video named by several sentences
            if video_id in self.video_where:
                raise DatasetError(f"{source}: videos[{k}]: video {video_id} already listed in "
                                   f"{self.video_where[video_id]}")
            split = default_split or video.get("split")
            if not isinstance(split, str) or not split:
                raise DatasetError(f"{source}: videos[{k}] ({video_id}) has no 'split'")
            self.video_where[video_id] = f"{source} videos[{k}]"
            split_of[video_id] = split
            path = self.on_disk.get(video_id, self.videos_root / f"{video_id}.mp4")
            record: dict[str, Any] = {"id": video_id, "path": str(Path(path).resolve())}
            if isinstance(video.get("category"), (int, str)) and not isinstance(video.get("category"), bool):
                record["label"] = video["category"]
            self.videos.setdefault(split, []).append(record)
        return split_of

    def _add_sentences(self, source: PathLike, sentences: list, split_of: dict[str, str]) -> None:
        for k, sentence in enumerate(sentences):
            where = f"{source}: sentences[{k}]"
            if not isinstance(sentence, dict) or not isinstance(sentence.get("caption"), str):
                raise DatasetError(f"{where} has no 'caption' text")
            video_id = sentence.get("video_id")
            if video_id not in split_of:
                raise DatasetError(f"{where} names video {video_id!r}, which this file does not list")
            n = self.per_video[video_id] = self.per_video.get(video_id, -1) + 1
            sen_id = sentence.get("sen_id")
            caption_id = str(sen_id) if sen_id is not None else f"{video_id}_{n}"
            if caption_id in self.caption_where:
                raise DatasetError(f"{where} repeats caption id {caption_id} (first at "
                                   f"{self.caption_where[caption_id]})")
            self.caption_where[caption_id] = where
            self.captions.setdefault(split_of[video_id], []).append(
                {"id": caption_id, "text": sentence["caption"].strip(), "ref": video_id})


MSRVTT_1KA_SPLIT = "test1k"
_MSRVTT_1KA_COLUMNS = ("key", "video_id", "sentence")


def msrvtt_1ka_to_manifests(test_csv: PathLike, videos_dir: PathLike, out_dir: PathLike) -> list[str]:
    """MSR-VTT's 1k-A test split (``MSRVTT_JSFUSION_test.csv``, the 1000 video-caption pairs text-to-video
    retrieval papers report) + a videos folder -> ``test1k.videos.jsonl`` + ``test1k.captions.jsonl``.

    The CSV has the header ``key,vid_key,video_id,sentence`` (some copies add a leading unnamed index column): one
    caption per video. Video id = ``video_id`` (``video7579``), found as ``<video_id>.<ext>`` anywhere under
    ``videos_dir``; caption id = ``key`` (``ret0``), ``text`` = ``sentence``, ``ref`` = the video.
    """
    source = Path(test_csv)
    videos_root = require_dir(videos_dir, "videos folder")
    try:
        rows = list(read_table(source, ",", _MSRVTT_1KA_COLUMNS))
    except DatasetError as exc:
        raise DatasetError(f"{exc} (expected MSRVTT_JSFUSION_test.csv: a header 'key,vid_key,video_id,sentence')") \
            from None
    on_disk = _videos_by_stem(videos_root)
    videos: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    video_line: dict[str, int] = {}
    key_line: dict[str, int] = {}
    for line, row in rows:
        key, video_id, sentence = (row[c].strip() for c in _MSRVTT_1KA_COLUMNS)
        if not key or not video_id or not sentence:
            raise DatasetError(f"{source}:{line}: empty 'key', 'video_id' or 'sentence'")
        if key in key_line:
            raise DatasetError(f"{source}:{line}: key {key} repeats line {key_line[key]}")
        key_line[key] = line
        if video_id not in video_line:
            video_line[video_id] = line
            videos.append({"id": video_id, "path": str(Path(on_disk.get(video_id, videos_root / f"{video_id}.mp4"))
                                                       .resolve())})
        captions.append({"id": key, "text": sentence, "ref": video_id})
    if not captions:
        raise DatasetError(f"{source}: no rows")
    check_some_exist([r["path"] for r in videos], source, videos_root)
    return [*write_splits(out_dir, {MSRVTT_1KA_SPLIT: videos}, "videos"),
            *write_splits(out_dir, {MSRVTT_1KA_SPLIT: captions}, "captions")]


# ---- MSVD (Microsoft Research Video Description Corpus, "YouTube2Text") -------------------------------------------
# The split every paper uses (Venugopalan et al. 2015, via youtube_mapping.txt's vid1..vid1970): 1200 / 100 / 670.
MSVD_SPLITS = (("train", 1, 1200), ("val", 1201, 1300), ("test", 1301, 1970))
_MSVD_VID = re.compile(r"^vid(\d+)$")


def msvd_to_manifests(captions_file: PathLike, videos_dir: PathLike, out_dir: PathLike,
                      mapping: PathLike | None = None, language: str | None = "English") -> list[str]:
    """MSVD descriptions + ``YouTubeClips/`` -> ``all.videos.jsonl`` + ``all.captions.jsonl``, or with ``mapping``
    (``youtube_mapping.txt``) the standard ``train`` / ``val`` / ``test`` split (vid1-1200, 1201-1300, 1301-1970).

    ``captions_file`` is ``AllVideoDescriptions.txt`` (``VIDEO_ID caption`` lines, ``#`` starts a comment line) or
    ``MSR Video Description Corpus.csv`` (header ``VideoID,Start,End,WorkerID,Source,AnnotationTime,Language,
    Description``; video id ``{VideoID}_{Start}_{End}``; only rows in ``language``, all when None; rows with an empty
    Description are skipped). Video id e.g. ``-4wsuPCjDBc_5_15``, found as ``<id>.avi`` (any video extension)
    anywhere under ``videos_dir``. Caption id ``{video_id}_{k}``, ``ref`` = the video. With ``mapping``, videos it
    does not list are left out (they are not part of the benchmark).
    """
    source = Path(captions_file)
    videos_root = require_dir(videos_dir, "MSVD videos folder (YouTubeClips)")
    described = (_msvd_csv(source, language) if source.suffix.lower() == ".csv" else _msvd_txt(source))
    if not described:
        raise DatasetError(f"{source}: no descriptions" + (f" in {language}" if language and
                                                           source.suffix.lower() == ".csv" else ""))
    split_of = _msvd_mapping(Path(mapping)) if mapping is not None else {v: "all" for v in described}
    on_disk = _videos_by_stem(videos_root)
    videos: dict[str, list[dict[str, Any]]] = {}
    captions: dict[str, list[dict[str, Any]]] = {}
    caption_ids: dict[str, str] = {}
    for video_id, split in split_of.items():
        path = on_disk.get(video_id, videos_root / f"{video_id}.avi")
        videos.setdefault(split, []).append({"id": video_id, "path": str(Path(path).resolve())})
        for k, (where, text) in enumerate(described.get(video_id, [])):
            caption_id = f"{video_id}_{k}"
            if caption_id in caption_ids:  # ids hold underscores: "a_1_2" caption 10 = "a_1_2_1" caption 0
                raise DatasetError(f"{where}: caption id {caption_id} clashes with {caption_ids[caption_id]}")
            caption_ids[caption_id] = where
            captions.setdefault(split, []).append({"id": caption_id, "text": text, "ref": video_id})
    check_some_exist([r["path"] for split in videos.values() for r in split], source, videos_root)
    written = []
    for split in videos:
        written += write_splits(out_dir, {split: videos[split]}, "videos")
        written += write_splits(out_dir, {split: captions.get(split, [])}, "captions")
    return written


def _msvd_txt(path: Path) -> dict[str, list[tuple[str, str]]]:
    """``AllVideoDescriptions.txt``: video id -> [(file:line, caption)] in file order."""
    described: dict[str, list[tuple[str, str]]] = {}
    for lineno, line in enumerate(read_text_lines(path), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        video_id, _, text = line.strip().partition(" ")
        if not text.strip():
            raise DatasetError(f"{path}:{lineno}: expected 'VIDEO_ID caption', got {line.strip()[:60]!r}")
        described.setdefault(video_id, []).append((f"{path}:{lineno}", text.strip()))
    return described


def _msvd_csv(path: Path, language: str | None) -> dict[str, list[tuple[str, str]]]:
    """``MSR Video Description Corpus.csv``: video id -> [(file:line, caption)] for the rows in ``language``."""
    described: dict[str, list[tuple[str, str]]] = {}
    wanted = language.strip().lower() if language else None
    for line, row in read_table(path, ",", ["VideoID", "Start", "End", "Language", "Description"]):
        if wanted is not None and row["Language"].strip().lower() != wanted:
            continue
        name, start, end = row["VideoID"].strip(), row["Start"].strip(), row["End"].strip()
        if not name or not start.isdigit() or not end.isdigit():
            raise DatasetError(f"{path}:{line}: expected a VideoID and integer Start and End seconds, got "
                               f"{name!r}, {start!r}, {end!r}")
        if row["Description"].strip():
            described.setdefault(f"{name}_{start}_{end}", []).append((f"{path}:{line}", row["Description"].strip()))
    return described


def _msvd_mapping(path: Path) -> dict[str, str]:
    """``youtube_mapping.txt`` (``VIDEO_ID vidN`` lines) -> video id -> split, in vidN order."""
    number: dict[str, int] = {}
    where: dict[int, int] = {}
    for lineno, line in enumerate(read_text_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.split()
        found = _MSVD_VID.match(fields[1]) if len(fields) == 2 else None
        if not found:
            raise DatasetError(f"{path}:{lineno}: expected 'VIDEO_ID vidN', got {line.strip()[:60]!r}")
        n = int(found.group(1))
        if n in where:
            raise DatasetError(f"{path}:{lineno}: vid{n} already mapped at line {where[n]}")
        if fields[0] in number:
            raise DatasetError(f"{path}:{lineno}: video {fields[0]} already mapped (vid{number[fields[0]]})")
        where[n] = lineno
        number[fields[0]] = n
    split_of = {}
    for video_id, n in sorted(number.items(), key=lambda kv: kv[1]):
        split = next((name for name, first, last in MSVD_SPLITS if first <= n <= last), None)
        if split is None:
            raise DatasetError(f"{path}:{where[n]}: vid{n} is outside the standard split (vid1 .. vid1970)")
        split_of[video_id] = split
    if not split_of:
        raise DatasetError(f"{path}: no 'VIDEO_ID vidN' lines")
    return split_of


# ---- LSMDC (Large Scale Movie Description Challenge: MPII-MD + M-VAD clips with audio descriptions) ----------------
_LSMDC_TIME = re.compile(r"^\d+\.\d+\.\d+\.\d+$")  # hh.mm.ss.mmm
_LSMDC_PREFIX = re.compile(r"^LSMDC\d*_(annos_)?", re.IGNORECASE)


def lsmdc_to_manifests(annotation_files: Sequence[PathLike], videos_dir: PathLike, out_dir: PathLike,
                       ) -> list[str]:
    """LSMDC annotation file(s) + the clips folder -> per file ``{split}.videos.jsonl`` + ``{split}.captions.jsonl``.

    Each file (``LSMDC16_annos_training.csv``, ``_val``, ``_test``, ``_blindtest``,
    ``LSMDC16_challenge_1000_publictect.csv``) is tab-separated without a header: ``CLIP_ID, START_ALIGNED,
    END_ALIGNED, START_EXTRACTED, END_EXTRACTED, SENTENCE`` (times ``hh.mm.ss.mmm``; the blind test has no
    sentence). Split = the file name without ``LSMDC16_annos_`` / ``LSMDC16_`` (``training``, ``val``, ...). A clip id
    (``1006_Slumdog_Millionaire_01.25.49.077-01.25.54.718``) may carry several sentences: one video item, caption ids
    ``{clip id}_{k}``. Clips are ``<MOVIE>/<CLIP_ID>.avi`` where MOVIE is the clip id up to its last ``_``
    (``1006_Slumdog_Millionaire``); any ``<CLIP_ID>.<video extension>`` anywhere under ``videos_dir`` is used first.
    """
    if not annotation_files:
        raise DatasetError("no LSMDC annotation file given")
    videos_root = require_dir(videos_dir, "LSMDC clips folder")
    on_disk = _videos_by_stem(videos_root)
    clip_where: dict[str, str] = {}
    videos: dict[str, list[dict[str, Any]]] = {}
    captions: dict[str, list[dict[str, Any]]] = {}
    for source in annotation_files:
        split = _LSMDC_PREFIX.sub("", Path(source).stem) or Path(source).stem
        if split in videos:
            raise DatasetError(f"{source}: a second file for split {split!r}")
        videos[split], captions[split] = [], []
        per_clip: dict[str, int] = {}
        for lineno, line in enumerate(read_text_lines(source), start=1):
            if not line.strip():
                continue
            where = f"{source}:{lineno}"
            fields = line.rstrip("\r\n").split("\t", 5)
            if len(fields) < 5 or not all(_LSMDC_TIME.match(f.strip()) for f in fields[1:5]):
                raise DatasetError(f"{where}: expected 'CLIP_ID<TAB>START<TAB>END<TAB>START<TAB>END<TAB>SENTENCE' "
                                   f"with hh.mm.ss.mmm times, got {line.strip()[:80]!r}")
            clip = fields[0].strip()
            movie, underscore, _ = clip.rpartition("_")
            if not underscore or not movie:
                raise DatasetError(f"{where}: clip id {clip!r} is not MOVIE_START-END")
            if clip not in per_clip:
                if clip in clip_where:
                    raise DatasetError(f"{where}: clip {clip} already listed at {clip_where[clip]}")
                clip_where[clip] = where
                per_clip[clip] = 0
                path = on_disk.get(clip, videos_root / movie / f"{clip}.avi")
                videos[split].append({"id": clip, "path": str(Path(path).resolve())})
            sentence = fields[5].strip() if len(fields) > 5 else ""
            if sentence:
                captions[split].append({"id": f"{clip}_{per_clip[clip]}", "text": sentence, "ref": clip})
                per_clip[clip] += 1
        if not videos[split]:
            raise DatasetError(f"{source}: no clip lines")
    check_some_exist([r["path"] for split in videos.values() for r in split],
                     ", ".join(map(os.fspath, annotation_files)), videos_root)
    written = []
    for split in videos:
        written += write_splits(out_dir, {split: videos[split]}, "videos")
        written += write_splits(out_dir, {split: captions[split]}, "captions")
    return written
