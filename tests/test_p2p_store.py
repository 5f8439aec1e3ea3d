"""P2P store in one process: real engines, a real HTTP metadata server, real transfers."""
from __future__ import annotations

import asyncio
import os

import msgspec
import pytest

from store.p2p import NoSourceError, ObjectExistsError, ObjectNotFoundError, P2PStore
from store.p2p.chunks import locate, split_ranges
from store.p2p.records import (Extent, Holder, ObjectRecord, RecordError, decode_object,
                               encode_object, object_key)
from transfer.metadata import HttpMetadataServer

pytestmark = pytest.mark.timeout(60)
MiB = 1 << 20


@pytest.fixture
async def server():
    srv = HttpMetadataServer(port=0)
    await srv.start()
    yield srv
    await srv.stop()


async def _stores(url: str, n: int, **kw) -> list[P2PStore]:
    return [await P2PStore.open(url, **kw) for _ in range(n)]


def _record(**changes) -> ObjectRecord:
    base = dict(name="a/b", size=10000, chunk_size=4096, checksums=["0" * 64] * 3,
                holders=[Holder("127.0.0.1:1", [Extent(4096, 6000), Extent(65536, 4000)])])
    return ObjectRecord(**{**base, **changes})


def test_record_roundtrip_and_validation() -> None:
    r = _record()
    assert decode_object(encode_object(r), expected_name="a/b") == r
    bad = [
        _record(size=0),
        _record(checksums=["0" * 64] * 2),
        _record(checksums=["x" * 64] * 3),
        _record(chunk_size=100),
        _record(holders=[Holder("127.0.0.1:1", [Extent(4096, 9999)])]),
        _record(holders=[Holder("bad segment!", [Extent(4096, 10000)])]),
        _record(holders=[Holder("h:1", [Extent(1, 10000)]), Holder("h:1", [Extent(1, 10000)])]),
        _record(name="../x"),
    ]
    for rec in bad:
        with pytest.raises(RecordError):
            decode_object(msgspec.json.encode(rec))
    for data in (b"\x80\x04pickle", b"{}", b'{"name": 1}', b"[" * 100000):
        with pytest.raises(RecordError):
            decode_object(data)
    with pytest.raises(RecordError, match="expected"):
        decode_object(encode_object(r), expected_name="other")
    with pytest.raises(ValueError):
        object_key("a//b")


def test_ranges_split_at_both_sides_boundaries() -> None:
    src = [Extent(1000, 10), Extent(5000, 30)]
    dst = [Extent(9000, 25), Extent(20000, 15)]
    assert locate(src, 5, 10) == [(1005, 5), (5000, 5)]
    runs = split_ranges(src, dst, 5, 30)
    assert runs == [(1005, 9005, 5), (5000, 9010, 15), (5015, 20000, 10)]
    assert sum(n for *_, n in runs) == 30
    with pytest.raises(ValueError):
        locate(src, 35, 10)


async def test_register_get_list_and_release(server: HttpMetadataServer) -> None:
    a, b, c = await _stores(server.url, 3)
    try:
        parts = [bytearray(os.urandom(3 * MiB + 17)), bytearray(os.urandom(5 * MiB))]
        info = await a.register("ckpt/x", parts, chunk_size=MiB)
        assert (info.size, info.num_chunks, info.holders) == (8 * MiB + 17, 9, (a.segment,))
        got = await b.get("ckpt/x")
        assert bytes(b.view("ckpt/x").pieces(0, info.size).__next__()) == bytes(parts[0] + parts[1])
        assert got.sources[a.segment].bytes == info.size
        # c reads into two buffers split differently from the origin's, from both holders
        into = [bytearray(MiB), bytearray(7 * MiB + 17)]
        got = await c.get("ckpt/x", into=into)
        assert bytes(into[0] + into[1]) == bytes(parts[0] + parts[1])
        assert got.sources[b.segment].bytes > 0 and got.sources[a.segment].bytes > 0
        [listed] = await a.list("ckpt/")
        assert set(listed.holders) == {a.segment, b.segment, c.segment}
        assert await a.list("other/") == []
        with pytest.raises(ObjectNotFoundError, match="delete_replica"):
            await b.unregister("ckpt/x")
        with pytest.raises(ObjectNotFoundError, match="unregister"):
            await a.delete_replica("ckpt/x")
        await b.delete_replica("ckpt/x")
        await a.unregister("ckpt/x")
        [listed] = await a.list()
        assert listed.holders == (c.segment,)
        with pytest.raises(ObjectNotFoundError):
            await a.get("nope")
    finally:
        for s in (a, b, c):
            await s.close()


async def test_register_conflicts_and_bad_input(server: HttpMetadataServer) -> None:
    a, b = await _stores(server.url, 2)
    try:
        data = bytearray(os.urandom(MiB))
        await a.register("obj", data)
        with pytest.raises(ObjectExistsError, match="different content"):
            await b.register("obj", bytearray(os.urandom(MiB)))
        same = bytearray(data)
        info = await b.register("obj", same)  # identical content: one more holder
        assert set(info.holders) == {b.segment} and len((await a.list())[0].holders) == 2
        with pytest.raises(ValueError, match="destination holds"):
            await _get_wrong_size(a, b)
        with pytest.raises(ValueError, match="bad object name"):
            await a.register("../etc", data)
        with pytest.raises(TypeError, match="not a buffer"):
            await a.register("x", 12.5)
    finally:
        await a.close()
        await b.close()


async def _get_wrong_size(a: P2PStore, b: P2PStore) -> None:
    await b.register("small", bytearray(os.urandom(8192)), chunk_size=4096)
    await a.get("small", into=bytearray(100))


async def test_concurrent_getters_all_become_holders(server: HttpMetadataServer) -> None:
    """Compare-and-set: eight getters finishing together must all end up in the record."""
    origin, *getters = await _stores(server.url, 9)
    try:
        data = bytearray(os.urandom(2 * MiB))
        await origin.register("shared", data, chunk_size=256 << 10)
        results = await asyncio.gather(*(g.get("shared") for g in getters))
        assert all(r.size == len(data) for r in results)
        for g in getters:
            assert g.view("shared").digest(0, len(data)) == origin.view("shared").digest(
                0, len(data))
        [info] = await origin.list()
        assert set(info.holders) == {s.segment for s in (origin, *getters)}
    finally:
        for s in (origin, *getters):
            await s.close()


async def test_corrupt_replica_chunks_are_refetched(server: HttpMetadataServer) -> None:
    a, b, c = await _stores(server.url, 3)
    try:
        data = bytearray(os.urandom(4 * MiB))
        await a.register("obj", data, chunk_size=256 << 10)
        await b.get("obj")
        # Flip bytes in b's replica behind the store's back: b now serves bad chunks.
        held = b._held["obj"]
        assert held.shared is not None
        view = held.shared.view
        for off in range(0, len(data), 256 << 10):
            view[off + 5] ^= 0xFF
        got = await c.get("obj")
        assert c.view("obj").digest(0, len(data)) == a.view("obj").digest(0, len(data))
        stats = got.sources[b.segment]
        assert stats.corrupt >= 1 and stats.bytes == 0
        assert stats.dropped is not None and "checksum" in stats.dropped
        assert got.refetches >= 1 and got.sources[a.segment].bytes == len(data)
    finally:
        for s in (a, b, c):
            await s.close()


async def test_no_source_left_is_a_clear_error(server: HttpMetadataServer) -> None:
    a, b = await _stores(server.url, 2)
    try:
        data = bytearray(os.urandom(MiB))
        await a.register("obj", data, chunk_size=256 << 10)
        # The origin's engine vanishes while its record and lease stay (a hung or dead node).
        await a.engine.close()
        with pytest.raises(NoSourceError, match=f"no source left.*{a.segment}"):
            await b.get("obj")
        assert b.held() == []  # nothing half-registered
    finally:
        await a.close()
        await b.close()


async def test_p2p_handshake_metadata_is_refused() -> None:
    with pytest.raises(ValueError, match="P2PHANDSHAKE"):
        await P2PStore.open("P2PHANDSHAKE")
