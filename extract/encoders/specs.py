"""Encoder specs: what a spec names (a plugin, a local ``save_pretrained`` directory or a hub id), where its files
are, the checks on the settings asked for, and plugins (import, call, identity).

- ``MODULE:CALLABLE`` or ``path/to/file.py:CALLABLE``: a plugin. The callable is called with keyword arguments
  ``modality``, ``layer``, ``max_tokens`` plus any user ``options`` and returns an encoder object. An optional
  module-level ``identity(**same_kwargs) -> dict`` lets the no-op check skip loading the plugin.
- a local directory saved with ``save_pretrained`` or a Hugging Face hub id: a transformers model, see
  :mod:`extract.encoders.hf`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..filehash import file_sha256
from ..media import AudioOptions, ImageOptions, VideoOptions
from .base import FRAME_POOLS, MODALITIES, EncoderError, EncoderNotCachedError, FrozenEncoder


def _plugin_target(spec: str) -> tuple[str, str] | None:
    """(module or file, callable) when ``spec`` names a plugin; None for a directory or hub id."""
    if os.path.exists(spec) or ":" not in spec:
        return None
    module, _, attr = spec.rpartition(":")
    if not module or not attr.isidentifier():
        return None
    return module, attr


SHIPPED_PLUGINS = "extract.plugins."  # plugins that come with this project: code the user installed


def is_foreign_plugin(spec: str) -> bool:
    """Whether loading ``spec`` runs plugin code other than the plugins shipped with this project. Transformers
    directories and hub ids load without remote code (``trust_remote_code`` stays off) and are not plugins."""
    target = _plugin_target(spec)
    return target is not None and not target[0].startswith(SHIPPED_PLUGINS)


def check_recorded_spec(spec: str, source: str, *, trust_plugins: bool) -> None:
    """Refuse to run a plugin whose spec was read from ``source`` (a store or run directory, which may come from
    someone else) rather than given by the user, unless ``trust_plugins``: importing a plugin runs its code."""
    if is_foreign_plugin(spec) and not trust_plugins:
        raise EncoderError(
            f"{source} records the encoder plugin {spec!r}; running it would execute that code. If you trust whoever "
            "made it, pass --trust-plugins; or give the encoder spec yourself (see SECURITY.md)")


def _import_plugin_module(module: str) -> Any:
    if module.endswith(".py"):
        path = os.path.abspath(module)
        if not os.path.isfile(path):
            raise EncoderError(f"plugin file not found: {module}")
        # A stable module name per file, so repeated loads reuse one module object (and its state).
        name = "oneencoder_plugin_" + hashlib.sha256(path.encode()).hexdigest()[:12]
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise EncoderError(f"cannot import plugin file {module}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception:
            del sys.modules[name]
            raise
        return mod
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EncoderError(f"cannot import plugin module {module!r}: {exc}") from exc


MediaOptions = AudioOptions | VideoOptions | ImageOptions


@dataclass(frozen=True)
class EncoderSettings:
    """What an extraction asks of an encoder besides its spec and modality."""

    layer: int
    max_tokens: int | None
    options: dict[str, Any] | None  # plugins' own keyword arguments
    media: MediaOptions | None  # the modality's decoding options (defaults when not given); None for text
    frame_pool: str


def _media_options(
    modality: str, audio: AudioOptions | None, video: VideoOptions | None, image: ImageOptions | None = None
) -> MediaOptions | None:
    """The decoding options that apply to ``modality`` (defaults when not given); None for text."""
    if modality == "audio":
        return audio or AudioOptions()
    if modality == "video":
        return video or VideoOptions()
    if modality == "image":
        return image or ImageOptions()
    return None


def _plugin_kwargs(modality: str, settings: EncoderSettings) -> dict:
    """Keyword arguments of a plugin's callable and identity: image/audio/video plugins also get the decoding
    options (``max_pixels`` / ``sample_rate``, ``max_seconds``, ``segment``, ``max_decoded_seconds`` / ``frames``,
    ``sampling``, ``fps``, ``clips``, ``max_video_pixels``)."""
    media, options = settings.media, settings.options
    extra = media.identity() if media is not None else {}
    clash = sorted(set(extra) & set(options or {}))
    if clash:
        raise EncoderError(f"encoder options {clash} clash with the extraction's own {modality} options; use those")
    return {"modality": modality, "layer": settings.layer, "max_tokens": settings.max_tokens, **extra, **(options or {})}


def _resolve_hf_dir(spec: str) -> tuple[Path, dict[str, Any]]:
    """Local folder holding the model files plus source info: the dir itself, or the cached hub snapshot."""
    if os.path.isdir(spec):
        return Path(spec), {"source": "local"}
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError as exc:  # pragma: no cover - transformers depends on huggingface_hub
        raise EncoderError(f"{spec!r} is not a directory and huggingface_hub is not installed") from exc
    cached = try_to_load_from_cache(spec, "config.json")
    if not isinstance(cached, str):
        raise EncoderNotCachedError(
            f"encoder {spec!r} is neither a local directory nor in the local Hugging Face cache; download it first "
            f"(e.g. `hf download {spec}`) or pass a directory saved with save_pretrained"
        )
    snapshot = Path(cached).parent
    return snapshot, {"source": "hub", "spec": spec, "revision": snapshot.name}


_LOCAL_HINT = ("pass a directory saved with save_pretrained instead (--encoder path/to/model), or download the model "
               "into the Hugging Face cache where there is network (`hf download ID`)")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in {"1", "ON", "YES",
                                                                                                     "TRUE"}


def require_model_files(spec: str) -> None:
    """Before transformers would download ``spec``: nothing to do for a local directory or a cached hub id; else
    fail at once with one line when offline (``HF_HUB_OFFLINE``), when the hub cannot be reached, or when it has
    no such model (a mistyped id), instead of minutes of retries and a long traceback. One request, no retries."""
    if os.path.isdir(spec):
        return
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(spec, "config.json"), str):
            return
    except HFValidationError:
        raise EncoderError(f"encoder {spec!r} is neither a local directory nor a Hugging Face model id; "
                           f"{_LOCAL_HINT}") from None
    if _offline():
        raise EncoderNotCachedError(f"encoder {spec!r} is neither a local directory nor in the local Hugging Face "
                                    f"cache, and HF_HUB_OFFLINE is set; {_LOCAL_HINT}")
    try:
        HfApi().model_info(spec, timeout=10)
    except GatedRepoError:
        raise EncoderError(f"encoder {spec!r} is a gated model: accept its terms on the hub and log in "
                           f"(`hf auth login`), or {_LOCAL_HINT}") from None
    except RepositoryNotFoundError:
        raise EncoderError(f"encoder {spec!r}: no such local directory and no such model on the Hugging Face hub "
                           f"(mistyped?); {_LOCAL_HINT}") from None
    except Exception as exc:  # DNS, refused connection, proxy, timeout: anything that is not the hub's answer
        raise EncoderNotCachedError(f"encoder {spec!r} is not in the local Hugging Face cache and the hub cannot be "
                                    f"reached ({type(exc).__name__}: {' '.join(str(exc).split())}); set HF_HUB_OFFLINE=1 on machines "
                                    f"without network and {_LOCAL_HINT}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _check_modality(modality: str) -> None:
    if modality not in MODALITIES:
        raise EncoderError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")


def _check_frame_pool(frame_pool: str) -> None:
    if frame_pool not in FRAME_POOLS:
        raise EncoderError(f"frame_pool must be one of {', '.join(FRAME_POOLS)}, not {frame_pool!r}")


def _check_video_pool(spec: str, modality: str, frame_pool: str) -> None:
    # Silently ignoring "keep" for a real video model would store something other than what was asked for.
    if modality == "video" and frame_pool != "mean":
        raise EncoderError(f"frame_pool={frame_pool!r} applies to per-frame mode (an image encoder), not {spec!r}")


def _check_hf_args(spec: str, modality: str, max_tokens: int | None, options: dict[str, Any] | None) -> None:
    """Settings that make no sense for a transformers model; checked before identity so a run fails early."""
    if options:
        raise EncoderError(f"encoder options {sorted(options)} are only for plugins, not {spec!r}")
    if modality != "text" and max_tokens is not None:
        raise EncoderError("max_tokens applies to text encoders only")


def _plugin_identity(spec: str, modality: str, settings: EncoderSettings
                     ) -> tuple[dict[str, Any], FrozenEncoder | None]:
    """Plugin identity, and the loaded encoder when identity needed loading it (so the caller can reuse it)."""
    target = _plugin_target(spec)
    assert target is not None
    module_name, attr = target
    mod = _import_plugin_module(module_name)
    kwargs = _plugin_kwargs(modality, settings)
    # A file plugin's path differs between machines; its name plus content hash identifies it portably.
    if module_name.endswith(".py"):
        shown = {"spec": f"{os.path.basename(module_name)}:{attr}", "file_sha256": file_sha256(module_name)}
    else:
        shown = {"spec": spec}
    base = {"kind": "plugin", **shown, "options": {k: v for k, v in kwargs.items() if k != "modality"}}
    ident_fn = getattr(mod, "identity", None)
    if callable(ident_fn):
        return {**base, "plugin": ident_fn(**kwargs)}, None
    encoder = _load_plugin(spec, modality, settings)
    return {**base, "plugin": encoder.identity()}, encoder


def _load_plugin(spec: str, modality: str, settings: EncoderSettings) -> FrozenEncoder:
    target = _plugin_target(spec)
    assert target is not None
    mod = _import_plugin_module(target[0])
    factory = getattr(mod, target[1], None)
    if not callable(factory):
        raise EncoderError(f"plugin {spec!r}: {target[1]!r} is not a callable in {target[0]}")
    encoder = factory(**_plugin_kwargs(modality, settings))
    missing = [a for a in ("modality", "dim", "fixed_tokens", "preprocessor", "identity", "forward", "to")
               if not hasattr(encoder, a)]
    if missing:
        raise EncoderError(f"plugin {spec!r} returned an object without {', '.join(missing)} (see docs/plugins.md)")
    if encoder.modality != modality:
        raise EncoderError(f"plugin {spec!r} encodes {encoder.modality!r}, not {modality!r}")
    return encoder
