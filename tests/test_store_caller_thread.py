"""The blocking client's caller-thread path (store.client.direct) against a real master process."""
from __future__ import annotations

import ctypes
import threading
import time

import pytest

from _store_util import MIB, master_process, new_client
from store.client import MasterErrorCode, StoreError, direct
from store.client.errors import BUFFER_NOT_REGISTERED, RPC_FAIL
from store.master import ReplicateConfig
from transfer.memory import memory_at

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def master():
    with master_process() as address:
        yield address


@pytest.fixture(scope="module")
def pool(master):
    """One memory-contributing holder and one client-only reader/writer."""
    holder = new_client(master)
    user = new_client(master, global_segment_size=0)
    yield holder, user
    user.close()
    holder.close()


def _pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def test_small_ops_run_on_the_caller_thread_with_exact_bytes(pool):
    holder, user = pool
    assert user.direct is not None
    buf = (ctypes.c_char * (MIB))()
    addr = user.register(buf)
    try:
        before = user.direct.hits
        value = _pattern(4096, 1)
        user.put("ct/4k", value)
        assert user.get("ct/4k") == value
        memory_at(addr, 65536)[:] = _pattern(65536, 2)
        user.put_from("ct/64k", addr, 65536)
        assert user.get_into("ct/64k", addr + 65536, 2 * 65536) == 65536
        assert bytes(memory_at(addr + 65536, 65536)) == _pattern(65536, 2)
        assert user.direct.hits == before + 4
        # The loop path sees what the caller-thread path wrote, and the other way round.
        assert holder.get("ct/64k") == _pattern(65536, 2)
        holder.put("ct/from-holder", b"h" * 1000)
        assert user.get("ct/from-holder") == b"h" * 1000
    finally:
        user.unregister(addr)


def test_concurrent_threads_each_get_their_own_bytes(pool):
    _, user = pool
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for i in range(30):
                value = _pattern(1000 + i, k)
                user.put(f"ct/t{k}/{i}", value)
                assert user.get(f"ct/t{k}/{i}") == value
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors


def test_unusual_ops_fall_back_to_the_loop_path(pool):
    _, user = pool
    assert user.direct is not None
    buf = (ctypes.c_char * (4 * MIB))()
    addr = user.register(buf)
    try:
        hits = user.direct.hits
        big = _pattern(MIB + 3, 3)  # over the small-path size: the loop path stages it
        user.put("ct/big", big)
        assert user.get("ct/big") == big
        assert user.direct.hits == hits
        # Errors come out exactly as the loop path reports them.
        with pytest.raises(StoreError) as e:
            user.get("")
        assert e.value.code == MasterErrorCode.INVALID_KEY
        with pytest.raises(StoreError) as e:
            user.get_into("ct/big", addr, 100)  # buffer too small
        assert e.value.code == MasterErrorCode.INVALID_PARAMS
        unregistered = (ctypes.c_char * 4096)()
        with pytest.raises(StoreError) as e:
            user.put_from("ct/unreg", ctypes.addressof(unregistered), 4096)
        assert e.value.code == BUFFER_NOT_REGISTERED
        with pytest.raises(StoreError) as e:
            user.put("ct/empty", b"")
        assert e.value.code == MasterErrorCode.INVALID_PARAMS
    finally:
        user.unregister(addr)


def test_existence_lookups_run_on_the_caller_thread(pool):
    holder, user = pool
    assert user.direct is not None
    holder.put("ct/ex/a", b"a")
    user.put("ct/ex/b", b"b")
    hits = user.direct.hits
    keys = ["ct/ex/a", "ct/ex/missing", "ct/ex/b"]
    assert user.batch_exists(keys) == [True, False, True]
    assert user.exists("ct/ex/b") and not user.exists("ct/ex/missing")
    assert user.direct.hits == hits + 3
    # The lease asked for on the caller thread is granted: a plain remove is refused.
    assert user.batch_exists(["ct/ex/a"], grant_lease=True) == [True]
    with pytest.raises(StoreError) as e:
        holder.remove("ct/ex/a")
    assert e.value.code == MasterErrorCode.OBJECT_HAS_LEASE
    # A bad key takes the loop path, which reports it precisely.
    with pytest.raises(StoreError) as e:
        user.batch_exists(["ct/ex/a", ""])
    assert e.value.code == MasterErrorCode.INVALID_KEY
    assert user.direct.hits == hits + 4


def test_refusals_raise_from_the_caller_thread(pool):
    _, user = pool
    with pytest.raises(StoreError) as e:
        user.get("ct/never-written")
    assert e.value.not_found
    user.put("ct/dup", b"first")
    with pytest.raises(StoreError) as e:
        user.put("ct/dup", b"second")
    assert e.value.code == MasterErrorCode.OBJECT_ALREADY_EXISTS
    assert user.get("ct/dup") == b"first"
    # A replica count the pool cannot satisfy is refused, never a hang or a torn object.
    with pytest.raises(StoreError):
        user.put("ct/too-many", b"x", ReplicateConfig(replica_num=5))
    assert not user.exists("ct/too-many")


def test_checksums_on_the_caller_thread(master):
    holder = new_client(master, checksum=True)
    user = new_client(master, checksum=True, global_segment_size=0)
    try:
        assert user.direct is not None
        buf = (ctypes.c_char * 65536)()
        addr = user.register(buf)
        hits = user.direct.hits
        value = _pattern(20000, 5)
        user.put("ck/direct", value)
        memory_at(addr, 8000)[:] = _pattern(8000, 6)
        user.put_from("ck/zc", addr, 8000)
        assert user.get("ck/direct") == value
        assert user.get_into("ck/zc", addr + 10000, 10000) == 8000
        assert bytes(memory_at(addr + 10000, 8000)) == _pattern(8000, 6)
        assert user.direct.hits == hits + 4
        # Corrupt the only replica: the read fails verification and the loop path reports it.
        rep = user.engine.run(user.core.replicas(["ck/direct"]))[0][0]
        memory_at(rep.address + 17, 1)[0] ^= 0x55
        with pytest.raises(StoreError, match="checksum"):
            user.get("ck/direct")
        user.unregister(addr)
    finally:
        user.close()
        holder.close()


@pytest.mark.parametrize("few_cores", [False, True], ids=["split", "one-stream"])
def test_mid_size_puts_split_across_streams_keep_every_byte(master, monkeypatch, few_cores):
    """Puts and gets between the small-path limit and 4 MiB move as pieces side by side
    (store.client.direct._transfer) on hosts with cores to spare, else as one exchange on one
    stream; odd sizes and the checksum trailer cross piece borders."""
    monkeypatch.setattr(direct, "_FEW_CORES", few_cores)
    holder = new_client(master, checksum=True)
    user = new_client(master, checksum=True, global_segment_size=0)
    try:
        assert user.direct is not None
        size = 3 * MIB + 12345
        buf = (ctypes.c_char * (2 * size))()
        addr = user.register(buf)
        hits = user.direct.hits
        for i, n in enumerate((MIB, (512 << 10) + 1, size)):
            value = _pattern(n, 10 + i)
            memory_at(addr, n)[:] = value
            key = f"split/{few_cores}/{i}"
            user.put_from(key, addr, n)
            assert user.direct.hits == hits + 2 * i + 1  # stored on the caller-thread path
            assert holder.get(key) == value  # through the loop path, verified
            back = addr + size
            memory_at(back, n)[:] = bytes(n)
            assert user.get_into(key, back, n) == n
            assert user.direct.hits == hits + 2 * i + 2  # read back on that path, verified
            assert memory_at(back, n) == value
        # split: the pieces ran side by side; one stream: no helper thread was ever needed
        assert (user.direct._writers is not None) is not few_cores
        user.unregister(addr)
    finally:
        user.close()
        holder.close()


def test_master_restart_and_short_retry_timeout():
    with master_process() as address:
        holder = new_client(address)
        user = new_client(address, global_segment_size=0, rpc={"retry_timeout": 0.5})
        assert user.core.master.retry_timeout == 0.5
        user.put("rs/1", b"before")
        assert user.get("rs/1") == b"before"
        port = int(address.rpartition(":")[2])
    # The master is gone: a clear error within about retry_timeout, not the 15 s default.
    start = time.monotonic()
    with pytest.raises(StoreError) as e:
        user.put("rs/2", b"nobody home")
    assert e.value.code == RPC_FAIL
    assert time.monotonic() - start < 5.0
    with master_process(port=port):
        # The holder remounts on its next heartbeat; then the caller-thread path reconnects.
        deadline = time.monotonic() + 15
        while True:
            try:
                user.put("rs/3", b"after")
                break
            except StoreError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert user.get("rs/3") == b"after"
        user.close()
        holder.close()


def test_large_values_move_as_one_exchange_on_hosts_with_few_cores(monkeypatch):
    """With few cores a put or get of up to 4 MiB is one exchange on one stream, on the
    caller's thread: the engine's loop path (parallel streams) is never entered."""
    monkeypatch.setattr(direct, "_FEW_CORES", True)
    with master_process() as master:  # its own: the holder is the only segment
        _one_exchange_round_trip(master, monkeypatch)


def _one_exchange_round_trip(master: str, monkeypatch: pytest.MonkeyPatch) -> None:
    holder = new_client(master, checksum=True)
    user = new_client(master, checksum=True, global_segment_size=0)
    try:
        assert user.direct is not None
        user.put("one/warm", b"w" * 100)  # the first transfer to a segment fetches its descriptor
        loop_batches = []
        general = user.engine.transfer

        def counted(requests, **kwargs):
            loop_batches.append(len(requests))
            return general(requests, **kwargs)

        monkeypatch.setattr(user.engine, "transfer", counted)
        size = 4 * MIB - 8  # the checksum trailer makes it exactly 4 MiB
        buf = (ctypes.c_char * (2 * size + 64))()
        addr = user.register(buf)
        value = _pattern(size, 21)
        memory_at(addr, size)[:] = value
        hits = user.direct.hits
        user.put_from("one/big", addr, size)
        assert user.get_into("one/big", addr + size + 64, size) == size
        assert bytes(memory_at(addr + size + 64, size)) == value
        assert user.direct.hits == hits + 2
        assert loop_batches == []
        assert holder.get("one/big") == value  # the holder's loop path agrees, verified
        user.unregister(addr)
    finally:
        user.close()
        holder.close()
