"""A standing adversarial suite: hostile inputs of every kind a user can hand the pipeline, and random byte
corruption of media, manifests and run directories. The invariants: no exception but the project's own one-line
errors, every bad item named with its reason, every good item stored or trained on. The counts (inputs tried, bad
items reported, good items kept) are printed at the end so the figure can be tracked.

Shard and manifest-entry corruption of stores, and repair, are not here: they belong with the store's integrity
tests (tests/test_stores.py)."""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import first_codec, gray_frame, sine, write_audio_file, write_video_file
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from extract.manifest import Item, ManifestError, read_manifest
from extract.media import MediaError, load_audio, load_image, load_video_frames
from pipeline.training.rundir import RunDir, RunError

TALLY: Counter = Counter()
FAST = settings(max_examples=100, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", autouse=True)
def _print_counts(request):
    yield
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():  # shown whatever the capture mode
        print(f"\nadversarial suite: {TALLY['tried']} inputs tried, {TALLY['reported']} bad items reported with a "
              f"reason, {TALLY['kept']} good items kept")


def _corrupt(data: bytes, flips: list[tuple[float, int]], keep: float) -> bytes:
    """``data`` with bytes overwritten at relative positions, then cut to the fraction ``keep`` of its length."""
    out = bytearray(data)
    for where, value in flips:
        out[min(len(out) - 1, int(where * len(out)))] = value
    return bytes(out[: max(0, int(keep * len(out)))])


corruptions = st.tuples(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8),
                        st.one_of(st.just(1.0), st.floats(0, 1)))


# ---- manifests ---------------------------------------------------------------------------------------------------
def _manifest_bytes() -> bytes:
    records = [{"id": f"i{k}", "text": f"caption number {k}", "ref": f"img{k % 3}", "label": k % 2} for k in range(12)]
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@FAST
@given(corruptions)
def test_a_corrupted_manifest_reads_or_names_every_bad_line(tmp_path_factory, corruption):
    path = tmp_path_factory.getbasetemp() / "adversarial-manifest.jsonl"
    path.write_bytes(_corrupt(_manifest_bytes(), *corruption))
    TALLY["tried"] += 1
    try:
        items = read_manifest(path)
    except ManifestError as err:
        assert err.problems and all(isinstance(line, int) and reason for line, reason in err.problems)
        assert str(err).startswith(f"invalid manifest {path}")
        TALLY["reported"] += len(err.problems)
        return
    assert all(isinstance(item, Item) and item.id for item in items)
    TALLY["kept"] += len(items)


# ---- hostile captions through a real tokenizer -------------------------------------------------------------------
hostile_char = st.one_of(st.characters(), st.integers(0xD800, 0xDFFF).map(chr), st.sampled_from("\x00\n\t \u2028"))


@pytest.fixture(scope="module")
def text_preprocessor(tiny_text_model):
    from transformers import AutoTokenizer

    from extract.encoders import HFTextPreprocessor

    return HFTextPreprocessor(AutoTokenizer.from_pretrained(tiny_text_model), max_tokens=16)


@FAST
@given(st.lists(st.text(hostile_char, max_size=40), min_size=1, max_size=8))
def test_hostile_captions_fail_alone_with_a_reason(text_preprocessor, texts):
    items = [Item(id=f"t{k}", path=None, text=t, label=None, ref=None, line=k + 1) for k, t in enumerate(texts)]
    TALLY["tried"] += len(items)
    batch = text_preprocessor(items)
    good, failed = batch["items"], batch.get("failed", [])
    assert len(good) + len(failed) == len(items)
    assert {it.id for it in good} | {it.id for it, _ in failed} == {it.id for it in items}
    assert all(reason for _, reason in failed)
    for item, _ in failed:  # what the error table records must be writable as UTF-8
        json.dumps({"text": item.text}, ensure_ascii=False).encode("utf-8")
    if good:
        assert batch["input_ids"].shape[0] == len(good)
    TALLY["reported"] += len(failed)
    TALLY["kept"] += len(good)


# ---- corrupted media ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("adversarial-media")
    rng = np.random.default_rng(0)
    out = {}
    for fmt in ("PNG", "JPEG", "GIF", "TIFF"):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buffer, format=fmt)
        out[fmt.lower()] = buffer.getvalue()
    out["wav"] = write_audio_file(root / "a.wav", sine(0.3, 8000), 8000, first_codec("pcm_s16le")).read_bytes()
    out["mp4"] = write_video_file(root / "v.mp4", [gray_frame(20 * i) for i in range(6)],
                                  first_codec("mpeg4")).read_bytes()
    return out


def _decode(kind: str, path: Path):
    if kind == "wav":
        wave = load_audio(path, 8000)
        assert wave.dtype == torch.float32 and wave.ndim == 1 and len(wave) > 0
    elif kind == "mp4":
        (clip,) = load_video_frames(path, 3)
        assert clip.shape[0] == 3 and clip.dtype == np.uint8
    else:
        assert load_image(path).mode == "RGB"


@FAST
@given(st.sampled_from(["png", "jpeg", "gif", "tiff", "wav", "mp4"]), corruptions)
def test_corrupted_media_decodes_or_fails_with_a_reason(media, tmp_path_factory, kind, corruption):
    path = tmp_path_factory.getbasetemp() / f"adversarial.{kind}"
    path.write_bytes(_corrupt(media[kind], *corruption))
    TALLY["tried"] += 1
    try:
        _decode(kind, path)
    except MediaError as err:
        assert err.reason
        TALLY["reported"] += 1
        return
    TALLY["kept"] += 1


# ---- run directories ---------------------------------------------------------------------------------------------
RECORDS = [{"stage": "fit-up", "epoch": e, "loss": 1.0 / e, "val": {"rsum": 0.1 * e}} for e in range(1, 6)]


@FAST
@given(st.integers(0, 10_000), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=3))
def test_a_torn_or_corrupted_metrics_log_reads_a_prefix_or_names_the_line(tmp_path_factory, cut, flips):
    run = tmp_path_factory.getbasetemp() / "adversarial-run"
    run.mkdir(exist_ok=True)
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in RECORDS).encode()
    torn = _corrupt(data, flips, min(1.0, cut / len(data)))
    (run / "metrics.jsonl").write_bytes(torn)
    TALLY["tried"] += 1
    try:
        records = RunDir(run).metrics()
    except RunError as err:
        assert "metrics.jsonl line" in str(err)
        TALLY["reported"] += 1
        return
    if not flips:  # a crash only tears the end: every complete record is kept
        assert records == RECORDS[: len(records)] and len(records) >= torn.count(b"\n")
    TALLY["kept"] += len(records)


# ---- one extraction and one training over a hostile corpus, end to end --------------------------------------------
def test_a_hostile_corpus_extracts_and_trains_on_every_good_item(tmp_path, tiny_image_model, tiny_text_model):
    from test_media_bounds import png_declaring

    from extract.run import run_extraction
    from pipeline.training.fit import TrainConfig, fit_up
    from stores import FeatureStore

    rng = np.random.default_rng(1)
    (tmp_path / "img").mkdir()
    images, captions, bad_images = [], [], {}
    for k in range(12):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{k}.png")
        images.append({"id": f"img{k}", "path": f"img/{k}.png"})
        captions += [{"id": f"img{k}-c{c}", "text": f"a {w} picture", "ref": f"img{k}"} for c, w in
                     enumerate(("red", "blue"))]
    png_declaring(tmp_path / "img" / "bomb.png", 9000, 9000)
    (tmp_path / "img" / "torn.png").write_bytes((tmp_path / "img" / "0.png").read_bytes()[:70])
    (tmp_path / "img" / "empty.png").write_bytes(b"")
    for name in ("bomb", "torn", "empty", "absent"):
        images.append({"id": name, "path": f"img/{name}.png"})
        captions.append({"id": f"{name}-c0", "text": "a picture", "ref": name})
        bad_images[name] = True
    manifest_images = tmp_path / "images.jsonl"
    manifest_images.write_text("".join(json.dumps(r) + "\n" for r in images))
    manifest_text = tmp_path / "captions.jsonl"
    lines = [json.dumps(r) for r in captions] + ['{"id": "lone", "text": "x\\udcff y", "ref": "img1"}',
                                                 json.dumps({"id": "blank", "text": "   ", "ref": "img2"})]
    manifest_text.write_text("\n".join(lines) + "\n")

    image_store = run_extraction(manifest_images, "image", tiny_image_model, tmp_path / "images", batch_size=5,
                                 progress=False).store
    text_store = run_extraction(manifest_text, "text", tiny_text_model, tmp_path / "texts", batch_size=5,
                                progress=False).store
    stored_images, stored_texts = FeatureStore.open(image_store), FeatureStore.open(text_store)
    image_errors = {e["id"]: e["reason"] for e in stored_images.errors()}
    text_errors = {e["id"]: e["reason"] for e in stored_texts.errors()}
    assert set(image_errors) == set(bad_images) and all(image_errors.values())
    assert set(text_errors) == {"lone", "blank"} and all(text_errors.values())
    assert set(stored_images.ids) == {f"img{k}" for k in range(12)}
    assert len(stored_texts) == len(captions)

    run = tmp_path / "run"
    fit_up(image_store, text_store, run, width=16, blocks=1,
           train=TrainConfig(epochs=1, batch_size=6, val_fraction=0.25, tensorboard=False), progress=False)
    dropped = json.loads((run / "dropped-pairs.json").read_text())["fit-up"]["items"]
    assert {d["id"] for d in dropped} == {f"{name}-c0" for name in bad_images}
    (record,) = RunDir(run).metrics()
    assert math.isfinite(record["loss"]) and math.isfinite(record["val"]["rsum"])
    TALLY["tried"] += len(images) + len(lines)
    TALLY["reported"] += len(image_errors) + len(text_errors) + len(dropped)
    TALLY["kept"] += len(stored_images) + len(stored_texts) - len(dropped)
