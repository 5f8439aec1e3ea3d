"""etcd backend against a real etcd server (``transfer.testing.EtcdServer``)."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator

import aetcd
import pytest

from transfer.metadata import (
    EtcdMetadataStore,
    MetadataError,
    MetadataStore,
    MetadataUnavailableError,
    open_metadata_store,
    segment_key,
)
from transfer.testing import EtcdServer, free_port, stop_process

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.timeout(60),
]


@pytest.fixture
def etcd(etcd_server: EtcdServer) -> EtcdServer:
    """The session's real etcd (tests/conftest.py); keys are isolated per test by ``ns``."""
    return etcd_server


@pytest.fixture
def ns() -> str:
    """A key prefix of this test's own: the etcd server is shared by the module."""
    return f"test/{uuid.uuid4().hex[:12]}/"


@pytest.fixture
async def store(etcd: EtcdServer) -> AsyncIterator[EtcdMetadataStore]:
    s = EtcdMetadataStore(etcd.endpoint, timeout=5.0)
    yield s
    await s.close()


async def test_is_a_metadata_store(store: EtcdMetadataStore) -> None:
    assert isinstance(store, MetadataStore)


async def test_get_put_delete(store: EtcdMetadataStore, ns: str) -> None:
    key = ns + segment_key("10.1.1.1:7000")
    assert await store.get(key) is None
    await store.put(key, b'{"protocol": "tcp"}')
    assert await store.get(key) == b'{"protocol": "tcp"}'
    assert await store.delete(key) is True
    assert await store.delete(key) is False
    assert await store.get(key) is None


async def test_versions_are_mod_revisions(store: EtcdMetadataStore, ns: str) -> None:
    await store.put(ns + "k", b"1")
    _, v1 = await store.get_with_version(ns + "k")  # type: ignore[misc]
    await store.put(ns + "k", b"2")
    value, v2 = await store.get_with_version(ns + "k")  # type: ignore[misc]
    assert value == b"2" and v2 > v1
    await store.delete(ns + "k")
    await store.put(ns + "k", b"1")
    _, v3 = await store.get_with_version(ns + "k")  # type: ignore[misc]
    assert v3 > v2


async def test_list_by_prefix(store: EtcdMetadataStore, ns: str) -> None:
    await store.put(ns + "ram/a", b"A")
    await store.put(ns + "ram/b", b"B")
    await store.put(ns + "rpc/a", b"R")
    await store.put(ns + "ram", b"not under ram/")
    assert await store.list(ns + "ram/") == {ns + "ram/a": b"A", ns + "ram/b": b"B"}
    assert await store.list(ns + "none/") == {}
    everything = await store.list("")
    assert {ns + "ram/a", ns + "rpc/a", ns + "ram"} <= set(everything)


async def test_compare_and_set(store: EtcdMetadataStore, ns: str) -> None:
    key = ns + "cas"
    assert await store.compare_and_set(key, b"first", None) is True
    assert await store.compare_and_set(key, b"again", None) is False
    value, version = await store.get_with_version(key)  # type: ignore[misc]
    assert value == b"first"
    assert await store.compare_and_set(key, b"x", version + 1000) is False
    assert await store.compare_and_set(key, b"second", version) is True
    assert await store.compare_and_set(key, b"third", version) is False
    assert await store.get(key) == b"second"
    with pytest.raises(ValueError):
        await store.compare_and_set(key, b"x", 0)


async def test_concurrent_cas_one_winner(etcd: EtcdServer, ns: str) -> None:
    stores = [EtcdMetadataStore(etcd.endpoint) for _ in range(6)]
    try:
        results = await asyncio.gather(
            *(s.compare_and_set(ns + "leader", f"s{i}".encode(), None)
              for i, s in enumerate(stores))
        )
        assert sum(results) == 1
        assert await stores[0].get(ns + "leader") == f"s{results.index(True)}".encode()
        _, version = await stores[0].get_with_version(ns + "leader")  # type: ignore[misc]
        results = await asyncio.gather(
            *(s.compare_and_set(ns + "leader", b"next", version) for s in stores)
        )
        assert sum(results) == 1
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_ttl_key_kept_alive_then_revoked_on_close(etcd: EtcdServer, ns: str) -> None:
    key = ns + "ephemeral"
    async with EtcdMetadataStore(etcd.endpoint) as owner, EtcdMetadataStore(etcd.endpoint) as peer:
        await owner.put(key, b"v", ttl=1)
        await asyncio.sleep(3.0)  # beyond etcd's granted TTL (>= 1 s, rounded up by etcd)
        assert await peer.get(key) == b"v"
        await owner.close()
        assert await peer.get(key) is None, "close() revokes the lease at once"


async def test_dead_owner_key_expires(etcd: EtcdServer, ns: str) -> None:
    """SIGKILL an engine holding a TTL key: the key goes when the lease runs out."""
    key = ns + "engine"
    script = textwrap.dedent(f"""
        import asyncio
        from transfer.metadata import EtcdMetadataStore
        async def main():
            s = EtcdMetadataStore({etcd.endpoint!r})
            await s.put({key!r}, b"alive", ttl=1)
            print("published", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            start_new_session=True)
    try:
        async with EtcdMetadataStore(etcd.endpoint) as watcher:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)  # type: ignore[union-attr]
            assert line.strip() == b"published"
            assert await watcher.get(key) == b"alive"
            proc.kill()
            proc.wait(timeout=10)
            killed_at = time.monotonic()
            while await watcher.get(key) is not None:
                assert time.monotonic() - killed_at < 10, "lease of a dead owner did not expire"
                await asyncio.sleep(0.1)
    finally:
        stop_process(proc)
        if proc.stdout:
            proc.stdout.close()


async def test_cas_with_ttl_and_failed_cas_keeps_lease(store: EtcdMetadataStore, ns: str) -> None:
    key = ns + "owned"
    assert await store.compare_and_set(key, b"mine", None, ttl=1) is True
    assert await store.compare_and_set(key, b"theirs", None, ttl=1) is False
    await asyncio.sleep(2.5)
    assert await store.get(key) == b"mine"


async def test_rewrite_without_ttl_detaches_lease(store: EtcdMetadataStore, etcd: EtcdServer,
                                                  ns: str) -> None:
    key = ns + "k"
    await store.put(key, b"temp", ttl=1)
    await store.put(key, b"permanent")
    await store.close()  # would revoke the lease if the key still hung on it
    async with EtcdMetadataStore(etcd.endpoint) as other:
        assert await other.get(key) == b"permanent"


async def test_expired_lease_is_republished_by_live_owner(store: EtcdMetadataStore,
                                                          etcd: EtcdServer, ns: str) -> None:
    """An owner whose lease ran out (partitioned for longer than the TTL) re-creates its key."""
    key = ns + "seg"
    await store.put(key, b"desc", ttl=1)
    host, port = etcd.endpoint.rsplit(":", 1)
    async with aetcd.Client(host=host, port=int(port), timeout=5) as raw:
        kv = await raw.get(key.encode())
        assert kv is not None and kv.lease != 0, "a TTL key must hang on a lease"
        await raw.revoke_lease(kv.lease)  # what expiry looks like; deletes the key
        assert await raw.get(key.encode()) is None
        deadline = time.monotonic() + 5
        while (kv := await raw.get(key.encode())) is None:
            assert time.monotonic() < deadline, "live owner did not re-publish its key"
            await asyncio.sleep(0.1)
        assert kv.value == b"desc" and kv.lease != 0


async def test_failover_to_second_endpoint(etcd: EtcdServer, ns: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    async with EtcdMetadataStore([dead, etcd.endpoint], timeout=3) as s:
        await s.put(ns + "k", b"v")
        assert await s.get(ns + "k") == b"v"
        assert await s.compare_and_set(ns + "k2", b"v", None) is True


async def test_factory_parses_etcd_urls(etcd: EtcdServer, ns: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    for spec in (f"etcd://{etcd.endpoint}", f"etcd://{dead},{etcd.endpoint}", etcd.endpoint):
        store = open_metadata_store(spec)
        try:
            assert isinstance(store, EtcdMetadataStore)
            await store.put(ns + "f", spec.encode())
            assert await store.get(ns + "f") == spec.encode()
        finally:
            await store.close()


async def test_unreachable_etcd_is_a_clear_error() -> None:
    endpoints = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    async with EtcdMetadataStore(endpoints, timeout=2) as s:
        started = time.monotonic()
        with pytest.raises(MetadataUnavailableError, match="no etcd endpoint reachable"):
            await s.get("k")
        with pytest.raises(MetadataUnavailableError):
            await s.put("k", b"v", ttl=1)
        assert time.monotonic() - started < 10


async def test_etcd_size_limit_is_reported(store: EtcdMetadataStore, ns: str) -> None:
    # etcd's default --max-request-bytes is 1.5 MiB: bigger puts fail cleanly, not by hanging.
    with pytest.raises(MetadataError) as info:
        await store.put(ns + "big", b"x" * (2 * 1024 * 1024))
    assert not isinstance(info.value, MetadataUnavailableError)
    with pytest.raises(ValueError, match="limit"):
        await store.put(ns + "huge", b"x" * (16 * 1024 * 1024 + 1))


async def test_bad_input_rejected(store: EtcdMetadataStore) -> None:
    with pytest.raises(ValueError):
        await store.get("")
    with pytest.raises(ValueError):
        await store.put("k\x00", b"v")
    with pytest.raises(ValueError):
        await store.put("k", b"v", ttl=-1)


async def test_closed_store_refuses_work(etcd: EtcdServer) -> None:
    s = EtcdMetadataStore(etcd.endpoint)
    await s.put("test/closed", b"v")
    await s.close()
    await s.close()
    with pytest.raises(MetadataError, match="closed"):
        await s.get("test/closed")
