"""Code named by a store or run directory (which may come from someone else) runs only when the user opts in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy_stores import _write

from extract.run import run_extraction
from pipeline.training.fit import TrainConfig, fit_up

REPO = Path(__file__).resolve().parents[1]

# A text encoder plugin that leaves a file behind whenever its module is imported: proof that its code ran.
PLUGIN = '''
from pathlib import Path
import torch

Path(__file__).with_name("plugin-ran").touch()


class Pre:
    def __call__(self, items):
        return {"items": items}


class Enc:
    modality, dim, fixed_tokens, preprocessor = "text", 4, None, Pre()

    def identity(self):
        return {"version": 1}

    def to(self, device):
        return self

    def forward(self, batch):
        texts = [it.text for it in batch["items"]]
        rows = [[float(ord(t[0]) % 7), float(len(t)), float(i), 1.0] for i, t in enumerate(texts)]
        tokens = torch.tensor(rows)[:, None, :].repeat(1, 2, 1)
        return tokens, torch.full((len(rows),), 2, dtype=torch.int64)


def load(**kwargs):
    return Enc()
'''


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "cli.py", *map(str, args)], cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory):
    """A run whose text store was extracted with a file plugin (the spec the store and the run record)."""
    root = tmp_path_factory.mktemp("trust")
    plugin = root / "stranger_plugin.py"
    plugin.write_text(PLUGIN)
    spec = f"{plugin}:load"
    words = ["red", "blue", "green", "gray", "pink", "teal", "gold", "navy", "rose", "sand"]
    manifest = root / "captions.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"c{i}", "text": f"{w} thing", "ref": f"img{i}"}) + "\n"
                                for i, w in enumerate(words)))
    texts = run_extraction(manifest, "text", spec, root / "texts", progress=False, batch_size=4).store
    gen = torch.Generator().manual_seed(0)
    images = _write(root / "images", "image", "fixed", [torch.randn(2, 6, generator=gen) for _ in words],
                    [{"id": f"img{i}"} for i in range(len(words))], 6, 2,
                    {"encoder": {"id": "toy"}, "modality": "image"})
    train = TrainConfig(epochs=1, batch_size=4, val_fraction=0.2, tensorboard=False)
    fit_up(images, texts, root / "run", width=16, blocks=1, train=train, progress=False)
    return root, spec


def test_encode_refuses_a_plugin_recorded_in_the_run_unless_trusted_or_given(plugin_run):
    from extract.encoders import EncoderError
    from pipeline.encode import encode

    root, spec = plugin_run
    ran = root / "plugin-ran"
    ran.unlink(missing_ok=True)
    refused = _cli("encode", "--run", root / "run", "--modality", "text", "a red thing")  # a fresh process
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "records the encoder plugin" in refused.stderr and "--trust-plugins" in refused.stderr
    assert not ran.exists()  # its code never ran

    with pytest.raises(EncoderError, match="--trust-plugins"):
        encode(root / "run", "text", ["a red thing"])
    trusted = encode(root / "run", "text", ["a red thing"], trust_plugins=True)[1]
    given = encode(root / "run", "text", ["a red thing"], encoder_spec=spec)[1]  # the user names it again
    assert trusted.shape == given.shape == (1, 16) and (trusted == given).all()


def test_repair_refuses_a_plugin_recorded_in_the_store_unless_trusted(plugin_run):
    root, _ = plugin_run
    ran = root / "plugin-ran"
    ran.unlink(missing_ok=True)
    shard = next(p for p in sorted((root / "texts" / "tokens").rglob("*")) if p.is_file() and p.stat().st_size > 16)
    data = bytearray(shard.read_bytes())
    data[8] ^= 0xFF
    shard.write_bytes(bytes(data))
    refused = _cli("stores", "verify", root / "texts", "--repair")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "records the encoder plugin" in refused.stderr and "--trust-plugins" in refused.stderr
    assert not ran.exists() and shard.read_bytes() == bytes(data)  # nothing ran, nothing was removed
