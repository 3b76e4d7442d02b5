"""How training options are chosen and kept, through the real CLI in subprocesses: --resume continues a run's
recorded configuration and refuses a different one, --preset paper sets the paper's protocol under explicit options,
freeze-align's CLS branch is reachable, and every trainer keeps the weights of its best validation epoch."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import click
import numpy as np
import pytest
import torch
from conftest import run_cli
from toy_stores import _write, make_toy_modality, make_toy_pair

from stores import FeatureStore

REPO = Path(__file__).resolve().parents[1]


cli = run_cli


def config(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toy")
    image, text = make_toy_pair(root, n_images=32)
    return {"root": root, "image": image, "text": text, "audio": make_toy_modality(root, "audio", n_images=32)}


def fit_up_args(toy: dict, run: Path, *extra: object) -> list[object]:
    return ["fit-up", "--image-store", toy["image"], "--text-store", toy["text"], "--out", run, "--width", 16,
            "--blocks", 1, "--no-tensorboard", *extra]


# ---- --resume ----------------------------------------------------------------------------------------------------
def test_resume_continues_the_recorded_options_and_refuses_different_ones(toy, tmp_path):
    run = tmp_path / "run"
    cli(*fit_up_args(toy, run, "--epochs", 2, "--batch-size", 8, "--sampling", "all", "--lr", 0.002))
    original = config(run)
    # Resumed without repeating the options: the recorded ones hold (every pair, lr 0.002), not the defaults; an
    # option repeated with its recorded value is fine.
    cli(*fit_up_args(toy, run, "--epochs", 3, "--resume", "--batch-size", 8))
    resumed = config(run)
    assert resumed["stages"][0]["train"] == {**original["stages"][0]["train"], "epochs": 3}
    assert resumed["model"] == original["model"] and resumed["loss"] == original["loss"]
    steps = [r["steps"] for r in metrics(run)]
    assert steps == [steps[0]] * 3  # epoch 3 ran the same batches per epoch as epochs 1-2
    # Given explicitly and different: refused in one line naming each option, and nothing is touched.
    before = {p: p.read_bytes() for p in (run / "config.json", run / "metrics.jsonl", run / "model.safetensors")}
    refused = cli(*fit_up_args(toy, run, "--epochs", 4, "--resume", "--batch-size", 128, "--loss", "soft"), ok=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    message = refused.stderr.strip()
    assert len(message.splitlines()) == 1
    assert "--batch-size 128 differs from the run's 8" in message and "--loss soft differs" in message
    assert {p: p.read_bytes() for p in before} == before


# ---- --preset paper ----------------------------------------------------------------------------------------------
def test_every_preset_names_only_options_its_command_has():
    import cli as cli_module
    from pipeline.training.fit import TrainConfig
    from pipeline.training.presets import PRESET_DIR, preset_names

    assert "paper" in preset_names()
    train_fields = {f for f in TrainConfig.__dataclass_fields__}
    for name in preset_names():
        data = json.loads((PRESET_DIR / f"{name}.json").read_text())
        for command in ("fit-up", "fit-al", "fit-vqa"):
            params = {p.name for p in cli_module.main.commands[command].params}
            assert "preset" in params
            assert set(data.get(command, {})) <= params | train_fields, (name, command)


def test_preset_paper_sets_the_papers_protocol_under_explicit_options(toy, tmp_path):
    run = tmp_path / "paper"
    cli(*fit_up_args(toy, run, "--preset", "paper", "--epochs", 1, "--batch-size", 16))
    c = config(run)
    stage = c["stages"][0]
    # The paper's values where none was given ...
    assert c["loss"]["kind"] == "soft" and c["loss"]["target_mix"] == 0.0 and c["head"] == "up"
    assert stage["train"]["sampling"] == "all" and stage["train"]["warmup_epochs"] == 0
    assert (stage["train"]["lr"], stage["train"]["beta1"], stage["train"]["beta2"],
            stage["train"]["weight_decay"]) == (0.001, 0.9, 0.95, 0.001)
    assert c["model"]["fusion"] == "add"
    # ... the command line's where one was (--width, --blocks and the epochs, batch size of this small test).
    assert (c["model"]["width"], c["model"]["blocks"]) == (16, 1)
    assert (stage["train"]["epochs"], stage["train"]["batch_size"]) == (1, 16)
    assert stage["preset"]["name"] == "paper"
    assert stage["preset"]["values"]["epochs"] == 500 and stage["preset"]["values"]["batch_size"] == 512
    assert stage["preset"]["overridden"] == {"epochs": 1, "batch_size": 16, "width": 16, "blocks": 1}

    al = ["fit-al", "--run", run, "--modality", "audio", "--store", toy["audio"], "--pivot", "text", "--pivot-store",
          toy["text"], "--no-tensorboard"]
    cli(*al, "--preset", "paper", "--epochs", 1)
    c = config(run)
    al_stage = c["stages"][1]
    assert c["modalities"]["audio"]["al"] == "mlp"
    assert (al_stage["train"]["batch_size"], al_stage["train"]["sampling"], al_stage["train"]["epochs"]) == (64, "all", 1)
    assert al_stage["preset"] == {"name": "paper", "values": al_stage["preset"]["values"], "overridden": {"epochs": 1}}
    # fit-al --resume without the options: the stage's recorded ones (batch 64, every pair), not the defaults.
    cli(*al, "--epochs", 2, "--resume")
    resumed = config(run)["stages"][1]
    assert resumed["train"] == {**al_stage["train"], "epochs": 2} and resumed["preset"] == al_stage["preset"]
    steps = [r["steps"] for r in metrics(run) if r["stage"] == "fit-al:audio"]
    assert len(steps) == 2 and steps[0] == steps[1]
    refused = cli(*al, "--epochs", 3, "--resume", "--al", "linear", ok=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "--al linear differs from the run's mlp" in refused.stderr


def test_preset_paper_for_vqa_trains_the_up_with_a_linear_head(toy, tmp_path):
    from pipeline.training.fit import TrainConfig, fit_up

    run = tmp_path / "run"
    fit_up(toy["image"], toy["text"], run, width=16, blocks=1, train=TrainConfig(epochs=1, batch_size=8),
           progress=False)
    # Questions about the toy images (same text encoder identity as the caption store), answered by the image's label.
    gen = torch.Generator().manual_seed(0)
    identity = FeatureStore.open(toy["text"]).identity
    items = [torch.randn(int(torch.randint(2, 6, (1,), generator=gen)), 16, generator=gen) for _ in range(32)]
    metas = [{"id": f"q{i}", "ref": f"img{i}", "label": "yes" if i % 2 else "no"} for i in range(32)]
    questions = _write(tmp_path / "questions", "text", "ragged", items, metas, 16, None,
                       {**identity, "manifest_sha256": "questions"})
    out = tmp_path / "vqa"
    cli("fit-vqa", "--run", run, "--image-store", toy["image"], "--question-store", questions, "--out", out,
        "--preset", "paper", "--epochs", 2, "--batch-size", 8)
    c = json.loads((out / "config.json").read_text())
    assert c["settings"]["unfreeze"] is True and c["settings"]["hidden"] == 0
    assert (c["train"]["epochs"], c["train"]["batch_size"], c["train"]["lr"]) == (2, 8, 0.001)
    assert c["preset"]["name"] == "paper" and c["preset"]["overridden"] == {"epochs": 2}
    assert c["preset"]["values"]["epochs"] == 100


def test_readme_protocol_table_matches_the_preset_and_the_defaults():
    """The README's table of the paper's protocol says, per option, our default and the paper's value: both must
    be what the command line and presets/paper.json really hold (the defaults may change; the table follows)."""
    import cli as cli_module
    from pipeline.training.presets import preset_values

    text = (REPO / "README.md").read_text()
    section = text.split("## The paper's protocol", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| `")]
    assert rows
    checked = 0
    for row in rows:
        command, option = row[0].strip("`").split(" ", 1)
        params = {p.opts[0]: p for p in cli_module.main.commands[command].params if p.opts}
        values = preset_values("paper", command)
        assert option in params, row
        param = params[option]
        default = param.get_default(click.Context(cli_module.main.commands[command]))
        ours, paper = row[1].split(" ")[0].strip("`"), row[2].split(" ")[0].strip("`")
        if default is not None:  # None: the head chooses (said in the row)
            assert ours == (str(default).lower() if isinstance(default, bool) else str(default)), row
        if param.name in values:
            expected = values[param.name]
            expected = str(expected).lower() if isinstance(expected, bool) else str(expected)
            assert paper == expected, row
        checked += 1
    assert checked >= 8


# ---- freeze-align's CLS branch -----------------------------------------------------------------------------------
def test_freeze_align_cls_branch_follows_the_store_and_the_option(tmp_path, tiny_image_model, tiny_text_model):
    from extract.run import run_extraction
    from pipeline.demo import make_shapes_dataset
    from pipeline.training.fit import TrainConfig, fit_up
    from pipeline.training.rundir import RunDir

    images, captions = make_shapes_dataset(tmp_path / "data", n_images=16, seed=0, prefix="c")
    vit = run_extraction(images, "image", tiny_image_model, tmp_path / "vit", progress=False, workers=0).store
    text = run_extraction(captions, "text", tiny_text_model, tmp_path / "txt", progress=False, workers=0).store
    common = ["fit-up", "--image-store", vit, "--text-store", text, "--head", "freeze-align", "--width", 16,
              "--epochs", 1, "--batch-size", 8, "--no-tensorboard"]
    cli(*common, "--out", tmp_path / "auto")
    model, _, c = RunDir(tmp_path / "auto").load_model()
    assert c["model"]["cls_token"] == {"image": True, "text": False}  # a ViT store starts with its CLS token
    assert model.adapters["image"].cls is not None and model.adapters["text"].cls is None
    refused = cli(*common, "--out", tmp_path / "auto", "--cls-token", "no", "--resume", "--epochs", 2, ok=False)
    assert refused.returncode == 1 and "--cls-token no differs from the run's yes" in refused.stderr
    fit_up(vit, text, tmp_path / "off", head="freeze-align", width=16, cls_token=False,
           train=TrainConfig(epochs=1, batch_size=8), progress=False)
    assert config(tmp_path / "off")["model"]["cls_token"]["image"] is False


def test_freeze_align_without_a_known_cls_encoder_averages_every_token(toy, tmp_path, one_thread):
    from pipeline.training.fit import TrainConfig, fit_up

    for name, cls_token in (("auto", None), ("forced", True)):
        fit_up(toy["image"], toy["text"], tmp_path / name, head="freeze-align", width=16, cls_token=cls_token,
               train=TrainConfig(epochs=1, batch_size=8, tensorboard=False), progress=False)
    assert config(tmp_path / "auto")["model"]["cls_token"] == {"image": False, "text": False}
    assert config(tmp_path / "forced")["model"]["cls_token"]["image"] is True


# ---- one selection rule --------------------------------------------------------------------------------------------
def _selected(records: list[dict]) -> int:
    scores = [r["val"]["rsum"] for r in records]
    return int(np.argmax(scores)) + 1  # the first best epoch, as a strict '>' keeps it


def test_fit_up_records_the_selection_rule_and_epoch(toy, tmp_path, one_thread):
    from pipeline.training.fit import TrainConfig, fit_up

    run = tmp_path / "run"
    fit_up(toy["image"], toy["text"], run, width=16, blocks=1,
           train=TrainConfig(epochs=3, batch_size=8, lr=0.05, tensorboard=False), progress=False)
    selection = config(run)["stages"][0]["selection"]
    assert selection["epoch"] == _selected(metrics(run))
    assert "best validation rsum" in selection["rule"]


@pytest.mark.parametrize("path_loss", ["own", "shared"])
def test_fit_ups_up_trains_its_linear_path_as_the_linear_head_of_its_seed_with_its_own_loss(toy, tmp_path, one_thread,
                                                                                          path_loss):
    from pipeline.training.fit import LossConfig, TrainConfig, fit_up

    rows = np.arange(8)
    probe = {"image": FeatureStore.open(toy["image"]).get_batch(rows),
             "text": FeatureStore.open(toy["text"]).get_batch(rows)}
    seen: dict[str, list] = {}
    for head in ("up", "linear"):
        seen[head] = []

        def monitor(epoch, model, head=head):
            embed = model.linear_path if head == "up" else model.encode
            with torch.no_grad():
                seen[head].append({m: embed(m, *probe[m]) for m in probe})
            return {}

        # A fixed temperature: the only parameter the two losses would otherwise share
        fit_up(toy["image"], toy["text"], tmp_path / head, head=head, width=16, blocks=1,
               head_options={} if path_loss == "shared" else {"path_loss": path_loss},
               loss=LossConfig(learn_temperature=False), train=TrainConfig(epochs=3, batch_size=8, tensorboard=False),
               progress=False, on_epoch=monitor)
    assert config(tmp_path / "up")["model"]["path_loss"] == path_loss  # "shared": fit-up's default
    same = [all(torch.allclose(up[m], linear[m], atol=1e-5) for m in probe)
            for up, linear in zip(seen["up"], seen["linear"], strict=True)]
    # own: epoch by epoch the path is the linear head; shared: the UP's loss moves it elsewhere
    assert same == [path_loss == "own"] * 3


def test_fit_up_keeps_the_latest_epoch_within_one_standard_error_and_a_resume_keeps_the_same(toy, tmp_path,
                                                                                             one_thread):
    from pipeline.training.fit import TrainConfig, fit_up

    train = TrainConfig(epochs=8, batch_size=8, lr=0.05, seed=1, val_fraction=0.25, select="mean-rank-1se",
                        tensorboard=False)
    whole = tmp_path / "whole"
    fit_up(toy["image"], toy["text"], whole, width=16, blocks=1, train=train, progress=False)
    records = metrics(whole)
    lowest = min(records, key=lambda r: (r["val"]["mean_rank"], r["epoch"]))
    within = [r["epoch"] for r in records
              if r["val"]["mean_rank"] <= lowest["val"]["mean_rank"] + lowest["val"]["mean_rank_se"]]
    selection = config(whole)["stages"][0]["selection"]
    assert selection["epoch"] == max(within) > lowest["epoch"]  # not the first lowest: a later one within its error
    assert "within one standard error" in selection["rule"]
    assert [r["epoch"] for r in records if r.get("saved")][-1] == selection["epoch"]
    # Stopped after epoch 4 and resumed: the checkpoint carries the best epoch's tolerance, so the same epoch is kept.
    parts = tmp_path / "resumed"
    fit_up(toy["image"], toy["text"], parts, width=16, blocks=1, train=replace(train, epochs=4), progress=False)
    fit_up(toy["image"], toy["text"], parts, width=16, blocks=1, train=train, resume=True, progress=False)
    assert config(parts)["stages"][0]["selection"]["epoch"] == selection["epoch"]
    assert (parts / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()


def test_base_keeps_its_best_validation_epoch_by_the_same_rule(tmp_path, tiny_image_model, tiny_text_model,
                                                               one_thread):
    from extract.encoders import load_encoder
    from extract.manifest import read_manifest
    from pipeline.demo import make_shapes_dataset
    from pipeline.training.base import _validate, fit_base, manifest_pairs
    from pipeline.training.fit import TrainConfig, selection_rule
    from pipeline.training.pairs import split_by_anchor
    from pipeline.training.rundir import RunDir

    image_manifest, text_manifest = make_shapes_dataset(tmp_path / "train", 16, seed=0, prefix="tr")
    run = tmp_path / "base"
    fit_base(tiny_image_model, tiny_text_model, image_manifest, text_manifest, run, width=16, encoder_lr=3e-3,
             train=TrainConfig(epochs=4, batch_size=6, lr=3e-2, val_fraction=0.25, seed=1, tensorboard=False),
             progress=False)
    records = metrics(run)
    selection = config(run)["stages"][0]["selection"]
    assert selection["rule"] == selection_rule("rsum") and selection["epoch"] == _selected(records)
    assert [r["epoch"] for r in records if r.get("saved")][-1] == selection["epoch"]
    # The kept encoders and head reproduce the selected epoch's validation figures exactly.
    images, texts = read_manifest(image_manifest), read_manifest(text_manifest)
    _, val_pairs = split_by_anchor(manifest_pairs(images, texts, image_manifest, text_manifest), 0.25, 1)
    head, _, _ = RunDir(run).load_model()
    encoders = {m: load_encoder(str(run / "encoders" / m), m) for m in ("image", "text")}
    val = _validate(encoders["image"], encoders["text"], head, images, texts, val_pairs, "cpu", 6)
    assert val["rsum"] == pytest.approx(records[selection["epoch"] - 1]["val"]["rsum"], abs=1e-9)
    assert val["rsum"] == pytest.approx(selection["score"], abs=1e-9)
