"""Named sets of training options (``--preset NAME``), kept as data: one JSON file per preset in ``presets/``.

A preset file maps each training command (``fit-up``, ``fit-al``, ``fit-vqa``) to option values, by the command's
parameter names (``batch_size``, ``loss_kind``, ...) or the :class:`pipeline.training.fit.TrainConfig` fields the command
line does not expose (``beta1``, ``beta2``). A preset sets every value it names explicitly, so it means the same
thing whatever the defaults are; what it does not name keeps the default. Options given on the command line win
over the preset. :func:`resolve_options` returns the resolved values and the record a run keeps of the preset.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from stores import OneEncoderError

PRESET_DIR = Path(__file__).with_name("presets")


class PresetError(OneEncoderError, ValueError):
    """A preset that does not exist or names an option its command does not have."""


def preset_names() -> list[str]:
    """The presets shipped in ``presets/``, by file stem."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_file(name: str) -> Path:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise PresetError(f"unknown preset {name!r}; known: {', '.join(preset_names()) or 'none'}")
    return path


def preset_values(name: str, command: str) -> dict[str, Any]:
    """The option values preset ``name`` sets for ``command`` (empty when it sets none)."""
    data = json.loads(preset_file(name).read_text(encoding="utf-8"))
    values = data.get(command, {})
    if not isinstance(values, dict):
        raise PresetError(f"preset {name!r}: the entry for {command!r} must be an object of option values")
    return dict(values)


def resolve_options(command: str, values: Mapping[str, Any], explicit: Iterable[str], preset: str | None,
                    extra: Iterable[str] = ()) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Option values of ``command`` after applying ``preset`` under the ``explicit`` ones.

    ``values``: every option as parsed (defaults included); ``explicit``: the names given on the command line;
    ``extra``: further names a preset may set (settings the command line does not expose). Returns the resolved
    values (``values`` plus the extra names the preset sets) and the record to keep in the run:
    ``{"name", "values": what the preset sets, "overridden": {name: value given instead}}``, or None without one."""
    resolved = dict(values)
    if preset is None:
        return resolved, None
    explicit = set(explicit)
    wanted = preset_values(preset, command)
    unknown = sorted(set(wanted) - set(values) - set(extra))
    if unknown:
        raise PresetError(f"preset {preset!r} ({preset_file(preset).name}) sets {', '.join(unknown)}, which "
                          f"{command} does not have")
    overridden = {k: values[k] for k in wanted if k in explicit and values[k] != wanted[k]}
    resolved.update({k: v for k, v in wanted.items() if k not in explicit})
    return resolved, {"name": preset, "values": wanted, "overridden": overridden}
