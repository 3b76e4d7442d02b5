"""Image datasets: COCO captions, image folders, Karpathy-split caption files (Flickr30k), CIFAR-10/100 pickles,
DAQUAR questions and answers, TextCaps, Oxford-IIIT Pets, Caltech-101 and Tiny ImageNet."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..manifest import write_manifest, write_text_file
from .common import (
    IMAGE_EXTENSIONS,
    DatasetError,
    PathLike,
    check_some_exist,
    files_with,
    load_json,
    read_text_lines,
    rel_path,
    require_dir,
    require_file,
    write_splits,
)

KARPATHY_SPLITS = ("train", "restval", "val", "test")  # written in this order; any other split name after them


def coco_captions_to_manifests(annotations_json: PathLike, images_dir: PathLike, out_dir: PathLike,
                               split: str | None = None) -> tuple[str, str]:
    """Write ``{split}.images.jsonl`` and ``{split}.captions.jsonl`` into ``out_dir`` from a COCO captions file.

    ``split`` defaults to the file name without ``captions_`` (``captions_train2017.json`` -> ``train2017``), so
    the train and val files can share one ``out_dir``. Image item ids are the COCO image ids, caption item ids the
    annotation ids (both as strings); each caption's ``ref`` is its image's item id and its text is stripped of
    surrounding white space. Items keep the annotation file's order. A caption whose ``image_id`` is not among
    the images, or an images folder holding none of the listed files, raises :class:`DatasetError` before
    anything is written.
    """
    data = load_json(annotations_json, "a COCO captions JSON file (captions_train2017.json)")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{annotations_json}: expected a COCO captions JSON object with 'images' and "
                           "'annotations' lists (captions_train2017.json)")
    split = split or Path(annotations_json).stem.removeprefix("captions_") or "all"
    images: list[dict[str, Any]] = []
    image_ids: set[str] = set()
    for k, img in enumerate(data.get("images", [])):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise DatasetError(f"{annotations_json}: images[{k}] needs 'id' and 'file_name'")
        image_id = str(img["id"])
        if image_id in image_ids:
            raise DatasetError(f"{annotations_json}: duplicate image id {image_id}")
        image_ids.add(image_id)
        images.append({"id": image_id, "path": os.path.abspath(os.path.join(images_dir, img["file_name"]))})
    captions: list[dict[str, Any]] = []
    orphans: list[str] = []
    for k, ann in enumerate(data.get("annotations", [])):
        if not isinstance(ann, dict) or not {"id", "image_id", "caption"} <= set(ann) \
                or not isinstance(ann["caption"], str):
            raise DatasetError(f"{annotations_json}: annotations[{k}] needs 'id', 'image_id' and a 'caption' string")
        image_id = str(ann["image_id"])
        if image_id not in image_ids:
            orphans.append(str(ann["id"]))
            continue
        captions.append({"id": str(ann["id"]), "text": ann["caption"].strip(), "ref": image_id})
    if orphans:
        shown = ", ".join(orphans[:10]) + (" ..." if len(orphans) > 10 else "")
        raise DatasetError(f"{annotations_json}: {len(orphans)} caption(s) refer to unknown images: {shown}")
    if not images:
        raise DatasetError(f"{annotations_json}: the 'images' list is empty")
    if not captions:
        raise DatasetError(f"{annotations_json}: no captions (is this an instances_*.json file rather than "
                           "captions_*.json?)")
    check_some_exist([r["path"] for r in images], annotations_json, images_dir)
    image_manifest, = write_splits(out_dir, {split: images}, "images")
    text_manifest, = write_splits(out_dir, {split: captions}, "captions")
    return image_manifest, text_manifest


def image_folder_to_manifest(root: PathLike, out: PathLike) -> str:
    """Write a manifest of every image under ``root``; the label is the first folder below ``root``.

    Walks recursively in sorted order (deterministic across file systems), skips hidden files and folders and
    non-image extensions. Item ids are the image paths relative to ``root`` (posix), which are unique and
    stable. Images directly in ``root`` get no label.
    """
    root = os.path.abspath(os.fspath(root))
    out = os.fspath(out)
    out_dir = os.path.dirname(os.path.abspath(out))
    records: list[dict[str, Any]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # in-place: controls the walk order
        for name in sorted(filenames):
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            full = os.path.join(dirpath, name)
            rel = Path(os.path.relpath(full, root)).as_posix()
            record: dict[str, Any] = {"id": rel, "path": rel_path(full, out_dir)}
            if "/" in rel:
                record["label"] = rel.split("/", 1)[0]
            records.append(record)
    if not records:
        raise DatasetError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {root}")
    return write_manifest(out, records)


# ---- Karpathy splits (Flickr30k, Flickr8k, COCO) -------------------------------------------------------------------
def karpathy_to_manifests(karpathy_json: PathLike, images_dir: PathLike, out_dir: PathLike) -> list[str]:
    """``dataset_flickr30k.json`` (also ``dataset_flickr8k.json``, ``dataset_coco.json``) -> per split
    ``{split}.images.jsonl`` and ``{split}.captions.jsonl``.

    The file is ``{"images": [{"filename", "split", "sentences": [{"raw", "sentid"?}], "filepath"?}]}``. Image ids
    are the file names without extension (``1000092795``); caption ids are ``sentid`` (else ``{image id}_{k}``),
    each caption's ``ref`` is its image. Image paths are ``images_dir/[filepath/]filename``.
    """
    data = load_json(karpathy_json, f"one of {_FLICKR_FORMATS}")
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DatasetError(f"{karpathy_json}: expected a JSON object with an 'images' list (Karpathy split format)")
    images: dict[str, list[dict[str, Any]]] = {s: [] for s in KARPATHY_SPLITS}
    captions: dict[str, list[dict[str, Any]]] = {s: [] for s in KARPATHY_SPLITS}
    seen_images: dict[str, int] = {}
    seen_captions: dict[str, int] = {}
    for k, entry in enumerate(entries):
        where = f"{karpathy_json}: images[{k}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected an object, got {type(entry).__name__}")
        filename, split, sentences = entry.get("filename"), entry.get("split"), entry.get("sentences")
        if not isinstance(filename, str) or not filename:
            raise DatasetError(f"{where}: missing 'filename'")
        if not isinstance(split, str) or not split:
            raise DatasetError(f"{where} ({filename}): missing 'split'")
        if not isinstance(sentences, list):
            raise DatasetError(f"{where} ({filename}): missing 'sentences' list")
        image_id = os.path.splitext(filename)[0]
        if image_id in seen_images:
            raise DatasetError(f"{where}: image {filename} already listed at images[{seen_images[image_id]}]")
        seen_images[image_id] = k
        path = os.path.join(images_dir, entry.get("filepath") or "", filename)
        images.setdefault(split, []).append({"id": image_id, "path": os.path.abspath(path)})
        for j, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(raw, str):
                raise DatasetError(f"{where} ({filename}): sentences[{j}] has no 'raw' text")
            sentid = sentence.get("sentid")
            caption_id = str(sentid) if sentid is not None else f"{image_id}_{j}"
            if caption_id in seen_captions:
                raise DatasetError(f"{where} ({filename}): sentences[{j}] repeats caption id {caption_id} "
                                   f"(first in images[{seen_captions[caption_id]}])")
            seen_captions[caption_id] = k
            captions.setdefault(split, []).append({"id": caption_id, "text": raw.strip(), "ref": image_id})
    if not seen_images:
        raise DatasetError(f"{karpathy_json}: the 'images' list is empty")
    check_some_exist([r["path"] for split in images.values() for r in split], karpathy_json, images_dir)
    written = []
    for split in images:
        if images[split]:
            written += write_splits(out_dir, {split: images[split]}, "images")
            written += write_splits(out_dir, {split: captions[split]}, "captions")
    return written


_FLICKR_TOKEN = re.compile(r"^(?P<file>[^#\t]+)#(?P<k>\d+)\t(?P<text>.*)$")
_FLICKR_FORMATS = ("the Karpathy split JSON (dataset_flickr30k.json), results_20130124.token "
                   "('IMAGE.jpg#K<TAB>caption' lines) or results.csv ('image_name| comment_number| comment')")


def flickr30k_to_manifests(captions_file: PathLike, images_dir: PathLike, out_dir: PathLike) -> list[str]:
    """Any of Flickr30k's caption files -> manifests: the Karpathy split JSON (:func:`karpathy_to_manifests`),
    the distribution's own ``results_20130124.token`` or the widely shared ``results.csv``.

    The token file has ``1000092795.jpg#0<TAB>Two young guys ...`` lines; ``results.csv`` has the header
    ``image_name| comment_number| comment`` and ``|``-separated rows (a row whose number and caption are separated
    by a space instead of ``|``, as one row of the shared file is, is read as meant). Neither holds a split: they
    give ``all.images.jsonl`` + ``all.captions.jsonl``; image id = the file name without extension
    (``1000092795``, as the Karpathy JSON gives), caption id ``{image id}_{k}`` with k = the caption number,
    ``ref`` = the image. The format is recognised from the file's first line; any other file is an error naming the
    three formats.
    """
    source = require_file(captions_file, "Flickr30k caption file")
    lines = read_text_lines(source)
    first = next((line.strip() for line in lines if line.strip()), "")
    if first.startswith("{"):
        return karpathy_to_manifests(source, images_dir, out_dir)
    if _FLICKR_TOKEN.match(first):
        rows = _flickr_token_rows(source, lines)
    elif first.replace(" ", "").lower() == "image_name|comment_number|comment":
        rows = _flickr_csv_rows(source, lines)
    else:
        raise DatasetError(f"{source}:1: not a Flickr30k caption file: expected {_FLICKR_FORMATS}")
    images: dict[str, dict[str, Any]] = {}
    captions: list[dict[str, Any]] = []
    caption_where: dict[str, str] = {}
    for where, file_name, k, text in rows:
        image_id = os.path.splitext(file_name)[0]
        images.setdefault(image_id, {"id": image_id, "path": os.path.abspath(os.path.join(images_dir, file_name))})
        caption_id = f"{image_id}_{k}"
        if caption_id in caption_where:
            raise DatasetError(f"{where}: caption {k} of {file_name} is already at {caption_where[caption_id]}")
        caption_where[caption_id] = where
        if not text:
            raise DatasetError(f"{where}: empty caption")
        captions.append({"id": caption_id, "text": text, "ref": image_id})
    if not captions:
        raise DatasetError(f"{source}: no captions")
    check_some_exist([r["path"] for r in images.values()], source, images_dir)
    return [*write_splits(out_dir, {"all": list(images.values())}, "images"),
            *write_splits(out_dir, {"all": captions}, "captions")]


def _flickr_token_rows(source: Path, lines: list[str]) -> list[tuple[str, str, int, str]]:
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        found = _FLICKR_TOKEN.match(line.rstrip("\r\n"))
        if not found:
            raise DatasetError(f"{source}:{lineno}: expected 'IMAGE.jpg#K<TAB>caption' (results_20130124.token), "
                               f"got {line.strip()[:60]!r}")
        rows.append((f"{source}:{lineno}", found["file"].strip(), int(found["k"]), found["text"].strip()))
    return rows


def _flickr_csv_rows(source: Path, lines: list[str]) -> list[tuple[str, str, int, str]]:
    rows = []
    header_seen = False
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not header_seen:
            header_seen = True
            continue
        file_name, bar, rest = line.partition("|")
        number, bar2, text = rest.partition("|")
        if bar and not bar2:  # 'IMAGE| 4 caption': the second separator is missing
            number, _, text = rest.strip().partition(" ")
        if not bar or not number.strip().isdigit() or not file_name.strip():
            raise DatasetError(f"{source}:{lineno}: expected 'image_name| comment_number| comment' "
                               f"(results.csv), got {line.strip()[:60]!r}")
        rows.append((f"{source}:{lineno}", file_name.strip(), int(number), text.strip()))
    return rows


# ---- CIFAR-10 / CIFAR-100 python pickles ---------------------------------------------------------------------------
class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches hold only dicts, lists, bytes and numpy arrays: refuse any other global (a pickle can run code)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (not part of a CIFAR batch)")
        return super().find_class(module, name)


def _load_batch(path: Path) -> dict[str, Any]:
    """A CIFAR pickle as a dict with str keys (the files were pickled by Python 2: keys and strings are bytes)."""
    try:
        with open(path, "rb") as handle:
            obj = _ArrayUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DatasetError(f"{path}: not a CIFAR python pickle ({exc})") from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _names(meta: dict[str, Any], key: str, path: Path) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path}: no {key!r} list")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _find_cifar(source: Path) -> tuple[str, Path]:
    """``("cifar10" | "cifar100", folder)``: ``source`` is the batches folder or the folder holding it."""
    for folder in (source, source / "cifar-10-batches-py", source / "cifar-100-python"):
        if (folder / "batches.meta").is_file():
            return "cifar10", folder
        if (folder / "meta").is_file() and (folder / "train").is_file():
            return "cifar100", folder
    raise DatasetError(f"{source}: not a CIFAR python folder (expected batches.meta and data_batch_1..5 + "
                       "test_batch for CIFAR-10, or meta, train and test for CIFAR-100)")


def cifar_to_manifests(source: PathLike, out_dir: PathLike, variant: str | None = None, label: str = "fine",
                       ) -> list[str]:
    """CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``) pickles -> PNG files under
    ``out_dir/images/{split}/`` plus ``out_dir/train.jsonl``, ``out_dir/test.jsonl`` and ``out_dir/classes.txt``.

    Item ids are ``{split}-{index:05d}`` in file order; ``label`` is the class name (CIFAR-100: the ``fine`` or
    ``coarse`` one). ``classes.txt`` lists the class names in label-index order (``eval zero-shot --classes``).
    ``variant`` (``cifar10``/``cifar100``), when given, must match what ``source`` holds.
    """
    found, folder = _find_cifar(require_dir(source, "CIFAR folder"))
    if variant is not None and variant != found:
        raise DatasetError(f"{source}: holds {found}, not {variant}")
    if label not in ("fine", "coarse"):
        raise DatasetError(f"label must be 'fine' or 'coarse', not {label!r}")
    if found == "cifar10":
        meta_path, label_key, names_key = folder / "batches.meta", "labels", "label_names"
        batches = {"train": [folder / f"data_batch_{i}" for i in range(1, 6)], "test": [folder / "test_batch"]}
    else:
        meta_path, label_key, names_key = folder / "meta", f"{label}_labels", f"{label}_label_names"
        batches = {"train": [folder / "train"], "test": [folder / "test"]}
    classes = _names(_load_batch(meta_path), names_key, meta_path)
    out = Path(out_dir)
    # Every batch is read and checked before the first PNG is written: a bad batch leaves nothing behind.
    arrays = {split: [_batch_arrays(_load_batch(require_file(path, f"{found} batch {path.name}")), label_key, path,
                                    len(classes)) for path in paths] for split, paths in batches.items()}
    splits: dict[str, list[dict[str, Any]]] = {}
    for split, loaded in arrays.items():
        records: list[dict[str, Any]] = []
        image_dir = out / "images" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        for pixels, labels in loaded:
            for row, lab in zip(pixels, labels, strict=True):
                item_id = f"{split}-{len(records):05d}"
                target = image_dir / f"{len(records):05d}.png"
                # rows are 1024 red, then 1024 green, then 1024 blue values, each plane row-major 32x32
                _save_png(row.reshape(3, 32, 32).transpose(1, 2, 0), target)
                records.append({"id": item_id, "path": str(target.resolve()), "label": classes[int(lab)]})
        splits[split] = records
    written = write_splits(out, splits)
    write_text_file(out / "classes.txt", "".join(f"{name}\n" for name in classes))
    return [*written, str(out / "classes.txt")]


def _batch_arrays(batch: dict[str, Any], label_key: str, path: Path, n_classes: int,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The batch's ``data`` (N, 3072) uint8 and its labels (N,), checked against each other and the class list."""
    if "data" not in batch or label_key not in batch:
        raise DatasetError(f"{path}: batch has no {'data' if 'data' not in batch else label_key!r} entry "
                           f"(keys: {', '.join(sorted(batch))})")
    data = np.asarray(batch["data"])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
        raise DatasetError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    labels = np.asarray(batch[label_key])
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DatasetError(f"{path}: {label_key!r} must hold {len(data)} integers, got {labels.dtype} {labels.shape}")
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if len(bad):
        raise DatasetError(f"{path}: row {int(bad[0])} has label {int(labels[bad[0]])}, outside the "
                           f"{n_classes} classes of the meta file")
    return data, labels


def _save_png(pixels: np.ndarray, target: Path) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(pixels)).save(target, format="PNG")  # (32, 32, 3) uint8: RGB


# ---- DAQUAR (visual question answering on NYU-Depth V2 images) -----------------------------------------------------
DAQUAR_SUBSETS = ("37", "894")  # reduced DAQUAR (37 object classes) and full DAQUAR (894)
# Question files per split, as the distribution names them: reduced DAQUAR's test file is qa.37.raw.reduced.test.txt.
_DAQUAR_FILES = {"train": ("qa.{s}.raw.train.txt",), "test": ("qa.{s}.raw.test.txt", "qa.{s}.raw.reduced.test.txt")}
_DAQUAR_FILE = re.compile(r"^qa\.(\d+)\.raw\..*\.txt$")
_DAQUAR_IMAGE = re.compile(r"\bimage(\d+)\b")
_DAQUAR_IMAGE_DIRS = ("images", "nyu_depth_images")


def daquar_to_manifests(source: PathLike, out_dir: PathLike, images_dir: PathLike | None = None,
                        subset: str | None = None) -> list[str]:
    """DAQUAR's ``qa.{37,894}.raw.{train,test}.txt`` (reduced DAQUAR's test file may be
    ``qa.37.raw.reduced.test.txt``) -> per split ``{split}.images.jsonl`` (the split's distinct images, id
    ``image{N}``, path ``images_dir/image{N}.png``) and ``{split}.questions.jsonl`` (id ``{split}-{k}`` for the k-th
    question of the file, ``text`` = the question, ``ref`` = its image id, ``label`` = its answer).

    The raw files alternate a question line ("what is on the desk in the image3 ?") and an answer line
    ("book, scissor, papers"). The image number is taken from the question and replaced there by "the image"
    ("... on the desk in the image ?"): it is the item's ``ref``, not language, and the encoder should not see it.
    Multi-word answers are written as their comma-separated items joined by ", ". ``subset`` picks ``37`` or
    ``894`` when both are in ``source``; ``images_dir`` defaults to ``source/images`` or ``source/nyu_depth_images``.
    When both ``qa.S.raw.test.txt`` and ``qa.S.raw.reduced.test.txt`` are present the second is split
    ``reduced-test``. A ``qa.S.raw.*.txt`` file of another name is an error, never skipped; nothing is written
    until every file has been read and the images folder checked.
    """
    folder = require_dir(source, "DAQUAR folder")
    subset = _daquar_subset(folder, subset)
    images_root = Path(images_dir) if images_dir is not None else next(
        (folder / d for d in _DAQUAR_IMAGE_DIRS if (folder / d).is_dir()), None)
    if images_root is None:
        raise DatasetError(f"{folder}: no images folder ({' or '.join(_DAQUAR_IMAGE_DIRS)}); pass --images")
    require_dir(images_root, "DAQUAR images folder")
    files = _daquar_files(folder, subset)
    splits: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for split, path in files:
        questions = _read_daquar(path, split)
        images: dict[str, dict[str, Any]] = {}
        for record in questions:
            image_id = record["ref"]
            if image_id not in images:
                images[image_id] = {"id": image_id, "path": os.path.abspath(images_root / f"{image_id}.png")}
        splits[split] = (list(images.values()), questions)
    check_some_exist([r["path"] for images, _ in splits.values() for r in images], folder, images_root)
    written: list[str] = []
    for split, (images_list, questions) in splits.items():
        written += write_splits(out_dir, {split: images_list}, "images")
        written += write_splits(out_dir, {split: questions}, "questions")
    return written


def _daquar_files(folder: Path, subset: str) -> list[tuple[str, Path]]:
    """``(split, file)`` for every question file of ``subset``; an unknown ``qa.S.raw.*.txt`` name is an error."""
    found: list[tuple[str, Path]] = []
    known: set[str] = set()
    for split, patterns in _DAQUAR_FILES.items():
        names = [pattern.format(s=subset) for pattern in patterns]
        known.update(names)
        present = [folder / name for name in names if (folder / name).is_file()]
        found += [(split if k == 0 else f"reduced-{split}", path) for k, path in enumerate(present)]
    unknown = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.startswith(f"qa.{subset}.raw.")
                     and p.name.endswith(".txt") and p.name not in known)
    if unknown:
        raise DatasetError(f"{folder / unknown[0]}: not a DAQUAR question file name (expected "
                           f"{', '.join(sorted(known))})")
    return found


def _daquar_subset(folder: Path, subset: str | None) -> str:
    present = sorted({m.group(1) for p in folder.iterdir() if (m := _DAQUAR_FILE.match(p.name))} &
                     set(DAQUAR_SUBSETS), key=DAQUAR_SUBSETS.index)
    if subset is not None:
        if subset not in DAQUAR_SUBSETS:
            raise DatasetError(f"DAQUAR subset must be one of {', '.join(DAQUAR_SUBSETS)}, not {subset!r}")
        if subset not in present:
            raise DatasetError(f"{folder}: no qa.{subset}.raw.train.txt or qa.{subset}.raw.test.txt")
        return subset
    if not present:
        raise DatasetError(f"{folder}: no DAQUAR question files (qa.37.raw.train.txt, qa.37.raw.reduced.test.txt, "
                           "qa.894.raw.test.txt, ...)")
    if len(present) > 1:
        raise DatasetError(f"{folder}: holds both reduced (qa.37.*) and full (qa.894.*) DAQUAR; pick one with "
                           "--subset 37 or --subset 894")
    return present[0]


def _read_daquar(path: Path, split: str) -> list[dict[str, Any]]:
    """Question records of one raw file: non-blank lines taken two at a time (question, answer)."""
    lines = [(n, line.strip()) for n, line in enumerate(read_text_lines(path), start=1) if line.strip()]
    if len(lines) % 2:
        n, last = lines[-1]
        raise DatasetError(f"{path}:{n}: question {last[:60]!r} has no answer line (the file must alternate "
                           "question and answer lines)")
    records: list[dict[str, Any]] = []
    for k in range(0, len(lines), 2):
        (q_line, question), (a_line, answer) = lines[k], lines[k + 1]
        found = _DAQUAR_IMAGE.findall(question)
        if not found:
            raise DatasetError(f"{path}:{q_line}: expected a question naming its image ('... in the image3 ?'), "
                               f"got {question[:60]!r}")
        if len(set(found)) > 1:
            raise DatasetError(f"{path}:{q_line}: the question names several images ({', '.join(sorted(set(found)))})")
        if _DAQUAR_IMAGE.search(answer) and answer.endswith("?"):
            raise DatasetError(f"{path}:{a_line}: expected an answer, got another question {answer[:60]!r} (the "
                               "file must alternate question and answer lines)")
        parts = [p.strip() for p in answer.split(",") if p.strip()]
        if not parts:
            raise DatasetError(f"{path}:{a_line}: empty answer")
        text = " ".join(_DAQUAR_IMAGE.sub("image", question).split())
        records.append({"id": f"{split}-{k // 2:05d}", "text": text, "ref": f"image{found[0]}",
                        "label": ", ".join(parts)})
    if not records:
        raise DatasetError(f"{path}: no questions")
    return records


# ---- TextCaps (captions that read the text in Open Images photos; TextVQA's images) --------------------------------
_TEXTCAPS_SPLIT = re.compile(r"_(train|val|test)$")
_TEXTCAPS_IMAGE_DIRS = {"train": "train_images", "val": "train_images", "test": "test_images"}


def textcaps_to_manifests(annotation_files: Sequence[PathLike], out_dir: PathLike, images_dir: PathLike | None = None,
                          ) -> list[str]:
    """TextCaps ``TextCaps_0.1_{train,val,test}.json`` -> per file (split) ``{split}.images.jsonl`` and
    ``{split}.captions.jsonl``.

    A file is ``{"dataset_type": "train", "data": [{"image_id", "caption_id"?, "caption_str"?, "reference_strs"?,
    ...}]}``: train and val hold one entry per caption (each repeating its image's five ``reference_strs``), test one
    entry per image and no captions. Split = ``dataset_type``, else the file name's ``_train``/``_val``/``_test``,
    else its stem. Image id = ``image_id``, path ``images_dir/<image_id>.jpg``; ``images_dir`` defaults to
    ``train_images/`` (train, val) or ``test_images/`` (test) beside the file. Caption id = ``caption_id`` (else
    ``{image_id}_{k}``), ``text`` = ``caption_str``, ``ref`` = the image; an entry without ``caption_str`` gives its
    ``reference_strs`` instead (once per image, ids ``{image_id}_{k}``).
    """
    if not annotation_files:
        raise DatasetError("no TextCaps annotation file given")
    image_where: dict[str, str] = {}
    written: list[str] = []
    pending: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]] = []
    for source in annotation_files:
        data = load_json(source, "a TextCaps JSON file (TextCaps_0.1_train.json)")
        entries = data.get("data") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise DatasetError(f"{source}: expected a JSON object with a 'data' list (TextCaps format)")
        split = _textcaps_split(Path(source), data)
        folder = Path(images_dir) if images_dir is not None else Path(source).parent / _TEXTCAPS_IMAGE_DIRS.get(
            split, "train_images")
        images, captions = _textcaps_entries(Path(source), entries, folder, image_where)
        if not images:
            raise DatasetError(f"{source}: the 'data' list is empty")
        check_some_exist([r["path"] for r in images], source, folder)
        pending.append((split, images, captions))
    splits = [s for s, _, _ in pending]
    if len(set(splits)) != len(splits):
        raise DatasetError(f"two annotation files are the same split ({', '.join(splits)})")
    for split, images, captions in pending:  # written only once every file has been read without error
        written += write_splits(out_dir, {split: images}, "images")
        written += write_splits(out_dir, {split: captions}, "captions")
    return written


def _textcaps_split(source: Path, data: dict[str, Any]) -> str:
    declared = data.get("dataset_type")
    if isinstance(declared, str) and declared.strip():
        return declared.strip()
    found = _TEXTCAPS_SPLIT.search(source.stem)
    return found.group(1) if found else source.stem


def _textcaps_entries(source: Path, entries: list[Any], folder: Path, image_where: dict[str, str],
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    images: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    caption_where: dict[str, int] = {}
    per_image: dict[str, int] = {}
    referenced: set[str] = set()  # images whose reference_strs were already used
    for k, entry in enumerate(entries):
        where = f"{source}: data[{k}]"
        image_id = entry.get("image_id") if isinstance(entry, dict) else None
        if not isinstance(image_id, str) or not image_id.strip():
            raise DatasetError(f"{where} has no 'image_id'")
        if image_id not in per_image:
            if image_id in image_where:
                raise DatasetError(f"{where}: image {image_id} is already listed in {image_where[image_id]}")
            image_where[image_id] = str(source)
            per_image[image_id] = 0
            images.append({"id": image_id, "path": os.path.abspath(folder / f"{image_id}.jpg")})
        texts: list[tuple[str | None, str]] = []
        caption, references = entry.get("caption_str"), entry.get("reference_strs")
        if caption is not None:
            if not isinstance(caption, str):
                raise DatasetError(f"{where} ({image_id}): 'caption_str' must be a string")
            caption_id = entry.get("caption_id")
            texts.append((None if caption_id is None else str(caption_id), caption))
        elif references is not None and image_id not in referenced:
            if not isinstance(references, list) or not all(isinstance(r, str) for r in references):
                raise DatasetError(f"{where} ({image_id}): 'reference_strs' must be a list of strings")
            referenced.add(image_id)
            texts += [(None, r) for r in references]
        for caption_id, text in texts:
            n = per_image[image_id]
            per_image[image_id] = n + 1
            caption_id = caption_id if caption_id is not None else f"{image_id}_{n}"
            if caption_id in caption_where:
                raise DatasetError(f"{where} repeats caption id {caption_id} (first at data[{caption_where[caption_id]}])")
            caption_where[caption_id] = k
            captions.append({"id": caption_id, "text": text.strip(), "ref": image_id})
    return images, captions


# ---- Oxford-IIIT Pets (37 cat and dog breeds) ----------------------------------------------------------------------
PETS_SPLITS = ("trainval", "test")
_PETS_NAME = re.compile(r"^(.+)_(\d+)$")
_PETS_SPECIES = {1: "cat", 2: "dog"}


def oxford_pets_to_manifests(source: PathLike, out_dir: PathLike, label: str = "breed") -> list[str]:
    """Oxford-IIIT Pets ``annotations/trainval.txt`` and ``annotations/test.txt`` + ``images/*.jpg`` ->
    ``trainval.jsonl``, ``test.jsonl`` and ``classes.txt``.

    Lines are ``Image CLASS-ID SPECIES BREED-ID`` (``Abyssinian_100 1 1 1``; ``#`` starts a comment line). Item id =
    the image name, path ``images/<name>.jpg``; ``label`` = the class name, i.e. the image name without its trailing
    ``_N`` (``Abyssinian``, ``american_bulldog``), or with ``label="species"`` ``cat`` / ``dog`` (SPECIES 1 / 2).
    ``classes.txt`` lists the labels in CLASS-ID order (``cat``, ``dog`` for species). ``source`` is the folder
    holding ``images/`` and ``annotations/``.
    """
    if label not in ("breed", "species"):
        raise DatasetError(f"label must be 'breed' or 'species', not {label!r}")
    root = require_dir(source, "Oxford-IIIT Pets folder")
    images_dir = root / "images"
    class_of: dict[int, tuple[str, str]] = {}  # CLASS-ID -> (name, where first seen)
    splits: dict[str, list[dict[str, Any]]] = {}
    for split in PETS_SPLITS:
        path = root / "annotations" / f"{split}.txt"
        if path.is_file():
            splits[split] = _read_pets(path, images_dir, label, class_of)
    if not splits:
        raise DatasetError(f"{root}: no annotations/trainval.txt or annotations/test.txt (is this the Oxford-IIIT "
                           "Pets folder, with annotations.tar.gz extracted in it?)")
    check_some_exist([r["path"] for records in splits.values() for r in records], root / "annotations", images_dir)
    classes = (list(_PETS_SPECIES.values()) if label == "species"
               else [class_of[k][0] for k in sorted(class_of)])
    written = write_splits(out_dir, splits)
    classes_path = Path(out_dir) / "classes.txt"
    write_text_file(classes_path, "".join(f"{name}\n" for name in classes))
    return [*written, str(classes_path)]


def _read_pets(path: Path, images_dir: Path, label: str, class_of: dict[int, tuple[str, str]],
               ) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(read_text_lines(path), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{lineno}"
        fields = line.split()
        if len(fields) != 4 or not all(f.isdigit() for f in fields[1:]):
            raise DatasetError(f"{where}: expected 'IMAGE CLASS-ID SPECIES BREED-ID' (four fields, three integers), "
                               f"got {line.strip()[:60]!r}")
        name, class_id, species = fields[0], int(fields[1]), int(fields[2])
        found = _PETS_NAME.match(name)
        if not found:
            raise DatasetError(f"{where}: image name {name!r} does not end in _N (expected e.g. 'Abyssinian_100')")
        if species not in _PETS_SPECIES:
            raise DatasetError(f"{where}: SPECIES must be 1 (cat) or 2 (dog), got {species}")
        breed = found.group(1)
        known = class_of.setdefault(class_id, (breed, where))
        if known[0] != breed:
            raise DatasetError(f"{where}: CLASS-ID {class_id} is {breed!r} here but {known[0]!r} at {known[1]}")
        if name in seen:
            raise DatasetError(f"{where}: image {name} already listed at line {seen[name]}")
        seen[name] = lineno
        records.append({"id": name, "path": os.path.abspath(images_dir / f"{name}.jpg"),
                        "label": _PETS_SPECIES[species] if label == "species" else breed})
    if not records:
        raise DatasetError(f"{path}: no image lines")
    return records


# ---- Caltech-101 (class folders, no official split) ----------------------------------------------------------------
CALTECH_BACKGROUND = "BACKGROUND_Google"


def caltech101_to_manifests(source: PathLike, out_dir: PathLike, per_class_train: int | None = None,
                            per_class_test: int | None = None, seed: int = 0, keep_background: bool = False,
                            ) -> list[str]:
    """Caltech-101 ``101_ObjectCategories/<class>/image_NNNN.jpg`` -> ``all.jsonl`` (the dataset has no official
    split), or with ``per_class_train`` N ``train.jsonl`` + ``test.jsonl``, plus ``classes.txt``.

    Item id = ``<class>/<file name without extension>``, ``label`` = class folder. ``BACKGROUND_Google`` (clutter,
    not a class) is left out unless ``keep_background``. The split is deterministic and independent of file system
    order: within each class the images are ranked by the SHA-256 hex digest of ``"{seed}:{item id}"``; the first N
    go to train, the rest (at most ``per_class_test`` of them, when given) to test. Each manifest lists its items in
    class, then file-name order. A class with N images or fewer is an error (it would have no test image).
    ``source`` is ``101_ObjectCategories`` or a folder holding it (also as ``caltech-101/101_ObjectCategories``).
    """
    if per_class_test is not None and per_class_train is None:
        raise DatasetError("--per-class-test needs --per-class-train (the test images are those not in train)")
    for flag, value in (("--per-class-train", per_class_train), ("--per-class-test", per_class_test)):
        if value is not None and value < 1:
            raise DatasetError(f"{flag} must be at least 1, not {value}")
    root = require_dir(source, "Caltech-101 folder")
    for candidate in (root / "101_ObjectCategories", root / "caltech-101" / "101_ObjectCategories"):
        if candidate.is_dir():
            root = candidate
            break
    by_class: dict[str, list[dict[str, Any]]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name == CALTECH_BACKGROUND and not keep_background:
            continue
        records = [{"id": f"{folder.name}/{path.relative_to(folder).with_suffix('').as_posix()}",
                    "path": str(path.resolve()), "label": folder.name}
                   for path in files_with(folder, IMAGE_EXTENSIONS)]
        if records:
            by_class[folder.name] = records
    if not by_class:
        raise DatasetError(f"{root}: no <class>/*.jpg images (is this Caltech-101's 101_ObjectCategories folder?)")
    if per_class_train is None:
        splits = {"all": [r for records in by_class.values() for r in records]}
    else:
        splits = {"train": [], "test": []}
        for name, records in by_class.items():
            if len(records) <= per_class_train:
                raise DatasetError(f"{root / name}: {len(records)} images, so --per-class-train {per_class_train} "
                                   "leaves none for test")
            ranked = sorted(range(len(records)), key=lambda i: hashlib.sha256(
                f"{seed}:{records[i]['id']}".encode()).hexdigest())
            train = set(ranked[:per_class_train])
            test = set(ranked[per_class_train:(per_class_train + per_class_test) if per_class_test else None])
            splits["train"] += [r for i, r in enumerate(records) if i in train]
            splits["test"] += [r for i, r in enumerate(records) if i in test]
    written = write_splits(out_dir, splits)
    classes_path = Path(out_dir) / "classes.txt"
    write_text_file(classes_path, "".join(f"{name}\n" for name in by_class))
    return [*written, str(classes_path)]


# ---- Tiny ImageNet (200 ImageNet classes at 64x64) -----------------------------------------------------------------
_WNID = re.compile(r"^n\d{8}$")


def tiny_imagenet_to_manifests(source: PathLike, out_dir: PathLike, label_names: bool = False) -> list[str]:
    """Tiny ImageNet ``tiny-imagenet-200/`` -> ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` (unlabelled) and
    ``classes.txt``.

    Reads ``wnids.txt`` (the 200 classes), ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` labelled by
    ``val/val_annotations.txt`` (tab-separated ``file, wnid, x0, y0, x1, y1``) and ``test/images/*.JPEG``. Item id =
    file name without extension (``n01443537_0``, ``val_0``, ``test_0``); ``label`` = the wnid, or with
    ``label_names`` its name from ``words.txt``: the first synonym (``goldfish``), the whole entry where two classes
    share a first synonym, and the entry followed by `` (wnid)`` where even those are equal, so names are unique.
    ``classes.txt`` lists the labels in ``wnids.txt`` order. ``source`` is ``tiny-imagenet-200`` or its parent.
    """
    root = require_dir(source, "Tiny ImageNet folder")
    if not (root / "wnids.txt").is_file() and (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    wnids = _read_wnids(require_file(root / "wnids.txt", "wnids.txt (the class list)"))
    names = _wnid_names(require_file(root / "words.txt", "words.txt (class names)"), wnids) if label_names else {
        w: w for w in wnids}
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
    train = require_dir(root / "train", "train folder")
    extra = sorted(p.name for p in train.iterdir() if p.is_dir() and p.name not in names)
    if extra:
        raise DatasetError(f"{train}: class folder {extra[0]} is not in {root / 'wnids.txt'}")
    for wnid in wnids:
        folder = require_dir(train / wnid / "images", f"training images of {wnid}")
        splits["train"] += [{"id": p.stem, "path": str(p.resolve()), "label": names[wnid]}
                            for p in files_with(folder, IMAGE_EXTENSIONS)]
    val_dir = root / "val"
    annotations = val_dir / "val_annotations.txt"
    if annotations.is_file():
        splits["val"] = _read_tiny_val(annotations, val_dir / "images", names)
        check_some_exist([r["path"] for r in splits["val"]], annotations, val_dir / "images")
    if (root / "test" / "images").is_dir():
        splits["test"] = [{"id": p.stem, "path": str(p.resolve())}
                          for p in files_with(root / "test" / "images", IMAGE_EXTENSIONS)]
    if not splits["train"]:
        raise DatasetError(f"{train}: no images under <wnid>/images/")
    written = write_splits(out_dir, splits)
    classes_path = Path(out_dir) / "classes.txt"
    write_text_file(classes_path, "".join(f"{names[w]}\n" for w in wnids))
    return [*written, str(classes_path)]


def _read_wnids(path: Path) -> list[str]:
    wnids: dict[str, int] = {}
    for lineno, line in enumerate(read_text_lines(path), start=1):
        wnid = line.strip()
        if not wnid:
            continue
        if not _WNID.match(wnid):
            raise DatasetError(f"{path}:{lineno}: expected a WordNet id like 'n01443537', got {wnid[:60]!r}")
        if wnid in wnids:
            raise DatasetError(f"{path}:{lineno}: {wnid} already listed at line {wnids[wnid]}")
        wnids[wnid] = lineno
    if not wnids:
        raise DatasetError(f"{path}: no class ids")
    return list(wnids)


def _wnid_names(path: Path, wnids: list[str]) -> dict[str, str]:
    """Unique class names for ``wnids`` from ``words.txt`` (``wnid<TAB>name, synonym, ...`` per line)."""
    wanted, entries = set(wnids), {}
    for lineno, line in enumerate(read_text_lines(path), start=1):
        if not line.strip():
            continue
        wnid, tab, entry = line.partition("\t")
        if not tab or not entry.strip():
            raise DatasetError(f"{path}:{lineno}: expected 'WNID<TAB>NAME', got {line[:60]!r}")
        if wnid.strip() in wanted:
            entries[wnid.strip()] = " ".join(entry.split())
    missing = [w for w in wnids if w not in entries]
    if missing:
        raise DatasetError(f"{path}: no name for {len(missing)} class(es) of wnids.txt, e.g. {missing[0]}")
    names = {w: entries[w].split(",")[0].strip() for w in wnids}
    counts = Counter(names.values())
    names = {w: n if counts[n] == 1 else entries[w] for w, n in names.items()}
    counts = Counter(names.values())
    return {w: n if counts[n] == 1 else f"{n} ({w})" for w, n in names.items()}


def _read_tiny_val(path: Path, images_dir: Path, names: dict[str, str]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(read_text_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip():
            raise DatasetError(f"{path}:{lineno}: expected 'FILE<TAB>WNID<TAB>x0<TAB>y0<TAB>x1<TAB>y1', "
                               f"got {line[:60]!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in names:
            raise DatasetError(f"{path}:{lineno}: class {wnid!r} is not in wnids.txt")
        if name in seen:
            raise DatasetError(f"{path}:{lineno}: {name} already listed at line {seen[name]}")
        seen[name] = lineno
        records.append({"id": os.path.splitext(name)[0], "path": os.path.abspath(images_dir / name),
                        "label": names[wnid]})
    if not records:
        raise DatasetError(f"{path}: no lines")
    return records
