"""Staging of CUDA/file regions: pinned pool chunks when they fit and are free, never a wait."""
from __future__ import annotations

import pytest

from transfer.cuda import host_allocator
from transfer.memory import Region
from transfer.staging import Staging

pytestmark = pytest.mark.timeout(10)

CUDA = Region(1 << 40, 64 << 20, "cuda:0")  # never dereferenced: only its location matters


def test_cuda_staging_leases_pool_chunks_and_gives_them_back() -> None:
    staging = Staging(chunk_size=1 << 20, count=2, allocator=host_allocator)
    try:
        with staging.host_buffer(CUDA, 4096) as a, staging.host_buffer(CUDA, 1 << 20) as b:
            assert len(a) == 4096 and len(b) == 1 << 20
            pool = staging._pinned_pool()
            assert pool.in_use == 2
            with staging.host_buffer(CUDA, 100) as c:  # pool exhausted: pageable, no wait
                assert len(c) == 100 and pool.in_use == 2
            a[:4] = b"abcd"
            assert bytes(a[:4]) == b"abcd"
        assert pool.in_use == 0 and pool.allocated == 2
    finally:
        staging.close()


def test_oversized_and_file_requests_use_pageable_memory() -> None:
    staging = Staging(chunk_size=1 << 20, count=2, allocator=host_allocator)
    try:
        assert staging.try_lease(CUDA, (1 << 20) + 1) is None
        assert staging.try_lease(Region(1 << 62, 4096, "file:/tmp/x"), 4096) is None
        assert staging._pool is None  # nothing pinned for work that cannot use it
        with staging.host_buffer(CUDA, 2 << 20) as big:
            assert len(big) == 2 << 20
    finally:
        staging.close()
