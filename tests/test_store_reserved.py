"""Space reserved ahead (store.master.reservations, store.client.reserved): a put becomes write
+ one commit. The master's rules over real RPC, then real clients against a real master process."""
from __future__ import annotations

import asyncio
import ctypes
import time
from collections.abc import AsyncIterator

import pytest

from _master_util import MIB, code_of, segment, started
from _store_util import master_process, new_client
from store.client import StoreError
from store.master import MasterClient, MasterErrorCode, ReplicateConfig
from store.master.messages import (OkReply, PutCommitRequest, RemoveAllReply,
                                   RemoveAllRequest, ReserveReply, ReserveRequest, StatsReply,
                                   StatsRequest)
from store.master.reservations import MIN_RESERVATION
from store.master.server import MasterServer
from transfer.memory import memory_at
from transfer.rpc import RpcError

E = MasterErrorCode
pytestmark = pytest.mark.timeout(60)
BASE = 1 << 40


@pytest.fixture
async def master() -> AsyncIterator[MasterServer]:
    server = await started(put_start_timeout=1.0)
    yield server
    await server.stop()


@pytest.fixture
async def client(master: MasterServer) -> AsyncIterator[MasterClient]:
    async with MasterClient(master.rpc_address, retry_timeout=2.0) as c:
        yield c


async def _reserve(c: MasterClient, who: str, size: int, release: int = 0) -> ReserveReply:
    return await c.call("reserve_space", ReserveRequest(who, size, release), ReserveReply)


async def _commit(c: MasterClient, who: str, rid: int, key: str, size: int, address: int,
                  config: ReplicateConfig | None = None) -> None:
    await c.call("put_commit", PutCommitRequest(who, rid, key, size, address,
                                                config or ReplicateConfig()), OkReply)


async def _used(c: MasterClient) -> int:
    return (await c.call("stats", StatsRequest(), StatsReply)).used


async def test_objects_are_cut_front_first_and_every_byte_comes_back(client, master) -> None:
    await client.mount_segment(segment("seg", size=64 * MIB, base=BASE))
    res = await _reserve(client, "w", 4 * MIB)
    assert res.segment == "seg" and res.size == 4 * MIB and res.ttl_ms == 1000
    front = res.address
    for i, size in enumerate((1000, 64, 300_000)):
        await _commit(client, "w", res.reservation, f"k{i}", size, front)
        got = await client.get_replica_list(f"k{i}")
        assert [(r.segment, r.address, r.size) for r in got.replicas] == [("seg", front, size)]
        front += -(-size // res.alignment) * res.alignment
    assert await _used(client) == 4 * MIB  # three objects and the rest, nothing else
    # A retried commit (its reply lost) succeeds again and changes nothing.
    await _commit(client, "w", res.reservation, "k0", 1000, res.address)
    # The next reservation hands the rest of this one back.
    nxt = await _reserve(client, "w", 2 * MIB, release=res.reservation)
    assert await _used(client) == (front - res.address) + 2 * MIB
    await client.call("remove_all", RemoveAllRequest(force=True), RemoveAllReply)
    master.service.store.reservations.release("w", nxt.reservation)
    alloc = master.service.store.segments.get("seg").allocator
    assert alloc.used == 0 and alloc.free_list() == [(0, 64 * MIB)]


async def test_commits_that_are_not_the_front_of_ones_own_reservation_are_refused(client) -> None:
    await client.mount_segment(segment("seg", size=64 * MIB, base=BASE))
    res = await _reserve(client, "w", 2 * MIB)
    rid, a = res.reservation, res.address
    assert await code_of(_commit(client, "other", rid, "k", 100, a)) == E.INVALID_PARAMS
    assert await code_of(_commit(client, "w", rid + 99, "k", 100, a)) == E.INVALID_PARAMS
    assert await code_of(_commit(client, "w", rid, "k", 100, a + 64)) == E.INVALID_PARAMS
    assert await code_of(_commit(client, "w", rid, "k", 3 * MIB, a)) == E.INVALID_PARAMS
    assert await code_of(_commit(client, "w", rid, "", 100, a)) == E.INVALID_KEY
    assert await code_of(_commit(client, "w", rid, "k", 100, a,
                               ReplicateConfig(replica_num=2))) == E.INVALID_PARAMS
    await client.put_start("w", "taken", 100)
    assert await code_of(_commit(client, "w", rid, "taken", 100, a)) == E.OBJECT_PUT_IN_PROGRESS
    # None of the refusals moved the front: the first good commit still goes there.
    await _commit(client, "w", rid, "k", 100, a)
    assert (await client.get_replica_list("k")).replicas[0].address == a
    assert await code_of(_commit(client, "w", rid, "k", 100, a + 128)) == E.OBJECT_ALREADY_EXISTS


async def test_reservations_expire_go_with_their_segment_and_fit_small_segments(
        client, master) -> None:
    await client.mount_segment(segment("small", size=4 * MIB, base=BASE))
    with pytest.raises(RpcError) as info:  # an eighth of 4 MiB is under the minimum
        await _reserve(client, "w", 64 * MIB)
    assert info.value.code == E.NO_AVAILABLE_HANDLE
    await client.mount_segment(segment("big", size=32 * MIB, base=BASE * 2, client="c2"))
    res = await _reserve(client, "w", 64 * MIB)
    assert res.segment == "big" and res.size == 4 * MIB and res.size >= MIN_RESERVATION
    # Expiry (put timeout 1 s here) hands the space back; a commit after it is refused.
    await asyncio.sleep(1.5)  # expiry at 1 s; the master's sweep runs every 0.25 s here
    assert master.service.store.reservations.live == {}
    assert await code_of(_commit(client, "w", res.reservation, "late", 100, res.address)) \
        == E.INVALID_PARAMS
    # A reservation in a segment that is unmounted goes with it.
    res = await _reserve(client, "w", 2 * MIB)
    await client.unmount_segment("c2", res.segment)
    assert await code_of(_commit(client, "w", res.reservation, "k", 100, res.address)) \
        == E.INVALID_PARAMS


# -- clients -----------------------------------------------------------------------------------


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


def test_client_puts_from_reserved_space_with_one_master_call_each() -> None:
    with master_process() as master:
        holder = new_client(master, checksum=True, global_segment_size=256 * MIB)
        user = new_client(master, checksum=True, global_segment_size=0)
        try:
            assert user.direct is not None
            calls: list[str] = []
            real = user.direct._master

            def counted(method, request, reply, **kw):  # type: ignore[no-untyped-def]
                calls.append(method)
                return real(method, request, reply, **kw)

            user.direct._master = counted  # type: ignore[method-assign]
            size = MIB + 7
            buf = (ctypes.c_char * (2 * size))()
            addr = user.register(buf)
            values = [_pattern(size, i) for i in range(5)]
            for i, v in enumerate(values):
                memory_at(addr, size)[:] = v
                user.put_from(f"r/{i}", addr, size)
            assert calls == ["reserve_space"] + ["put_commit"] * 5
            held = user.direct._local.held
            for i, v in enumerate(values):  # another client reads them, checksums verified
                assert holder.get(f"r/{i}") == v
            # A refused commit (the key exists) keeps the front for the next put.
            front = held.front
            with pytest.raises(StoreError, match="ALREADY_EXISTS"):
                user.put_from("r/0", addr, size)
            assert user.direct._local.held is held and held.front == front
            # Objects needing placement of their own keep the two-phase put.
            calls.clear()
            user.put_from("r/two", addr, 1000, ReplicateConfig(replica_num=1,
                                                             preferred_segment="nowhere"))
            assert calls == ["batch_put_start", "batch_put_end"]
            user.unregister(addr)
        finally:
            user.close()
            holder.close()


def test_a_reservation_the_master_does_not_know_falls_back_to_a_two_phase_put() -> None:
    """As after a failover: the commit is refused, the value is stored the two-phase way."""
    with master_process() as master:
        holder = new_client(master, global_segment_size=64 * MIB)
        user = new_client(master, global_segment_size=0)
        try:
            user.put("first", b"x" * 100_000)
            held = user.direct._local.held
            assert held is not None
            held.id += 1000  # the master never made this one
            value = _pattern(200_000, 3)
            user.put("second", value)
            assert holder.get("second") == value
            assert user.direct._local.held is not held  # dropped
            user.put("third", b"z" * 10)  # and a fresh one is made
            assert user.direct._local.held is not None
        finally:
            user.close()
            holder.close()


def test_reservations_are_written_only_inside_their_window() -> None:
    """Half the master's put timeout after asking, a reservation is not written into again."""
    with master_process("--put-start-timeout", "1") as master:
        holder = new_client(master, global_segment_size=64 * MIB)
        user = new_client(master, global_segment_size=0)
        try:
            user.put("a", b"a" * 1000)
            first = user.direct._local.held
            assert first is not None and first.usable_until - time.monotonic() <= 0.5
            time.sleep(0.6)
            user.put("b", b"b" * 1000)
            assert user.direct._local.held is not first
            assert holder.get("a") == b"a" * 1000 and holder.get("b") == b"b" * 1000
        finally:
            user.close()
            holder.close()
