"""``fit-base``: the paper's "Base" baseline, image and text encoders trained END TO END (OneEncoder, Section IV).

OneEncoder keeps its encoders frozen and trains only the UP from cached features. The baseline it is compared with
trains the modality-specific encoders themselves, with the same pairs and the same contrastive loss
(:class:`project.ContrastiveLoss`). Here each encoder's final-layer tokens go through a registered projection head
(``linear`` by default: one Linear per modality on their masked mean, the usual CLIP-style projection), and
encoders, head and temperature all train together, reading raw media through exactly the extraction's
preprocessing (:func:`extract.encoders.load_encoder`'s preprocessor: same decoding, resizing, tokenisation).

Only ``transformers`` image and text encoders (a local ``save_pretrained`` folder or a cached hub id), final
layer, are supported: plugins run their forward inside ``torch.inference_mode`` and cannot give gradients.

The run directory is a normal run bundle that ``eval retrieval`` / ``eval zero-shot`` / ``encode`` read the same
way as a UP run::

    RUN/config.json, model.safetensors (the projection head + temperature), metrics.jsonl
    RUN/encoders/image/, RUN/encoders/text/   the fine-tuned encoders, saved with save_pretrained (+ processor)
    RUN/stores/train-image/, train-text/      the training manifests re-extracted WITH the fine-tuned encoders

The re-extraction at the end records in ``config.json`` what a store made by the fine-tuned encoders looks like, so
a held-out set is evaluated by extracting it with ``--encoder RUN/encoders/image`` (and ``.../text``) and running
``eval retrieval --run RUN`` on those stores; a store made with the original (frozen) encoders is refused. The
weights kept (encoders, head and temperature) are chosen by the rule every trainer uses,
:func:`pipeline.training.loop.selection_rule` (``TrainConfig.select``, fit-up's by default), recorded in the stage; the encoders are written when an
epoch improves on the best, so only one copy of them is ever on disk.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from extract.encoders import HFImageEncoder, HFTextEncoder, load_encoder
from extract.manifest import Item, read_manifest
from pipeline.evaluation.metrics import bidirectional_retrieval
from pipeline.training import loop as training
from pipeline.training.fit import LossConfig, head_config, store_record
from pipeline.training.loop import TrainConfig, TrainingError
from pipeline.training.pairs import PairingError, Pairs, epoch_batches, split_by_anchor
from pipeline.training.prefetch import prefetched
from pipeline.training.rundir import RunDir, RunError
from project import HEADS
from stores import FeatureStore

STAGE = "fit-base"


def unfreeze(module: nn.Module) -> nn.Module:
    """Undo :func:`extract.encoders.freeze` on a private copy of an encoder, so it can be trained.

    ``load_encoder`` freezes every model it loads (eval mode, no gradients, ``.train()`` made a no-op) because the
    extraction must never change an encoder. The Base baseline is the one place where training the encoder is the
    point, so it removes the no-op ``train`` and turns gradients back on for THIS copy only; the files on disk and
    any other loaded copy stay frozen.
    """
    module.__dict__.pop("train", None)  # freeze() set an instance attribute that shadows nn.Module.train
    module.requires_grad_(True)
    return module.train()


def trainable_tokens(encoder: Any, batch: dict[str, Any], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-layer tokens ``[B, L, D]`` and mask ``[B, L]`` of a preprocessed batch, WITH autograd.

    The same computation as the encoder's own ``forward`` (its ``last_hidden_state``; conv maps as H*W tokens), which
    runs under ``torch.inference_mode`` for extraction."""
    inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if encoder.modality == "image":
        tokens = encoder.model(pixel_values=inputs["pixel_values"], return_dict=True).last_hidden_state
        if tokens.dim() == 4:  # [B, C, H, W] -> [B, H*W, C]
            tokens = tokens.flatten(2).transpose(1, 2)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
    tokens = encoder.model(**inputs, return_dict=True).last_hidden_state
    return tokens, inputs["attention_mask"].bool()


def _load_trainable(spec: str, modality: str, device: str) -> Any:
    encoder = load_encoder(spec, modality, device=device)
    if not isinstance(encoder, (HFImageEncoder, HFTextEncoder)):
        raise TrainingError(f"fit-base trains transformers image/text encoders only; {spec!r} gave a "
                            f"{type(encoder).__name__} (plugins encode under inference mode, without gradients)")
    if not callable(getattr(encoder.model, "save_pretrained", None)):
        # A dual encoder (CLIP, SigLIP) loads as one tower, a plain module that cannot be saved as a model folder.
        raise TrainingError(f"fit-base cannot save the fine-tuned {modality} part of {spec!r} "
                            f"({type(encoder.model).__name__} is not a standalone transformers model)")
    unfreeze(encoder.model)
    return encoder


def manifest_pairs(images: list[Item], texts: list[Item], image_manifest: Path | str,
                   text_manifest: Path | str) -> Pairs:
    """(image row, text row) pairs: each text item's ``ref`` names an image id (as ``fit-up`` pairs stores)."""
    index = {item.id: i for i, item in enumerate(images)}
    missing = [t for t in texts if t.ref is None or t.ref not in index]
    if missing:
        shown = ", ".join(f"{t.id!r} -> {t.ref!r}" for t in missing[:5])
        raise PairingError(f"{len(missing)} items of {text_manifest} have no 'ref' naming an image of "
                           f"{image_manifest} (e.g. {shown})")
    return Pairs(np.asarray([index[t.ref] for t in texts]), np.arange(len(texts)))


def _preprocess(encoder: Any, items: list[Item]) -> dict[str, Any]:
    batch = encoder.preprocessor(items)
    if batch["failed"]:
        item, reason = batch["failed"][0]
        raise TrainingError(f"item {item.id!r} ({item.path or item.text!r}, line {item.line}) cannot be "
                            f"preprocessed: {reason}")
    return batch


def _embed(encoder: Any, head: nn.Module, modality: str, items: list[Item], device: str,
           batch_size: int) -> torch.Tensor:
    """L2-normalised embeddings of ``items`` in eval mode (validation)."""
    out = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            tokens, mask = trainable_tokens(encoder, _preprocess(encoder, items[start : start + batch_size]), device)
            out.append(nn.functional.normalize(head.encode(modality, tokens, mask).float(), dim=-1).cpu())
    return torch.cat(out)


def fit_base(
    image_encoder: str,
    text_encoder: str,
    image_manifest: Path | str,
    text_manifest: Path | str,
    out: Path | str,
    *,
    head: str = "linear",
    encoder_lr: float = 1e-5,
    loss: LossConfig | None = None,
    train: TrainConfig | None = None,
    extract_dtype: str = "fp32",
    overwrite: bool = False,
    progress: bool = True,
    **head_options: Any,
) -> dict:
    """Train both encoders, a projection ``head`` and the temperature end to end on image-text pairs of two
    manifests; write a run directory (see the module docstring). ``encoder_lr`` is the encoders' learning rate
    (``train.lr`` is the head's): pretrained transformers are fine-tuned with a much smaller step than a fresh head.
    ``head_options``: fields of the head's config (``width``, ``blocks``, ``fusion``, ...; the config's defaults
    otherwise), taken by the heads that have them (:func:`pipeline.training.fit.head_config`).
    """
    head_fields = {f.name for registered in HEADS.values() for f in fields(registered.config_class)}
    if set(head_options) - head_fields:
        raise TypeError(f"fit_base() got unknown head options {sorted(set(head_options) - head_fields)}")
    train, loss = train or TrainConfig(epochs=10, batch_size=64), loss or LossConfig()
    if train.epochs < 1:
        raise TrainingError(f"--epochs must be >= 1, got {train.epochs}")
    run = RunDir(out, tensorboard=train.tensorboard)
    _clear_run_dir(run, overwrite)
    images, texts = read_manifest(image_manifest), read_manifest(text_manifest)
    pairs = manifest_pairs(images, texts, image_manifest, text_manifest)
    train_pairs, val_pairs = split_by_anchor(pairs, train.val_fraction, train.seed)
    if len(train_pairs.anchors) < 2:
        raise TrainingError(f"only {len(train_pairs.anchors)} training images: a contrastive batch needs 2 or more")

    device = train.device
    image_enc, text_enc = _load_trainable(image_encoder, "image", device), _load_trainable(text_encoder, "text", device)
    torch.manual_seed(train.seed)  # the head's initial weights follow --seed
    dims = {"image": image_enc.dim, "text": text_enc.dim}
    config = {"head": head, "model": head_config(head, dims, **head_options).to_dict(), "loss": asdict(loss)}
    model, loss_fn = RunDir.build(config)
    model.to(device).train()
    loss_fn.to(device)
    optimizer = training.build_optimizer(
        [{"params": [*image_enc.model.parameters(), *text_enc.model.parameters()], "lr": encoder_lr},
         {"params": [*model.parameters(), *loss_fn.parameters()], "lr": train.lr}], train)
    run.path.mkdir(parents=True, exist_ok=True)
    trainer = _EndToEnd(image_enc, text_enc, model, loss_fn, optimizer, images, texts, train)
    folders = {"image": run.path / "encoders" / "image", "text": run.path / "encoders" / "text"}
    record, best = trainer.fit(run, train_pairs, val_pairs, folders, loss.target_mix, progress)
    config.update({
        "modalities": _reextract(run, folders, image_manifest, text_manifest, train, extract_dtype),
        "stages": [{"name": STAGE, "anchor": "image", "partner": "text", "train": asdict(train),
                    "selection": {"rule": training.selection_rule(train.select), "epoch": best.epoch,
                                  "score": best.score},
                    "encoder_lr": encoder_lr, "trained_encoders": {"image": image_encoder, "text": text_encoder},
                    "image_manifest": str(Path(image_manifest).resolve()),
                    "text_manifest": str(Path(text_manifest).resolve())}],
        "base": {"note": "encoders trained end to end; evaluate stores extracted with encoders/image and encoders/text",
                 "encoders": {m: str(f) for m, f in folders.items()}},
    })
    run.write_config(config)
    return {"run": str(run.path), "encoders": {m: str(f) for m, f in folders.items()}, **record,
            "selected_epoch": best.epoch, "selected_score": best.score}


def _clear_run_dir(run: RunDir, overwrite: bool) -> None:
    """Make room for a new run at ``run.path``: an existing run only with ``overwrite``, never another folder."""
    if run.path.exists() and any(run.path.iterdir()):
        if not run.exists():  # never delete a folder that is not a run, whatever --overwrite says
            raise RunError(f"{run.path} exists, is not empty and is not a run directory; choose another --out")
        if not overwrite:
            raise RunError(f"{run.path} already holds a run; use --overwrite to replace it")
        shutil.rmtree(run.path)


@dataclass
class _EndToEnd:
    """Both encoders, the head and the loss trained together on manifest items (the epoch loop of fit-base)."""

    image_enc: Any
    text_enc: Any
    model: nn.Module
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    images: list[Item]
    texts: list[Item]
    train: TrainConfig

    def fetch(self, pair: tuple) -> tuple:
        """Decode and preprocess one minibatch (prefetch thread): the extraction's own preprocessors."""
        return (_preprocess(self.image_enc, [self.images[i] for i in pair[0]]),
                _preprocess(self.text_enc, [self.texts[j] for j in pair[1]]))

    def step(self, batch: tuple, where: str) -> tuple[float, int]:
        (a_idx, _), (a_batch, b_batch) = batch
        device = self.train.device
        a = self.model.encode("image", *trainable_tokens(self.image_enc, a_batch, device))
        b = self.model.encode("text", *trainable_tokens(self.text_enc, b_batch, device))
        value = training.optimiser_step(self.optimizer, self.loss_fn(a, b), where, "lower --lr / --encoder-lr")
        self.loss_fn.clamp_temperature_()
        return value, len(a_idx)

    def fit(self, run: RunDir, train_pairs: Pairs, val_pairs: Pairs, folders: dict[str, Path], target_mix: float,
            progress: bool) -> tuple[dict, training.BestEpoch]:
        """Train every epoch, keeping (saving) the best one's encoders and head; the last record and the best."""
        train = self.train
        steps_per_epoch = max(1, math.ceil(len(train_pairs.anchors) / train.batch_size))
        best = training.BestEpoch()
        for epoch in range(1, train.epochs + 1):
            started = time.perf_counter()
            for module in (self.image_enc.model, self.text_enc.model, self.model):
                module.train()
            self.loss_fn.target_mix = 1.0 if epoch <= train.warmup_epochs else target_mix
            generator = training.epoch_generator(train.seed, epoch)
            batches = epoch_batches(train_pairs, train.batch_size, generator, train.sampling)
            loss = training.train_epoch(prefetched(batches, self.fetch), self.step, f"at epoch {epoch}")
            val = _validate(self.image_enc, self.text_enc, self.model, self.images, self.texts, val_pairs,
                            train.device, train.batch_size)
            record = {"stage": STAGE, "epoch": epoch, "loss": loss, "temperature": self.loss_fn.temperature,
                      "steps": steps_per_epoch, "seconds": training.seconds_since(started), "val": val}
            if best.offer_validation(val, train.select, epoch):  # as run_stage
                record["saved"] = True
                _save_encoders(self.image_enc, self.text_enc, folders)
                run.save_model(self.model, self.loss_fn)
            run.append_metrics(record)
            if progress:
                parts = [f"tau {record['temperature']:.4f}", *training.retrieval_parts(val, (1,))]
                print(training.epoch_line(STAGE, epoch, loss, parts, record["seconds"]), flush=True)
        if best.epoch == 0:
            raise TrainingError(f"no epoch of {run.path} had a finite validation score; nothing was kept")
        return record, best


def _reextract(run: RunDir, folders: dict[str, Path], image_manifest: Path | str, text_manifest: Path | str,
               train: TrainConfig, dtype: str) -> dict:
    """The kept encoders (ordinary transformers folders) re-extract the training manifests: the stores' identities
    are what eval retrieval checks a held-out store against. Returns the run config's ``modalities``."""
    from extract.run import run_extraction

    stores = {}
    for modality, manifest in (("image", image_manifest), ("text", text_manifest)):
        result = run_extraction(manifest, modality, str(folders[modality]), run.path / "stores" / f"train-{modality}",
                                batch_size=train.batch_size, device=train.device, dtype=dtype, on_error="fail",
                                progress=False)
        stores[modality] = store_record(FeatureStore.open(result.store))
    return {m: {"store": stores[m], "stage": STAGE, "status": "aligned", "encoder": f"encoders/{m}"}
            for m in ("image", "text")}


def _save_encoders(image_enc: Any, text_enc: Any, folders: dict[str, Path]) -> None:
    """Write both encoders (with their processor / tokenizer) as transformers folders, each complete under a
    temporary name first and then renamed over the previous copy."""
    for encoder, folder, processor in ((image_enc, folders["image"], image_enc.preprocessor.processor),
                                       (text_enc, folders["text"], text_enc.preprocessor.tokenizer)):
        tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        encoder.model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)


def _validate(image_enc: Any, text_enc: Any, model: nn.Module, images: list[Item], texts: list[Item], pairs: Pairs,
              device: str, batch_size: int) -> dict:
    if len(pairs) == 0:
        return {}
    for module in (image_enc.model, text_enc.model, model):
        module.eval()
    relevance = pairs.relevance()
    a = _embed(image_enc, model, "image", [images[i] for i in relevance.anchors], device, batch_size)
    b = _embed(text_enc, model, "text", [texts[j] for j in relevance.partners], device, batch_size)
    return training.add_selection_scores(bidirectional_retrieval(a, b, relevance, "image", "text"))
