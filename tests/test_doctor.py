"""The environment check (`cli.py doctor`, `--version`): a broken package is named in one line with its fix."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_doctor_passes_here_and_names_every_package() -> None:
    done = _cli("doctor")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for package in ("torch", "torchaudio", "transformers", "zarr", "tensorstore", "av"):
        assert any(line.split()[:2] == ["ok", package] for line in lines), (package, lines)
    if importlib.util.find_spec("torchaudio") is None:
        assert any("torchaudio (not installed): audio resampled by PyAV" in line for line in lines), lines


def _broken_torchaudio(folder: Path, version: str, needs: str) -> None:
    """A torchaudio whose compiled library does not load, as a build for another torch release fails."""
    package = folder / "torchaudio"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "raise OSError('/site-packages/torchaudio/lib/libtorchaudio.so: undefined symbol: "
        "_ZNK5torch8autograd4Node4nameEv')\n"
    )
    info = folder / f"torchaudio-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torchaudio\nVersion: {version}\n"
                                   f"Requires-Dist: {needs}\n")


@pytest.mark.parametrize("needs", ["torch==2.99.0", "torch>=2.11"])
def test_doctor_names_a_mismatched_torchaudio_in_one_line(tmp_path: Path, needs: str) -> None:
    # torch>=2.11 is what torchaudio 2.11.1 really declares, and it still does not load with torch 2.11.0.
    torch_version = importlib.metadata.version("torch")
    _broken_torchaudio(tmp_path, "2.11.1", needs)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = _cli("doctor", env=env)
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("BROKEN  torchaudio")]
    assert "torchaudio 2.11.1" in line and f"torch {torch_version}" in line
    assert ("built for torch==2.99.0" in line) == (needs == "torch==2.99.0")
    assert "undefined symbol" in line and "fix: pip install torch==2.11.0 torchaudio==2.11.0" in line
    assert "pip uninstall torchaudio" in line
    # transformers imports torchaudio: its failure points back at torchaudio instead of hiding the cause.
    transformers = [line for line in done.stdout.splitlines() if " transformers " in line]
    assert transformers and all(line.split()[0] == "ok" or "fix torchaudio first" in line for line in transformers)
    assert any(line.startswith("ok      torch ") for line in done.stdout.splitlines())


def test_version_names_the_project_and_the_torch_pair() -> None:
    done = _cli("--version")
    assert done.returncode == 0
    assert done.stdout.startswith(f"oneencoder-cache {importlib.metadata.version('oneencoder-cache')} (")
    assert f"torch {importlib.metadata.version('torch')}" in done.stdout


def test_console_script_is_the_cli() -> None:
    (entry,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "oneencoder-cache"]
    assert entry.value == "cli:main"
    script = shutil.which("oneencoder-cache", path=str(Path(sys.executable).parent))
    assert script is not None
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "fit-up" in done.stdout and "doctor" in done.stdout
