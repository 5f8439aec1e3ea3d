"""The small-batch tcp path: from the loop (inside submit) and on a blocking caller's thread."""
from __future__ import annotations

import time

import numpy as np
import pytest
from _transfer_util import Peer, config, engines, pattern, sha

from transfer.batch import RequestStatus, TransferRequest
from transfer.engine import Engine
from transfer.errors import AddressError, TransferFailedError
from transfer.smallpath import SMALL_BATCH_BYTES
from transfer.transports.base import Opcode

pytestmark = pytest.mark.timeout(30)
NO_SHM = {"transfer.enable_shm": False}


async def test_small_batch_runs_inside_submit_with_exact_bytes() -> None:
    async with engines(2, **NO_SHM) as (a, b):
        src = pattern(256 << 10, 1)
        dst = np.zeros(256 << 10, np.uint8)
        sa, db = await a.register(src), await b.register(dst)
        # Two contiguous requests (coalesced into one slice) and one elsewhere.
        reqs = [TransferRequest(Opcode.WRITE, sa, b.name, db, 4096),
                TransferRequest(Opcode.WRITE, sa + 4096, b.name, db + 4096, 4096),
                TransferRequest(Opcode.WRITE, sa + 65536, b.name, db + 100_000, 60_000)]
        batch = await a.submit(reqs)
        assert batch.done and batch.ok  # completed in submit: no task, no executor
        assert [r.transferred for r in batch.results] == [4096, 4096, 60_000]
        assert np.array_equal(dst[:8192], src[:8192])
        assert np.array_equal(dst[100_000:160_000], src[65536:125_536])
        back = np.zeros_like(src)
        ba = await a.register(back)
        await a.transfer([TransferRequest(Opcode.READ, ba, b.name, db + 100_000, 60_000)])
        assert np.array_equal(back[:60_000], src[65536:125_536])
        assert all(s.sock is None for pool in a._transports["tcp"]._pools.values() for s in pool)


async def test_large_batch_and_bad_ranges_take_the_general_path() -> None:
    async with engines(2, **NO_SHM) as (a, b):
        src = pattern(2 * SMALL_BATCH_BYTES, 2)
        dst = np.zeros_like(src)
        sa, db = await a.register(src), await b.register(dst)
        await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, src.nbytes)])
        assert np.array_equal(dst, src)
        assert a.stats()["tcp_connects"] >= 1
        with pytest.raises(AddressError):
            await a.submit([TransferRequest(Opcode.READ, sa, b.name, db + src.nbytes, 16)])


async def test_loop_stream_broken_between_batches_falls_back() -> None:
    async with engines(2, **NO_SHM) as (a, b):
        src = pattern(8192, 3)
        dst = np.zeros_like(src)
        sa, db = await a.register(src), await b.register(dst)
        await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, 4096)])
        (stream,) = a._small._loop_streams.values()
        stream.sock.close()  # the next exchange fails at once; the general path redoes it
        await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, 8192)])
        assert np.array_equal(dst, src)


def test_blocking_caller_runs_on_its_own_thread() -> None:
    with Peer("--no-shm", size=1 << 20) as peer:
        engine = Engine(config(**NO_SHM)).start_in()
        try:
            src = pattern(peer.size, 4)
            sa = engine.run(engine.register(src))
            # The first call opens the segment on the loop; later ones never touch it.
            reqs = [TransferRequest(Opcode.WRITE, sa + i * 65536, peer.name,
                                    peer.addr + i * 65536, 65536) for i in range(16)]
            for i in range(0, 16, 4):
                res = engine.transfer_blocking(reqs[i:i + 4])
                assert [r.status for r in res] == [RequestStatus.COMPLETED] * 4
            assert peer.sha() == sha(src)
            # Only the first call hopped to the loop (its loop stream); the rest used a stream
            # of the transport's pool, on this thread.
            pools = engine._transports["tcp"]._pools.values()
            assert any(s.sock is not None for pool in pools for s in pool)
            peer.fill(11)
            dst = np.zeros(4096, np.uint8)
            da = engine.run(engine.register(dst))
            engine.transfer_blocking([TransferRequest(Opcode.READ, da, peer.name,
                                                      peer.addr + 12_345, 4096)])
            full = np.zeros(peer.size, np.uint8)
            fa = engine.run(engine.register(full))
            engine.transfer_blocking([TransferRequest(Opcode.READ, fa, peer.name, peer.addr,
                                                      peer.size)])  # general path
            assert np.array_equal(dst, full[12_345:12_345 + 4096])
            with pytest.raises(AddressError):
                engine.transfer_blocking([TransferRequest(Opcode.READ, da, peer.name,
                                                          peer.addr + peer.size, 16)])
        finally:
            engine.close_in()


def test_blocking_caller_after_peer_death_fails_bounded() -> None:
    engine = Engine(config(**NO_SHM, **{"transfer.max_retries": 1})).start_in()
    try:
        with Peer("--no-shm", size=1 << 20) as peer:
            src = np.ones(4096, np.uint8)
            sa = engine.run(engine.register(src))
            req = [TransferRequest(Opcode.WRITE, sa, peer.name, peer.addr, 4096)]
            engine.transfer_blocking(req)
            peer.kill()
            start = time.monotonic()
            with pytest.raises(TransferFailedError):
                engine.transfer_blocking(req, timeout=15)
            assert time.monotonic() - start < 15
    finally:
        engine.close_in()


def test_a_bug_in_the_caller_thread_exchange_is_logged_and_the_transfer_still_lands(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A peer or link failure falls back quietly; anything else (a bug) falls back too, but
    says so, instead of showing only as lost speed."""
    from transfer.transports.tcp import TcpTransport

    real = TcpTransport._pipeline

    def broken_on_the_caller_thread(self, stream, slices, poll=0.0):  # type: ignore[no-untyped-def]
        if poll > 0:  # only the caller-thread exchange polls
            raise TypeError("a bug")
        return real(self, stream, slices, poll)

    monkeypatch.setattr(TcpTransport, "_pipeline", broken_on_the_caller_thread)
    with Peer("--no-shm", size=1 << 20) as peer:
        engine = Engine(config(**NO_SHM)).start_in()
        try:
            src = pattern(65536, 5)
            sa = engine.run(engine.register(src))
            req = [TransferRequest(Opcode.WRITE, sa, peer.name, peer.addr, 65536)]
            engine.transfer_blocking(req)  # opens the segment on the loop
            with caplog.at_level("WARNING", logger="transfer.smallpath"):
                res = engine.transfer_blocking(req)
            assert res[0].status is RequestStatus.COMPLETED
            assert "failed unexpectedly" in caplog.text and "TypeError: a bug" in caplog.text
        finally:
            engine.close_in()
