"""Stores held whole on the training device (``--store-device``), so an epoch reads nothing from disk.

Each store is loaded once (:meth:`stores.FeatureStore.whole_tokens`: its tokens as stored, no padding) and moved to
the device; a minibatch is then a gather by index there. The buffer is flat: a ragged store is ``[total tokens, D]``
with item offsets, so it takes the store's own bytes (padded to the longest item it would take ``N x L_max x D``:
1.67x for the benchmark's captions of 8-40 tokens, more for real captions with a long tail). A batch is padded
when it is gathered, exactly as the store's reader pads it: the same tensors as the disk path, so the same weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.training.loop import TrainingError
from stores import FeatureStore

STORE_DEVICES = ("none", "cpu", "cuda")
# The share of the free memory the stores may take: the model, optimiser state and activations need the rest.
HEADROOM = 0.9


def store_device_for(store_device: str, device: str) -> str | None:
    """The torch device the stores are held on for ``--store-device store_device`` when training on ``device``
    (``cuda`` is the training GPU), or None for ``none``; a clear error for a choice that cannot work."""
    if store_device not in STORE_DEVICES:
        raise TrainingError(f"store_device must be one of {STORE_DEVICES}, got {store_device!r}")
    if store_device == "none":
        return None
    if store_device == "cuda":
        if torch.device(device).type != "cuda":
            raise TrainingError(f"--store-device cuda needs a CUDA training device, not --device {device}")
        return device
    return "cpu"


def available_ram() -> int:
    """Bytes of RAM the kernel could give this process now (``MemAvailable``: free plus reclaimable cache)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_bytes(device: str) -> int:
    """Free memory on ``device``: the GPU's free memory, or the RAM available."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    return available_ram()


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def check_fits(stores: Sequence[FeatureStore], device: str, free: dict[str, int] | None = None) -> None:
    """Refuse, in one line, stores whose tokens (estimated from their metadata) do not fit in :data:`HEADROOM` of
    the free memory of ``device``, and (a store not yet in RAM is loaded through it) of the RAM. ``free``: the free
    bytes by ``"ram"`` / ``"device"`` instead of asking the machine."""
    free = free or {}
    need_ram = sum(s.nbytes for s in stores if not s.in_memory)
    on_gpu = torch.device(device).type == "cuda"
    need_device = sum(s.nbytes for s in stores) if on_gpu else need_ram
    where = [("device", device if on_gpu else "RAM", need_device)] + ([("ram", "RAM", need_ram)] if on_gpu else [])
    for key, name, need in where:
        if need == 0:
            continue
        have = free.get(key)
        have = (free_bytes(device) if key == "device" else available_ram()) if have is None else have
        if need > HEADROOM * have:
            sizes = ", ".join(f"{s.path} {_size(s.nbytes)}" for s in stores)
            raise TrainingError(f"--store-device {torch.device(device).type}: the stores need {_size(need)} ({sizes}) "
                                f"but {name} has {_size(have)} free (at most {HEADROOM:.0%} may be used); use "
                                "--store-device none to read them from disk")


class ResidentStore:
    """One store's tokens on ``device`` (flat, as stored) and the batches gathered from them: :meth:`batch` gives
    the tensors :func:`pipeline.training.prefetch.token_batch` reads from the store, on ``device``."""

    def __init__(self, store: FeatureStore, device: str, pin: bool = False):
        tokens, offsets = store.whole_tokens()
        self.layout, self.device, self.pin = store.layout, device, pin
        self.tokens = tokens.to(device)
        self._lengths = store.lengths  # on the host: a batch's width needs no device sync
        self.lengths = torch.from_numpy(store.lengths).to(device)
        self.starts = torch.from_numpy(offsets[:-1]).to(device)

    @property
    def nbytes(self) -> int:
        return self.tokens.numel() * self.tokens.element_size()

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (storage dtype, zero-padded to the batch's longest item) and mask of ``indices``; pinned when
        held on the CPU for a GPU (``pin``)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = torch.from_numpy(idx).to(self.device)
        if self.layout in ("fixed", "pooled"):
            tokens = self.tokens[rows]
            tokens = tokens.unsqueeze(1) if self.layout == "pooled" else tokens
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=self.device)
        else:
            width = int(self._lengths[idx].max()) if len(idx) else 0
            positions = torch.arange(width, device=self.device)
            mask = positions[None, :] < self.lengths[rows][:, None]
            flat = torch.where(mask, self.starts[rows][:, None] + positions[None, :], 0)
            zero = torch.zeros((), dtype=self.tokens.dtype, device=self.device)
            tokens = torch.where(mask[..., None], self.tokens[flat], zero)
        return (tokens.pin_memory(), mask.pin_memory()) if self.pin else (tokens, mask)
