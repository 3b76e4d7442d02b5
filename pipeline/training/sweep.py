"""``fit-up --sweep GRID.json``: several fit-up configurations trained as one job that reads the cache once.

The grid is a JSON object of option -> list of values (every combination is a configuration) or a JSON list of
option objects (exactly those configurations). Each configuration gets its own run directory under the sweep's
folder, named by its options (``width-64_lr-0.001``), with its config, metrics and best-epoch weights, exactly as
:func:`pipeline.training.fit.fit_up` writes them for the same options and seed. Configurations that draw the same
batches (the same seed: batch order and validation split follow it) are trained together by the fit loop's own
:func:`pipeline.training.fit.train_together`: each minibatch is read from the stores once and given to each head in
turn, every head with its own global random state, so its weights and dropout masks are those of training it alone.
Configurations of different seeds train one group after another. ``SWEEP.json`` in the folder lists the runs.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipeline.training import distributed
from pipeline.training.defaults import FIT_UP_SCHEDULE
from pipeline.training.fit import (
    HEAD_OPTIONS,
    LossConfig,
    TrainConfig,
    TrainingError,
    close_fit_up,
    open_fit_up_stores,
    prepare_stage,
    setup_fit_up,
    train_together,
)
from pipeline.training.rundir import RunDir, RunError
from stores import atomic_write_text

# What a grid may vary, by the fit-up option's name (dashes or underscores), and where each lands.
MODEL_OPTIONS = ("head", "fusion", "width", "blocks")
LOSS_OPTIONS = {"loss": "kind", "temperature": "init_temperature", "target_mix": "target_mix"}
TRAIN_OPTIONS = ("lr", "seed", "weight_decay")
SWEEP_OPTIONS = (*MODEL_OPTIONS, *LOSS_OPTIONS, *TRAIN_OPTIONS, *HEAD_OPTIONS)
SWEEP_FILE = "SWEEP.json"


class SweepError(TrainingError):
    """A sweep grid that cannot be trained."""


def read_grid(path: Path | str) -> list[dict[str, Any]]:
    """The configurations of a grid file (see the module's doc), each ``{option: value}`` in the file's order."""
    path = Path(path)
    try:
        grid = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SweepError(f"sweep grid {path}: cannot read it as JSON ({err})") from err
    return grid_configurations(grid, str(path))


def grid_configurations(grid: Any, where: str = "sweep grid") -> list[dict[str, Any]]:
    """The configurations of a grid: an object of option -> list of values (their product) or a list of objects."""
    if isinstance(grid, dict):
        for option, values in grid.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"{where}: {option!r} must map to a non-empty list of values, got {values!r}")
        configs = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    elif isinstance(grid, list) and grid and all(isinstance(c, dict) for c in grid):
        configs = [dict(c) for c in grid]
    else:
        raise SweepError(f"{where}: expected an object of option -> list of values, or a non-empty list of objects")
    configs = [{k.replace("-", "_"): v for k, v in c.items()} for c in configs]
    for config in configs:
        unknown = sorted(set(config) - set(SWEEP_OPTIONS))
        if unknown:
            raise SweepError(f"{where}: cannot sweep {', '.join(unknown)}; a sweep varies {', '.join(SWEEP_OPTIONS)}"
                             " (other options come from the command line, shared by every run)")
    names = [run_name(c) for c in configs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise SweepError(f"{where}: configuration {repeated[0]!r} appears more than once")
    return configs


def run_name(options: dict[str, Any]) -> str:
    """A configuration's run directory name: ``width-64_lr-0.001`` (``base`` for no options)."""
    parts = [f"{k}-{v}" for k, v in options.items()]
    return re.sub(r"[^A-Za-z0-9._+=-]", "", "_".join(parts).replace("/", "-")) or "base"


def configured(options: dict[str, Any], fit_up_options: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`pipeline.training.fit.setup_fit_up` for one configuration: the sweep's
    shared ``fit_up_options`` with the configuration's ``options`` put where they belong."""
    kwargs = dict(fit_up_options)
    loss = kwargs.get("loss") or LossConfig()
    train = kwargs.get("train") or TrainConfig(**FIT_UP_SCHEDULE)
    head_options = dict(kwargs.get("head_options") or {})
    for option, value in options.items():
        if option in MODEL_OPTIONS:
            kwargs[option] = value
        elif option in LOSS_OPTIONS:
            loss = replace(loss, **{LOSS_OPTIONS[option]: value})
        elif option in TRAIN_OPTIONS:
            train = replace(train, **{option: value})
        else:
            head_options[option] = value
    return {**kwargs, "loss": loss, "train": train, "head_options": head_options}


def fit_up_sweep(image_store: Path | str, text_store: Path | str, out: Path | str,
                 configurations: Sequence[dict[str, Any]], *, overwrite: bool = False, progress: bool = True,
                 **fit_up_options: Any) -> dict:
    """Train every configuration of a sweep (:func:`grid_configurations`) into ``out/NAME/``; ``fit_up_options``
    are :func:`pipeline.training.fit.fit_up`'s options shared by every run (a configuration's own options win).
    Each run equals ``fit_up`` of its options alone. Returns ``{"out", "runs": [{"name", "options", "run",
    "summary"}]}``, also written to ``out/SWEEP.json``."""
    if distributed.is_distributed():
        raise SweepError("fit-up --sweep runs in one process; launch it without torchrun")
    if fit_up_options.pop("resume", False):
        raise SweepError("fit-up --sweep cannot --resume; resume one of its runs with fit-up --resume --out RUN")
    configurations = grid_configurations(list(configurations)) if configurations else [{}]
    out = Path(out)
    images, texts = open_fit_up_stores(image_store, text_store)
    names = [run_name(c) for c in configurations]
    taken = [n for n in names if RunDir(out / n).exists()]
    if taken and not overwrite:  # refused before any run directory is touched
        raise RunError(f"{out / taken[0]} already holds a run; use --overwrite to replace the sweep's runs")
    groups: dict[int, list[tuple[str, dict, dict]]] = {}
    for name, options in zip(names, configurations, strict=True):
        kwargs = configured(options, fit_up_options)
        groups.setdefault(kwargs["train"].seed, []).append((name, options, kwargs))
    results = []
    for members in groups.values():
        trainees = []
        for name, _, kwargs in members:
            run, model, loss_fn, stage = setup_fit_up(images, texts, out / name, overwrite=overwrite, **kwargs)
            trainee = prepare_stage(run, model, loss_fn, stage, resume=False, label=name)
            assert not isinstance(trainee, dict)  # only a resumed stage can be finished already
            trainees.append(trainee)
        summaries = train_together(trainees, progress)
        for (name, options, _), trainee, summary in zip(members, trainees, summaries, strict=True):
            results.append({"name": name, "options": options, **close_fit_up(trainee.run, summary)})
    order = {name: i for i, name in enumerate(names)}
    results.sort(key=lambda r: order[r["name"]])
    record = {"out": str(out), "runs": [{"name": r["name"], "options": r["options"], "run": r["run"],
                                         "selected_epoch": r.get("selected_epoch")} for r in results]}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SWEEP_FILE, json.dumps(record, indent=2) + "\n")
    return {"out": str(out), "runs": results}


def sweep_runs(folder: Path | str) -> list[Path] | None:
    """The run directories a sweep folder lists in ``SWEEP.json``; None when ``folder`` is not a sweep's."""
    record_path = Path(folder) / SWEEP_FILE
    if not record_path.is_file():
        return None
    record = json.loads(record_path.read_text(encoding="utf-8"))
    return [Path(folder) / r["name"] for r in record.get("runs", [])]
