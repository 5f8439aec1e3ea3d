"""Engines finding each other through every metadata backend, plus authentication."""
from __future__ import annotations

import numpy as np
import pytest
from _transfer_util import Peer, config, engines, pattern, sha

from transfer.batch import RequestStatus, TransferRequest
from transfer.engine import Engine
from transfer.errors import AddressError, SegmentNotFoundError, TransferFailedError
from transfer.metadata import HttpMetadataServer
from transfer.testing import free_port
from transfer.transports.base import Opcode

pytestmark = pytest.mark.timeout(30)
NO_SHM = {"transfer.enable_shm": False}


async def _roundtrip(a: Engine, b: Engine) -> None:
    src = pattern(1 << 20, 31)
    dst = np.zeros_like(src)
    sa, db = await a.register(src), await b.register(dst)
    await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, src.nbytes)])
    assert np.array_equal(dst, src)


async def test_p2p_handshake_names_segment_by_rpc_port() -> None:
    async with engines(2, **NO_SHM, local_hostname="127.0.0.1:1") as (a, b):
        assert a.name == f"127.0.0.1:{a.rpc_port}" and a.rpc_port != 1
        await _roundtrip(a, b)


async def test_http_metadata_server() -> None:
    server = HttpMetadataServer("127.0.0.1", 0)
    await server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/metadata"
        port = free_port()
        async with engines(1, **NO_SHM, metadata_server=url,
                           local_hostname=f"127.0.0.1:{port}") as (a,), \
                engines(1, **NO_SHM, metadata_server=url) as (b,):
            assert a.name == f"127.0.0.1:{port}"
            await _roundtrip(b, a)
    finally:
        await server.stop()


async def test_etcd_metadata(etcd_server) -> None:
    md = f"etcd://{etcd_server.endpoint}"
    async with engines(2, **NO_SHM, metadata_server=md) as (a, b):
        await _roundtrip(a, b)
        await b.close()
        with pytest.raises(SegmentNotFoundError):  # b unpublished itself on close
            await a.open_segment(b.name, refresh=True)


def test_restarted_peer_descriptor_is_refreshed() -> None:
    """A peer restarting under the same name with new buffers is found again after a failure."""
    from transfer.rpc import get_background_loop

    loop = get_background_loop()
    server = HttpMetadataServer("127.0.0.1", 0)
    loop.run(server.start())
    url = f"http://127.0.0.1:{server.port}/metadata"
    hostname = f"127.0.0.1:{free_port()}"
    engine = Engine(config(**NO_SHM, metadata_server=url)).start_in()
    try:
        src = pattern(1 << 20, 32)
        sa = engine.run(engine.register(src))
        with Peer("--no-shm", "--metadata", url, "--hostname", hostname) as first:
            engine.run(engine.transfer([TransferRequest(Opcode.WRITE, sa, first.name, first.addr,
                                                        4096)], timeout=10))
            old_addr = first.addr
        with Peer("--no-shm", "--metadata", url, "--hostname", hostname) as second:
            assert second.name == hostname
            # The cached descriptor still names the dead engine's data port: this attempt
            # fails, and the failure drops the cached descriptor.
            with pytest.raises((TransferFailedError, AddressError)):
                engine.run(engine.transfer([TransferRequest(Opcode.WRITE, sa, hostname, old_addr,
                                                            4096)], timeout=10))
            engine.run(engine.transfer([TransferRequest(Opcode.WRITE, sa, hostname, second.addr,
                                                        second.size)], timeout=10))
            assert second.sha() == sha(src)
    finally:
        engine.close_in()
        loop.run(server.stop())


async def test_auth_secret_required_on_data_and_control_plane() -> None:
    secret = {"auth_secret": "s3cret-s3cret"}
    async with engines(2, **NO_SHM, **secret) as (a, b):
        await _roundtrip(a, b)
        async with engines(1, **NO_SHM) as (intruder,):
            # No secret: cannot even fetch the descriptor over the control plane.
            with pytest.raises(SegmentNotFoundError):
                await intruder.open_segment(b.name)
        async with engines(1, **NO_SHM, auth_secret="wrong-secret!") as (wrong,):
            with pytest.raises(SegmentNotFoundError):
                await wrong.open_segment(b.name)


async def test_unauthenticated_data_connection_cannot_touch_memory() -> None:
    """Even knowing the descriptor (e.g. from a shared metadata server), the data port refuses."""
    async with engines(1, **NO_SHM, auth_secret="s3cret-s3cret") as (b,), \
            engines(1, **NO_SHM) as (intruder,):
        dst = np.zeros(4096, np.uint8)
        db = await b.register(dst)
        from transfer.descriptor import PeerSegment

        peer = PeerSegment(b.descriptor())
        intruder._cache._entries[b.name] = (float("inf"), peer)  # as if read from metadata
        src = np.ones(4096, np.uint8)
        sa = await intruder.register(src)
        batch = await intruder.submit([TransferRequest(Opcode.WRITE, sa, b.name, db, 4096)])
        (r,) = await batch.wait(10)
        assert r.status is RequestStatus.FAILED and "authentication" in r.error
        assert not dst.any()
