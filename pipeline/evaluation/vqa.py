"""``fit-vqa``: visual question answering on a trained run, from cached features (OneEncoder, Section V).

The run's aligned head (the UP) embeds the images of an image store and the questions of a text store (each
question's ``ref`` names its image, its ``label`` is its answer); a :class:`project.vqa.VQAHead` classifies the
pair into the answer vocabulary of the training questions, trained with cross-entropy. The head is frozen by
default, so both embeddings are computed once and the classifier trains on them in memory; ``unfreeze=True`` trains
the UP together with the classifier (what the paper does: "OneEncoder ... focuses solely on training the UP"),
reading token batches from the stores every step. The encoders are never loaded either way.

Output folder (default ``RUN/vqa``)::

    config.json        answer vocabulary, head config, settings, the stores (with their cache keys), the run
    model.safetensors  head.* (the prediction head) and, with unfreeze, encoder.* (the fine-tuned UP)
    metrics.jsonl      per epoch: loss, training accuracy, test accuracy (no model selection: the last epoch is kept)
    report.json / .md  accuracy, macro F1, WUPS@0.9 / WUPS@0.0 (when WordNet is installed) on the train and test
                       questions, beside the majority-answer baseline and chance

Test answers absent from the training vocabulary cannot be predicted and count as wrong; the report gives how many
there are and the accuracy ceiling they leave.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline.embed import embed_store
from pipeline.evaluation.vqa_metrics import answer_metrics, canonical_answer, wordnet_similarity
from pipeline.training.fit import store_record
from pipeline.training.loop import (
    TrainConfig,
    TrainingError,
    build_optimizer,
    epoch_generator,
    epoch_line,
    optimiser_step,
    seconds_since,
    train_epoch,
)
from pipeline.training.pairs import pair_stores
from pipeline.training.prefetch import prefetched, to_device, token_batch
from pipeline.training.rundir import RunDir, RunError, check_compatible
from project.vqa import VQAHead, VQAHeadConfig, VQAModel
from stores import FeatureStore, atomic_write_text

WEIGHTS_FILE = "model.safetensors"
TRAIN_FIELDS = ("epochs", "batch_size", "lr", "beta1", "beta2", "weight_decay", "seed", "device")


@dataclass
class VQASettings:
    """The prediction head and whether the aligned head trains too."""

    hidden: int = 512
    dropout: float = 0.1
    fusion: str = "concat"
    unfreeze: bool = False


@dataclass
class QASplit:
    """Questions of one split with the store row of each question's image and its canonical answer."""

    images: FeatureStore
    questions: FeatureStore
    image_of: np.ndarray  # [n_questions] row in ``images`` of each question's image
    answers: list[str]


def load_split(config: dict, image_store: Path | str, question_store: Path | str, split: str) -> QASplit:
    """Open, check against the run and pair one split's stores; every question needs an image and an answer."""
    images, questions = FeatureStore.open(image_store), FeatureStore.open(question_store)
    for store, modality, what in ((images, "image", "image"), (questions, "text", "question")):
        if store.modality != modality:
            raise TrainingError(f"{split} {what} store {store.path} holds {store.modality!r} features, not {modality!r}")
        check_compatible(config, modality, store)
    if questions.labels is None:
        raise TrainingError(f"{split} question store {questions.path} has no labels: each question needs its answer "
                            "as 'label' in the manifest")
    no_answer = [questions.ids[i] for i, label in enumerate(questions.labels) if label is None or not str(label).strip()]
    if no_answer:
        raise TrainingError(f"{len(no_answer)} questions of {questions.path} have no answer label, e.g. "
                            f"{', '.join(no_answer[:5])}")
    pairs = pair_stores(images, questions)
    image_of = np.full(len(questions), -1, dtype=np.int64)
    image_of[pairs.partner] = pairs.anchor
    if len(pairs) != len(questions) or (image_of < 0).any():
        lonely = [questions.ids[i] for i in np.flatnonzero(image_of < 0)[:5]]
        raise TrainingError(f"every question of {questions.path} needs one image in {images.path} (its 'ref'); "
                            f"without one: {', '.join(lonely) or 'questions naming several images'}")
    return QASplit(images, questions, image_of, [canonical_answer(label) for label in questions.labels])


def answer_vocabulary(answers: list[str]) -> list[str]:
    """Distinct training answers, most frequent first (ties alphabetical): the classifier's classes."""
    counts = Counter(answers)
    return sorted(counts, key=lambda a: (-counts[a], a))


@torch.no_grad()
def predict(model: VQAModel, split: QASplit, answers: list[str], device: str = "cpu", batch_size: int = 512,
            cache: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[str]:
    """Predicted answer of every question of ``split`` (``cache``: its image and question embeddings, if known)."""
    was_training = model.training
    model.eval()
    image_emb, question_emb = cache if cache is not None else embeddings(model, split, device)
    out: list[str] = []
    for start in range(0, len(split.answers), batch_size):
        rows = np.arange(start, min(start + batch_size, len(split.answers)))
        logits = model.head(image_emb[split.image_of[rows]].to(device), question_emb[rows].to(device))
        out += [answers[k] for k in logits.argmax(1).tolist()]
    model.train(was_training)
    return out


def embeddings(model: VQAModel, split: QASplit, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned, L2-normalised embeddings of every image and every question of ``split`` (on the CPU)."""
    return (embed_store(model.encoder, model.image, split.images, device=device),
            embed_store(model.encoder, model.question, split.questions, device=device))


def fit_vqa(
    run_dir: Path | str,
    image_store: Path | str,
    question_store: Path | str,
    out: Path | str | None = None,
    *,
    test_image_store: Path | str | None = None,
    test_question_store: Path | str | None = None,
    settings: VQASettings | None = None,
    train: TrainConfig | None = None,
    preset: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Train the VQA prediction head (and, with ``settings.unfreeze``, the run's UP) and write the report.
    ``preset``: the record of the ``--preset`` the options came from, kept in the output's config."""
    settings = settings or VQASettings()
    train = train or TrainConfig(epochs=100, batch_size=64)  # Section V: 100 epochs
    if (test_image_store is None) != (test_question_store is None):
        raise TrainingError("give both a test image store and a test question store, or neither")
    run = RunDir(run_dir)
    encoder, _, config = run.load_model(train.device)
    out_dir = Path(out) if out is not None else run.path / "vqa"
    _check_out_dir(out_dir, overwrite)
    train_split = load_split(config, image_store, question_store, "train")
    test_split = (load_split(config, test_image_store, test_question_store, "test")
                  if test_image_store is not None else None)
    answers = answer_vocabulary(train_split.answers)
    if len(answers) < 2:
        raise TrainingError(f"the training questions have {len(answers)} distinct answer(s); a classifier needs 2+")

    torch.manual_seed(train.seed)  # the head's initial weights follow --seed
    head_config = VQAHeadConfig(width=int(encoder.config.width), answers=len(answers), hidden=settings.hidden,
                                dropout=settings.dropout, fusion=settings.fusion)
    model = VQAModel(encoder, VQAHead(head_config)).to(train.device)
    encoder.requires_grad_(settings.unfreeze)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], train)
    # Frozen: the embeddings never change, so they are computed once (the classifier then trains in memory).
    frozen_cache = {"train": embeddings(model, train_split, train.device)} if not settings.unfreeze else {}
    if test_split is not None and not settings.unfreeze:
        frozen_cache["test"] = embeddings(model, test_split, train.device)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    record_train = {k: v for k, v in asdict(train).items() if k in TRAIN_FIELDS}
    vqa_config = {
        "task": "vqa", "run": str(run.path), "run_head": config["head"], "answers": answers,
        "run_weights_sha256": _sha256(run.path / WEIGHTS_FILE),
        "head": head_config.to_dict(), "settings": asdict(settings), "train": record_train,
        **({"preset": preset} if preset is not None else {}),
        "stores": {name: {"image": store_record(s.images), "question": store_record(s.questions)}
                   for name, s in (("train", train_split), ("test", test_split)) if s is not None},
    }
    atomic_write_text(out_dir / "config.json", json.dumps(vqa_config, indent=2, sort_keys=True))
    trainer = _AnswerTrainer(model, optimizer, train_split, answers, frozen_cache, settings.unfreeze, train)
    for epoch in range(1, train.epochs + 1):
        record = trainer.epoch(epoch, test_split)
        with open(out_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        if progress:
            accuracies = [f"train acc {record['train_accuracy']:.3f}"]
            accuracies += [f"test acc {record['test_accuracy']:.3f}"] if "test_accuracy" in record else []
            print(epoch_line("fit-vqa", epoch, record["loss"], accuracies, record["seconds"]), flush=True)

    _save_weights(model, settings.unfreeze, out_dir / WEIGHTS_FILE)
    report = _report(model, vqa_config, train_split, test_split, answers, frozen_cache, train.device, out_dir)
    return report


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output folder that holds something other than a VQA model, or one without ``overwrite``."""
    if out_dir.exists() and any(out_dir.iterdir()):
        config_file = out_dir / "config.json"
        if not config_file.is_file() or json.loads(config_file.read_text()).get("task") != "vqa":
            raise RunError(f"{out_dir} exists and is not a VQA output folder; choose another --out")
        if not overwrite:
            raise RunError(f"{out_dir} already holds a VQA model; pass --overwrite to replace it")


@dataclass
class _AnswerTrainer:
    """The epoch loop of fit-vqa: cross-entropy on the answers, from the frozen embeddings cached in memory or,
    with ``unfreeze``, from token batches read from the stores every step."""

    model: VQAModel
    optimizer: torch.optim.Optimizer
    split: QASplit
    answers: list[str]
    frozen_cache: dict
    unfreeze: bool
    train: TrainConfig

    def __post_init__(self) -> None:
        index = {a: k for k, a in enumerate(self.answers)}
        self.targets = torch.tensor([index[a] for a in self.split.answers])
        self.pin = torch.device(self.train.device).type == "cuda"

    def fetch(self, rows: np.ndarray) -> tuple:
        """Token batches of the questions ``rows`` and of their images (read in the prefetch thread)."""
        return (token_batch(self.split.images, self.split.image_of[rows], self.pin),
                token_batch(self.split.questions, rows, self.pin))

    def logits(self, batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        device = self.train.device
        if self.unfreeze:
            for rows, fetched in prefetched(batches, self.fetch):
                yield rows, self.model(*(x for side in fetched for x in to_device(side, device)))
        else:
            image_emb, question_emb = self.frozen_cache["train"]
            for rows in batches:
                yield rows, self.model.head(image_emb[self.split.image_of[rows]].to(device),
                                            question_emb[rows].to(device))

    def epoch(self, epoch: int, test_split: QASplit | None) -> dict:
        """Train one epoch; its metrics record (loss, training accuracy and, with a test split, test accuracy)."""
        started = time.perf_counter()
        generator = epoch_generator(self.train.seed, epoch)
        batches = [b.numpy() for b in torch.randperm(len(self.targets), generator=generator).split(self.train.batch_size)]
        self.model.train(self.unfreeze)  # a frozen UP stays in eval mode (no dropout): frozen means frozen
        self.model.head.train()
        correct = 0

        def step(batch: tuple[np.ndarray, torch.Tensor], where: str) -> tuple[float, int]:
            nonlocal correct
            rows, logits = batch
            y = self.targets[rows].to(self.train.device)
            value = optimiser_step(self.optimizer, F.cross_entropy(logits, y), where,
                                   "lower --lr or check the stores for non-finite values")
            correct += int((logits.argmax(1) == y).sum())
            return value, len(rows)

        loss = train_epoch(self.logits(batches), step, f"at epoch {epoch}")
        record = {"epoch": epoch, "loss": loss, "train_accuracy": correct / len(self.targets),
                  "seconds": seconds_since(started)}
        if test_split is not None:
            predicted = predict(self.model, test_split, self.answers, self.train.device,
                                cache=self.frozen_cache.get("test"))
            record["test_accuracy"] = answer_metrics(predicted, test_split.answers)["accuracy"]
        return record


def _save_weights(model: VQAModel, with_encoder: bool, path: Path) -> None:
    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    if with_encoder:  # a frozen UP is the run's own model.safetensors: not copied
        tensors.update({f"encoder.{k}": v.detach().cpu().contiguous() for k, v in model.encoder.state_dict().items()})
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def load_vqa(out_dir: Path | str, device: str = "cpu") -> tuple[VQAModel, dict]:
    """A trained VQA model (eval mode) and its config: the run's UP (or the fine-tuned one saved with it) + head."""
    out_dir = Path(out_dir)
    config_path = out_dir / "config.json"
    if not config_path.is_file():
        raise RunError(f"{out_dir} is not a VQA output folder (no config.json); train one with fit-vqa")
    config = json.loads(config_path.read_text())
    run_weights = Path(config["run"]) / WEIGHTS_FILE
    if run_weights.is_file() and _sha256(run_weights) != config["run_weights_sha256"]:
        # The head was trained on embeddings of the run's weights at that time; other weights give other embeddings.
        raise RunError(f"the weights of run {config['run']} changed since this VQA model was trained on them")
    encoder, _, _ = RunDir(config["run"]).load_model(device)
    model = VQAModel(encoder, VQAHead(VQAHeadConfig.from_dict(config["head"])))
    tensors = load_file(str(out_dir / WEIGHTS_FILE))
    model.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    fine_tuned = {k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")}
    if fine_tuned:
        model.encoder.load_state_dict(fine_tuned)
    return model.to(device).eval(), config


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _report(model: VQAModel, config: dict, train_split: QASplit, test_split: QASplit | None, answers: list[str],
            cache: dict, device: str, out_dir: Path) -> dict:
    similarity, why_not = wordnet_similarity()
    majority = answers[0]
    report: dict = {
        "task": "vqa", "run": config["run"], "out": str(out_dir),
        "encoder": "UP trained with the head (--unfreeze)" if config["settings"]["unfreeze"] else "UP frozen",
        "answers": len(answers), "fusion": config["head"]["fusion"], "train_settings": config["train"],
        "wups_computed": similarity is not None,
        "chance_accuracy": 1 / len(answers), "majority_answer": majority,
    }
    if similarity is None:
        report["wups_not_computed"] = f"WUPS not computed: {why_not}"
    for name, split in (("train", train_split), ("test", test_split)):
        if split is None:
            report[name] = None
            continue
        predicted = predict(model, split, answers, device, cache=cache.get(name))
        report[name] = answer_metrics(predicted, split.answers, similarity, why_not)
        report[name]["majority_baseline"] = answer_metrics([majority] * len(split.answers), split.answers,
                                                           similarity, why_not)
        known = set(answers)
        unknown = sum(a not in known for a in split.answers)
        report[name]["unknown_answers"] = unknown
        report[name]["accuracy_ceiling"] = 1 - unknown / len(split.answers)
    report["report_path"], report["markdown_path"] = str(out_dir / "report.json"), str(out_dir / "report.md")
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out_dir / "report.md", vqa_markdown(report))
    return report


def _cell(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def vqa_markdown(report: dict) -> str:
    """A :func:`fit_vqa` report as Markdown: one table per split, the model beside the majority answer."""
    lines = [f"# VQA: {report['out']}", "",
             f"- run: {report['run']} ({report['encoder']}); prediction head: {report['fusion']} + MLP over "
             f"{report['answers']} answers",
             f"- settings: {report['train_settings']}",
             f"- chance accuracy {_cell(report['chance_accuracy'])} %; majority answer {report['majority_answer']!r}",
             "- metrics in percent; answers compared as sets of comma-separated items; F1 is macro over answers"]
    if not report["wups_computed"]:
        lines.append(f"- **{report['wups_not_computed']}**")
    for name in ("train", "test"):
        metrics = report[name]
        if metrics is None:
            lines += ["", f"## {name}: no stores given"]
            continue
        lines += ["", f"## {name} ({metrics['questions']} questions; {metrics['unknown_answers']} with an answer "
                      f"outside the vocabulary, accuracy ceiling {_cell(metrics['accuracy_ceiling'])} %)", "",
                  "| | accuracy | F1 (macro) | WUPS@0.9 | WUPS@0.0 |", "| --- | ---: | ---: | ---: | ---: |"]
        for label, m in (("model", metrics), ("majority answer", metrics["majority_baseline"])):
            wups = m["wups"] or {}
            lines.append(f"| {label} | {_cell(m['accuracy'])} | {_cell(m['f1_macro'])} | "
                         f"{_cell(wups.get('WUPS@0.9'))} | {_cell(wups.get('WUPS@0.0'))} |")
    return "\n".join(lines) + "\n"
