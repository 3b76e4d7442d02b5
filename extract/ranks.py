"""Which process this is in a torchrun job, and the few collectives the extraction and the pipeline share.

Every helper answers as for one process (rank 0 of 1) when no process group of more than one process is
initialised, so single-process code calls them unconditionally. Joining the group is the command's business
(:func:`pipeline.training.distributed.session`); this module lives in ``extract/`` because extraction, the lowest room that
runs distributed, needs it and must not import ``pipeline``.
"""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["all_gather_object", "barrier", "broadcast_object", "is_distributed", "is_main", "rank", "world_size"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on the one process that writes run directories and prints (rank 0, or a single process)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """``obj`` of rank ``src`` on every rank (pickled; for small control messages only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object) -> list:
    """Every rank's ``obj``, in rank order (a one-element list in a single process)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
