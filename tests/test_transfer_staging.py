"""Staging of CUDA/file regions: pinned pool chunks when they fit and are free, never a wait."""
from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from transfer.cuda import host_allocator
from transfer.memory import Region
from transfer.staging import Staging

if TYPE_CHECKING:
    from transfer.engine import Engine

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


@pytest.fixture
def fake_device(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Host memory registered as ``cuda:0`` with the CUDA copies done by ``memmove``: there is
    no GPU here, but every staging step around the copies is the real code. Records
    ``(direction, thread id)`` per copy. ``tests/test_store_gpu.py`` runs the same paths on a
    real GPU."""
    import ctypes
    import threading

    from transfer import cuda

    calls: list[tuple[str, int]] = []

    def d2h(dev_ptr: int, host: object, n: int, device: int) -> None:
        calls.append(("d2h", threading.get_ident()))
        ctypes.memmove(cuda._host_address(host), dev_ptr, n)

    def h2d(host: object, dev_ptr: int, n: int, device: int) -> None:
        calls.append(("h2d", threading.get_ident()))
        ctypes.memmove(dev_ptr, cuda._host_address(host), n)

    monkeypatch.setattr(cuda, "copy_device_to_host", d2h)
    monkeypatch.setattr(cuda, "copy_host_to_device", h2d)
    return calls


async def _cuda_round_trip(a: Engine, b: Engine, n: int, seed: int) -> None:
    """Write ``n`` bytes of (fake) CUDA memory of ``a`` to ``b`` from the loop and read them
    back into other CUDA memory: shared memory at ``b`` when ``a`` reaches it over shm, else
    a registered host buffer; the bytes must come back whole."""
    import numpy as np
    from _transfer_util import pattern

    from transfer.batch import TransferRequest
    from transfer.transports.base import Opcode

    src, back = pattern(n, seed), np.zeros(n, np.uint8)
    sa = await a.register(src, location="cuda:0")
    ba = await a.register(back, location="cuda:0")
    shm = a.config.transfer.enable_shm and b.config.transfer.enable_shm
    rb = (await b.allocate_shared(n)).address if shm else await b.register(np.zeros(n, np.uint8))
    await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, rb, n)])
    await a.transfer([TransferRequest(Opcode.READ, ba, b.name, rb, n)])
    assert np.array_equal(back, src)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("shm", [False, True], ids=["tcp", "shm"])
async def test_blocking_callers_stage_device_memory_on_their_own_thread(
        shm: bool, fake_device: list[tuple[str, int]]) -> None:
    """``transfer_blocking`` with CUDA local memory stays on the caller's thread instead of
    taking the general path's hops: staged through host chunks, a 9 MiB write cut at the 4 MiB
    chunk size (tcp sends the chunks; shm copies them to the peer's pages)."""
    import asyncio
    import threading

    import numpy as np
    from _transfer_util import engines, pattern

    from transfer.batch import TransferRequest
    from transfer.transports.base import Opcode

    n = (9 << 20) + 123
    async with engines(2, **{"transfer.enable_shm": shm}) as (a, b):
        src, back = pattern(n, 7), np.zeros(n, np.uint8)
        sa = await a.register(src, location="cuda:0")
        ba = await a.register(back, location="cuda:0")
        holder = np.zeros(n, np.uint8)
        rb = (await b.allocate_shared(n)).address if shm else await b.register(holder)
        await a.open_segment(b.name)  # transfer_blocking uses known peers only
        done: list[int] = []

        def caller() -> None:
            a.transfer_blocking([TransferRequest(Opcode.WRITE, sa, b.name, rb, n)],
                                timeout=20, one_stream_bytes=n)
            a.transfer_blocking([TransferRequest(Opcode.READ, ba, b.name, rb, n)],
                                timeout=20, one_stream_bytes=n)
            done.append(threading.get_ident())

        thread = threading.Thread(target=caller)
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.01)
        assert done and np.array_equal(back, src)
        assert {t for _, t in fake_device} == {done[0]}  # every copy on the caller's thread
        kinds = [k for k, _ in fake_device]
        assert kinds == ["d2h"] * 3 + ["h2d"] * 3


@pytest.mark.timeout(30)
@pytest.mark.parametrize("shm", [False, True], ids=["tcp", "shm"])
async def test_loop_paths_stage_a_batch_of_pieces_in_shared_chunks_in_one_hop(
        shm: bool, fake_device: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's paths with 64 CUDA pieces of 32 KiB (one per layer, as the connector puts a
    block; tcp: the general path, shm: the fast path): they share one pinned chunk, and all
    device copies of a batch run in one executor call (one thread), before the transfer for
    writes and after it for reads."""
    import numpy as np
    from _transfer_util import engines, pattern

    from transfer import cuda
    from transfer.batch import TransferRequest
    from transfer.transports.base import Opcode

    monkeypatch.setattr(cuda, "pinned_allocator", host_allocator)  # "pinned" host memory
    piece, count = 32 << 10, 64
    async with engines(2, **{"transfer.enable_shm": shm}) as (a, b):
        src, back = pattern(2 * count * piece, 9), np.zeros(2 * count * piece, np.uint8)
        sa = await a.register(src, location="cuda:0")
        ba = await a.register(back, location="cuda:0")
        rb = (await b.allocate_shared(src.nbytes)).address if shm \
            else await b.register(np.zeros_like(src))
        at = [2 * i * piece for i in range(count)]  # every other piece: nothing merges
        await a.transfer([TransferRequest(Opcode.WRITE, sa + o, b.name, rb + o, piece)
                          for o in at])
        await a.transfer([TransferRequest(Opcode.READ, ba + o, b.name, rb + o, piece)
                          for o in at])
        for o in at:
            assert np.array_equal(back[o:o + piece], src[o:o + piece])
        assert not back[piece:2 * piece].any()  # the gaps stay untouched
        d2h = [t for k, t in fake_device if k == "d2h"]
        h2d = [t for k, t in fake_device if k == "h2d"]
        assert len(d2h) == len(h2d) == count
        assert len(set(d2h)) == 1 and len(set(h2d)) == 1  # one executor call each way
        pool = a._staging._pool
        assert pool is not None and pool.allocated == 1 and pool.in_use == 0


@pytest.mark.timeout(30)
async def test_shm_fast_path_copies_device_runs_without_a_free_chunk_straight_to_the_peer(
        fake_device: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch) -> None:
    """From the loop, with every pinned chunk taken, CUDA runs still take the shm fast path:
    each is copied straight to or from the peer's pages (one copy per run, none pinned)."""
    from _transfer_util import engines

    from transfer.staging import Staging

    monkeypatch.setattr(Staging, "try_lease", lambda self, region, length: None)
    async with engines(2) as (a, b):
        await _cuda_round_trip(a, b, (5 << 20) + 7, 3)
        # the 5 MiB run is cut at the 4 MiB chunk size, each piece then copied directly
        assert [k for k, _ in fake_device] == ["d2h", "d2h", "h2d", "h2d"]
        assert a._staging._pool is None


@pytest.mark.timeout(30)
@pytest.mark.parametrize("blocking", [False, True], ids=["loop", "blocking"])
async def test_a_failed_device_copy_on_the_shm_fast_path_fails_cleanly(
        blocking: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA error in a device copy on the shm fast path: from the loop the batch fails with
    the error (no hang); for a blocking caller the fast path answers None, so the general path
    redoes the batch and reports. Either way the pinned chunks are given back."""
    import asyncio

    from _transfer_util import engines, pattern

    from transfer import cuda
    from transfer.batch import TransferRequest
    from transfer.errors import TransferFailedError
    from transfer.transports.base import Opcode

    def broken(*args: object) -> None:
        raise RuntimeError("cuMemcpyDtoH of 4096 bytes on cuda:0 failed: CUDA error 700")

    monkeypatch.setattr(cuda, "copy_device_to_host", broken)
    monkeypatch.setattr(cuda, "pinned_allocator", host_allocator)
    async with engines(2) as (a, b):
        src = pattern(1 << 20, 5)
        sa = await a.register(src, location="cuda:0")
        rb = (await b.allocate_shared(1 << 20)).address
        reqs = [TransferRequest(Opcode.WRITE, sa + i * 4096, b.name, rb + i * 8192, 4096)
                for i in range(16)]
        if blocking:
            peer = await a.open_segment(b.name)
            assert a._fast is not None
            assert await asyncio.to_thread(a._fast.run_blocking, reqs, peer) is None
        else:
            with pytest.raises(TransferFailedError, match="CUDA error 700"):
                await a.transfer(reqs)
        pool = a._staging._pool
        assert pool is not None and pool.allocated == 1 and pool.in_use == 0


@pytest.mark.timeout(30)
async def test_general_path_cuts_a_large_cuda_request_into_pinned_chunks(
        fake_device: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch) -> None:
    """From the loop over tcp, a CUDA request longer than a pinned chunk (9 MiB, 4 MiB chunks)
    is staged a chunk per piece (the pieces then travel as one gathered run), instead of in
    pageable memory of its full length; the bytes come back whole."""
    from _transfer_util import engines

    from transfer import cuda

    monkeypatch.setattr(cuda, "pinned_allocator", host_allocator)
    async with engines(2, **{"transfer.enable_shm": False}) as (a, b):
        await _cuda_round_trip(a, b, (9 << 20) + 5, 11)
        assert [k for k, _ in fake_device] == ["d2h"] * 3 + ["h2d"] * 3
        pool = a._staging._pool
        assert pool is not None and pool.allocated == 3 and pool.in_use == 0


@pytest.mark.timeout(30)
async def test_the_staging_pool_is_sized_by_the_engines_config(
        fake_device: list[tuple[str, int]], monkeypatch: pytest.MonkeyPatch) -> None:
    """``transfer.staging_chunk_size`` / ``staging_chunks``: a 3 MiB CUDA request with 1 MiB
    chunks and two of them is staged as three pieces, two pinned and one pageable (nothing
    waits for a chunk), and comes back whole."""
    from _transfer_util import engines

    from transfer import cuda

    monkeypatch.setattr(cuda, "pinned_allocator", host_allocator)
    async with engines(2, **{"transfer.enable_shm": False,
                             "transfer.staging_chunk_size": 1 << 20,
                             "transfer.staging_chunks": 2}) as (a, b):
        await _cuda_round_trip(a, b, 3 << 20, 13)
        assert [k for k, _ in fake_device] == ["d2h"] * 3 + ["h2d"] * 3
        pool = a._staging._pool
        assert pool is not None and pool.allocated == 2 and pool.in_use == 0
        assert a._staging.chunk_size == 1 << 20
