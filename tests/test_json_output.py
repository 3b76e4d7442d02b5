"""``--json`` on the commands that print a result (schemas in docs/json.md), and the ``stores ls`` table, in real
subprocesses on real stores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.training.fit import LossConfig, TrainConfig, fit_up
from stores import FeatureStore
from stores.catalog import describe
from tests.test_cli import cli
from tests.test_finetune_report import labelled_clusters
from tests.toy_stores import make_toy_pair


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("json")
    deep = root / ("a-rather-long-folder-name-" * 3) / "nested"
    image_store, text_store = make_toy_pair(deep, n_images=24)
    fit_up(image_store, text_store, root / "run", width=16, blocks=1, loss=LossConfig(),
           train=TrainConfig(epochs=1, batch_size=12, val_fraction=0.0), progress=False)
    return {"root": root, "image": image_store, "text": text_store, "run": root / "run"}


def test_stores_ls_table_and_json(toy):
    listing = json.loads(cli("stores", "ls", toy["root"], "--json").stdout)
    assert [Path(s["path"]).name for s in listing] == ["toy-image", "toy-text"]
    assert listing[0] == json.loads(json.dumps(describe(toy["image"])))
    header, *rows = cli("stores", "ls", toy["root"]).stdout.splitlines()
    assert header.split() == ["modality", "layout", "dtype", "items", "tokens", "dim", "MB", "state", "key",
                              "encoder", "store"]
    assert len(rows) == 2 and len(str(toy["image"])) > 80
    for row, path, modality in zip(rows, (toy["image"], toy["text"]), ("image", "text"), strict=True):
        assert row.endswith(str(path)) and row.split()[:3] == [modality, "fixed" if modality == "image" else "ragged",
                                                               "float16"]
        assert "toy-encoder" in row.split()
        # every column starts where its header does, however long the paths
        assert row.index(str(path)) == header.index("store")
        assert row.index("toy-encoder") == header.index("encoder")


def test_stores_errors_and_verify_json(toy, tmp_path):
    errors = json.loads(cli("stores", "errors", toy["image"], "--json").stdout)
    assert errors == {"store": str(toy["image"]), "count": 0, "errors": []}
    ok = json.loads(cli("stores", "verify", toy["text"], "--json").stdout)
    assert ok == {"store": str(toy["text"]), "ok": True, "repaired": None, "problems": []}
    broken = labelled_clusters(tmp_path / "broken", 4, seed=1)
    shard = next(p for p in sorted((broken / "tokens" / "c").rglob("*")) if p.is_file())
    shard.write_bytes(shard.read_bytes()[:-3])
    result = cli("stores", "verify", broken, "--json", ok=False)
    assert result.returncode == 1 and "bad shard" in result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False and len(report["problems"]) == 1
    assert "truncated" in report["problems"][0]["reason"] and report["problems"][0]["array"] == "tokens"


def test_cka_and_eval_json(toy, tmp_path):
    cka = json.loads(cli("cka", "--store", toy["image"], "--store", toy["text"], "--json").stdout)
    assert cka["task"] == "cka" and cka["pairs"] == 24 and len(cka["ranking"]) == 1
    retrieval = json.loads(cli("eval", "retrieval", "--run", toy["run"], "--image-store", toy["image"],
                               "--text-store", toy["text"], "--json").stdout)
    assert retrieval["task"] == "retrieval" and retrieval["metrics"]["image->text"]["queries"] == 24
    sheet = json.loads(cli("eval", "sheet", "--run", toy["run"], "--image-store", toy["image"], "--text-store",
                           toy["text"], "--queries", 2, "--k", 3, "--out", tmp_path / "s.html", "--json").stdout)
    assert sheet["task"] == "retrieval-sheet" and len(sheet["rows"]) == 4 and sheet["out"] == str(tmp_path / "s.html")
    train = labelled_clusters(tmp_path / "train", 6, seed=2)
    test = labelled_clusters(tmp_path / "test", 3, seed=3)
    probe = json.loads(cli("eval", "linear-probe", "--train-store", train, "--test-store", test, "--features", "raw",
                           "--epochs", 2, "--out", tmp_path / "probe", "--json").stdout)
    assert probe["task"] == "linear-probe" and probe["test_items"] == len(FeatureStore.open(test))
    assert json.loads(Path(probe["report_path"]).read_text())["final"] == probe["final"]
