"""The training study of docs/training.md runs on the library as it is: one configuration, one seed, one set of
toy stores in the development-set layout, with the held-out recall recorded at every epoch."""

from __future__ import annotations

import json

from toy_stores import make_toy_pair

from pipeline.studies.train_study import run_one, summarise


def test_a_study_fit_records_held_out_recall_at_every_epoch_and_summarises(tmp_path):
    folder = tmp_path / "dev" / "toy"
    for split, seed in (("train", 0), ("test", 1)):
        image, text = make_toy_pair(tmp_path / split, n_images=24, captions=1, seed=seed)
        folder.mkdir(parents=True, exist_ok=True)
        image.rename(folder / f"image-{split}")
        text.rename(folder / f"text-{split}")
    row = run_one(tmp_path / "dev", "toy", "linear-cos", seed=0, epochs=2)
    assert [e["epoch"] for e in row["epochs"]] == [1, 2] and row["kept_epoch"] in (1, 2)
    own = run_one(tmp_path / "dev", "toy", "linear-cos-e10", seed=0)  # no --epochs: the config's own 10
    assert len(own["epochs"]) == 10
    for epoch in row["epochs"]:
        held_out = epoch["held_out"]
        assert 0 <= held_out["R@1"] <= held_out["R@5"] <= held_out["R@10"] <= 1 and held_out["mean_rank"] >= 1
    study = tmp_path / "study.jsonl"
    study.write_text(json.dumps(row) + "\n")
    assert "linear-cos" in summarise(study) and "toy" in summarise(study)
