"""VQA (fit-vqa, the DAQUAR adapter, accuracy / F1 / WUPS) and the "Base" baseline (fit-base: encoders trained end
to end), on real files: a DAQUAR-format folder of generated shape images, tiny transformers models saved to disk,
real stores, the CLI in subprocesses where the command line itself is under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from extract.adapters import DatasetError, daquar_to_manifests
from extract.encoders import load_encoder
from extract.manifest import read_manifest
from extract.run import run_extraction
from pipeline.demo import draw_shape, make_shapes_dataset
from pipeline.evaluation.evaluate import evaluate_retrieval
from pipeline.evaluation.vqa import VQASettings, fit_vqa, load_split, load_vqa, predict
from pipeline.evaluation.vqa_metrics import (
    accuracy,
    answer_metrics,
    canonical_answer,
    macro_f1,
    wordnet_similarity,
    wups,
)
from pipeline.training.base import fit_base, trainable_tokens
from pipeline.training.fit import LossConfig, TrainConfig, fit_up
from pipeline.training.rundir import RunError

REPO = Path(__file__).resolve().parents[1]
COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "square", "triangle")


def cli(*args: object) -> subprocess.CompletedProcess:
    # One intra-op thread, as the one_thread fixture does in-process: the tensors are tiny, and a second thread on a
    # busy 2-core machine only spin-waits (several times slower). The results are the same.
    result = subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise AssertionError(f"cli {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


def sha256s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- the DAQUAR adapter on the real file format ------------------------------------------------------------------
def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (10, 20, 30)).save(path)


def test_daquar_adapter_reads_the_raw_question_answer_files(tmp_path: Path) -> None:
    src = tmp_path / "daquar"
    for n in (3, 5, 7):
        _png(src / "nyu_depth_images" / f"image{n}.png")
    (src / "qa.37.raw.train.txt").write_text(
        "what is on the right side of the black telephone and on the left side of the red chair in the image3 ?\n"
        "desk\n"
        "what is on the desk in the image3 ?\n"
        "book,scissor, papers , tape_dispenser\n"
        "how many chairs are in the image5 ?\n"
        "2\n\n")
    (src / "qa.37.raw.test.txt").write_text("what is behind the table in the image7 ?\nsofa\n")
    written = daquar_to_manifests(src, tmp_path / "m")
    assert [Path(p).name for p in written] == ["train.images.jsonl", "train.questions.jsonl", "test.images.jsonl",
                                               "test.questions.jsonl"]
    images = read_manifest(tmp_path / "m" / "train.images.jsonl")
    assert [i.id for i in images] == ["image3", "image5"]  # distinct images, first-seen order
    assert all(Path(i.path).is_file() and Path(i.path).name == f"{i.id}.png" for i in images)
    questions = read_manifest(tmp_path / "m" / "train.questions.jsonl")
    assert [(q.id, q.ref, q.label) for q in questions] == [
        ("train-00000", "image3", "desk"),
        ("train-00001", "image3", "book, scissor, papers, tape_dispenser"),
        ("train-00002", "image5", "2"),
    ]
    assert questions[1].text == "what is on the desk in the image ?"  # the image number is the ref, not text
    test_q = read_manifest(tmp_path / "m" / "test.questions.jsonl")
    assert [(q.id, q.text, q.ref, q.label) for q in test_q] == [
        ("test-00000", "what is behind the table in the image ?", "image7", "sofa")]


def test_daquar_adapter_names_bad_input(tmp_path: Path) -> None:
    src = tmp_path / "daquar"
    _png(src / "images" / "image1.png")
    train = src / "qa.894.raw.train.txt"
    train.write_text("what is this in the image1 ?\nchair\nwhat is that in the image1 ?\n")
    with pytest.raises(DatasetError, match=r"qa\.894\.raw\.train\.txt:3: question .* has no answer line"):
        daquar_to_manifests(src, tmp_path / "m")
    train.write_text("what is this ?\nchair\n")
    with pytest.raises(DatasetError, match=r"train\.txt:1: expected a question naming its image"):
        daquar_to_manifests(src, tmp_path / "m")
    train.write_text("what is this in the image1 ?\nwhat is that in the image1 ?\n")
    with pytest.raises(DatasetError, match=r"train\.txt:2: expected an answer, got another question"):
        daquar_to_manifests(src, tmp_path / "m")
    train.write_text("what is this in the image1 ?\nchair\n")
    (src / "qa.37.raw.test.txt").write_text("what is this in the image1 ?\nchair\n")
    with pytest.raises(DatasetError, match="both reduced .* and full"):
        daquar_to_manifests(src, tmp_path / "m")
    assert len(daquar_to_manifests(src, tmp_path / "m", subset="894")) == 2
    with pytest.raises(DatasetError, match="none of the 1 media files"):
        daquar_to_manifests(src, tmp_path / "m", images_dir=tmp_path, subset="894")


# ---- answer metrics ----------------------------------------------------------------------------------------------
def test_accuracy_and_macro_f1_by_hand() -> None:
    assert canonical_answer(" table,chair ") == canonical_answer("chair, table") == "chair, table"
    assert accuracy(["table,chair", "sofa"], ["chair, table", "bed"]) == 0.5  # answers are sets
    # classes a: 2TP/(pred+true) = 2/4; b: 2/3; c: 0/1  -> (0.5 + 0.6667 + 0) / 3
    assert macro_f1(["a", "b", "b", "a"], ["a", "a", "b", "c"]) == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError, match="2 predictions for 1"):
        accuracy(["a", "b"], ["a"])


def test_wups_formula_by_hand_with_a_given_word_similarity() -> None:
    table = {frozenset(("chair", "sofa")): 0.8, frozenset(("chair", "table")): 0.95}

    def similarity(a: str, b: str) -> float:
        return table.get(frozenset((a, b)), 0.0)

    pred, truth = ["chair", "chair, table", "sofa"], ["sofa", "table", "sofa"]
    # q1: 0.8 is below 0.9 -> 0.1 * 0.8; q2: min(0.95 * 1, max(0.95, 1)) = 0.95; q3: equal words -> 1
    assert wups(pred, truth, 0.9, similarity) == pytest.approx((0.08 + 0.95 + 1) / 3)
    assert wups(pred, truth, 0.0, similarity) == pytest.approx((0.8 + 0.95 + 1) / 3)
    assert wups(["chair"], ["sky"], 0.0, similarity) == 0.0


def test_wups_not_computed_is_said_not_faked() -> None:
    out = answer_metrics(["a"], ["a"], None, "nltk is not installed")
    assert out["accuracy"] == 1.0 and out["wups"] is None
    assert out["wups_not_computed"] == "WUPS not computed: nltk is not installed"
    similarity, why = wordnet_similarity()
    assert (similarity is None) == (why is not None)


def test_wups_with_wordnet() -> None:
    similarity, why = wordnet_similarity()
    if similarity is None:
        pytest.skip(f"WordNet unavailable ({why}); WUPS is reported as not computed instead")
    # sofa and couch share the synset couch.n.01: Wu-Palmer 1.0 at any threshold
    assert wups(["sofa"], ["couch"], 0.9, similarity) == pytest.approx(1.0)
    # chair and sky are far apart (< 0.9): WUPS@0.9 is exactly a tenth of WUPS@0.0
    far = wups(["chair"], ["sky"], 0.0, similarity)
    assert 0 < far < 0.9 and wups(["chair"], ["sky"], 0.9, similarity) == pytest.approx(0.1 * far)


# ---- VQA end to end ----------------------------------------------------------------------------------------------
def write_daquar(root: Path, n_train: int, n_test: int, seed: int = 0) -> dict[int, tuple[str, str]]:
    """A DAQUAR-format folder (images/imageN.png, qa.37.raw.{train,test}.txt) of one coloured shape per image and two
    questions per image (its colour, its shape); returns image number -> (colour, shape)."""
    rng = random.Random(seed)
    attrs = {}
    for n in range(1, n_train + n_test + 1):
        attrs[n] = (COLOURS[n % 3], SHAPES[(n // 3) % 3])
        (root / "images").mkdir(parents=True, exist_ok=True)
        draw_shape(attrs[n][0], attrs[n][1], "center", "large", rng, px=64).save(root / "images" / f"image{n}.png")
    for split, numbers in (("train", range(1, n_train + 1)), ("test", range(n_train + 1, n_train + n_test + 1))):
        lines = []
        for n in numbers:
            lines += [f"what is the colour of the object in the image{n} ?", attrs[n][0],
                      f"what is the shape of the object in the image{n} ?", attrs[n][1]]
        (root / f"qa.37.raw.{split}.txt").write_text("\n".join(lines) + "\n")
    return attrs


@pytest.fixture(scope="module")
def vqa_setup(tmp_path_factory: pytest.TempPathFactory, tiny_image_model: str, tiny_text_model: str) -> dict:
    """DAQUAR manifests through the CLI, stores extracted with tiny models, and a UP trained on captions."""
    root = tmp_path_factory.mktemp("vqa")
    attrs = write_daquar(root / "daquar", n_train=36, n_test=12)
    printed = cli("manifest", "daquar", root / "daquar", "--out", root / "m").stdout.split()
    assert [Path(p).name for p in printed] == ["train.images.jsonl", "train.questions.jsonl", "test.images.jsonl",
                                               "test.questions.jsonl"]
    captions = root / "m" / "train.captions.jsonl"  # image-text pairs for the UP (fit-up)
    captions.write_text("".join(json.dumps({"id": f"c{n}", "text": f"a {c} {s}", "ref": f"image{n}"}) + "\n"
                                for n, (c, s) in attrs.items() if n <= 36))
    stores = {}
    for name, modality, spec in (("train.images", "image", tiny_image_model), ("test.images", "image", tiny_image_model),
                                 ("train.questions", "text", tiny_text_model),
                                 ("test.questions", "text", tiny_text_model), ("train.captions", "text", tiny_text_model)):
        stores[name] = run_extraction(root / "m" / f"{name}.jsonl", modality, spec, root / "stores" / name,
                                      dtype="fp32", progress=False).store
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: see the one_thread fixture
    try:
        fit_up(stores["train.images"], stores["train.captions"], root / "run", width=64, blocks=1,
               loss=LossConfig(), train=TrainConfig(epochs=6, batch_size=12, val_fraction=0.0), progress=False)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "stores": stores, "run": root / "run"}


def test_vqa_through_the_cli_beats_the_majority_answer(vqa_setup: dict, one_thread) -> None:
    s, out = vqa_setup["stores"], vqa_setup["root"] / "vqa-frozen"
    run_sha = sha256s(vqa_setup["run"])
    result = cli("fit-vqa", "--run", vqa_setup["run"], "--image-store", s["train.images"],
                 "--question-store", s["train.questions"], "--test-image-store", s["test.images"],
                 "--test-question-store", s["test.questions"], "--epochs", 60, "--batch-size", 16, "--out", out)
    report = json.loads((out / "report.json").read_text())
    test = report["test"]
    assert report["answers"] == 6 and test["questions"] == 24 and test["unknown_answers"] == 0
    majority = test["majority_baseline"]["accuracy"]
    assert majority <= 0.25 and report["chance_accuracy"] == pytest.approx(1 / 6)
    assert test["accuracy"] >= majority + 0.25, report  # colour questions at least are answered from the image
    assert 0 < test["f1_macro"] <= 1 and test["f1_macro"] > test["majority_baseline"]["f1_macro"]
    markdown = (out / "report.md").read_text()
    if report["wups_computed"]:
        assert test["wups"]["WUPS@0.9"] >= test["accuracy"] - 1e-9  # a right answer scores 1
        assert test["wups"]["WUPS@0.0"] >= test["wups"]["WUPS@0.9"]
    else:  # the only honest output without WordNet: said in the JSON, the table and the console
        assert test["wups"] is None and "WUPS not computed" in report["wups_not_computed"]
        assert report["wups_not_computed"] in markdown and "WUPS not computed" in result.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 60
    assert not any(k.startswith("encoder.") for k in load_file(str(out / "model.safetensors")))  # frozen UP
    assert sha256s(vqa_setup["run"]) == run_sha
    # the saved model reproduces the reported test accuracy
    model, config = load_vqa(out)
    run_config = json.loads((vqa_setup["run"] / "config.json").read_text())
    split = load_split(run_config, s["test.images"], s["test.questions"], "test")
    predicted = predict(model, split, config["answers"])
    assert accuracy(predicted, split.answers) == pytest.approx(test["accuracy"])
    # ... and is refused once the run's weights (that the frozen embeddings came from) change
    run_copy, vqa_copy = vqa_setup["root"] / "run-copy", vqa_setup["root"] / "vqa-copy"
    shutil.copytree(vqa_setup["run"], run_copy)
    shutil.copytree(out, vqa_copy)
    (vqa_copy / "config.json").write_text(json.dumps({**config, "run": str(run_copy)}))
    weights = load_file(str(run_copy / "model.safetensors"))
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in weights.items()},
              str(run_copy / "model.safetensors"))
    with pytest.raises(RunError, match="changed since this VQA model was trained"):
        load_vqa(vqa_copy)


def test_vqa_unfreeze_trains_the_up_but_not_the_run(vqa_setup: dict, one_thread) -> None:
    s, out = vqa_setup["stores"], vqa_setup["root"] / "vqa-unfrozen"
    run_sha = sha256s(vqa_setup["run"])
    report = fit_vqa(vqa_setup["run"], s["train.images"], s["train.questions"], out,
                     settings=VQASettings(hidden=0, fusion="concat-product", unfreeze=True),
                     train=TrainConfig(epochs=2, batch_size=24), progress=False)
    assert report["test"] is None and report["train"]["questions"] == 72
    saved = load_file(str(out / "model.safetensors"))
    # hidden=0: the paper's single linear layer, on [image; question; image * question] of width 64
    assert saved["head.mlp.weight"].shape == (6, 3 * 64)
    original = {k[6:]: v for k, v in load_file(str(vqa_setup["run"] / "model.safetensors")).items()
                if k.startswith("model.")}
    encoder = {k[8:]: v for k, v in saved.items() if k.startswith("encoder.")}
    assert encoder.keys() == original.keys()
    assert any(not torch.equal(encoder[k], original[k]) for k in original)  # the UP trained with the head
    assert sha256s(vqa_setup["run"]) == run_sha  # ... in the VQA folder, not in the run
    with pytest.raises(RunError, match="already holds a VQA model"):
        fit_vqa(vqa_setup["run"], s["train.images"], s["train.questions"], out, progress=False)
    foreign = vqa_setup["root"] / "not-vqa"
    (foreign / "keep.txt").parent.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(RunError, match="is not a VQA output folder"):
        fit_vqa(vqa_setup["run"], s["train.images"], s["train.questions"], foreign, overwrite=True, progress=False)
    assert (foreign / "keep.txt").read_text() == "mine"


# ---- the Base baseline -------------------------------------------------------------------------------------------
def test_base_trains_the_encoders_end_to_end_and_evaluates_like_a_run(
        tmp_path: Path, tiny_image_model: str, tiny_text_model: str, one_thread) -> None:
    image_manifest, text_manifest = make_shapes_dataset(tmp_path / "train", 12, seed=0, prefix="tr")
    before = {"image": sha256s(Path(tiny_image_model)), "text": sha256s(Path(tiny_text_model))}
    run = tmp_path / "base"
    cli("fit-base", "--image-encoder", tiny_image_model, "--text-encoder", tiny_text_model, "--image-manifest",
        image_manifest, "--text-manifest", text_manifest, "--out", run, "--epochs", 2, "--batch-size", 6,
        "--encoder-lr", 1e-3, "--width", 32, "--val-fraction", 0.25)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all("image->text" in r["val"] for r in records)
    # the encoders' weights changed (saved as ordinary transformers folders) ...
    for modality, spec in (("image", tiny_image_model), ("text", tiny_text_model)):
        tuned = load_file(str(run / "encoders" / modality / "model.safetensors"))
        start = load_file(str(Path(spec) / "model.safetensors"))
        changed = [k for k in start if k in tuned and not torch.equal(start[k], tuned[k])]
        assert len(changed) > len(start) // 2, f"{modality}: only {changed} changed"
    # ... while the originals on disk and every encoder the extraction code loads stay frozen
    assert {"image": sha256s(Path(tiny_image_model)), "text": sha256s(Path(tiny_text_model))} == before
    frozen = load_encoder(tiny_image_model, "image")
    frozen.model.train()
    assert not frozen.model.training and not any(p.requires_grad for p in frozen.model.parameters())

    # held-out evaluation: extract with the fine-tuned encoders, then eval retrieval as for any run
    test_images, test_captions = make_shapes_dataset(tmp_path / "test", 6, seed=1, prefix="te")
    image_store = run_extraction(test_images, "image", str(run / "encoders" / "image"), tmp_path / "s-img",
                                 progress=False).store
    text_store = run_extraction(test_captions, "text", str(run / "encoders" / "text"), tmp_path / "s-txt",
                                progress=False).store
    report = evaluate_retrieval(run, image_store, text_store)
    assert report["pairs"] == 12 and 0 <= report["metrics"]["image->text"]["R@1"] <= 1
    original_store = run_extraction(test_images, "image", tiny_image_model, tmp_path / "s-orig", progress=False).store
    with pytest.raises(RunError, match="was not made like the image store the run was trained on"):
        evaluate_retrieval(run, original_store, text_store)
    with pytest.raises(RunError, match="is not a run directory"):  # never deletes a folder that is not a run
        fit_base(tiny_image_model, tiny_text_model, image_manifest, text_manifest, tmp_path / "test", overwrite=True)
    assert test_images.is_file()


def test_trainable_tokens_equal_the_extraction_forward(tiny_image_model: str, tiny_text_model: str,
                                                       image_manifest: str, text_manifest: str) -> None:
    """Base trains on exactly what extraction computes: same preprocessing, same tokens (in eval mode)."""
    for spec, modality, manifest in ((tiny_image_model, "image", image_manifest),
                                     (tiny_text_model, "text", text_manifest)):
        encoder = load_encoder(spec, modality)
        batch = encoder.preprocessor(read_manifest(manifest))
        expected, lengths = encoder.forward(batch)
        tokens, mask = trainable_tokens(encoder, batch, "cpu")
        assert torch.equal(mask.sum(1), lengths)
        torch.testing.assert_close(tokens * mask[..., None], expected * mask[..., None])
