"""The prefetch iterator of the fit loop: order kept, reads overlap, errors surface at their item, early exit is clean;
token batches travel in the store dtype and reach the step as float32."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.training.prefetch import prefetched, to_device, token_batch


def test_items_come_back_in_order_with_their_results():
    assert list(prefetched(range(7), lambda x: x * x, ahead=3)) == [(i, i * i) for i in range(7)]
    assert list(prefetched(range(3), lambda x: -x, ahead=0)) == [(0, 0), (1, -1), (2, -2)]
    assert list(prefetched([], lambda x: x)) == []


def test_reads_run_ahead_in_another_thread_while_the_consumer_works():
    started: list[tuple[int, float]] = []
    threads: set[str] = set()

    def fetch(x: int) -> int:
        started.append((x, time.perf_counter()))
        threads.add(threading.current_thread().name)
        return x

    it = prefetched(range(5), fetch, ahead=2)
    first = next(it)
    time.sleep(0.2)  # the consumer is busy with item 0: items 1 and 2 must be fetched meanwhile
    assert first == (0, 0) and {x for x, _ in started} >= {0, 1, 2}
    assert threading.current_thread().name not in threads
    assert [x for x, _ in it] == [1, 2, 3, 4]


def test_a_failed_read_is_raised_at_its_item_and_not_before():
    def fetch(x: int) -> int:
        if x == 2:
            raise OSError("shard 2 unreadable")
        return x

    seen = []
    with pytest.raises(OSError, match="shard 2"):
        for x, _ in prefetched(range(5), fetch, ahead=2):
            seen.append(x)
    assert seen == [0, 1]


def test_stopping_early_leaves_no_thread_behind():
    before = threading.active_count()
    for x, _ in prefetched(range(100), lambda x: time.sleep(0.01) or x, ahead=2):
        if x == 3:
            break
    time.sleep(0.1)
    assert threading.active_count() == before


def test_token_batches_travel_in_the_store_dtype_and_reach_the_step_as_float32(tmp_path):
    import numpy as np
    import torch
    from toy_stores import make_toy_pair

    from stores import FeatureStore

    image_path, text_path = make_toy_pair(tmp_path, n_images=12)
    for path in (image_path, text_path):
        store = FeatureStore.open(path)
        rows = np.array([5, 0, 7, 7])
        tokens, mask = token_batch(store, rows)
        assert tokens.dtype == store.dtype != torch.float32  # the toy stores are fp16: half the bytes to copy
        on_device, device_mask = to_device((tokens, mask), "cpu")
        expected, expected_mask = store.get_batch(rows)
        assert on_device.dtype == torch.float32 and torch.equal(on_device, expected)
        assert torch.equal(device_mask, expected_mask)
