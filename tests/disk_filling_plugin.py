"""A toy text encoder plugin that fills the disk under a store once every item is encoded, so the writer meets a full
disk exactly in ``finish`` (with the default 64 MB shards nothing is written before it).

Pass ``<this file>:load`` as the encoder and the folder to fill in ``FILL_DISK_AT``; the filler file is
``FILL_DISK_AT/filler``. Ragged output: 1-3 tokens of width 3 per item, values from the text.
"""

import os
from pathlib import Path

import torch


class Pre:
    def __call__(self, items):
        return {"items": items}


class Filling:
    modality, dim, fixed_tokens, preprocessor = "text", 3, None, Pre()

    def __init__(self, last_id: str):
        self.last_id = last_id

    def identity(self):
        return {"version": 1}

    def to(self, device):
        return self

    def forward(self, batch):
        where = os.environ.get("FILL_DISK_AT")
        if where and any(item.id == self.last_id for item in batch["items"]):
            with open(Path(where) / "filler", "ab", buffering=0) as filler:
                try:
                    while True:
                        filler.write(b"\0" * 4096)
                except OSError:
                    pass
        n = torch.tensor([float(len(item.text)) for item in batch["items"]])
        tokens = n[:, None, None] + torch.arange(3.0)[None, :, None] / 2 + torch.arange(3.0)[None, None, :] / 4
        return tokens, (n.long() % 3) + 1


def load(last_id: str = "c39", **kwargs):
    return Filling(last_id)
