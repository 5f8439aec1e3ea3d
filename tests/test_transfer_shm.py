"""Shared-memory transport: same-host peers copy between mappings, chosen by the probe."""
from __future__ import annotations

import os

import numpy as np
import pytest
from _transfer_util import Peer, config, engines, pattern, sha

from transfer.batch import RequestStatus, TransferRequest
from transfer.engine import Engine
from transfer.errors import DescriptorError
from transfer.shm import SHM_DIR, HostProbe, SharedBuffer, check_shm_name
from transfer.transports.base import Opcode

pytestmark = pytest.mark.timeout(30)


def test_cross_process_shm_both_directions_without_tcp() -> None:
    with Peer("--shared", size=8 << 20) as peer:
        engine = Engine(config()).start_in()
        try:
            src = pattern(peer.size, 21)
            sa = engine.run(engine.register(src))
            engine.run(engine.transfer([TransferRequest(Opcode.WRITE, sa, peer.name, peer.addr,
                                                        peer.size)], timeout=20))
            assert peer.sha() == sha(src)
            peer.fill(22)
            dst = engine.run(engine.allocate_shared(peer.size))  # local side may be shm too
            engine.run(engine.transfer([TransferRequest(Opcode.READ, dst.address, peer.name,
                                                        peer.addr, peer.size)], timeout=20))
            assert np.array_equal(np.frombuffer(dst.view, np.uint8), pattern(peer.size, 22))
            assert engine.stats()["tcp_connects"] == 0  # nothing went over a socket
        finally:
            engine.close_in()


def test_shm_disabled_falls_back_to_tcp() -> None:
    with Peer("--shared", size=1 << 20) as peer:
        engine = Engine(config(**{"transfer.enable_shm": False})).start_in()
        try:
            src = pattern(peer.size, 23)
            sa = engine.run(engine.register(src))
            engine.run(engine.transfer([TransferRequest(Opcode.WRITE, sa, peer.name, peer.addr,
                                                        peer.size)], timeout=20))
            assert peer.sha() == sha(src)
            assert engine.stats()["tcp_connects"] > 0
        finally:
            engine.close_in()


async def test_non_shared_remote_buffer_uses_tcp() -> None:
    async with engines(2) as (a, b):
        src = pattern(1 << 20, 24)
        dst = np.zeros_like(src)
        sa, db = await a.register(src), await b.register(dst)
        await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, src.nbytes)])
        assert np.array_equal(dst, src) and a.stats()["tcp_connects"] > 0


async def test_sub_range_of_shared_buffer_is_published_with_offset() -> None:
    async with engines(2) as (a, b):
        shared = await b.allocate_shared(1 << 20, register=False)
        db = await b.register(shared.address + 4096, 8192)
        peer = await a.open_segment(b.name)
        (buf,) = peer.desc.buffers
        assert buf.shm_name == shared.name and buf.shm_offset == 4096
        src = pattern(8192, 25)
        sa = await a.register(src)
        await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, 8192)])
        assert bytes(shared.view[4096:4096 + 8192]) == src.tobytes()
        assert a.stats()["tcp_connects"] == 0


def test_probe_requires_matching_token() -> None:
    probe = HostProbe()
    try:
        assert HostProbe.matches(probe.entry())
        assert not HostProbe.matches({**probe.entry(), "token": "0" * 32})
        assert not HostProbe.matches({"probe": "mooncake-probe-nothere", "token": "0" * 32})
        assert not HostProbe.matches({"probe": "../etc/passwd", "token": "x"})
        assert not HostProbe.matches({})
    finally:
        probe.close()
    assert not os.path.exists(os.path.join(SHM_DIR, probe.name))


def test_shared_buffer_lifecycle_and_name_validation() -> None:
    buf = SharedBuffer.create(4096)
    path = os.path.join(SHM_DIR, buf.name)
    assert os.path.getsize(path) == 4096
    buf.view[:5] = b"hello"
    with open(path, "rb") as f:
        assert f.read(5) == b"hello"
    buf.free()
    buf.free()
    assert not os.path.exists(path)
    for bad in ("../x", "mooncake-../../etc", "other-name", "", None, "mooncake-a/b"):
        with pytest.raises(DescriptorError):
            check_shm_name(bad)
    with pytest.raises(ValueError):
        SharedBuffer.create(0)


async def test_failed_batch_reports_status_for_shm_peer_gone() -> None:
    async with engines(2) as (a, b):
        shared = await b.allocate_shared(1 << 20)
        src = pattern(1 << 20, 26)
        sa = await a.register(src)
        await a.open_segment(b.name)
        os.unlink(os.path.join(SHM_DIR, shared.name))  # the file vanished under us
        batch = await a.submit([TransferRequest(Opcode.WRITE, sa, b.name, shared.address, 1 << 20)])
        (r,) = await batch.wait(10)
        assert r.status is RequestStatus.FAILED and "map" in r.error


def test_files_of_killed_engines_are_reaped() -> None:
    import signal

    from transfer.shm import reap_stale

    def ours() -> set[str]:
        return {n for n in os.listdir(SHM_DIR) if n.startswith("mooncake-")}

    before = ours()
    with Peer("--shared", size=1 << 20) as peer:
        peer_files = ours() - before
        assert any(n.startswith("mooncake-probe-") for n in peer_files)
        assert any(n.startswith("mooncake-buf-") for n in peer_files)
        reap_stale(min_age=0)
        assert peer_files <= ours()  # a live engine's files stay
        peer.proc.send_signal(signal.SIGKILL)
        peer.proc.wait(10)
        assert peer_files <= ours()  # kill -9: nothing cleaned up by the peer itself
        assert reap_stale(min_age=0) >= len(peer_files)
        assert not peer_files & ours()
