"""Classification on top of a run: a linear classifier trained on a labelled store, tested on another.

Two protocols of OneEncoder (Section IV-C, Table IV), one loop (:func:`classify`):

- **linear probe** (``fine_tune=False``): the classifier trains on frozen features. They are the run's aligned
  embeddings (L2-normalised, :func:`pipeline.embed.embed_store`) or, as a baseline, the stores' raw pooled features
  (``features="raw"``), computed once and cached in memory.
- **fine-tune** (``fine_tune=True``): the run's head (the UP, or DFE / freeze-align / linear head, with the store
  modality's adapter or Alignment Layer and modality token) trains together with the classifier, from the cached
  encoder tokens of every minibatch; the encoders stay frozen (they are never loaded). The fine-tuned weights are
  saved in a folder of their own; the run's own model is never written.

Either way the classifier (:class:`project.classifier.EmbeddingClassifier`, one ``nn.Linear``) sees its input
standardised with the training set's per-dimension mean and std (of the embeddings before any fine-tuning): an
affine map that a linear classifier with a bias can undo, so it changes only how well one learning rate suits every
encoder (raw feature scales differ by orders of magnitude), not what the classifier can represent. No augmentation.

Test accuracy is measured every ``eval_every`` epochs and at the last one. The report gives every checkpoint, the
final accuracy and the best one; the best is selected on the test set itself, so it is an optimistic upper bound,
and the final accuracy is the number to quote.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.curate import class_indices, label_key, labels_of
from pipeline.embed import embed_store
from pipeline.evaluation.evaluate import EvaluationError, report_stem
from pipeline.evaluation.metrics import topk_accuracy
from pipeline.training.loop import TrainConfig, build_optimizer, epoch_line, optimiser_step, train_epoch
from pipeline.training.prefetch import prefetched
from pipeline.training.rundir import RunDir, check_compatible
from project.classifier import EmbeddingClassifier, finetune_parameters, parameter_groups, standardisation
from stores import FeatureStore, atomic_write_text, identity_differences

FEATURES = ("aligned", "raw")
# Identity fields that may differ between a train and a test store made the same way (other items, other dtype).
_DATASET_FIELDS = ("manifest_sha256", "dtype")
CLASSIFIER_FILE = "classifier.safetensors"


class ProbeError(EvaluationError):
    """The stores or settings of a linear probe or fine-tune do not fit together."""


def _targets(train: FeatureStore, test: FeatureStore) -> tuple[list, np.ndarray, np.ndarray, list]:
    """Classes (from the training labels), train and test class indices, and the classes absent from the test set."""
    classes, train_y = class_indices(labels_of(train, "train", ProbeError))
    if len(classes) < 2:
        raise ProbeError(f"train store {train.path} has a single label ({classes[0]!r}): a probe needs 2 or more")
    position = {label_key(c): i for i, c in enumerate(classes)}
    test_keys = [label_key(label) for label in labels_of(test, "test", ProbeError)]
    unseen = sorted({k for k in test_keys if k not in position})
    if unseen:
        count = sum(k in unseen for k in test_keys)
        raise ProbeError(
            f"labels only in the test store {test.path} (never in train store {train.path}): "
            f"{', '.join(unseen[:20])}{' ...' if len(unseen) > 20 else ''} ({count} test items); the classifier "
            "cannot predict a class it was never trained on"
        )
    test_y = np.asarray([position[k] for k in test_keys], dtype=np.int64)
    missing = [c for i, c in enumerate(classes) if not (test_y == i).any()]
    return classes, train_y, test_y, missing


def _check_stores(train: FeatureStore, test: FeatureStore) -> None:
    if train.modality != test.modality:
        raise ProbeError(f"train store {train.path} holds {train.modality} features but test store {test.path} holds "
                         f"{test.modality}")


def _load_run(run_dir: Path | str, train: FeatureStore, test: FeatureStore, device: str) -> tuple[Any, Any, dict]:
    """The run's head, loss and config, after checking that the run embeds the stores' modality like they were made."""
    run = RunDir(run_dir)
    model, loss, config = run.load_model(device)
    aligned = config["modalities"]
    if train.modality not in aligned:
        raise ProbeError(
            f"run {run.path} cannot embed {train.modality} store {train.path}: it aligns "
            f"{', '.join(sorted(aligned))} only (align {train.modality} first: fit-al --modality {train.modality})"
        )
    if aligned[train.modality].get("status") == "training":
        raise ProbeError(f"run {run.path} has not finished aligning {train.modality} (fit-al was interrupted; "
                         "finish it with fit-al --resume)")
    for store in (train, test):
        check_compatible(config, store.modality, store)
    return model, loss, config


def _features(train: FeatureStore, test: FeatureStore, run_dir: Path | str | None, features: str,
              device: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    if features == "raw":
        strip = lambda identity: {k: v for k, v in identity.items() if k not in _DATASET_FIELDS}  # noqa: E731
        differences = identity_differences(strip(train.identity), strip(test.identity))
        if differences or train.dim != test.dim:
            raise ProbeError(f"train store {train.path} and test store {test.path} were not made by the same "
                             f"extraction, so their raw features differ in kind: "
                             + "; ".join(differences or [f"dim {train.dim} != {test.dim}"]))
        return train.pooled(), test.pooled(), "raw pooled features"
    model, _, _ = _load_run(run_dir, train, test, device)  # type: ignore[arg-type]
    return (embed_store(model, train.modality, train, device=device),
            embed_store(model, test.modality, test, device=device), f"aligned embeddings of run {run_dir}")


@torch.no_grad()
def _accuracy(classifier: EmbeddingClassifier, inputs: Callable[[np.ndarray], tuple], n: int, y: torch.Tensor,
              batch_size: int) -> dict:
    classifier.eval()
    logits = torch.cat([classifier(*inputs(np.arange(i, min(i + batch_size, n)))).float().cpu()
                        for i in range(0, n, batch_size)])
    return topk_accuracy(logits, y.cpu(), ks=(1, 5) if logits.shape[1] > 5 else (1,))  # top-5 of 5 classes is 1


def _store_inputs(store: FeatureStore, device: str) -> Callable[[np.ndarray], tuple]:
    """Minibatch reader of a store's cached tokens: indices -> (tokens, mask) on ``device``."""
    def read(idx: np.ndarray) -> tuple:
        tokens, mask = store.get_batch(idx)
        return tokens.to(device), mask.to(device)
    return read


def _tensor_inputs(x: torch.Tensor) -> Callable[[np.ndarray], tuple]:
    return lambda idx: (x[torch.from_numpy(idx).to(x.device)],)


def classify(
    train_store: str | Path,
    test_store: str | Path,
    run_dir: str | Path | None = None,
    features: str = "aligned",
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    eval_every: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    out_dir: str | Path | None = None,
    progress: bool = False,
    fine_tune: bool = False,
) -> dict:
    """Train a linear classifier on ``train_store``'s labels and report test accuracy (top-1, and top-5 when there
    are more than 5 classes) every ``eval_every`` epochs (default: a tenth of ``epochs``, every epoch when
    fine-tuning).

    ``fine_tune=False``: the linear probe on frozen ``features``. ``fine_tune=True``: the run's head trains with
    the classifier (``features`` must be ``aligned``); its weights go to ``OUT/fine-tune-<stores>/``, a run
    bundle of its own (``config.json``, ``model.safetensors``) plus ``classifier.safetensors``.

    Writes ``linear-probe-<test store>-<key>--train-<train store>-<key>.json`` and ``.md`` (``linear-probe-raw-...``
    for raw features, ``fine-tune-...`` when fine-tuning) into ``out_dir``, by default ``RUN/eval``. Returns the
    report.
    """
    task = "fine-tune" if fine_tune else "linear-probe"
    _check_settings(features, epochs, batch_size, lr, fine_tune, run_dir, out_dir)
    eval_every = eval_every or (1 if fine_tune else max(1, epochs // 10))
    train, test = FeatureStore.open(train_store), FeatureStore.open(test_store)
    _check_stores(train, test)
    classes, train_y, test_y, absent = _targets(train, test)
    y_train, y_test = torch.from_numpy(train_y).to(device), torch.from_numpy(test_y).to(device)
    setup = (_fine_tune_setup if fine_tune else _probe_setup)(train, test, run_dir, features, len(classes), seed,
                                                              device)
    classifier = setup.classifier
    params = [p for p in classifier.parameters() if p.requires_grad]
    # The probe keeps torch's default AdamW betas (0.9, 0.999), not the paper's fit-up ones.
    optimizer = build_optimizer(params, TrainConfig(lr=lr, beta1=0.9, beta2=0.999, weight_decay=weight_decay))
    generator = torch.Generator().manual_seed(seed)  # one generator for every epoch's order
    eval_batch = 4096 if not fine_tune else max(batch_size, 256)

    def step(batch: tuple[np.ndarray, tuple], where: str) -> tuple[float, int]:
        rows, inputs = batch
        loss = F.cross_entropy(classifier(*inputs), y_train[torch.from_numpy(rows).to(device)])
        return optimiser_step(optimizer, loss, where, "lower --lr"), len(rows)

    checkpoints = []
    for epoch in range(1, epochs + 1):
        classifier.train()
        order = torch.randperm(len(train), generator=generator).numpy()
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        # Fine-tuning reads tokens from the store for every step: the next batch is read while one trains.
        loss = train_epoch(prefetched(batches, setup.train_inputs, ahead=2 if fine_tune else 0), step,
                           f"in {task} at epoch {epoch}")
        if epoch % eval_every == 0 or epoch == epochs:
            checkpoints.append(_checkpoint(setup, epoch, loss, y_train, y_test, eval_batch, progress))
    best = max(checkpoints, key=lambda r: r["test"]["top1"])  # first of equals: the earliest epoch
    report: dict[str, Any] = {
        "task": task,
        "features": features,
        "space": setup.space,
        "run": str(run_dir) if run_dir is not None else None,
        **_store_fields(train, test),
        "dim": setup.dim,
        "classes": classes,
        "classes_absent_from_test": absent,
        "settings": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
                     "eval_every": eval_every, "seed": seed, "optimizer": "AdamW", "standardised": True},
        "checkpoints": checkpoints,
        "final": {"epoch": checkpoints[-1]["epoch"], **checkpoints[-1]["test"]},
        "best": {"epoch": best["epoch"], **best["test"], "selected_on": "test"},
        "chance_top1": 1 / len(classes),
        "majority_top1": float(np.bincount(test_y, minlength=len(classes)).max() / len(test_y)),
    }
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "eval"  # type: ignore[arg-type]
    return _write_report(out, report, train, test, setup, params)


def _checkpoint(setup: _Setup, epoch: int, loss: float, y_train: torch.Tensor, y_test: torch.Tensor, eval_batch: int,
                progress: bool) -> dict:
    """The record of an evaluated epoch: its training loss and its train and test accuracy (printed with
    ``progress``)."""
    record = {"epoch": epoch, "loss": loss,
              "train": _accuracy(setup.classifier, setup.train_inputs, len(y_train), y_train, eval_batch),
              "test": _accuracy(setup.classifier, setup.test_inputs, len(y_test), y_test, eval_batch)}
    if progress:
        print(epoch_line(None, epoch, loss, [f"train top1 {record['train']['top1']:.3f}",
                                             f"test top1 {record['test']['top1']:.3f}"], width=4), flush=True)
    return record


def _store_fields(train: FeatureStore, test: FeatureStore) -> dict[str, Any]:
    return {"modality": train.modality, "train_store": str(train.path), "test_store": str(test.path),
            "train_store_key": train.key, "test_store_key": test.key, "train_items": len(train),
            "test_items": len(test)}


def _check_settings(features: str, epochs: int, batch_size: int, lr: float, fine_tune: bool,
                    run_dir: str | Path | None, out_dir: str | Path | None) -> None:
    if features not in FEATURES:
        raise ProbeError(f"features must be one of {FEATURES}, not {features!r}")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ProbeError(f"need epochs >= 1, batch size >= 1 and lr > 0 (got {epochs}, {batch_size}, {lr})")
    if fine_tune and (run_dir is None or features != "aligned"):
        raise ProbeError("fine-tuning trains a run's head: it needs --run RUN_DIR and aligned features")
    if features == "aligned" and run_dir is None:
        raise ProbeError("a probe on aligned embeddings needs --run RUN_DIR (or --features raw)")
    if out_dir is None and run_dir is None:
        raise ProbeError("give --run RUN_DIR or --out DIR: the report needs a place")


@dataclass
class _Setup:
    """The classifier of a probe or fine-tune and what it reads: minibatch readers of the train and test sets."""

    classifier: EmbeddingClassifier
    train_inputs: Callable[[np.ndarray], tuple]
    test_inputs: Callable[[np.ndarray], tuple]
    space: str
    dim: int
    trainable: list[str] = field(default_factory=list)  # the run's head parameters that train (fine-tune)
    loss_fn: Any = None
    config: dict | None = None


def _fine_tune_setup(train: FeatureStore, test: FeatureStore, run_dir: str | Path | None, features: str,
                     classes: int, seed: int, device: str) -> _Setup:
    model, loss_fn, config = _load_run(run_dir, train, test, device)  # type: ignore[arg-type]
    # Standardise with the statistics of the embeddings before fine-tuning, then keep that map fixed.
    mean, std = standardisation(embed_store(model, train.modality, train, device=device).float())
    torch.manual_seed(seed)  # the classifier's initial weights and the head's dropout follow the seed
    classifier = EmbeddingClassifier(len(mean), classes, head=model, modality=train.modality,
                                     mean=mean, std=std).to(device)
    trainable = finetune_parameters(model, train.modality)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return _Setup(classifier, _store_inputs(train, device), _store_inputs(test, device),
                  f"the {train.modality} embeddings of run {run_dir}, fine-tuned", int(len(mean)), trainable,
                  loss_fn, config)


def _probe_setup(train: FeatureStore, test: FeatureStore, run_dir: str | Path | None, features: str, classes: int,
                 seed: int, device: str) -> _Setup:
    x_train, x_test, space = _features(train, test, run_dir, features, device)
    x_train, x_test = x_train.float().to(device), x_test.float().to(device)
    mean, std = standardisation(x_train)
    torch.manual_seed(seed)  # the classifier's initial weights follow the seed
    classifier = EmbeddingClassifier(x_train.shape[1], classes, mean=mean, std=std).to(device)
    return _Setup(classifier, _tensor_inputs(x_train), _tensor_inputs(x_test), space, int(len(mean)))


def _write_report(out: Path, report: dict, train: FeatureStore, test: FeatureStore, setup: _Setup,
                  params: list) -> dict:
    """Write the report's JSON and Markdown (and, after a fine-tune, the fine-tuned weights) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    # Named by both stores (folder name and key prefix): another train or test store never replaces this report.
    stem = (f"{report['task']}-{'raw-' if report['features'] == 'raw' else ''}{report_stem(test)}"
            f"--train-{report_stem(train)}")
    if report["task"] == "fine-tune":
        report["trainable_parameters"] = sum(p.numel() for p in params)
        head = setup.classifier.head
        report["trained"] = [*parameter_groups(head, setup.trainable, train.modality), "classifier"]
        report["weights"] = str(_save_fine_tuned(out / stem, setup.classifier, setup.loss_fn, setup.config, report))
    report["report_path"], report["markdown_path"] = str(out / f"{stem}.json"), str(out / f"{stem}.md")
    atomic_write_text(out / f"{stem}.json", json.dumps(report, indent=2))
    atomic_write_text(out / f"{stem}.md", probe_markdown(report))
    return report


def _save_fine_tuned(folder: Path, classifier: EmbeddingClassifier, loss_fn: Any, config: dict, report: dict) -> Path:
    """The fine-tuned head as a run bundle of its own (loadable by every command that takes --run) plus the
    classifier's weights; the run it came from is left untouched."""
    bundle = RunDir(folder)
    bundle.write_config({**config, "fine_tuned": {
        "from_run": report["run"], "modality": report["modality"], "train_store": report["train_store"],
        "classes": report["classes"], "settings": report["settings"], "classifier": CLASSIFIER_FILE}})
    bundle.save_model(classifier.head, loss_fn)  # type: ignore[arg-type]
    tmp = folder / f".{CLASSIFIER_FILE}.tmp{os.getpid()}"
    save_file({k: v.detach().cpu().contiguous() for k, v in classifier.classifier_state().items()}, str(tmp))
    os.replace(tmp, folder / CLASSIFIER_FILE)
    return folder


def linear_probe(train_store: str | Path, test_store: str | Path, run_dir: str | Path | None = None,
                 features: str = "aligned", **options: Any) -> dict:
    """:func:`classify` with frozen features (the linear probe)."""
    return classify(train_store, test_store, run_dir, features, **options)


def fine_tune(train_store: str | Path, test_store: str | Path, run_dir: str | Path, **options: Any) -> dict:
    """:func:`classify` with the run's head trained too (the paper's fine-tuning protocol)."""
    return classify(train_store, test_store, run_dir, "aligned", fine_tune=True, **options)


def probe_markdown(report: dict) -> str:
    """A :func:`classify` report as Markdown: settings, the per-checkpoint table, final and best."""
    top5 = "top5" in report["final"]
    s = report["settings"]
    fine_tuned = report["task"] == "fine-tune"
    lines = [
        f"# {'Fine-tune' if fine_tuned else 'Linear probe'}: {report['test_store']}",
        "",
        f"- features: {report['space']} ({report['dim']}-d, standardised with the training set's mean and std)",
        f"- train: {report['train_store']} ({report['train_items']} items); test: {report['test_store']} "
        f"({report['test_items']} items); {len(report['classes'])} classes",
        f"- nn.Linear, AdamW lr {s['lr']}, weight decay {s['weight_decay']}, batch {s['batch_size']}, "
        f"{s['epochs']} epochs, seed {s['seed']}; no augmentation",
    ]
    if fine_tuned:
        lines.append(f"- trained with the classifier: {', '.join(report['trained'])} "
                     f"({report['trainable_parameters']:,} parameters); encoders frozen; weights in "
                     f"{report['weights']}")
    lines.append(f"- chance top-1 {report['chance_top1']:.4f}; majority class {report['majority_top1']:.4f}")
    if report["classes_absent_from_test"]:
        lines.append(f"- classes never in the test set: {report['classes_absent_from_test']}")
    lines += ["", "| epoch | train loss | train top-1 | test top-1 |" + (" test top-5 |" if top5 else ""),
              "| ---: | ---: | ---: | ---: |" + (" ---: |" if top5 else "")]
    for r in report["checkpoints"]:
        lines.append(f"| {r['epoch']} | {r['loss']:.4f} | {r['train']['top1']:.4f} | {r['test']['top1']:.4f} |"
                     + (f" {r['test']['top5']:.4f} |" if top5 else ""))
    final, best = report["final"], report["best"]
    lines += ["", f"- **final** (epoch {final['epoch']}): test top-1 {final['top1']:.4f}"
              + (f", top-5 {final['top5']:.4f}" if top5 else ""),
              f"- **best checkpoint** (epoch {best['epoch']}, selected on the test set, so optimistic): test top-1 "
              f"{best['top1']:.4f}", ""]
    return "\n".join(lines)
