"""Is this environment able to run the project? One line per package, and one line naming the fix for each broken one.

Why a check of its own: a torchaudio built for another torch release fails deep inside ``import transformers``
(transformers imports torchaudio whenever it is installed), so every image, text and audio extraction dies with a
traceback that names neither the package nor the remedy. Each check here imports one package the way the pipeline
will and exercises the part the pipeline uses, in dependency order, so the first broken package is named, not the
innocent one that imported it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Check", "run_checks", "versions"]

# The pair constraints.txt pins and CI tests; named in the fix for a broken torchaudio.
TESTED_TORCH_PAIR = "torch==2.11.0 torchaudio==2.11.0"
PACKAGES = ("torch", "torchaudio", "transformers", "zarr", "tensorstore", "av", "numcodecs", "h5py")


@dataclass(frozen=True)
class Check:
    """One package's verdict: ``ok`` False means the pipeline cannot run until ``fix`` is applied."""

    package: str
    version: str | None
    ok: bool
    detail: str = ""
    fix: str = ""

    def line(self) -> str:
        head = f"{self.package} {self.version or '(not installed)'}"
        if self.ok:
            return f"ok      {head}" + (f": {self.detail}" if self.detail else "")
        return f"BROKEN  {head}: {self.detail}; fix: {self.fix}"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Installed versions of the packages the pipeline depends on, read from metadata (nothing is imported)."""
    return {name: _version(name) for name in ("oneencoder-cache", *PACKAGES)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _torch() -> str:
    import torch

    torch.ones(2).sum().item()
    return ""


def _torchaudio() -> str:
    # Imported before transformers on purpose: transformers would import it anyway and hide the cause.
    from torchaudio.transforms import Resample

    Resample(22050, 16000)
    return "audio resampled by torchaudio"


def _transformers() -> str:
    import numpy as np
    import transformers
    from transformers import Wav2Vec2FeatureExtractor

    # The PIL backend where transformers has one: the check must not need torchvision, which we do not install.
    processor = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    processor()(np.zeros((8, 8, 3), dtype=np.uint8), return_tensors="pt")
    Wav2Vec2FeatureExtractor()(np.zeros(400, dtype=np.float32), sampling_rate=16000, return_tensors="pt")
    return "image processor and audio feature extractor run"


def _zarr() -> str:
    import zarr

    zarr.create_array(store={}, shape=(2, 2), chunks=(1, 2), dtype="float16")
    return ""


def _tensorstore() -> str:
    import tensorstore

    tensorstore.array([1, 2, 3]).read().result()
    return ""


def _av() -> str:
    import av

    return f"FFmpeg {'.'.join(map(str, av.library_versions['libavcodec']))} (libavcodec)"


def _numcodecs() -> str:
    import numcodecs  # noqa: F401

    return ""


def _h5py() -> str:
    import h5py  # noqa: F401

    return ""


# package -> (exercise, fix when it fails). Order matters: a package is checked before those that import it.
CHECKS: dict[str, tuple[Callable[[], str], str]] = {
    "torch": (_torch, "reinstall torch (pip install --force-reinstall torch)"),
    "torchaudio": (_torchaudio, f"pip install {TESTED_TORCH_PAIR} (the tested pair), or pip uninstall torchaudio "
                                "to resample audio with PyAV's libswresample"),
    "transformers": (_transformers, "pip install -e . -c constraints.txt (the tested versions)"),
    "zarr": (_zarr, "pip install -e . -c constraints.txt (the tested versions)"),
    "tensorstore": (_tensorstore, "pip install -e . -c constraints.txt (the tested versions)"),
    "av": (_av, "pip install -e . -c constraints.txt (PyAV wheels bundle their own FFmpeg)"),
    "numcodecs": (_numcodecs, "pip install -e . -c constraints.txt (the tested versions)"),
    "h5py": (_h5py, "pip install -e . -c constraints.txt (the tested versions)"),
}


def _torchaudio_mismatch(torch_version: str | None) -> str:
    """What torchaudio's own metadata says it needs, when the installed torch is not that."""
    from packaging.requirements import Requirement

    for text in importlib.metadata.requires("torchaudio") or []:
        requirement = Requirement(text)
        if requirement.name == "torch" and torch_version and not requirement.specifier.contains(
            torch_version.split("+")[0], prereleases=True
        ):
            return f"it was built for {requirement} but torch {torch_version} is installed"
    return ""


def run_checks() -> list[Check]:
    """Check every package in :data:`CHECKS`; an optional one that is not installed (torchaudio) is fine."""
    results: list[Check] = []
    found = versions()
    for package, (exercise, fix) in CHECKS.items():
        version = found[package]
        if version is None and importlib.util.find_spec(package) is None:
            if package == "torchaudio":
                results.append(Check(package, None, True, "audio resampled by PyAV's libswresample"))
            else:
                results.append(Check(package, None, False, "not installed", "pip install -e . -c constraints.txt"))
            continue
        try:
            detail = exercise()
        except Exception as exc:  # any failure to import or run is the verdict, reported in one line
            reason = _first_line(exc)
            if package == "torchaudio":
                # Metadata alone cannot be trusted: torchaudio 2.11.1 declares torch>=2.11 yet fails on 2.11.0.
                mismatch = _torchaudio_mismatch(found["torch"]) or f"does not load with torch {found['torch']}"
                reason = f"{mismatch} ({reason})"
            if broken := [r.package for r in results if not r.ok]:
                fix = f"fix {broken[0]} first (it imports {broken[0]})"
            results.append(Check(package, version, False, reason, fix))
            continue
        results.append(Check(package, version, True, detail))
    return results
