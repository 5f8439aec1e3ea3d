"""P2P handshake backend: two "engines" that fetch each other's descriptors over real TCP.

The engine's RPC layer is not part of this package, so the tests wire up the smallest real
stand-in: a length-prefixed request/response over an asyncio TCP server, answering from
``get_local`` exactly as the engine's RPC handler will.
"""
from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from transfer.metadata import (
    MetadataError,
    MetadataStore,
    MetadataUnavailableError,
    P2PHandshakeMetadata,
    open_metadata_store,
    segment_key,
)

pytestmark = pytest.mark.timeout(30)

_LEN = struct.Struct("!I")
MAX_FRAME = 1 << 20


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes")
    return await reader.readexactly(size)


def _frame(payload: bytes) -> bytes:
    return _LEN.pack(len(payload)) + payload


@dataclass
class Engine:
    """A minimal engine: a P2P store plus a TCP endpoint serving its local descriptors."""

    store: P2PHandshakeMetadata
    server: asyncio.Server
    name: str  # "host:port", the segment name peers use

    @classmethod
    async def start(cls) -> Engine:
        holder: dict[str, P2PHandshakeMetadata] = {}

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                name = (await _read_frame(reader)).decode()
                found = holder["store"].get_local(segment_key(name))
                writer.write(b"\x00" if found is None else b"\x01" + _frame(found))
                await writer.drain()
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        store = P2PHandshakeMetadata(fetch_descriptor, fetch_timeout=2.0)
        holder["store"] = store
        return cls(store, server, f"127.0.0.1:{port}")

    async def stop(self) -> None:
        await self.store.close()
        self.server.close()
        await self.server.wait_closed()


async def fetch_descriptor(segment_name: str) -> bytes | None:
    """What the engine plugs in: ask the peer ``host:port`` for its own descriptor."""
    host, _, port = segment_name.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(_frame(segment_name.encode()))
        await writer.drain()
        if await reader.readexactly(1) == b"\x00":
            return None
        return await _read_frame(reader)
    finally:
        writer.close()


@pytest.fixture
async def engines() -> AsyncIterator[tuple[Engine, Engine]]:
    a, b = await Engine.start(), await Engine.start()
    yield a, b
    await a.stop()
    await b.stop()


async def test_is_a_metadata_store(engines: tuple[Engine, Engine]) -> None:
    assert isinstance(engines[0].store, MetadataStore)


async def test_peer_descriptor_fetched_from_peer(engines: tuple[Engine, Engine]) -> None:
    a, b = engines
    await b.store.put(segment_key(b.name), b'{"name": "b"}')
    assert await a.store.get(segment_key(b.name)) == b'{"name": "b"}'
    value, version = await a.store.get_with_version(segment_key(b.name))  # type: ignore[misc]
    assert value == b'{"name": "b"}' and version == 0  # remote: unversioned


async def test_peer_restart_is_seen_on_next_fetch(engines: tuple[Engine, Engine]) -> None:
    a, b = engines
    await b.store.put(segment_key(b.name), b"v1")
    assert await a.store.get(segment_key(b.name)) == b"v1"
    await b.store.put(segment_key(b.name), b"v2")
    assert await a.store.get(segment_key(b.name)) == b"v2"


async def test_missing_descriptor_is_none(engines: tuple[Engine, Engine]) -> None:
    a, b = engines
    assert await a.store.get(segment_key(b.name)) is None


async def test_own_descriptor_served_locally(engines: tuple[Engine, Engine]) -> None:
    a, _ = engines
    await a.store.put(segment_key(a.name), b"mine")
    assert await a.store.get(segment_key(a.name)) == b"mine"
    assert a.store.get_local(segment_key(a.name)) == b"mine"


async def test_writes_are_local_only(engines: tuple[Engine, Engine]) -> None:
    a, b = engines
    await a.store.put("mooncake/rpc_meta/x", b"r")
    assert await a.store.list("mooncake/") == {"mooncake/rpc_meta/x": b"r"}
    assert await b.store.list("") == {}
    assert await b.store.get("mooncake/rpc_meta/x") is None  # not a segment key: no fetch
    assert await a.store.delete("mooncake/rpc_meta/x") is True
    assert await a.store.delete("mooncake/rpc_meta/x") is False


async def test_local_compare_and_set(engines: tuple[Engine, Engine]) -> None:
    store = engines[0].store
    assert await store.compare_and_set("lock", b"1", None) is True
    assert await store.compare_and_set("lock", b"2", None) is False
    _, version = await store.get_with_version("lock")  # type: ignore[misc]
    assert await store.compare_and_set("lock", b"2", version) is True
    assert await store.get("lock") == b"2"


async def test_dead_peer_is_unavailable_not_missing(engines: tuple[Engine, Engine]) -> None:
    a, b = engines
    await b.store.put(segment_key(b.name), b"v")
    await b.stop()
    with pytest.raises(MetadataUnavailableError, match=b.name):
        await a.store.get(segment_key(b.name))


async def test_hung_peer_times_out() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    name = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    store = P2PHandshakeMetadata(fetch_descriptor, fetch_timeout=0.3)
    try:
        with pytest.raises(MetadataUnavailableError):
            await store.get(segment_key(name))
    finally:
        server.close()
        await store.close()


async def test_bad_fetch_results_are_errors() -> None:
    async def returns_text(name: str) -> bytes | None:
        return "not bytes"  # type: ignore[return-value]

    async def returns_too_much(name: str) -> bytes | None:
        return b"x" * 2048

    for fetch in (returns_text, returns_too_much):
        store = P2PHandshakeMetadata(fetch, max_value_size=1024)
        with pytest.raises(MetadataError, match="unusable descriptor"):
            await store.get(segment_key("h:1"))
        await store.close()


async def test_close_stops_serving_local_entries(engines: tuple[Engine, Engine]) -> None:
    a, b = engines
    await b.store.put(segment_key(b.name), b"v")
    await b.store.close()
    assert await a.store.get(segment_key(b.name)) is None
    with pytest.raises(MetadataError, match="closed"):
        await b.store.put("k", b"v")


async def test_factory_builds_p2p() -> None:
    store = open_metadata_store("P2PHANDSHAKE", fetch=fetch_descriptor)
    assert isinstance(store, P2PHandshakeMetadata)
    await store.close()
    with pytest.raises(ValueError, match="fetch"):
        open_metadata_store("P2PHANDSHAKE")
    with pytest.raises(ValueError, match="secret"):
        open_metadata_store("P2PHANDSHAKE", fetch=fetch_descriptor, secret="x")


def test_get_local_validates_key() -> None:
    store = P2PHandshakeMetadata(fetch_descriptor)
    with pytest.raises(ValueError):
        store.get_local("")
    with pytest.raises(ValueError):
        store.get_local("bad\x01key")
