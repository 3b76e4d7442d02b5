"""``FeatureStore.evict_from_page_cache``: a local store's files leave the OS page cache (the cold start that
``cli.py bench``'s P1a_cold measures), reads stay correct; a remote store is left alone with a reason."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_stores import make_toy_pair

from stores import FeatureStore, StoreWriter


def _pages_cached(path: Path) -> int:
    """Pages of ``path`` in the page cache, from mincore(2) over a mapping of the file (which touches no page)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size, page = path.stat().st_size, mmap.PAGESIZE
    if not size:
        return 0
    with open(path, "rb") as handle:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, handle.fileno(), 0)
    assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        vector = ctypes.create_string_buffer((size + page - 1) // page)
        assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
        return sum(byte & 1 for byte in vector.raw)
    finally:
        libc.munmap(address, size)


@pytest.fixture
def evicting_filesystem(tmp_path: Path) -> Path:
    """tmp_path, on a filesystem whose clean pages the kernel drops on POSIX_FADV_DONTNEED (tmpfs keeps them)."""
    if not (hasattr(os, "posix_fadvise") and sys.platform.startswith("linux")):
        pytest.skip("needs posix_fadvise and mincore (Linux)")
    probe = tmp_path / "probe"
    probe.write_bytes(os.urandom(1 << 16))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if _pages_cached(probe):
        pytest.skip("this filesystem keeps file pages in memory whatever the advice (tmpfs)")
    return tmp_path


def _token_shards(store: Path) -> list[Path]:
    """The shard files of the token array (what get_batch reads; a ragged store's offsets are read at open)."""
    return [p for p in sorted((store / "tokens" / "c").rglob("*")) if p.is_file()]


def test_a_local_store_leaves_the_page_cache_and_reads_the_same_afterwards(evicting_filesystem):
    image, text = make_toy_pair(evicting_filesystem, n_images=40)
    for path in (image, text):
        store = FeatureStore.open(path, ram_budget_gb=0)
        every = np.arange(len(store))
        before = store.get_batch(every)
        shards = _token_shards(path)
        assert shards and all(_pages_cached(s) for s in shards), "just written and read: cached"

        eviction = store.evict_from_page_cache()

        assert eviction.skipped is None
        assert eviction.files == sum(1 for p in path.rglob("*") if p.is_file())
        assert eviction.bytes == sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        assert [_pages_cached(s) for s in shards] == [0] * len(shards)
        after = store.get_batch(every)  # from the disk now
        assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
        assert all(_pages_cached(s) for s in shards)


def test_a_remote_store_is_left_alone_with_the_reason():
    url = f"memory://evict-{uuid.uuid4().hex}/store"
    writer = StoreWriter.create(url, modality="image", layout="fixed", dim=4, tokens_per_item=3, dtype="float16",
                                identity={"test": "remote eviction"})
    writer.add_batch([{"id": f"a{i}"} for i in range(5)], torch.randn(5, 3, 4), torch.full((5,), 3))
    writer.finish()

    eviction = FeatureStore.open(url, ram_budget_gb=0).evict_from_page_cache()

    assert (eviction.files, eviction.bytes) == (0, 0)
    assert eviction.skipped and "remote" in eviction.skipped and url in eviction.skipped
