"""Read the next minibatches from the stores while the current one trains.

Store reads (TensorStore, numpy gathers and casts) release the GIL, so one background thread overlaps them with the
model's forward and backward: an epoch from disk then costs what the same epoch from RAM does, as long as a read
is shorter than a step (docs/benchmarks.md, P1). Training loops read their token batches with :func:`token_batch`
there and move them with :func:`to_device` in the step.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import numpy as np
    import torch

    from stores import FeatureStore

T = TypeVar("T")
R = TypeVar("R")


def prefetched(items: Iterable[T], fetch: Callable[[T], R], ahead: int = 2) -> Iterator[tuple[T, R]]:
    """``(item, fetch(item))`` in order, with ``fetch`` already running for up to ``ahead`` items after the one
    being consumed. An exception from ``fetch`` is raised when its item is reached; stopping early (``break``, an
    error in the consumer) waits for the reads in flight and drops them."""
    if ahead < 1:
        for item in items:
            yield item, fetch(item)
        return
    pending: deque[tuple[T, Future[R]]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        try:
            for item in items:
                pending.append((item, pool.submit(fetch, item)))
                if len(pending) > ahead:
                    first, future = pending.popleft()
                    yield first, future.result()
            while pending:
                first, future = pending.popleft()
                yield first, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def token_batch(store: FeatureStore, indices: np.ndarray, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (in the store's dtype: fp16 / bf16 are half the bytes to pin and copy) and mask of ``indices``, pinned
    for an asynchronous copy to a GPU when ``pin``. :func:`to_device` casts them in the step: casting in the
    prefetch thread made CPU epochs slower (docs/benchmarks.md, finding 14)."""
    tokens, mask = store.get_batch(indices, dtype=store.dtype)
    return (tokens.pin_memory(), mask.pin_memory()) if pin else (tokens, mask)


def to_device(batch: tuple[torch.Tensor, torch.Tensor], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A :func:`token_batch` on ``device``, tokens as float32."""
    tokens, mask = batch
    return tokens.to(device, non_blocking=True).float(), mask.to(device)
