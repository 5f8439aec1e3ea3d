"""Key scheme, factory parsing, the versioned table and the descriptor cache."""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from transfer.metadata import (
    DescriptorCache,
    HttpMetadataClient,
    parse_metadata_server,
    parse_segment_key,
    rpc_meta_key,
    segment_key,
)
from transfer.metadata.base import validate_ttl, validate_value, validate_version
from transfer.metadata.factory import open_metadata_store, parse_endpoints
from transfer.metadata.keys import prefix_range_end, validate_key, validate_prefix
from transfer.metadata.table import Outcome, TableFullError, VersionedTable

pytestmark = pytest.mark.timeout(30)


# --- key scheme ---------------------------------------------------------------------------------

def test_keys_match_mooncake() -> None:
    assert segment_key("10.0.0.1:12345") == "mooncake/ram/10.0.0.1:12345"
    assert segment_key("nvmeof/disk0") == "mooncake/nvmeof/disk0"
    assert rpc_meta_key("10.0.0.1:12345") == "mooncake/rpc_meta/10.0.0.1:12345"


@pytest.mark.parametrize("name", ["10.0.0.1:1", "host-a:80", "nvmeof/disk0", "a/b/c"])
def test_parse_segment_key_inverts_segment_key(name: str) -> None:
    assert parse_segment_key(segment_key(name)) == name


@pytest.mark.parametrize(
    "key", ["mooncake/rpc_meta/h:1", "other/ram/h:1", "mooncake/ram/", "mooncake/ram/a/b",
            "mooncake/plain", "mooncake/x/"],
)
def test_parse_segment_key_rejects_non_segment_keys(key: str) -> None:
    assert parse_segment_key(key) is None


@pytest.mark.parametrize("name", ["", "/abs", "trailing/", "a//b"])
def test_segment_key_rejects_bad_names(name: str) -> None:
    with pytest.raises(ValueError):
        segment_key(name)


@pytest.mark.parametrize(
    ("key", "why"),
    [("", "empty"), ("a\x00b", "control"), ("a\x7f", "control"), ("\ud800", "surrogate"),
     ("é" * 513, "limit"), (b"bytes", "must be str")],
)
def test_validate_key_rejects(key: object, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        validate_key(key)


def test_validate_key_accepts_unicode_and_spaces() -> None:
    assert validate_key("mooncake/ram/ü ñ:1") == "mooncake/ram/ü ñ:1"
    assert validate_key("x" * 1024) == "x" * 1024
    assert validate_prefix("") == ""


@given(st.binary(max_size=8))
def test_prefix_range_end_selects_exactly_the_prefix(prefix: bytes) -> None:
    end = prefix_range_end(prefix)
    if end == b"\0":
        assert prefix.strip(b"\xff") == b""
        return
    assert prefix < end
    assert prefix + b"\xff" * 4 < end  # everything under the prefix is inside the range
    assert not end.startswith(prefix) or prefix == b""


def test_value_ttl_version_validation() -> None:
    assert validate_value(bytearray(b"ab")) == b"ab"
    with pytest.raises(ValueError):
        validate_value("str")
    with pytest.raises(ValueError):
        validate_value(b"xx", max_size=1)
    assert validate_ttl(None) is None and validate_ttl(2) == 2.0
    for bad in (0, -1, float("inf"), float("nan"), True, "1", 10**9):
        with pytest.raises(ValueError):
            validate_ttl(bad)
    assert validate_version(None) is None and validate_version(5) == 5
    for bad in (0, -1, True, 1.0):
        with pytest.raises(ValueError):
            validate_version(bad)


# --- factory ------------------------------------------------------------------------------------

def test_parse_p2p() -> None:
    assert parse_metadata_server("P2PHANDSHAKE").kind == "p2p"
    assert parse_metadata_server(" p2phandshake ").kind == "p2p"


def test_parse_http() -> None:
    spec = parse_metadata_server("http://10.0.0.1:8080/metadata")
    assert spec.kind == "http" and spec.url == "http://10.0.0.1:8080/metadata"
    assert parse_metadata_server("https://meta.example/api/metadata").kind == "http"


def test_parse_etcd() -> None:
    spec = parse_metadata_server("etcd://a:1,b:2")
    assert spec.kind == "etcd" and spec.endpoints == (("a", 1), ("b", 2))
    assert parse_metadata_server("10.0.0.1:2379").endpoints == (("10.0.0.1", 2379),)
    assert parse_metadata_server("etcd://[::1]:2379").endpoints == (("::1", 2379),)
    assert parse_endpoints(["h:1", " g:2 "]) == [("h", 1), ("g", 2)]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "non-empty"),
        ("garbage", "unrecognised"),
        ("redis://h:6379", "unsupported"),
        ("etcd://", "host:port"),
        ("etcd://a:1,,b:2", "host:port"),
        ("etcd://a:99999", "host:port"),
        ("etcd://a:port", "host:port"),
        ("http://h:8080", "no path"),
        ("http://h:8080/", "no path"),
        ("http://h:x/metadata", "bad metadata server URL"),
        ("http:///metadata", "bad metadata server URL"),
        ("http://h:1/metadata?key=x", "bad metadata server URL"),
    ],
)
def test_parse_garbage_is_clear_value_error(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_metadata_server(text)


async def test_factory_builds_http_client_and_refuses_misplaced_options() -> None:
    store = open_metadata_store("http://127.0.0.1:1/metadata", secret="tok", timeout=1.0)
    assert isinstance(store, HttpMetadataClient)
    await store.close()

    async def fetch(name: str) -> bytes | None:
        return None

    with pytest.raises(ValueError, match="secret"):
        open_metadata_store("etcd://h:1", secret="tok")
    with pytest.raises(ValueError, match="fetch"):
        open_metadata_store("http://h:1/metadata", fetch=fetch)
    with pytest.raises(ValueError, match="etcd credentials"):
        open_metadata_store("http://h:1/metadata", etcd_username="u", etcd_password="p")


# --- versioned table ----------------------------------------------------------------------------

class Clock:
    """Deterministic time for TTL logic (the real-time path is tested over HTTP and etcd)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_table_cas_and_conditional_delete() -> None:
    t = VersionedTable()
    assert t.compare_and_set("k", b"a", None) == 1
    assert t.compare_and_set("k", b"b", None) is None
    assert t.compare_and_set("k", b"b", 7) is None
    v = t.compare_and_set("k", b"b", 1)
    assert v == 2 and t.get("k").value == b"b"  # type: ignore[union-attr]
    assert t.delete("k", expected=1) is Outcome.CONFLICT
    assert t.delete("k", expected=2) is Outcome.OK
    assert t.delete("k") is Outcome.MISSING


def test_table_ttl_touch_and_sweep() -> None:
    clock = Clock()
    t = VersionedTable(clock=clock)
    v = t.put("k", b"v", ttl=10)
    t.put("forever", b"v")
    clock.now += 9
    assert t.touch("k", 10, v) is Outcome.OK
    assert t.touch("k", 10, v + 1) is Outcome.CONFLICT
    clock.now += 9
    assert t.get("k") is not None and t.get("k").version == v  # type: ignore[union-attr]
    assert t.sweep() == 0
    clock.now += 2
    assert [key for key, _ in t.items("")] == ["forever"]
    assert t.sweep() == 1
    assert t.get("k") is None and len(t) == 1
    assert t.touch("k", 10, v) is Outcome.MISSING


def test_table_rewrite_without_ttl_clears_expiry() -> None:
    clock = Clock()
    t = VersionedTable(clock=clock)
    t.put("k", b"v", ttl=1)
    t.put("k", b"w")
    clock.now += 5
    assert t.sweep() == 0
    assert t.get("k").value == b"w"  # type: ignore[union-attr]


def test_table_budget() -> None:
    t = VersionedTable(max_entries=2, max_total_bytes=20)
    t.put("a", b"123456789")  # 10 bytes with the key
    with pytest.raises(TableFullError):
        t.put("b", b"x" * 10)
    t.put("b", b"x" * 9)
    with pytest.raises(TableFullError):
        t.put("c", b"")
    t.delete("a")
    assert t.total_bytes == 10
    t.put("c", b"")


# --- descriptor cache ---------------------------------------------------------------------------

async def test_cache_hits_expire_and_invalidate() -> None:
    clock = Clock()
    calls: list[str] = []

    async def load(name: str) -> str | None:
        calls.append(name)
        return f"{name}#{len(calls)}"

    cache: DescriptorCache[str] = DescriptorCache(load, ttl=5, clock=clock)
    assert await cache.get("p") == "p#1"
    assert await cache.get("p") == "p#1"
    clock.now += 6
    assert await cache.get("p") == "p#2"
    assert cache.invalidate("p") is True
    assert cache.invalidate("p") is False
    assert await cache.get("p") == "p#3"
    assert await cache.get("p", refresh=True) == "p#4"
    assert calls == ["p"] * 4


async def test_cache_single_flight_and_no_negative_caching() -> None:
    release = asyncio.Event()
    calls = 0

    async def load(name: str) -> str | None:
        nonlocal calls
        calls += 1
        await release.wait()
        return None if name == "absent" else name

    cache: DescriptorCache[str] = DescriptorCache(load)
    waiters = [asyncio.create_task(cache.get("peer")) for _ in range(50)]
    await asyncio.sleep(0.01)
    release.set()
    assert await asyncio.gather(*waiters) == ["peer"] * 50
    assert calls == 1
    assert await cache.get("absent") is None
    assert await cache.get("absent") is None
    assert calls == 3, "absence must not be cached: the peer may come up any moment"


async def test_cache_invalidate_during_load_discards_result() -> None:
    gate = asyncio.Event()
    versions = iter(["old", "new"])

    async def load(name: str) -> str | None:
        value = next(versions)
        if value == "old":
            await gate.wait()
        return value

    cache: DescriptorCache[str] = DescriptorCache(load)
    slow = asyncio.create_task(cache.get("p"))
    await asyncio.sleep(0.01)
    cache.invalidate("p")  # e.g. the connection to p just failed
    assert await cache.get("p") == "new"
    gate.set()
    assert await slow == "old"
    assert cache.peek("p") == "new", "the stale load must not overwrite the fresh entry"


async def test_cache_errors_propagate_and_are_not_cached() -> None:
    fail = True

    async def load(name: str) -> str | None:
        if fail:
            raise ConnectionError("metadata server down")
        return "ok"

    cache: DescriptorCache[str] = DescriptorCache(load)
    with pytest.raises(ConnectionError):
        await cache.get("p")
    fail = False
    assert await cache.get("p") == "ok"


async def test_cache_cancelled_waiter_does_not_cancel_load() -> None:
    gate = asyncio.Event()

    async def load(name: str) -> str | None:
        await gate.wait()
        return "v"

    cache: DescriptorCache[str] = DescriptorCache(load)
    first = asyncio.create_task(cache.get("p"))
    second = asyncio.create_task(cache.get("p"))
    await asyncio.sleep(0.01)
    first.cancel()
    gate.set()
    assert await second == "v"
    assert cache.peek("p") == "v"


async def test_cache_is_bounded_lru() -> None:
    async def load(name: str) -> str | None:
        return name

    cache: DescriptorCache[str] = DescriptorCache(load, max_entries=2)
    await cache.get("a")
    await cache.get("b")
    await cache.get("a")  # a is now most recent
    await cache.get("c")
    assert len(cache) == 2 and "b" not in cache and "a" in cache and "c" in cache
