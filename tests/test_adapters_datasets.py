"""Dataset adapters: tiny copies of each dataset in its real on-disk layout become manifests that read back right.

Half the adapters run through the CLI in a subprocess, the rest through their Python functions.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from conftest import first_codec, gray_frame, run_cli, sine, write_audio_file, write_video_file
from PIL import Image

from extract.adapters import (
    DatasetError,
    caltech101_to_manifests,
    cifar_to_manifests,
    esc50_to_manifests,
    gtzan_to_manifests,
    librispeech_to_manifests,
    lsmdc_to_manifests,
    msrvtt_to_manifests,
    msvd_to_manifests,
    oxford_pets_to_manifests,
    text_classification_to_manifests,
    textcaps_to_manifests,
    tiny_imagenet_to_manifests,
    urbansound8k_to_manifests,
)
from extract.manifest import read_manifest

cli = run_cli


def _wav(path: Path, freq: float = 440.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_audio_file(path, sine(0.05, 8000, freq), 8000, "pcm_s16le")


def _summary(manifest: Path) -> list[tuple]:
    """(id, label, ref, text) of every item, checking each media path exists."""
    items = read_manifest(manifest)
    for item in items:
        assert item.path is None or Path(item.path).is_file(), item
    return [(it.id, it.label, it.ref, it.text) for it in items]


# ---- images ------------------------------------------------------------------------------------------------------
def test_flickr30k_karpathy_json_through_the_cli(tmp_path: Path) -> None:
    images = tmp_path / "flickr30k-images"
    images.mkdir()
    for name in ("100.jpg", "200.jpg", "300.jpg"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(images / name)
    karpathy = {"dataset": "flickr30k", "images": [
        {"filename": "100.jpg", "imgid": 0, "split": "train", "sentids": [0, 1], "sentences": [
            {"raw": "A dog runs.", "sentid": 0, "tokens": ["a", "dog", "runs"]},
            {"raw": " Two dogs play . ", "sentid": 1, "tokens": ["two", "dogs", "play"]}]},
        {"filename": "200.jpg", "imgid": 1, "split": "test", "sentences": [{"raw": "A cat.", "sentid": 2}]},
        {"filename": "300.jpg", "imgid": 2, "split": "train", "sentences": [{"raw": "A bird.", "sentid": 3}]},
    ]}
    source = tmp_path / "dataset_flickr30k.json"
    source.write_text(json.dumps(karpathy))
    out = tmp_path / "manifests"
    printed = cli("manifest", "flickr30k", source, "--images", images, "--out", out).stdout.split()
    assert sorted(Path(p).name for p in printed) == ["test.captions.jsonl", "test.images.jsonl",
                                                      "train.captions.jsonl", "train.images.jsonl"]
    assert _summary(out / "train.images.jsonl") == [("100", None, None, None), ("300", None, None, None)]
    assert _summary(out / "train.captions.jsonl") == [
        ("0", None, "100", "A dog runs."), ("1", None, "100", "Two dogs play ."), ("3", None, "300", "A bird.")]
    assert _summary(out / "test.captions.jsonl") == [("2", None, "200", "A cat.")]
    # paths are relative to the manifest folder, so the two folders can move together
    assert json.loads((out / "test.images.jsonl").read_text())["path"] == "../flickr30k-images/200.jpg"

    karpathy["images"][1].pop("split")
    source.write_text(json.dumps(karpathy))
    bad = cli("manifest", "flickr30k", source, "--images", images, "--out", out, ok=False)
    assert bad.returncode == 1 and "images[1] (200.jpg): missing 'split'" in bad.stderr
    assert "Traceback" not in bad.stderr


def _cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def _pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))  # the real files are Python 2 pickles (protocol 2)


def test_cifar10_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    names = [b"airplane", b"automobile", b"bird"]
    _pickle(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 2, b"num_vis": 3072})
    batches = {}
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = _cifar_rows(2, k)
        batches[name] = data
        _pickle(folder / name, {b"batch_label": name.encode(), b"labels": [k % 3, 2], b"data": data,
                                b"filenames": [b"a.png", b"b.png"]})
    out = tmp_path / "cifar"
    cifar_to_manifests(tmp_path, out, variant="cifar10")  # the folder holding cifar-10-batches-py also works
    train, test = read_manifest(out / "train.jsonl"), read_manifest(out / "test.jsonl")
    assert [it.id for it in train] == [f"train-{i:05d}" for i in range(10)]
    assert [it.label for it in train[:4]] == ["airplane", "bird", "automobile", "bird"]
    assert [(it.id, it.label) for it in test] == [("test-00000", "bird"), ("test-00001", "bird")]
    assert (out / "classes.txt").read_text().split() == ["airplane", "automobile", "bird"]
    # pixel-exact: row = 1024 red, 1024 green, 1024 blue values
    third = np.asarray(Image.open(train[2].path))
    assert third.shape == (32, 32, 3)
    assert np.array_equal(third, batches["data_batch_2"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert np.array_equal(third[0, 1], batches["data_batch_2"][0][[1, 1025, 2049]])

    with pytest.raises(DatasetError, match="holds cifar10, not cifar100"):
        cifar_to_manifests(folder, out, variant="cifar100")


def test_cifar100_coarse_labels_and_malformed_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    _pickle(folder / "meta", {b"fine_label_names": [b"apple", b"bee", b"cup"], b"coarse_label_names": [b"fruit",
                                                                                                      b"insect"]})
    for name, n in (("train", 3), ("test", 1)):
        _pickle(folder / name, {b"data": _cifar_rows(n, n), b"fine_labels": [2, 0, 1][:n],
                                b"coarse_labels": [0, 0, 1][:n], b"filenames": [b"x.png"] * n})
    out = tmp_path / "out"
    cifar_to_manifests(folder, out, label="coarse")
    assert [it.label for it in read_manifest(out / "train.jsonl")] == ["fruit", "fruit", "insect"]
    assert (out / "classes.txt").read_text().split() == ["fruit", "insect"]
    cifar_to_manifests(folder, out)
    assert [it.label for it in read_manifest(out / "train.jsonl")] == ["cup", "apple", "bee"]

    _pickle(folder / "test", {b"data": _cifar_rows(2, 0), b"coarse_labels": [0, 1]})
    with pytest.raises(DatasetError, match=r"test: batch has no 'fine_labels' entry"):
        cifar_to_manifests(folder, out)
    _pickle(folder / "test", {b"data": _cifar_rows(2, 0), b"fine_labels": [0, 7]})
    with pytest.raises(DatasetError, match=r"row 1 has label 7, outside the 3 classes"):
        cifar_to_manifests(folder, out)
    _pickle(folder / "test", {b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]})
    with pytest.raises(DatasetError, match=r"'data' must be uint8 of shape \(N, 3072\)"):
        cifar_to_manifests(folder, out)
    # a pickle can run code: only the globals a CIFAR batch needs are loaded
    _pickle(folder / "test", {b"data": OrderedDict(), b"fine_labels": []})
    with pytest.raises(DatasetError, match=r"refusing to load collections.OrderedDict"):
        cifar_to_manifests(folder, out)



def _jpg(path: Path, color: tuple[int, int, int] = (200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def test_textcaps_caption_entries_references_and_test_images(tmp_path: Path) -> None:
    for image_id in ("011e7e629fb9ae7b", "0a2a0d6e0e4c35a2", "1f4e3b6d8f0a9c21"):
        _jpg(tmp_path / "train_images" / f"{image_id}.jpg")
    _jpg(tmp_path / "test_images" / "2c5d1e0b7a3f4e68.jpg")
    refs = ["A sign reads STOP.", "a red stop sign", "Stop sign on a pole", "the sign says stop", "a stop sign"]
    common = {"image_classes": ["Sign"], "image_width": 1024, "image_height": 768, "set_name": "train"}
    train = {"dataset_type": "train", "dataset_name": "textcaps", "dataset_version": "0.1", "data": [
        {**common, "image_id": "011e7e629fb9ae7b", "image_path": "train/011e7e629fb9ae7b.jpg", "caption_id": 7,
         "caption_str": refs[0], "caption_tokens": ["a", "sign"], "reference_strs": refs},
        {**common, "image_id": "011e7e629fb9ae7b", "caption_id": 8, "caption_str": " a red stop sign ",
         "reference_strs": refs},
        # an entry without caption_str (a copy reduced to one entry per image) gives its image's reference_strs
        {**common, "image_id": "0a2a0d6e0e4c35a2", "reference_strs": ["a bottle of Coke", "a coca cola bottle"]}]}
    val = {"dataset_type": "val", "data": [{"image_id": "1f4e3b6d8f0a9c21", "caption_id": 90, "caption_str": "a clock",
                                            "reference_strs": ["a clock"]}]}
    test = {"dataset_type": "test", "data": [{"image_id": "2c5d1e0b7a3f4e68", "image_classes": ["Clock"]}]}
    files = []
    for name, data in (("train", train), ("val", val), ("test", test)):
        files.append(tmp_path / f"TextCaps_0.1_{name}.json")
        files[-1].write_text(json.dumps(data))
    out = tmp_path / "out"
    written = textcaps_to_manifests(files, out)
    assert [Path(p).name for p in written] == ["train.images.jsonl", "train.captions.jsonl", "val.images.jsonl",
                                               "val.captions.jsonl", "test.images.jsonl"]  # test: no captions
    assert _summary(out / "train.images.jsonl") == [("011e7e629fb9ae7b", None, None, None),
                                                    ("0a2a0d6e0e4c35a2", None, None, None)]
    assert _summary(out / "train.captions.jsonl") == [
        ("7", None, "011e7e629fb9ae7b", "A sign reads STOP."), ("8", None, "011e7e629fb9ae7b", "a red stop sign"),
        ("0a2a0d6e0e4c35a2_0", None, "0a2a0d6e0e4c35a2", "a bottle of Coke"),
        ("0a2a0d6e0e4c35a2_1", None, "0a2a0d6e0e4c35a2", "a coca cola bottle")]
    assert _summary(out / "val.captions.jsonl") == [("90", None, "1f4e3b6d8f0a9c21", "a clock")]
    assert json.loads((out / "test.images.jsonl").read_text())["path"] == "../test_images/2c5d1e0b7a3f4e68.jpg"

    train["data"][1]["caption_id"] = 7
    files[0].write_text(json.dumps(train))
    with pytest.raises(DatasetError, match=r"TextCaps_0\.1_train\.json: data\[1\] repeats caption id 7"):
        textcaps_to_manifests(files[:1], out)
    train["data"][1] = {"caption_str": "no image"}
    files[0].write_text(json.dumps(train))
    with pytest.raises(DatasetError, match=r"data\[1\] has no 'image_id'"):
        textcaps_to_manifests(files[:1], out)
    with pytest.raises(DatasetError, match=r"none of the 1 media files it lists exist"):
        textcaps_to_manifests(files[1:2], out, images_dir=tmp_path / "test_images")


def test_oxford_pets_breeds_species_and_malformed_lines(tmp_path: Path) -> None:
    root = tmp_path / "oxford-iiit-pet"
    for name in ("Abyssinian_100", "Abyssinian_101", "american_bulldog_10", "american_bulldog_11", "Bengal_3"):
        _jpg(root / "images" / f"{name}.jpg")
    (root / "annotations").mkdir()
    (root / "annotations" / "trainval.txt").write_text(
        "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\nAbyssinian_100 1 1 1\namerican_bulldog_10 2 2 1\n"
        "Abyssinian_101 1 1 1\n")
    (root / "annotations" / "test.txt").write_text("american_bulldog_11 2 2 1\nBengal_3 6 1 2\n")
    out = tmp_path / "out"
    written = oxford_pets_to_manifests(root, out)
    assert [Path(p).name for p in written] == ["trainval.jsonl", "test.jsonl", "classes.txt"]
    assert _summary(out / "trainval.jsonl") == [("Abyssinian_100", "Abyssinian", None, None),
                                                ("american_bulldog_10", "american_bulldog", None, None),
                                                ("Abyssinian_101", "Abyssinian", None, None)]
    assert (out / "classes.txt").read_text().splitlines() == ["Abyssinian", "american_bulldog", "Bengal"]  # by id
    oxford_pets_to_manifests(root, out, label="species")
    assert [i[1] for i in _summary(out / "test.jsonl")] == ["dog", "cat"]
    assert (out / "classes.txt").read_text().splitlines() == ["cat", "dog"]

    (root / "annotations" / "test.txt").write_text("american_bulldog_11 2 2 1\nBengal_3 1 1 2\n")
    with pytest.raises(DatasetError, match=r"test\.txt:2: CLASS-ID 1 is 'Bengal' here but 'Abyssinian' at "
                                           r".*trainval\.txt:3"):
        oxford_pets_to_manifests(root, out)
    (root / "annotations" / "test.txt").write_text("american_bulldog_11 2 dog 1\n")
    with pytest.raises(DatasetError, match=r"test\.txt:1: expected 'IMAGE CLASS-ID SPECIES BREED-ID'"):
        oxford_pets_to_manifests(root, out)


def test_caltech101_all_and_per_class_split_through_the_cli(tmp_path: Path) -> None:
    root = tmp_path / "caltech-101" / "101_ObjectCategories"
    counts = {"accordion": 4, "airplanes": 5, "BACKGROUND_Google": 2}
    for name, n in counts.items():
        for k in range(1, n + 1):
            _jpg(root / name / f"image_{k:04d}.jpg")
    out = tmp_path / "all"
    caltech101_to_manifests(tmp_path, out)  # the folder holding caltech-101/101_ObjectCategories also works
    everything = _summary(out / "all.jsonl")
    assert [i[0] for i in everything[:2]] == ["accordion/image_0001", "accordion/image_0002"]
    assert {i[1] for i in everything} == {"accordion", "airplanes"} and len(everything) == 9  # no background
    assert (out / "classes.txt").read_text().split() == ["accordion", "airplanes"]
    caltech101_to_manifests(root, out, keep_background=True)
    assert len(read_manifest(out / "all.jsonl")) == 11

    split = tmp_path / "split"
    cli("manifest", "caltech101", root, "--out", split, "--per-class-train", 2, "--per-class-test", 2, "--seed", 3)
    train, test = _summary(split / "train.jsonl"), _summary(split / "test.jsonl")
    for name, n in (("accordion", 4), ("airplanes", 5)):
        ids = [f"{name}/image_{k:04d}" for k in range(1, n + 1)]
        # the documented rule: rank a class's ids by sha256("{seed}:{id}"), the first N train, the next M test
        ranked = sorted(ids, key=lambda i: hashlib.sha256(f"3:{i}".encode()).hexdigest())
        assert [i[0] for i in train if i[1] == name] == sorted(ranked[:2])
        assert [i[0] for i in test if i[1] == name] == sorted(ranked[2:4])
    with pytest.raises(DatasetError, match=r"accordion: 4 images, so --per-class-train 4 leaves none for test"):
        caltech101_to_manifests(root, out, per_class_train=4)


def test_tiny_imagenet_wnids_val_annotations_and_unique_names(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n02012849", "n03126707", "n03710637", "n03710721"]
    root.mkdir()
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (root / "words.txt").write_text(
        "n00001740\tentity\nn01443537\tgoldfish, Carassius auratus\nn02012849\tcrane\nn03126707\tcrane\n"
        "n03710637\tmaillot\nn03710721\tmaillot, tank suit\n")
    for w in wnids:
        _jpg(root / "train" / w / "images" / f"{w}_0.JPEG")
        (root / "train" / w / f"{w}_boxes.txt").write_text(f"{w}_0.JPEG\t0\t0\t63\t63\n")
    _jpg(root / "val" / "images" / "val_0.JPEG")
    _jpg(root / "val" / "images" / "val_1.JPEG")
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn03126707\t0\t32\t44\t62\n"
                                                     "val_1.JPEG\tn01443537\t52\t37\t57\t63\n")
    _jpg(root / "test" / "images" / "test_0.JPEG")
    out = tmp_path / "out"
    written = tiny_imagenet_to_manifests(tmp_path, out)  # the parent folder also works
    assert [Path(p).name for p in written] == ["train.jsonl", "val.jsonl", "test.jsonl", "classes.txt"]
    assert _summary(out / "train.jsonl")[0] == ("n01443537_0", "n01443537", None, None)
    assert _summary(out / "val.jsonl") == [("val_0", "n03126707", None, None), ("val_1", "n01443537", None, None)]
    assert _summary(out / "test.jsonl") == [("test_0", None, None, None)]
    assert (out / "classes.txt").read_text().splitlines() == wnids

    tiny_imagenet_to_manifests(root, out, label_names=True)
    names = ["goldfish", "crane (n02012849)", "crane (n03126707)", "maillot", "maillot, tank suit"]
    assert (out / "classes.txt").read_text().splitlines() == names  # unique, as zero-shot needs
    assert [i[1] for i in _summary(out / "val.jsonl")] == ["crane (n03126707)", "goldfish"]

    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn03126707\t0\t32\t44\t62\n"
                                                     "val_1.JPEG\tn09999999\t52\t37\t57\t63\n")
    with pytest.raises(DatasetError, match=r"val_annotations\.txt:2: class 'n09999999' is not in wnids\.txt"):
        tiny_imagenet_to_manifests(root, out)
    (root / "wnids.txt").write_text("n01443537\ngoldfish\n")
    with pytest.raises(DatasetError, match=r"wnids\.txt:2: expected a WordNet id like 'n01443537', got 'goldfish'"):
        tiny_imagenet_to_manifests(root, out)


# ---- audio -------------------------------------------------------------------------------------------------------
def _librispeech(root: Path, subset: str, speaker: str, chapter: str, lines: list[str]) -> Path:
    folder = root / "LibriSpeech" / subset / speaker / chapter
    folder.mkdir(parents=True)
    trans = folder / f"{speaker}-{chapter}.trans.txt"
    trans.write_text("".join(f"{line}\n" for line in lines))
    for line in lines:
        write_audio_file(folder / f"{line.split()[0]}.flac", sine(0.05, 16000), 16000, first_codec("flac"))
    return trans


def test_librispeech_audio_and_transcripts(tmp_path: Path) -> None:
    _librispeech(tmp_path, "dev-clean", "84", "121123", ["84-121123-0000 GO DO YOU HEAR", "84-121123-0001 BUT IN LESS"])
    _librispeech(tmp_path, "dev-clean", "174", "50561", ["174-50561-0000 FORGOTTEN TOO"])
    _librispeech(tmp_path, "test-clean", "61", "70968", ["61-70968-0000 HE BEGAN A CONFUSED COMPLAINT"])
    out = tmp_path / "manifests"
    written = librispeech_to_manifests(tmp_path / "LibriSpeech", out, lowercase=True)
    assert [Path(p).name for p in written] == ["dev-clean.audio.jsonl", "dev-clean.transcripts.jsonl",
                                               "test-clean.audio.jsonl", "test-clean.transcripts.jsonl"]
    assert _summary(out / "dev-clean.audio.jsonl") == [
        ("174-50561-0000", "174", None, None), ("84-121123-0000", "84", None, None),
        ("84-121123-0001", "84", None, None)]
    assert _summary(out / "dev-clean.transcripts.jsonl") == [
        ("174-50561-0000", None, "174-50561-0000", "forgotten too"),
        ("84-121123-0000", None, "84-121123-0000", "go do you hear"),
        ("84-121123-0001", None, "84-121123-0001", "but in less")]
    # one subset folder: the split is its name
    only = librispeech_to_manifests(tmp_path / "LibriSpeech" / "test-clean", tmp_path / "one")
    assert [Path(p).name for p in only] == ["test-clean.audio.jsonl", "test-clean.transcripts.jsonl"]
    assert _summary(tmp_path / "one" / "test-clean.transcripts.jsonl")[0][3] == "HE BEGAN A CONFUSED COMPLAINT"

    trans = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123" / "84-121123.trans.txt"
    trans.write_text("84-121123-0000 GO DO YOU HEAR\n84-121123-0002 NO SUCH FILE\n")
    with pytest.raises(DatasetError, match=r"84-121123\.trans\.txt:2: no audio file 84-121123-0002\.flac"):
        librispeech_to_manifests(tmp_path / "LibriSpeech", out)
    trans.write_text("84-121123-0000\n")
    with pytest.raises(DatasetError, match=r"84-121123\.trans\.txt:1: expected '84-121123-NNNN TRANSCRIPT'"):
        librispeech_to_manifests(tmp_path / "LibriSpeech", out)


ESC50_HEADER = "filename,fold,target,category,esc10,src_file,take\n"


def test_esc50_folds_through_the_cli_and_python(tmp_path: Path) -> None:
    root = tmp_path / "ESC-50-master"
    rows = [("1-100032-A-0.wav", 1, 0, "dog", "True"), ("1-100038-A-14.wav", 1, 14, "chirping_birds", "False"),
            ("2-100648-A-43.wav", 2, 43, "chainsaw", "False")]
    for name, *_ in rows:
        _wav(root / "audio" / name)
    (root / "meta").mkdir()
    (root / "meta" / "esc50.csv").write_text(
        ESC50_HEADER + "".join(f"{n},{f},{t},{c},{e},{n[2:8]},A\n" for n, f, t, c, e in rows))
    out = tmp_path / "esc"
    esc50_to_manifests(root, out)
    assert sorted(p.name for p in out.iterdir()) == ["fold1.jsonl", "fold2.jsonl"]
    assert _summary(out / "fold1.jsonl") == [("1-100032-A-0", "dog", None, None),
                                             ("1-100038-A-14", "chirping_birds", None, None)]
    split = tmp_path / "split"
    cli("manifest", "esc50", root, "--out", split, "--test-fold", "2")
    assert [i[0] for i in _summary(split / "train.jsonl")] == ["1-100032-A-0", "1-100038-A-14"]
    assert _summary(split / "test.jsonl") == [("2-100648-A-43", "chainsaw", None, None)]
    esc10 = tmp_path / "esc10"
    esc50_to_manifests(root / "meta" / "esc50.csv", esc10, esc10=True)  # the CSV itself also works
    assert _summary(esc10 / "fold1.jsonl") == [("1-100032-A-0", "dog", None, None)]

    (root / "meta" / "esc50.csv").write_text(ESC50_HEADER + "1-100032-A-0.wav,1,0,dog,True,x,A\n"
                                                            "1-100038-A-14.wav,one,14,chirping_birds,False,x,A\n")
    with pytest.raises(DatasetError, match=r"esc50\.csv:3: 'fold' must be an integer, got 'one'"):
        esc50_to_manifests(root, out)
    (root / "meta" / "esc50.csv").write_text("name,fold\nx.wav,1\n")
    with pytest.raises(DatasetError, match=r"esc50\.csv:1: header has no column 'filename', 'category'"):
        esc50_to_manifests(root, out)


def test_urbansound8k_folds(tmp_path: Path) -> None:
    root = tmp_path / "UrbanSound8K"
    rows = [("100032-3-0-0.wav", 1, 3, "dog_bark"), ("100263-2-0-117.wav", 5, 2, "children_playing"),
            ("101415-3-0-2.wav", 1, 3, "dog_bark")]
    for name, fold, *_ in rows:
        _wav(root / "audio" / f"fold{fold}" / name)
    (root / "metadata").mkdir()
    (root / "metadata" / "UrbanSound8K.csv").write_text(
        "slice_file_name,fsID,start,end,salience,fold,classID,class\n"
        + "".join(f"{n},{n.split('-')[0]},0.0,0.3,1,{f},{c},{k}\n" for n, f, c, k in rows))
    out = tmp_path / "us8k"
    written = urbansound8k_to_manifests(root, out, test_fold=5)
    assert [Path(p).name for p in written] == ["train.jsonl", "test.jsonl"]
    assert _summary(out / "train.jsonl") == [("100032-3-0-0", "dog_bark", None, None),
                                             ("101415-3-0-2", "dog_bark", None, None)]
    test = read_manifest(out / "test.jsonl")
    assert test[0].label == "children_playing" and Path(test[0].path).parent.name == "fold5"
    with pytest.raises(DatasetError, match="no fold 7"):
        urbansound8k_to_manifests(root, out, test_fold=7)
    # every listed file missing: the audio folder is wrong, say so instead of writing useless manifests
    (root / "audio").rename(root / "elsewhere")
    with pytest.raises(DatasetError, match="none of the 3 media files it lists exist"):
        urbansound8k_to_manifests(root, out)


def test_gtzan_genre_folders(tmp_path: Path) -> None:
    for genre in ("jazz", "blues"):
        for k in range(2):
            _wav(tmp_path / "Data" / "genres_original" / genre / f"{genre}.0000{k}.wav", 300 + 100 * k)
    (tmp_path / "Data" / "genres_original" / "blues" / "README.txt").write_text("not audio")
    written = gtzan_to_manifests(tmp_path / "Data", tmp_path / "out")
    assert [Path(p).name for p in written] == ["all.jsonl"]
    assert _summary(tmp_path / "out" / "all.jsonl") == [
        ("blues.00000", "blues", None, None), ("blues.00001", "blues", None, None),
        ("jazz.00000", "jazz", None, None), ("jazz.00001", "jazz", None, None)]
    with pytest.raises(DatasetError, match="no <genre>/\\*.wav audio files"):
        gtzan_to_manifests(tmp_path / "Data" / "genres_original" / "blues", tmp_path / "x")


# ---- video -------------------------------------------------------------------------------------------------------
def test_msrvtt_annotations_and_videos(tmp_path: Path) -> None:
    codec = first_codec("libx264", "mpeg4")
    for folder, video in (("TrainValVideo", "video0"), ("TrainValVideo", "video1"), ("TestVideo", "video7010")):
        (tmp_path / "videos" / folder).mkdir(parents=True, exist_ok=True)
        write_video_file(tmp_path / "videos" / folder / f"{video}.mp4", [gray_frame(40), gray_frame(80)], codec)
    train_val = {"info": {"year": "2016"}, "videos": [
        {"category": 9, "url": "u", "video_id": "video0", "start time": 1.0, "end time": 2.0, "split": "train", "id": 0},
        {"category": 16, "url": "u", "video_id": "video1", "split": "validate", "id": 1}],
        "sentences": [{"caption": "a man drives a car", "video_id": "video0", "sen_id": 0},
                      {"caption": "a car on a road", "video_id": "video0", "sen_id": 1},
                      {"caption": "people sing", "video_id": "video1", "sen_id": 2}]}
    test = {"videos": [{"category": 3, "video_id": "video7010", "split": "test", "id": 7010}],
            "sentences": [{"caption": "a cartoon", "video_id": "video7010", "sen_id": 180000}]}
    (tmp_path / "train_val_videodatainfo.json").write_text(json.dumps(train_val))
    (tmp_path / "test_videodatainfo.json").write_text(json.dumps(test))
    out = tmp_path / "out"
    msrvtt_to_manifests([tmp_path / "train_val_videodatainfo.json", tmp_path / "test_videodatainfo.json"],
                        tmp_path / "videos", out)
    assert sorted(p.name for p in out.iterdir()) == [
        "test.captions.jsonl", "test.videos.jsonl", "train.captions.jsonl", "train.videos.jsonl",
        "validate.captions.jsonl", "validate.videos.jsonl"]
    assert _summary(out / "train.videos.jsonl") == [("video0", 9, None, None)]
    assert _summary(out / "train.captions.jsonl") == [("0", None, "video0", "a man drives a car"),
                                                      ("1", None, "video0", "a car on a road")]
    assert _summary(out / "test.captions.jsonl") == [("180000", None, "video7010", "a cartoon")]
    assert Path(read_manifest(out / "test.videos.jsonl")[0].path).parent.name == "TestVideo"

    test["sentences"].append({"caption": "orphan", "video_id": "video9"})
    (tmp_path / "test_videodatainfo.json").write_text(json.dumps(test))
    with pytest.raises(DatasetError, match=r"sentences\[1\] names video 'video9', which this file does not list"):
        msrvtt_to_manifests([tmp_path / "test_videodatainfo.json"], tmp_path / "videos", out)



def _clip(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_video_file(path, [gray_frame(40), gray_frame(80)], first_codec("mpeg4", "libx264"))


def test_msvd_descriptions_txt_csv_and_standard_split(tmp_path: Path) -> None:
    for clip in ("-4wsuPCjDBc_5_15", "zv2RIbUsnSw_335_341"):
        _clip(tmp_path / "YouTubeClips" / f"{clip}.avi")
    txt = tmp_path / "AllVideoDescriptions.txt"
    txt.write_text("# Microsoft Research Video Description Corpus\n# VideoID Description\n\n"
                   "-4wsuPCjDBc_5_15 a squirrel is eating a peanut in it's shell\n"
                   "-4wsuPCjDBc_5_15 a chipmunk is eating\nzv2RIbUsnSw_335_341 a man is playing a flute\n")
    out = tmp_path / "all"
    written = msvd_to_manifests(txt, tmp_path / "YouTubeClips", out)
    assert [Path(p).name for p in written] == ["all.videos.jsonl", "all.captions.jsonl"]
    assert _summary(out / "all.videos.jsonl") == [("-4wsuPCjDBc_5_15", None, None, None),
                                                  ("zv2RIbUsnSw_335_341", None, None, None)]
    assert _summary(out / "all.captions.jsonl") == [
        ("-4wsuPCjDBc_5_15_0", None, "-4wsuPCjDBc_5_15", "a squirrel is eating a peanut in it's shell"),
        ("-4wsuPCjDBc_5_15_1", None, "-4wsuPCjDBc_5_15", "a chipmunk is eating"),
        ("zv2RIbUsnSw_335_341_0", None, "zv2RIbUsnSw_335_341", "a man is playing a flute")]

    mapping = tmp_path / "youtube_mapping.txt"
    mapping.write_text("zv2RIbUsnSw_335_341 vid1250\n-4wsuPCjDBc_5_15 vid1\n")
    split = tmp_path / "split"
    written = msvd_to_manifests(txt, tmp_path / "YouTubeClips", split, mapping=mapping)
    assert [Path(p).name for p in written] == ["train.videos.jsonl", "train.captions.jsonl", "val.videos.jsonl",
                                               "val.captions.jsonl"]
    assert [i[0] for i in _summary(split / "val.captions.jsonl")] == ["zv2RIbUsnSw_335_341_0"]

    corpus = tmp_path / "MSR Video Description Corpus.csv"
    corpus.write_text("VideoID,Start,End,WorkerID,Source,AnnotationTime,Language,Description\n"
                      "-4wsuPCjDBc,5,15,337,unverified,11,English,\"A squirrel, eating.\"\n"
                      "-4wsuPCjDBc,5,15,337,unverified,11,French,un ecureuil mange\n"
                      "zv2RIbUsnSw,335,341,12,clean,30,English,A man plays a flute.\n")
    msvd_to_manifests(corpus, tmp_path / "YouTubeClips", out)
    assert _summary(out / "all.captions.jsonl") == [
        ("-4wsuPCjDBc_5_15_0", None, "-4wsuPCjDBc_5_15", "A squirrel, eating."),
        ("zv2RIbUsnSw_335_341_0", None, "zv2RIbUsnSw_335_341", "A man plays a flute.")]
    msvd_to_manifests(corpus, tmp_path / "YouTubeClips", out, language=None)
    assert len(read_manifest(out / "all.captions.jsonl")) == 3

    txt.write_text("# header\n-4wsuPCjDBc_5_15 a squirrel\nzv2RIbUsnSw_335_341\n")
    with pytest.raises(DatasetError, match=r"AllVideoDescriptions\.txt:3: expected 'VIDEO_ID caption'"):
        msvd_to_manifests(txt, tmp_path / "YouTubeClips", out)
    mapping.write_text("-4wsuPCjDBc_5_15 vid1\nzv2RIbUsnSw_335_341 clip2\n")
    with pytest.raises(DatasetError, match=r"youtube_mapping\.txt:2: expected 'VIDEO_ID vidN'"):
        msvd_to_manifests(corpus, tmp_path / "YouTubeClips", out, mapping=mapping)


def test_lsmdc_tab_separated_annotations_and_movie_folders(tmp_path: Path) -> None:
    clips = {"1006_Slumdog_Millionaire_01.25.49.077-01.25.54.718": "1006_Slumdog_Millionaire",
             "0001_American_Beauty_00.02.29.298-00.02.30.004": "0001_American_Beauty",
             "3011_BLIND_DATING_01.11.23.496-01.11.25.853": "3011_BLIND_DATING"}
    for clip, movie in clips.items():
        _clip(tmp_path / "videos" / movie / f"{clip}.avi")
    slumdog, beauty, blind = clips
    training = tmp_path / "LSMDC16_annos_training.csv"
    training.write_text(
        f"{slumdog}\t01.25.49.077\t01.25.54.718\t01.25.49.077\t01.25.54.718\tSOMEONE runs, \"fast\".\n"
        f"{beauty}\t00.02.29.298\t00.02.30.004\t00.02.28.651\t00.02.30.651\tWe are in a neighborhood.\n"
        f"{slumdog}\t01.25.49.077\t01.25.54.718\t01.25.49.077\t01.25.54.718\tHe stops.\n")
    blindtest = tmp_path / "LSMDC16_annos_blindtest.csv"
    blindtest.write_text(f"{blind}\t01.11.23.496\t01.11.25.853\t01.11.23.496\t01.11.25.853\n")
    out = tmp_path / "out"
    written = lsmdc_to_manifests([training, blindtest], tmp_path / "videos", out)
    assert [Path(p).name for p in written] == ["training.videos.jsonl", "training.captions.jsonl",
                                               "blindtest.videos.jsonl"]  # the blind test has no sentences
    assert _summary(out / "training.videos.jsonl") == [(slumdog, None, None, None), (beauty, None, None, None)]
    assert _summary(out / "training.captions.jsonl") == [
        (f"{slumdog}_0", None, slumdog, 'SOMEONE runs, "fast".'), (f"{beauty}_0", None, beauty,
                                                                   "We are in a neighborhood."),
        (f"{slumdog}_1", None, slumdog, "He stops.")]
    assert json.loads((out / "blindtest.videos.jsonl").read_text())["path"] == \
        f"../videos/3011_BLIND_DATING/{blind}.avi"

    training.write_text(f"{beauty}\t00.02.29.298\t00.02.30.004\t00.02.28.651\t00.02.30.651\tok\n"
                        f"{slumdog},01.25.49.077,01.25.54.718,01.25.49.077,01.25.54.718,comma separated\n")
    with pytest.raises(DatasetError, match=r"LSMDC16_annos_training\.csv:2: expected 'CLIP_ID<TAB>START"):
        lsmdc_to_manifests([training], tmp_path / "videos", out)
    training.write_text(f"{blind}\t01.11.23.496\t01.11.25.853\t01.11.23.496\t01.11.25.853\tagain\n")
    with pytest.raises(DatasetError, match=r"training\.csv:1: clip 3011_BLIND_DATING.* already listed at "
                                           r".*blindtest\.csv:1"):
        lsmdc_to_manifests([blindtest, training], tmp_path / "videos", out)


# ---- text --------------------------------------------------------------------------------------------------------
def test_sst2_tsv_through_the_cli(tmp_path: Path) -> None:
    glue = tmp_path / "SST-2"
    glue.mkdir()
    (glue / "train.tsv").write_text('sentence\tlabel\nhide new secretions \t0\nthe "greatest" film \t1\n')
    (glue / "dev.tsv").write_text("sentence\tlabel\nit 's a charming journey . \t1\n")
    (glue / "test.tsv").write_text("index\tsentence\n0\tuneasy mishmash of styles\n")
    out = tmp_path / "out"
    printed = cli("manifest", "sst2", glue, "--out", out).stdout.split()
    assert [Path(p).name for p in printed] == ["train.jsonl", "dev.jsonl", "test.jsonl"]
    assert _summary(out / "train.jsonl") == [("train-0", 0, None, "hide new secretions "),
                                             ("train-1", 1, None, 'the "greatest" film ')]  # no CSV quoting in TSV
    assert _summary(out / "test.jsonl") == [("test-0", None, None, "uneasy mishmash of styles")]  # unlabelled
    text_classification_to_manifests(glue / "test.tsv", tmp_path / "ids", "sst2", id_column="index")
    assert _summary(tmp_path / "ids" / "test.jsonl")[0][0] == "0"

    (glue / "dev.tsv").write_text("sentence\tlabel\nfine\t1\nbroken\t1\textra\n")
    with pytest.raises(DatasetError, match=r"dev\.tsv:3: 3 fields, the header has 2"):
        text_classification_to_manifests(glue, out, "sst2")


def test_trec_label_files(tmp_path: Path) -> None:
    (tmp_path / "train_5500.label").write_bytes(
        b"DESC:manner How did serfdom develop in and then leave Russia ?\n"
        b"ENTY:cremat What films featured the character Popeye Doyle ?\n"
        b"HUM:ind Who was Ren\xe9 Descartes ?\n")  # the real file is not UTF-8
    (tmp_path / "TREC_10.label").write_text("NUM:dist How far is it from Denver to Aspen ?\n")
    out = tmp_path / "out"
    written = text_classification_to_manifests(tmp_path, out, "trec")
    assert [Path(p).name for p in written] == ["train.jsonl", "test.jsonl"]
    train = _summary(out / "train.jsonl")
    assert [(i[0], i[1]) for i in train] == [("train-0", "DESC"), ("train-1", "ENTY"), ("train-2", "HUM")]
    assert train[0][3] == "How did serfdom develop in and then leave Russia ?"
    assert train[2][3] == "Who was René Descartes ?"
    text_classification_to_manifests(tmp_path, out, "trec", label_column="fine")
    assert _summary(out / "test.jsonl") == [("test-0", "NUM:dist", None, "How far is it from Denver to Aspen ?")]
    (tmp_path / "TREC_10.label").write_text("NUM:dist How far?\nno label here\n")
    with pytest.raises(DatasetError, match=r"TREC_10\.label:2: expected 'COARSE:fine question'"):
        text_classification_to_manifests(tmp_path, out, "trec")


def test_emotion_txt_and_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "train.txt").write_text("i didnt feel humiliated;sadness\ni feel great; really;joy\n")
    (txt / "val.txt").write_text("im feeling rather rotten;sadness\n")
    out = tmp_path / "out"
    written = text_classification_to_manifests(txt, out, "emotion")
    assert [Path(p).name for p in written] == ["train.jsonl", "val.jsonl"]
    assert _summary(out / "train.jsonl") == [("train-0", "sadness", None, "i didnt feel humiliated"),
                                             ("train-1", "joy", None, "i feel great; really")]
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    (jsonl / "validation.jsonl").write_text('{"text": "i feel loved", "label": 2}\n\n{"text": "so scared", "label": 4}\n')
    text_classification_to_manifests(jsonl, tmp_path / "out2", "emotion")
    assert _summary(tmp_path / "out2" / "validation.jsonl") == [("validation-0", 2, None, "i feel loved"),
                                                                ("validation-1", 4, None, "so scared")]
    (jsonl / "validation.jsonl").write_text('{"text": "ok", "label": 1}\n{"sentence": "wrong field", "label": 1}\n')
    with pytest.raises(DatasetError, match=r"validation\.jsonl:2: no string 'text' field"):
        text_classification_to_manifests(jsonl, out, "emotion")
    (txt / "val.txt").write_text("no separator at all\n")
    with pytest.raises(DatasetError, match=r"val\.txt:1: expected 'TEXT;LABEL'"):
        text_classification_to_manifests(txt, out, "emotion")


def test_any_csv_with_chosen_columns(tmp_path: Path) -> None:
    table = tmp_path / "reviews.csv"
    table.write_text('uid,review,stars\nr1,"good, really",5\nr2,bad,-1\nr3,"so ""so""",3\n')
    written = text_classification_to_manifests(table, tmp_path / "out", text_column="review", label_column="stars",
                                               id_column="uid")
    assert _summary(Path(written[0])) == [("r1", 5, None, "good, really"), ("r2", None, None, "bad"),
                                          ("r3", 3, None, 'so "so"')]  # -1 = no label
    with pytest.raises(DatasetError, match=r"reviews\.csv:1: header has no column 'text'"):
        text_classification_to_manifests(table, tmp_path / "out")
