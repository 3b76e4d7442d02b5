"""The notebook API (pipeline.api): Run.load(...).embed(...) and StoreDataset, on real stores and runs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import Run, StoreDataset
from pipeline.embed import embed_store
from pipeline.training.fit import LossConfig, TrainConfig, fit_up
from pipeline.training.rundir import RunDir, RunError
from stores import FeatureStore
from tests.test_search import shapes_run  # noqa: F401 - the fixture: a run trained with real encoders
from tests.toy_stores import make_toy_pair

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api")
    image_store, text_store = make_toy_pair(root, n_images=24)
    fit_up(image_store, text_store, root / "run", width=16, blocks=1, loss=LossConfig(),
           train=TrainConfig(epochs=1, batch_size=12, val_fraction=0.0), progress=False)
    return {"image": image_store, "text": text_store, "run": root / "run"}


def test_run_embeds_token_arrays_like_the_store_path(toy_run):
    run = Run.load(toy_run["run"])
    assert run.modalities == ["image", "text"] and run.width == 16 and "head=up" in repr(run)
    store = FeatureStore.open(toy_run["text"])
    model = RunDir(toy_run["run"]).load_model()[0]
    expected = embed_store(model, "text", store, [3, 4, 5]).numpy()
    tokens, mask = store.get_batch([3, 4, 5])
    assert np.allclose(run.embed("text", tokens=tokens.numpy(), mask=mask.numpy()), expected, atol=1e-6)
    assert np.allclose(run.embed_store(toy_run["text"], [3, 4, 5]), expected, atol=1e-6)
    pooled = run.embed("image", tokens=np.ones((2, 24), np.float32))  # pooled features: one token each
    assert pooled.shape == (2, 16) and np.allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-5)
    with pytest.raises(RunError, match=r"\[B, L, 16\]"):
        run.embed("text", tokens=np.ones((2, 3, 5)))
    with pytest.raises(RunError, match="not aligned"):
        run.embed("audio", tokens=np.ones((2, 3, 5)))
    with pytest.raises(RunError, match="either inputs"):
        run.embed("text")


def test_store_dataset_items_and_batches(toy_run):
    dataset = StoreDataset(toy_run["text"])
    store = dataset.store
    assert len(dataset) == len(store) == 48
    item = dataset[5]
    assert item["id"] == store.ids[5] and item["ref"] == store.refs[5] and item["label"] is None
    assert item["tokens"].shape == (store.lengths[5], store.dim)
    loader = torch.utils.data.DataLoader(dataset, batch_size=7, collate_fn=StoreDataset.collate)
    batch = next(iter(loader))
    tokens, mask = store.get_batch(list(range(7)))
    assert batch["ids"] == store.ids[:7] and torch.equal(batch["mask"], mask)
    assert torch.equal(batch["tokens"], tokens)
    assert dataset[-1]["id"] == store.ids[-1]
    with pytest.raises(IndexError):
        dataset[48]


def test_run_embeds_raw_inputs_and_the_readme_example_runs(shapes_run, tmp_path, monkeypatch):  # noqa: F811
    root = shapes_run["root"]
    run = Run.load(root / "run")
    image = Path(shapes_run["images"]).parent / "images" / "s00003.png"
    from_file = run.embed("image", [image])
    store = FeatureStore.open(root / "img")
    assert np.allclose(from_file, run.embed_store(store, [store.index_of("s00003")]), atol=1e-4)
    texts = run.embed("text", ["a small red circle on the left", "a large blue square on the top"])
    assert texts.shape == (2, 64)
    # The README's example, on a run laid out like `cli.py demo`'s output.
    block = re.search(r"## Python API.*?```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    (tmp_path / "demo-out" / "stores" / "test").mkdir(parents=True)
    (tmp_path / "demo-out" / "run").symlink_to(root / "run")
    (tmp_path / "demo-out" / "stores" / "test" / "image").symlink_to(root / "img")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - the documented example, as a user runs it
    assert scope["scores"].shape[1] == 16
