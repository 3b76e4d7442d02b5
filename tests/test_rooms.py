"""The seams between rooms: imports that stay light and acyclic, one error base class the command line catches,
one dtype table, shared command-line options."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]


def test_encoder_identity_is_computed_without_importing_zarr(tiny_text_model: str) -> None:
    """Hashing an encoder's files uses the stores' file helpers, which must not drag in the store format."""
    code = (
        "import sys\n"
        "from extract.encoders import encoder_identity\n"
        f"identity = encoder_identity({tiny_text_model!r}, 'text')\n"
        "assert identity['files']['model.safetensors'], identity\n"
        "assert 'zarr' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('zarr', 'stores')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def _stores_imports(path: Path) -> set[str]:
    """The ``stores`` modules a module imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stores."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "stores":
            found.update(a.name for a in node.names if (REPO / "stores" / f"{a.name}.py").is_file())
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("stores."))
    return found


def test_no_import_circle_inside_stores() -> None:
    graph = {p.stem: _stores_imports(p) - {p.stem} for p in (REPO / "stores").glob("*.py") if p.stem != "__init__"}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    circles = sorted(module for module in graph if reaches(module, module, {module}))
    assert not circles, f"modules importing themselves through others: {circles}"


def test_every_project_error_derives_from_the_one_base_class() -> None:
    from stores import OneEncoderError

    checked = []
    for room in ("extract", "stores", "pipeline", "project"):
        for path in sorted((REPO / room).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            names = [n.name for n in tree.body if isinstance(n, ast.ClassDef) and n.name.endswith("Error")]
            if not names:
                continue
            module = importlib.import_module(".".join(path.relative_to(REPO).with_suffix("").parts))
            for name in names:
                error = getattr(module, name)
                assert issubclass(error, OneEncoderError), f"{module.__name__}.{name} is not a OneEncoderError"
                checked.append(name)
    assert {"ManifestError", "EncoderError", "StoreError", "TrainingError", "EvaluationError"} <= set(checked)


def test_a_missing_fsspec_backend_is_one_line_for_every_stores_command(tmp_path: Path) -> None:
    """Without s3fs, an s3:// store is a project error (``StoreError``), shown as one line by any command."""
    hide = tmp_path / "sitecustomize.py"  # this interpreter has no s3fs, as a user's may not
    hide.write_text(
        "import sys\n"
        "class _NoS3fs:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 's3fs':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _NoS3fs())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    for command in (["stores", "ls"], ["stores", "info"], ["stores", "errors"], ["stores", "verify"]):
        done = subprocess.run([sys.executable, "cli.py", *command, "s3://bucket/x"], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env=env)
        assert done.returncode == 1, (command, done.stderr)
        assert "Traceback" not in done.stderr, (command, done.stderr)
        assert done.stderr.strip().splitlines() == [
            "Error: cannot open s3://bucket/x: Install s3fs to access S3 (is the fsspec backend for it installed?)"
        ], (command, done.stderr)


def _commands(group: click.Group, prefix: str = ""):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def test_device_defaults_to_auto_and_resolves_in_one_place() -> None:
    import cli
    from pipeline.training.distributed import resolve_device

    with_device = {name: next(p for p in command.params if p.name == "device")
                   for name, command in _commands(cli.main) if any(p.name == "device" for p in command.params)}
    assert {"extract", "fit-up", "fit-al", "fit-vqa", "fit-base", "eval retrieval", "encode", "bench"} <= set(with_device)
    for name, param in with_device.items():
        assert param.default == "auto", name
        context = click.Context(cli.main)
        assert param.process_value(context, "auto") == resolve_device("auto"), name
        assert param.process_value(context, "cpu") == "cpu", name
    assert resolve_device("cuda:1") == "cuda:1"


def test_one_dtype_table() -> None:
    import numpy as np

    import cli
    from extract import run
    from stores import DTYPES, STORAGE_DTYPE, as_torch_dtype

    assert run.DTYPES is DTYPES
    extract_dtype = next(p for p in cli.main.commands["extract"].params if p.name == "dtype")
    assert list(extract_dtype.type.choices) == list(DTYPES)
    for name in DTYPES.values():  # the stored bits have the width of the logical dtype
        assert as_torch_dtype(name).itemsize == np.dtype(STORAGE_DTYPE[name]).itemsize
    sources = "".join(p.read_text(encoding="utf-8") for room in ("extract", "stores", "pipeline")
                      for p in (REPO / room).rglob("*.py") if p.name != "dtypes.py")
    assert "torch.bfloat16}" not in sources and '"bf16": "bfloat16"' not in sources, "a second dtype table"

