"""Multi-process runs under ``torchrun``: process group set-up, rank queries, and the autograd-aware gather that
lets a contrastive loss see the negatives of the whole global batch.

A run is distributed when torchrun's environment says so (``RANK``, ``WORLD_SIZE`` > 1, ``LOCAL_RANK``);
otherwise every helper here answers as for one process (rank 0 of 1) and nothing is initialised, so a plain
``python cli.py ...`` behaves exactly as before. The backend is gloo on the CPU and nccl on CUDA, where each
process takes the GPU of its ``LOCAL_RANK``.

Training: each rank embeds its contiguous slice of every global batch,
the slices are all-gathered *with* gradients, and every rank computes the loss of the whole global batch. The
gather's backward sums the K identical losses' gradients into each slice (K times dL/dslice), and
DistributedDataParallel averages parameter gradients over the K ranks, so the parameters receive exactly the
single-process gradient of the global batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

# The rank queries and collectives are shared with the extraction, which sits below pipeline/.
from extract.ranks import (
    all_gather_object,
    barrier,
    broadcast_object,
    is_distributed,
    is_main,
    rank,
    world_size,
)

__all__ = [
    "PairEncoder", "all_gather_object", "barrier", "broadcast_object", "env_world_size", "gather_rows",
    "is_distributed", "is_main", "local_device", "my_slice", "pair_encoder", "rank", "resolve_device", "session", "split_sizes",
    "world_size",
]


def env_world_size() -> int:
    """World size torchrun announced (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def resolve_device(device: str) -> str:
    """``auto`` becomes ``cuda`` when torch sees a GPU, else ``cpu``; any other name is returned as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def local_device(device: str) -> str:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun, so each process drives its own GPU."""
    if env_world_size() > 1 and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


@contextmanager
def session(device: str = "cpu", backend: str | None = None, timeout_minutes: float = 60) -> Iterator[str]:
    """Join torchrun's process group for the duration of a command (a no-op for a single process).

    Yields the device this process should use (see :func:`local_device`). ``backend``: default gloo on the CPU,
    nccl on CUDA; extraction passes gloo (only control messages travel) with a long ``timeout_minutes``, since a
    barrier there waits for every rank's encoding. The group is destroyed on exit, also when the command fails.
    """
    device = local_device(device)
    started_here = False
    if env_world_size() > 1 and dist.is_available() and not dist.is_initialized():
        on_cuda = torch.device(device).type == "cuda"
        if on_cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend=backend or ("nccl" if on_cuda else "gloo"),
                                timeout=timedelta(minutes=timeout_minutes))
        started_here = True
    try:
        yield device
    finally:
        if started_here:
            dist.destroy_process_group()


def split_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous slices of ``n`` rows, as even as possible (earlier slices one larger)."""
    base, extra = divmod(n, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


def my_slice(n: int) -> slice:
    """This rank's contiguous slice of a global batch of ``n`` rows (everything in a single process)."""
    sizes = split_sizes(n, world_size())
    start = int(np.sum(sizes[: rank()]))
    return slice(start, start + sizes[rank()])


def gather_rows(x: Tensor, sizes: Sequence[int]) -> Tensor:
    """Concatenate every rank's ``x`` (rank r holds ``sizes[r]`` rows) along dim 0, keeping the autograd graph.

    Slices may differ in length by one (or be empty): each is padded to the longest before the collective and cut
    back after. The backward pass sums, into each rank's own rows, the gradients that every rank computed for them
    (``torch.distributed.nn.functional.all_gather``).
    """
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    longest = max(sizes)
    if x.shape[0] != sizes[rank()]:
        raise ValueError(f"rank {rank()} holds {x.shape[0]} rows, expected {sizes[rank()]}")
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
    parts = all_gather(x)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


class PairEncoder(nn.Module):
    """Both sides of a stage in one ``forward``, so DistributedDataParallel sees (and synchronises) one call."""

    def __init__(self, model: nn.Module, anchor: str, partner: str) -> None:
        super().__init__()
        self.model, self.anchor, self.partner = model, anchor, partner

    def forward(self, a_tokens: Tensor, a_mask: Tensor, b_tokens: Tensor,
                b_mask: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Each side's training embeddings (``Head.training_embeddings``: the embedding, then any part of the head
        that learns from a loss of its own)."""
        return (self.model.training_embeddings(self.anchor, a_tokens, a_mask),
                self.model.training_embeddings(self.partner, b_tokens, b_mask))


def pair_encoder(model: nn.Module, anchor: str, partner: str, device: str) -> nn.Module:
    """A :class:`PairEncoder`, wrapped in DistributedDataParallel when running distributed. Call it after the
    trainable parameters are chosen (``requires_grad``): DDP synchronises exactly those."""
    pair = PairEncoder(model, anchor, partner)
    if not is_distributed():
        return pair
    on_cuda = torch.device(device).type == "cuda"
    return nn.parallel.DistributedDataParallel(pair, device_ids=[torch.device(device)] if on_cuda else None)
