"""The shm fast path: whole batches checked and copied as merged runs, same results as always."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from _transfer_util import config, engines, pattern

from transfer.batch import RequestStatus, TransferRequest
from transfer.engine import Engine
from transfer.shm import SharedBuffer
from transfer.errors import AddressError
from transfer.transports.base import Opcode

pytestmark = pytest.mark.timeout(30)


def array(buf: SharedBuffer) -> np.ndarray:
    return np.frombuffer(buf.view, dtype=np.uint8)


async def test_mixed_scattered_batch_is_copied_in_submit() -> None:
    async with engines(2) as (a, b):
        local = await a.allocate_shared(1 << 20)
        remote = await b.allocate_shared(1 << 20)
        array(local)[:] = pattern(1 << 20, 1)
        array(remote)[:] = pattern(1 << 20, 2)
        block = 4096
        # Writes to even blocks in reverse order, reads of odd blocks: nothing merges across
        # an opcode change or a gap, and contiguous neighbours do merge.
        reqs = [TransferRequest(Opcode.WRITE, local.address + i * block, b.name,
                                remote.address + i * block, block) for i in (6, 4, 2, 0)]
        reqs += [TransferRequest(Opcode.READ, local.address + i * block, b.name,
                                 remote.address + i * block, block) for i in (9, 10, 11)]
        expect_remote = pattern(1 << 20, 2)
        expect_local = pattern(1 << 20, 1)
        for i in (6, 4, 2, 0):
            expect_remote[i * block:(i + 1) * block] = expect_local[i * block:(i + 1) * block]
        for i in (9, 10, 11):
            expect_local[i * block:(i + 1) * block] = pattern(1 << 20, 2)[i * block:(i + 1) * block]
        batch = await a.submit(reqs)
        assert batch.done and batch.task is None  # copied inline: fast path
        results = await batch.wait(5)
        assert [(r.status, r.transferred, r.error) for r in results] == \
            [(RequestStatus.COMPLETED, block, None)] * len(reqs)
        assert np.array_equal(array(remote), expect_remote)
        assert np.array_equal(array(local), expect_local)
        assert a.stats()["tcp_connects"] == 0


async def test_large_batch_runs_on_copy_threads() -> None:
    size = 24 << 20
    async with engines(2) as (a, b):
        local = await a.allocate_shared(size)
        remote = await b.allocate_shared(size)
        array(local)[:] = pattern(size, 3)
        block = 3 << 20
        reqs = [TransferRequest(Opcode.WRITE, local.address + i * block, b.name,
                                remote.address + i * block, block) for i in range(size // block)]
        batch = await a.submit(reqs)
        assert batch.task is not None  # too big to copy on the loop
        results = await batch.wait(10)
        assert all(r.status is RequestStatus.COMPLETED and r.transferred == block
                   for r in results)
        assert np.array_equal(array(remote), pattern(size, 3))
        array(local)[:] = 0
        back = [TransferRequest(Opcode.READ, r.local_addr, r.segment, r.remote_addr, r.length)
                for r in reqs]
        await a.transfer(back, timeout=10)
        assert np.array_equal(array(local), pattern(size, 3))


async def test_runs_do_not_cross_peer_buffers() -> None:
    async with engines(2) as (a, b):
        local = await a.allocate_shared(2 << 20)
        first = await b.allocate_shared(1 << 20)
        second = await b.allocate_shared(1 << 20)
        array(local)[:] = pattern(2 << 20, 4)
        half = 1 << 19
        reqs = [TransferRequest(Opcode.WRITE, local.address + i * half, b.name,
                                (first if i < 2 else second).address + (i % 2) * half, half)
                for i in range(4)]
        await a.transfer(reqs, timeout=5)
        assert np.array_equal(array(first), pattern(2 << 20, 4)[:1 << 20])
        assert np.array_equal(array(second), pattern(2 << 20, 4)[1 << 20:])


@pytest.mark.parametrize("bad", ["remote_end", "local_unregistered", "zero_length"])
async def test_bad_requests_still_get_precise_errors(bad: str) -> None:
    async with engines(2) as (a, b):
        local = await a.allocate_shared(1 << 20)
        remote = await b.allocate_shared(1 << 20)
        block = 64 << 10
        reqs = [TransferRequest(Opcode.WRITE, local.address + i * block, b.name,
                                remote.address + i * block, block) for i in range(16)]
        if bad == "remote_end":
            reqs[7] = TransferRequest(Opcode.WRITE, local.address, b.name,
                                      remote.address + (1 << 20) - 10, block)
            match = "request 7: remote"
        elif bad == "local_unregistered":
            reqs[3] = TransferRequest(Opcode.WRITE, 4096, b.name, remote.address, block)
            match = "request 3: local"
        else:
            reqs[5] = TransferRequest(Opcode.WRITE, local.address, b.name, remote.address, 0)
            match = "request 5"
        array(remote)[:] = 7
        with pytest.raises(AddressError, match=match):
            await a.submit(reqs)
        assert (array(remote) == 7).all()  # nothing moved


def test_blocking_caller_copies_on_its_own_thread() -> None:
    """``transfer_blocking`` plans and copies fast-path batches on the caller's thread: it
    finishes while the engine's loop is blocked, small (inline) and big (split) alike."""
    size = 12 << 20  # above INLINE_COPY_BYTES: the big batch also uses the copy threads
    a, b = Engine(config()).start_in(), Engine(config()).start_in()
    release = threading.Event()
    try:
        local = a.run(a.allocate_shared(size))
        remote = b.run(b.allocate_shared(size))
        array(local)[:] = pattern(size, 5)
        block = 64 << 10
        small = [TransferRequest(Opcode.WRITE, local.address + i * block, b.name,
                                 remote.address + i * block, block) for i in range(16)]
        a.transfer_blocking(small, timeout=5)  # opens the segment (on the loop)
        big = [TransferRequest(Opcode.WRITE, local.address + i * block, b.name,
                               remote.address + i * block, block) for i in range(size // block)]
        a._background.loop.call_soon_threadsafe(release.wait, 10)  # the loop hangs here
        results = a.transfer_blocking(big, timeout=5)
        assert not release.is_set()
        assert [(r.status, r.transferred, r.error) for r in results] == \
            [(RequestStatus.COMPLETED, block, None)] * len(big)
        assert np.array_equal(array(remote), pattern(size, 5))
        release.set()
        array(local)[:] = 0
        back = [TransferRequest(Opcode.READ, r.local_addr, r.segment, r.remote_addr, r.length)
                for r in small]
        a.transfer_blocking(back, timeout=5)
        assert np.array_equal(array(local)[:16 * block], pattern(size, 5)[:16 * block])
        # A bad request still gets the general path's precise error, and nothing moves.
        array(remote)[:] = 7
        bad = small[:3] + [TransferRequest(Opcode.WRITE, local.address, b.name,
                                           remote.address + size - 10, block)]
        with pytest.raises(AddressError, match="request 3: remote"):
            a.transfer_blocking(bad, timeout=5)
        assert (array(remote) == 7).all()
        assert a.stats()["tcp_connects"] == 0
    finally:
        release.set()
        a.close_in()
        b.close_in()


@pytest.mark.parametrize("shm", [True, False])
async def test_copies_to_says_whether_a_known_peer_is_a_memory_copy_away(shm: bool) -> None:
    """``Engine.copies_to``: the store's caller-thread path splits mid-size values over tcp
    streams, but not a copy to a same-host peer. Only a peer already known counts."""
    async with engines(2, **{"transfer.enable_shm": shm}) as (a, b):
        assert not a.copies_to(b.name)  # not looked up yet
        await a.open_segment(b.name)
        assert a.copies_to(b.name) is shm
        assert not a.copies_to("no-such-peer")
