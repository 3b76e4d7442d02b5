"""Dataset layouts as they are published (COCO, DAQUAR, Flickr30k's own caption files, MSR-VTT 1k-A, any media +
caption table) through ``cli.py manifest``: ids and captions compared with the fixture, and no adapter writes
anything until every check has passed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import first_codec, gray_frame, write_video_file
from PIL import Image

from extract.adapters import DatasetError, daquar_to_manifests, table_to_manifests
from extract.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def _jpg(path: Path, color: tuple[int, int, int] = (200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def _items(manifest: Path) -> list[tuple]:
    """(id, ref, text) of every item; media paths must exist."""
    items = read_manifest(manifest)
    assert all(it.path is None or Path(it.path).is_file() for it in items)
    return [(it.id, it.ref, it.text) for it in items]


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# ---- COCO --------------------------------------------------------------------------------------------------------
def _coco(root: Path, split: str, images: dict[int, str], captions: list[tuple[int, int, str]]) -> Path:
    for name in images.values():
        _jpg(root / split / name)
    path = root / "annotations" / f"captions_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "info": {"year": 2017}, "licenses": [],
        "images": [{"id": i, "file_name": name, "height": 8, "width": 8} for i, name in images.items()],
        "annotations": [{"id": a, "image_id": i, "caption": text} for a, i, text in captions]}))
    return path


def test_coco_with_a_wrong_images_folder_fails_and_writes_nothing(tmp_path: Path) -> None:
    ann = _coco(tmp_path / "coco", "val2017", {139: "000000000139.jpg"}, [(1, 139, "A room.")])
    out = tmp_path / "out"
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    line = _one_line_error(cli("manifest", "coco", ann, "--images", wrong, "--out", out))
    assert "none of the 1 media files" in line and "is the media folder right?" in line
    assert not out.exists()


def test_coco_train_and_val_share_an_out_folder_and_captions_are_stripped(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    train = _coco(root, "train2017", {9: "000000000009.jpg"}, [(48, 9, " A plate of food.\n"), (67, 9, "Food.")])
    val = _coco(root, "val2017", {139: "000000000139.jpg"}, [(1, 139, "A living room  ")])
    out = tmp_path / "manifests"
    for ann, split in ((train, "train2017"), (val, "val2017")):
        result = cli("manifest", "coco", ann, "--images", root / split, "--out", out)
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["train2017.captions.jsonl", "train2017.images.jsonl",
                                                      "val2017.captions.jsonl", "val2017.images.jsonl"]
    assert _items(out / "train2017.images.jsonl") == [("9", None, None)]
    assert _items(out / "train2017.captions.jsonl") == [("48", "9", "A plate of food."), ("67", "9", "Food.")]
    assert _items(out / "val2017.captions.jsonl") == [("1", "139", "A living room")]
    csv = tmp_path / "captions.csv"
    csv.write_text("image,caption\na.jpg,x\n")
    line = _one_line_error(cli("manifest", "coco", csv, "--images", root / "val2017", "--out", out))
    assert "not a JSON file; expected a COCO captions JSON file" in line


# ---- DAQUAR ------------------------------------------------------------------------------------------------------
def _daquar(root: Path) -> Path:
    for n in (1, 2):
        _jpg(root / "nyu_depth_images" / f"image{n}.png")
    (root / "qa.37.raw.train.txt").write_text("what is on the desk in the image1 ?\nbook\n")
    (root / "qa.37.raw.reduced.test.txt").write_text("what is left of the bed in the image2 ?\nlamp, chair\n")
    return root


def test_daquar_reads_the_reduced_test_file_of_the_distribution(tmp_path: Path) -> None:
    src = _daquar(tmp_path / "daquar")
    out = tmp_path / "out"
    result = cli("manifest", "daquar", src, "--out", out)
    assert result.returncode == 0, result.stderr
    assert sorted(Path(p).name for p in result.stdout.split()) == [
        "test.images.jsonl", "test.questions.jsonl", "train.images.jsonl", "train.questions.jsonl"]
    questions = read_manifest(out / "test.questions.jsonl")
    assert [(q.id, q.text, q.ref, q.label) for q in questions] == [
        ("test-00000", "what is left of the bed in the image ?", "image2", "lamp, chair")]
    (src / "qa.37.raw.test.txt").write_text("what is on the bed in the image2 ?\npillow\n")
    names = [Path(p).name for p in daquar_to_manifests(src, tmp_path / "both")]
    assert "test.questions.jsonl" in names and "reduced-test.questions.jsonl" in names
    (src / "qa.37.raw.val.txt").write_text("what is on the bed in the image2 ?\npillow\n")
    with pytest.raises(DatasetError, match=r"qa\.37\.raw\.val\.txt: not a DAQUAR question file name"):
        daquar_to_manifests(src, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_daquar_with_a_wrong_images_folder_writes_nothing(tmp_path: Path) -> None:
    src = _daquar(tmp_path / "daquar")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    out = tmp_path / "out"
    line = _one_line_error(cli("manifest", "daquar", src, "--images", wrong, "--out", out))
    assert "none of the 2 media files" in line
    assert not out.exists()


# ---- Flickr30k's own caption files -------------------------------------------------------------------------------
FLICKR = [("1000092795.jpg", "Two young guys with shaggy hair look at their hands while hanging out in the yard ."),
          ("1000092795.jpg", "Two young , White males are outside near many bushes ."),
          ("10002456.jpg", "Several men in hard hats are operating a giant pulley system .")]
FLICKR_ITEMS = [("1000092795_0", "1000092795", FLICKR[0][1]), ("1000092795_1", "1000092795", FLICKR[1][1]),
                ("10002456_0", "10002456", FLICKR[2][1])]


def _flickr_images(root: Path) -> Path:
    for name in ("1000092795.jpg", "10002456.jpg"):
        _jpg(root / name)
    return root


def test_flickr30k_token_file(tmp_path: Path) -> None:
    images = _flickr_images(tmp_path / "flickr30k-images")
    token = tmp_path / "results_20130124.token"
    numbers = [0, 1, 0]
    token.write_text("".join(f"{name}#{k}\t{text}\n" for (name, text), k in zip(FLICKR, numbers, strict=True)))
    out = tmp_path / "out"
    result = cli("manifest", "flickr30k", token, "--images", images, "--out", out)
    assert result.returncode == 0, result.stderr
    assert _items(out / "all.images.jsonl") == [("1000092795", None, None), ("10002456", None, None)]
    assert _items(out / "all.captions.jsonl") == FLICKR_ITEMS


def test_flickr30k_results_csv_with_bar_separators(tmp_path: Path) -> None:
    images = _flickr_images(tmp_path / "flickr30k_images")
    csv = tmp_path / "results.csv"
    # as shared: spaces after each '|', and one row (#19999 of the real file) missing its second '|'
    csv.write_text("image_name| comment_number| comment\n"
                   f"{FLICKR[0][0]}| 0| {FLICKR[0][1]}\n{FLICKR[1][0]}| 1 {FLICKR[1][1]}\n"
                   f"{FLICKR[2][0]}| 0| {FLICKR[2][1]}\n")
    out = tmp_path / "out"
    result = cli("manifest", "flickr30k", csv, "--images", images, "--out", out)
    assert result.returncode == 0, result.stderr
    assert _items(out / "all.captions.jsonl") == FLICKR_ITEMS


def test_flickr30k_wrong_file_names_the_expected_formats(tmp_path: Path) -> None:
    images = _flickr_images(tmp_path / "images")
    wrong = tmp_path / "captions.txt"
    wrong.write_text("a dog runs on the beach\n")
    line = _one_line_error(cli("manifest", "flickr30k", wrong, "--images", images, "--out", tmp_path / "out"))
    assert "not a Flickr30k caption file" in line and "results_20130124.token" in line and "results.csv" in line
    assert "invalid JSON" not in line
    assert not (tmp_path / "out").exists()


# ---- MSR-VTT 1k-A ------------------------------------------------------------------------------------------------
def test_msrvtt_1ka_jsfusion_test_csv(tmp_path: Path) -> None:
    codec = first_codec("libx264", "mpeg4")
    for video in ("video7010", "video7579"):
        (tmp_path / "videos" / "TestVideo").mkdir(parents=True, exist_ok=True)
        write_video_file(tmp_path / "videos" / "TestVideo" / f"{video}.mp4", [gray_frame(40), gray_frame(90)], codec)
    csv = tmp_path / "MSRVTT_JSFUSION_test.csv"
    csv.write_text(",key,vid_key,video_id,sentence\n"
                   "0,ret0,msr7579,video7579,a girl wearing red top and black trouser is putting a sweater on a dog\n"
                   "1,ret1,msr7010,video7010,young people sitting in the grass\n")
    out = tmp_path / "out"
    result = cli("manifest", "msrvtt", csv, "--videos", tmp_path / "videos", "--out", out)
    assert result.returncode == 0, result.stderr
    assert _items(out / "test1k.videos.jsonl") == [("video7579", None, None), ("video7010", None, None)]
    assert _items(out / "test1k.captions.jsonl") == [
        ("ret0", "video7579", "a girl wearing red top and black trouser is putting a sweater on a dog"),
        ("ret1", "video7010", "young people sitting in the grass")]
    csv.write_text("video_id,caption\nvideo7010,x\n")
    line = _one_line_error(cli("manifest", "msrvtt", csv, "--videos", tmp_path / "videos", "--out", tmp_path / "o2"))
    assert "header has no column 'key'" in line and "MSRVTT_JSFUSION_test.csv" in line


# ---- any media + caption table -----------------------------------------------------------------------------------
def test_table_csv_and_parquet_with_chosen_columns(tmp_path: Path) -> None:
    for name in ("a.jpg", "sub/b.jpg"):
        _jpg(tmp_path / "imgs" / name)
    rows = {"filepath": ["imgs/a.jpg", "imgs/sub/b.jpg", "imgs/a.jpg"], "title": ["a red square ", "blue", "red"],
            "key": ["000", "001", "000"]}
    csv = tmp_path / "pairs.csv"
    csv.write_text("filepath,title,key\n" + "".join(f"{p},{t},{k}\n" for p, t, k in zip(*rows.values(), strict=True)))
    out = tmp_path / "out"
    result = cli("manifest", "table", csv, "--path-column", "filepath", "--text-column", "title", "--id-column", "key",
                 "--out", out)
    assert result.returncode == 0, result.stderr
    assert _items(out / "pairs.images.jsonl") == [("000", None, None), ("001", None, None)]
    assert _items(out / "pairs.captions.jsonl") == [("000_0", "000", "a red square"), ("001_0", "001", "blue"),
                                                     ("000_1", "000", "red")]
    parquet = tmp_path / "pairs.parquet"
    pq.write_table(pa.table(rows), parquet)
    written = table_to_manifests(parquet, tmp_path / "pq", path_column="filepath", text_column="title")
    assert [Path(p).name for p in written] == ["pairs.images.jsonl", "pairs.captions.jsonl"]
    assert _items(tmp_path / "pq" / "pairs.images.jsonl") == [("imgs/a.jpg", None, None),
                                                              ("imgs/sub/b.jpg", None, None)]
    line = _one_line_error(cli("manifest", "table", csv, "--path-column", "image", "--out", tmp_path / "o3"))
    assert "header has no column 'image'" in line and "filepath, title, key" in line
    bogus = tmp_path / "bogus.parquet"
    bogus.write_text("not parquet")
    with pytest.raises(DatasetError, match="not a Parquet file"):
        table_to_manifests(bogus, tmp_path / "o4", path_column="filepath")
