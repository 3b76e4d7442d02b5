"""Raw inputs -> aligned, L2-normalised embeddings through exactly the extraction path the run's stores used.

Used by ``cli.py encode`` and by zero-shot evaluation (class prompts). The inputs are written to a temporary
manifest and extracted with the same encoder and the same settings (read back from the trained store's identity),
then embedded by the trained head: no train/serve skew, and an encoder that differs from the one the run was
trained on is refused.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.embed import embed_store
from pipeline.training.rundir import RunDir, RunError, check_compatible
from stores import FeatureStore


def extract_like_run(config: dict, modality: str, records: list[dict], encoder_spec: str | None, workdir: Path,
                     device: str = "cpu", trust_plugins: bool = False) -> FeatureStore:
    """Extract ``records`` (manifest records) like the run's ``modality`` store and return the new store.

    Without ``encoder_spec`` the encoder the run recorded is used; a plugin recorded there runs only with
    ``trust_plugins`` (the run directory may come from someone else)."""
    from extract.encoders import check_recorded_spec
    from extract.manifest import write_manifest
    from extract.run import ExtractionSpec, run_spec

    trained = config["modalities"].get(modality)
    if trained is None:
        raise RunError(f"modality {modality!r} is not aligned in this run (aligned: {sorted(config['modalities'])})")
    spec = encoder_spec or trained["store"].get("encoder_spec")
    if not spec:
        raise RunError(f"the run does not record which encoder built its {modality} store; pass the encoder spec")
    if encoder_spec is None:
        check_recorded_spec(spec, f"the run's {modality} store record", trust_plugins=trust_plugins)
    manifest = workdir / f"{modality}-inputs.jsonl"
    write_manifest(manifest, records)
    result = run_spec(ExtractionSpec.like_store(trained["store"]["identity"], manifest, modality, spec,
                                                workdir / f"{modality}-store", device=device, progress=False,
                                                on_error="fail"))
    store = FeatureStore.open(result.store)
    try:
        check_compatible(config, modality, store)
    except RunError as err:
        raise RunError(f"encoder {spec} is not the encoder the {modality} store was built with: {err}") from None
    return store


def input_records(modality: str, inputs: Sequence[str | os.PathLike[str]]) -> list[dict]:
    """Manifest records of raw inputs, ids = positions: texts for ``text``, absolute file paths otherwise."""
    if modality == "text":
        return [{"id": str(i), "text": str(value)} for i, value in enumerate(inputs)]
    return [{"id": str(i), "path": str(Path(value).resolve())} for i, value in enumerate(inputs)]


def encode(run_dir: Path | str, modality: str, inputs: Sequence[str], encoder_spec: str | None = None,
           device: str = "cpu", trust_plugins: bool = False) -> tuple[list[str], np.ndarray]:
    """Embed raw inputs (texts for ``text``, file paths otherwise) with a trained run: ``(ids, [n, W] float32)``.

    Ids are the input positions as strings; an audio split into segments or a video into clips yields one row per
    piece (``"3#seg1"``). ``trust_plugins``: see :func:`extract_like_run`.
    """
    run = RunDir(run_dir)
    model, _, config = run.load_model(device)
    records = input_records(modality, inputs)
    with tempfile.TemporaryDirectory(prefix="encode-") as tmp:
        store = extract_like_run(config, modality, records, encoder_spec, Path(tmp), device, trust_plugins)
        embeddings = embed_store(model, modality, store, device=device)
        ids = list(store.ids)
    return ids, embeddings.numpy()


def embed_records(run: RunDir, model: torch.nn.Module, config: dict, modality: str, records: list[dict],
                  encoder_spec: str | None, device: str = "cpu") -> torch.Tensor:
    """Embeddings of manifest records (e.g. zero-shot prompts), in record order."""
    with tempfile.TemporaryDirectory(prefix=f"{modality}-") as tmp:
        store = extract_like_run(config, modality, records, encoder_spec, Path(tmp), device)
        return embed_store(model, modality, store, device=device)
