"""StoreClient against a real master process, data through real transfer engines (TCP/shm)."""
from __future__ import annotations

import ctypes

import pytest

from _store_util import MIB, master_process, new_client
from store.client import MasterErrorCode, StoreError
from store.master import ReplicateConfig
from transfer.memory import memory_at

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def master():
    with master_process() as address:
        yield address


@pytest.fixture(scope="module")
def pool(master):
    """Two memory-contributing clients and one client-only reader."""
    a, b = new_client(master), new_client(master)
    reader = new_client(master, global_segment_size=0)
    yield a, b, reader
    for c in (reader, b, a):
        c.close()


def test_put_get_roundtrip_across_clients(pool):
    a, b, reader = pool
    reader.put("rt/small", b"hello")
    value = bytes(range(256)) * 4096
    a.put("rt/1m", value)
    assert reader.get("rt/small") == b"hello"
    assert reader.get("rt/1m") == value
    assert b.get("rt/1m") == value
    assert reader.get_size("rt/1m") == len(value)
    assert reader.exists("rt/small") and not reader.exists("rt/nope")


def test_value_larger_than_staging_buffer(master):
    c = new_client(master, local_buffer_size=MIB, global_segment_size=16 * MIB)
    try:
        value = b"z" * (3 * MIB + 7)
        c.put("big/1", value)
        assert c.get("big/1") == value
    finally:
        c.close()


def test_batches_report_per_key(pool):
    _, _, reader = pool
    errs = reader.put_batch(["b/1", "b/2", ""], [b"1", b"22", b"x"])
    assert errs[0] is None and errs[1] is None
    assert isinstance(errs[2], StoreError) and errs[2].code == MasterErrorCode.INVALID_KEY
    got = reader.get_batch(["b/1", "b/missing", "b/2"])
    assert got[0] == b"1" and got[2] == b"22"
    assert isinstance(got[1], StoreError) and got[1].not_found
    assert reader.batch_exists(["b/1", "b/missing"]) == [True, False]


def test_zero_copy_put_from_get_into(pool):
    _, _, reader = pool
    buf = (ctypes.c_char * (4 * MIB))()
    addr = reader.register(buf)
    try:
        memory_at(addr, MIB)[:] = bytes(range(256)) * 4096
        reader.put_from("zc/1", addr, MIB)
        assert reader.get_into("zc/1", addr + 2 * MIB, 2 * MIB) == MIB
        assert memory_at(addr + 2 * MIB, MIB) == memory_at(addr, MIB)
        errs = reader.batch_put_from(["zc/2", "zc/3"], [addr, addr + 10], [100, 200])
        assert errs == [None, None]
        sizes = reader.batch_get_into(["zc/2", "zc/3", "zc/none"],
                                      [addr + 3 * MIB, addr + 3 * MIB + 4096, addr], [100, 200, 10])
        assert sizes[:2] == [100, 200] and sizes[2].not_found
        assert bytes(memory_at(addr + 3 * MIB + 4096, 200)) == bytes(memory_at(addr + 10, 200))
        errs = reader.batch_put_from_multi_buffers(["zc/m"], [[addr, addr + 500]], [[64, 36]])
        assert errs == [None]
        assert reader.get("zc/m") == bytes(memory_at(addr, 64)) + bytes(memory_at(addr + 500, 36))
        got = reader.batch_get_into_multi_buffers(["zc/m"], [[addr + 3 * MIB, addr + 3 * MIB + 90]],
                                                  [[90, 10]])
        assert got == [100]
    finally:
        reader.unregister(addr)


def test_bad_input_gives_clear_errors(pool):
    _, _, reader = pool
    with pytest.raises(StoreError) as e:
        reader.put("", b"x")
    assert e.value.code == MasterErrorCode.INVALID_KEY
    with pytest.raises(StoreError) as e:
        reader.put("k" * 257, b"x")
    assert e.value.code == MasterErrorCode.INVALID_KEY
    with pytest.raises(StoreError) as e:
        reader.put("bad/empty", b"")
    assert e.value.code == MasterErrorCode.INVALID_PARAMS
    with pytest.raises(StoreError) as e:
        reader.put("bad/huge", b"x" * (40 * MIB))
    assert e.value.code == MasterErrorCode.INVALID_PARAMS
    with pytest.raises(StoreError) as e:
        reader.get("bad/unknown")
    assert e.value.not_found
    buf = (ctypes.c_char * 4096)()
    with pytest.raises(StoreError, match="not registered"):
        reader.put_from("bad/unreg", ctypes.addressof(buf), 4096)
    reader.put("bad/small", b"x" * 100)
    addr = reader.register(buf)
    try:
        with pytest.raises(StoreError) as e:
            reader.get_into("bad/small", addr, 10)
        assert e.value.code == MasterErrorCode.INVALID_PARAMS
    finally:
        reader.unregister(addr)


def test_duplicate_put_is_refused_and_value_kept(pool):
    _, _, reader = pool
    reader.put("dup/1", b"first")
    with pytest.raises(StoreError) as e:
        reader.put("dup/1", b"second")
    assert e.value.code == MasterErrorCode.OBJECT_ALREADY_EXISTS
    assert reader.get("dup/1") == b"first"


def test_remove_and_remove_all(pool):
    _, _, reader = pool
    reader.put("rm/1", b"v")
    reader.remove("rm/1", force=True)
    assert not reader.exists("rm/1")
    with pytest.raises(StoreError) as e:
        reader.get("rm/1")
    assert e.value.not_found
    reader.put("rm/2", b"v")
    assert reader.remove_all(force=True) >= 1
    assert not reader.exists("rm/2")


def test_tensors_roundtrip(pool):
    torch = pytest.importorskip("torch")
    _, _, reader = pool
    t = torch.arange(24, dtype=torch.float16).reshape(2, 3, 4)
    reader.put_tensor("t/1", t)
    out = reader.get_tensor("t/1")
    assert out.dtype == torch.float16 and out.shape == (2, 3, 4) and torch.equal(out, t)
    reader.put("t/notatensor", b"plain bytes")
    with pytest.raises(ValueError):
        reader.get_tensor("t/notatensor")


def test_location_cache_saves_master_hop_and_is_dropped_on_remove(pool):
    _, _, reader = pool
    reader.put("lc/1", b"cached")
    reader.get("lc/1")
    hits = reader.core.locations.hits
    assert reader.get("lc/1") == b"cached"
    assert reader.core.locations.hits == hits + 1
    reader.remove("lc/1", force=True)
    with pytest.raises(StoreError):
        reader.get("lc/1")


def test_checksum_detects_corrupt_replica_and_falls_back(master):
    a, b = new_client(master, checksum=True), new_client(master, checksum=True)
    reader = new_client(master, checksum=True, global_segment_size=0)
    try:
        value = b"integrity" * 1000
        reader.put("ck/1", value, ReplicateConfig(replica_num=2))
        assert reader.get_size("ck/1") == len(value)
        replicas = reader.engine.run(reader.core.replicas(["ck/1"]))[0]
        assert len(replicas) == 2
        view = memory_at(replicas[0].address + 5, 1)  # holders live in this process
        view[0] ^= 0xFF
        assert reader.get("ck/1") == value  # the corrupt replica is skipped
        other = memory_at(replicas[1].address + 5, 1)
        other[0] ^= 0xFF
        reader.core.locations.clear()
        with pytest.raises(StoreError, match="checksum"):
            reader.get("ck/1")
        plain = new_client(master, global_segment_size=0)
        try:
            plain.put("ck/plain", b"no trailer")
        finally:
            plain.close()
        with pytest.raises(StoreError, match="trailer"):
            reader.get("ck/plain")
    finally:
        for c in (reader, b, a):
            c.close()
