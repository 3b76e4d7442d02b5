"""A run directory is the model bundle: config, weights, checkpoints, metrics and evaluation reports.

```
RUN/
  config.json                 head name + head config, loss settings, aligned modalities and the stores they came from
  model.safetensors           weights used for evaluation (best validation epoch; last epoch without validation)
  metrics.jsonl               one JSON record per epoch (stage, loss, temperature, validation retrieval)
  dropped-pairs.json          items left out of a stage because their partner is absent (e.g. failed extraction)
  tb/<stage>/                 the same records as TensorBoard scalars, step = epoch (``tensorboard --logdir RUN/tb``)
  checkpoints/latest          name of the newest complete checkpoint directory
  checkpoints/epoch-000N/     model.safetensors + trainer_state.pt (optimizer, RNG, epoch) for --resume
  eval/*.json                 evaluation reports
```
Every file is written to a temporary name and renamed into place, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import weakref
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from project import ContrastiveLoss, build_head
from stores import FeatureStore, OneEncoderError, atomic_write_text, fsync_path, identity_differences

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.pt"
DROPPED_PAIRS_FILE = "dropped-pairs.json"
TENSORBOARD_DIR = "tb"
_tensorboard_warned = False


class RunError(OneEncoderError, RuntimeError):
    """The run directory is missing, inconsistent or incompatible with what was asked."""


# Identity fields that may differ between the store a run was trained on and one it is evaluated on: which items
# (the manifest, the size bounds that leave oversized items out) and the stored dtype, not how an item is encoded.
_DATASET_FIELDS = ("manifest_sha256", "dtype")
_SIZE_BOUNDS = ("max_pixels", "max_decoded_seconds", "max_video_pixels")


def _features_identity(identity: dict) -> dict:
    """What makes two stores' features comparable: the identity without its dataset fields and size bounds."""
    out = {k: v for k, v in identity.items() if k not in _DATASET_FIELDS}
    media = {k: v for k, v in (identity.get("media") or {}).items() if k not in _SIZE_BOUNDS}
    out.pop("media", None)
    return {**out, "media": media} if media else out


def check_compatible(config: dict, modality: str, store: FeatureStore) -> None:
    """Refuse a store whose features come from another encoder, layer or pooling than the run was trained on."""
    aligned = config["modalities"]
    if modality not in aligned:
        raise RunError(f"modality {modality!r} is not aligned in this run (aligned: {sorted(aligned)})")
    trained = aligned[modality]["store"]
    differences = identity_differences(_features_identity(trained["identity"]), _features_identity(store.identity))
    if differences or trained["dim"] != store.dim:
        raise RunError(
            f"store {store.path} was not made like the {modality} store the run was trained on ({trained['path']}): "
            + "; ".join(differences or [f"dim {store.dim} != {trained['dim']}"])
        )


def _save_weights(model: nn.Module, loss: nn.Module, path: Path, *, publish: bool = True) -> None:
    """Write the weights to ``path`` (fsynced); ``publish``: through a temporary name, renamed into place."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"loss.{k}": v.detach().cpu().contiguous() for k, v in loss.state_dict().items()})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}") if publish else path
    save_file(tensors, str(tmp))
    fsync_path(tmp)
    if publish:
        os.replace(tmp, path)
        fsync_path(path.parent)


def _load_weights(model: nn.Module, loss: nn.Module, path: Path) -> None:
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    loss.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("loss.")})


def tensorboard_scalars(record: dict) -> dict[str, float]:
    """The scalars of one metrics record, by TensorBoard tag: ``loss``, ``temperature``, ``target_mix``, ``lr``,
    ``seconds``, and every number of the validation dict as ``val/<direction>/<metric>`` (``val/rsum``)."""
    out = {name: float(record[name]) for name in ("loss", "temperature", "target_mix", "lr", "seconds")
           if isinstance(record.get(name), (int, float)) and not isinstance(record.get(name), bool)}

    def add(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{prefix}/{key}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix] = float(value)

    add("val", record.get("val") or {})
    return out


def tensorboard_folder(run: Path | str, stage: str) -> Path:
    """``RUN/tb/<stage>``; characters other than letters, digits, ``._-`` become ``-`` (``fit-al:audio`` ->
    ``fit-al-audio``), so the folder name is valid on every file system."""
    return Path(run) / TENSORBOARD_DIR / re.sub(r"[^A-Za-z0-9._-]", "-", stage)


class RunDir:
    def __init__(self, path: Path | str, *, tensorboard: bool = True):
        self.path = Path(path)
        self.tensorboard = tensorboard  # False: metrics.jsonl only, no tb/ event files
        self._tb_stage: str | None = None  # the stage whose SummaryWriter is open
        self._tb_writer = None
        self._tb_close: weakref.finalize | None = None

    # ---- config ------------------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    def exists(self) -> bool:
        return self.config_path.is_file()

    def read_config(self) -> dict:
        if not self.exists():
            raise RunError(f"{self.path} is not a run directory (no {CONFIG_FILE}); train one with fit-up first")
        return json.loads(self.config_path.read_text())

    def write_config(self, config: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, json.dumps(config, indent=2, sort_keys=True))

    # ---- model -------------------------------------------------------------------------------------------------
    @staticmethod
    def build(config: dict) -> tuple[nn.Module, ContrastiveLoss]:
        """Fresh head and loss from a run config."""
        model = build_head(config["head"], config["model"])
        loss = ContrastiveLoss(**config["loss"])
        return model, loss

    def save_model(self, model: nn.Module, loss: nn.Module) -> None:
        _save_weights(model, loss, self.path / WEIGHTS_FILE)

    def load_model(self, device: str = "cpu") -> tuple[nn.Module, ContrastiveLoss, dict]:
        """The evaluation weights, in eval mode, with the run config."""
        config = self.read_config()
        weights = self.path / WEIGHTS_FILE
        if not weights.is_file():
            raise RunError(f"{self.path} has no {WEIGHTS_FILE}: its training has not finished an epoch")
        model, loss = self.build(config)
        _load_weights(model, loss, weights)
        return model.to(device).eval(), loss.to(device).eval(), config

    # ---- metrics -----------------------------------------------------------------------------------------------
    def metrics(self) -> list[dict]:
        """Every record of ``metrics.jsonl``. A last line that does not parse was torn by a crash mid-append
        (its epoch has no checkpoint, so a resume redoes it) and is left out; a bad line before it is an error."""
        path = self.path / METRICS_FILE
        if not path.exists():
            return []
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line))
            except ValueError as err:
                if number == len(lines):
                    break
                raise RunError(f"{path} line {number} is not a JSON record ({err}); only a torn last line is "
                               "expected after a crash") from None
        return records

    def _drop_torn_tail(self) -> None:
        """Make ``metrics.jsonl`` end with a complete line before appending: a record torn by a crash is cut off
        (one that parsed whole only lacks its newline, which is added)."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return
        data = path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        cut = data.rfind(b"\n") + 1
        try:
            json.loads(data[cut:])
            tail = b"\n"
        except ValueError:
            tail = None
        with open(path, "r+b") as handle:
            if tail is None:
                handle.truncate(cut)
            else:
                handle.seek(0, os.SEEK_END)
                handle.write(tail)
            handle.flush()
            os.fsync(handle.fileno())

    def append_metrics(self, record: dict) -> None:
        """Append one record to ``metrics.jsonl`` (fsynced) and write its scalars to ``tb/<stage>/``."""
        self._drop_torn_tail()
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        if self.tensorboard:
            self._tensorboard(record)

    def truncate_metrics(self, keep) -> None:
        """Keep only the records for which ``keep(record)`` holds (used on resume to drop unsaved epochs)."""
        kept = [r for r in self.metrics() if keep(r)]
        atomic_write_text(self.path / METRICS_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        self.close_tensorboard()  # the next append rebuilds the event files from what was kept

    # ---- TensorBoard -------------------------------------------------------------------------------------------
    def _tensorboard(self, record: dict) -> None:
        """Mirror ``record`` into TensorBoard scalars, one writer per stage kept open and flushed per record.

        metrics.jsonl is the record of truth: when a stage's writer opens (first record of this process, or after
        a truncation on resume), ``tb/<stage>/`` is rebuilt from the stage's records in metrics.jsonl, so a resumed
        run's event files never hold a step twice nor an epoch that was dropped (redone) on resume."""
        stage = str(record.get("stage", "train"))
        if self._tb_stage != stage:
            self.close_tensorboard()
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # metrics.jsonl is already written; TensorBoard is only a mirror of it
                global _tensorboard_warned
                if not _tensorboard_warned:
                    print(f"warning: no TensorBoard event files ({err}); pip install tensorboard", file=sys.stderr)
                    _tensorboard_warned = True
                return
            folder = tensorboard_folder(self.path, stage)
            shutil.rmtree(folder, ignore_errors=True)
            writer = SummaryWriter(log_dir=str(folder))
            self._tb_stage, self._tb_writer = stage, writer
            self._tb_close = weakref.finalize(self, writer.close)  # also runs at interpreter exit
            records = [r for r in self.metrics() if str(r.get("stage", "train")) == stage]
        else:
            records = [record]
        for r in records:
            for tag, value in tensorboard_scalars(r).items():
                self._tb_writer.add_scalar(tag, value, global_step=int(r.get("epoch", 0)))
        self._tb_writer.flush()

    def close_tensorboard(self) -> None:
        """Close the open TensorBoard writer, if any (a later append opens a new one)."""
        if self._tb_close is not None:
            self._tb_close()  # closes the writer once; finalize objects are idempotent
        self._tb_stage, self._tb_writer, self._tb_close = None, None, None

    # ---- checkpoints -------------------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def save_checkpoint(self, model: nn.Module, loss: nn.Module, state: dict, tag: str) -> None:
        """Write ``checkpoints/<tag>/`` completely, then point ``latest`` at it, then drop older ones."""
        final = self.checkpoints / tag
        tmp = self.checkpoints / f".{tag}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _save_weights(model, loss, tmp / WEIGHTS_FILE, publish=False)  # the folder's rename publishes it
        torch.save(state, tmp / STATE_FILE)
        fsync_path(tmp / STATE_FILE)
        fsync_path(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_path(self.checkpoints)
        atomic_write_text(self.checkpoints / "latest", tag)
        for old in self.checkpoints.iterdir():
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)

    def checkpoint_state(self) -> dict | None:
        """Trainer state of the newest checkpoint (stage, epoch, optimizer, RNG), or None."""
        latest = self.checkpoints / "latest"
        if not latest.is_file():
            return None
        return torch.load(self.checkpoints / latest.read_text().strip() / STATE_FILE, weights_only=True)

    def load_checkpoint_weights(self, model: nn.Module, loss: nn.Module) -> None:
        folder = self.checkpoints / (self.checkpoints / "latest").read_text().strip()
        _load_weights(model, loss, folder / WEIGHTS_FILE)

    def record_dropped_pairs(self, stage: str, store: str, partner_store: str, dropped, failed: set) -> Path:
        """List in ``dropped-pairs.json`` (by stage) the items of ``store`` left out because the id their ``ref``
        names is absent from ``partner_store``; ``failed``: the ids that failed extraction there."""
        path = self.path / DROPPED_PAIRS_FILE
        listed = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        listed[stage] = {"store": str(store), "partner_store": str(partner_store),
                         "items": [{"id": item, "ref": ref, "failed_extraction": ref in failed}
                                   for item, ref in dropped]}
        atomic_write_text(path, json.dumps(listed, indent=2, sort_keys=True))
        return path

    def write_report(self, name: str, report: dict) -> Path:
        path = self.path / "eval" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(report, indent=2, sort_keys=True))
        return path
