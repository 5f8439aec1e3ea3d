"""Adding replicas on a chosen segment (hot-spot replication) against a real master and nodes."""
from __future__ import annotations

import time

import pytest

from store.client import StoreError
from store.master import MasterErrorCode, ReplicateConfig, SyncMasterClient
from store.master.errors import MasterError
from store.master.messages import SegmentDesc
from store.master.objects import ObjectStore
from store.master.replication import Replications
from transfer.rpc import RpcError
from _store_util import NodeProcess, master_process, new_client

MIB = 1 << 20
OK = 0


@pytest.fixture
def cluster():
    with master_process() as master:
        a = NodeProcess(master)
        b = NodeProcess(master)
        try:
            yield master, a, b
        finally:
            a.stop()
            b.stop()


def test_replica_survives_loss_of_the_original(cluster):
    master, a, b = cluster
    seg_a, seg_b = a.segments[0], b.segments[0]
    value = bytes(range(256)) * 4096 + b"tail"
    with new_client(master, global_segment_size=0) as c:
        c.put("hot", value, ReplicateConfig(preferred_segment=seg_a))
        with SyncMasterClient(master) as m:
            assert [r.segment for r in m.get_replica_list("hot").replicas] == [seg_a]
            assert c.replicate(["hot"], seg_b) == [OK]
            assert sorted(r.segment for r in m.get_replica_list("hot").replicas) == sorted(
                [seg_a, seg_b])
            # a second replica on the same segment is refused
            assert c.replicate(["hot"], seg_b) == [MasterErrorCode.OBJECT_ALREADY_EXISTS]
        a.kill9()
        with new_client(master, global_segment_size=0) as reader:
            assert reader.get("hot") == value
        deadline = time.monotonic() + 10
        with SyncMasterClient(master) as m:
            while time.monotonic() < deadline:
                if [r.segment for r in m.get_replica_list("hot").replicas] == [seg_b]:
                    break
                time.sleep(0.2)
            assert [r.segment for r in m.get_replica_list("hot").replicas] == [seg_b]
        with new_client(master, global_segment_size=0) as reader:
            assert reader.get("hot") == value


def test_error_codes(cluster):
    master, a, b = cluster
    seg_a, seg_b = a.segments[0], b.segments[0]
    with new_client(master, global_segment_size=0) as c:
        c.put("k", b"x" * 1000, ReplicateConfig(preferred_segment=seg_a))
        codes = c.replicate(["missing", "k", "k2" * 200], "no-such-segment")
        assert codes[0] == MasterErrorCode.OBJECT_NOT_FOUND
        assert codes[1] == MasterErrorCode.SEGMENT_NOT_FOUND
        assert codes[2] == MasterErrorCode.INVALID_KEY
        assert c.replicate(["k"], seg_a) == [MasterErrorCode.OBJECT_ALREADY_EXISTS]
        big = b"y" * (20 * MIB)
        c.put("big1", big, ReplicateConfig(preferred_segment=seg_a))
        c.put("big2", big, ReplicateConfig(preferred_segment=seg_b))
        # seg_b (32 MiB) cannot hold a second 20 MiB object: both are leased, nothing evicted
        c.get("big2")
        assert c.replicate(["big1"], seg_b) == [MasterErrorCode.NO_AVAILABLE_HANDLE]
        with pytest.raises(StoreError):
            c.replicate(["k"], "")
        assert c.replicate([], seg_b) == []


def test_remove_during_replication_frees_the_copy(cluster):
    master, a, b = cluster
    seg_a, seg_b = a.segments[0], b.segments[0]
    with new_client(master, global_segment_size=0) as c, SyncMasterClient(master) as m:
        c.put("gone", b"z" * 4096, ReplicateConfig(preferred_segment=seg_a))
        used = m.stats().used
        reply = m.replica_start("me", "gone", seg_b)
        assert reply.target.segment == seg_b and [s.segment for s in reply.sources] == [seg_a]
        assert [r.segment for r in m.get_replica_list("gone").replicas] == [seg_a]  # hidden
        assert m.stats().used == used + 4096
        m.remove("gone", force=True)
        with pytest.raises(RpcError) as e:
            m.replica_end("me", "gone")
        assert e.value.code == MasterErrorCode.OBJECT_NOT_FOUND
        assert m.stats().used == used - 4096
        # revoke frees; end after revoke is refused
        c.put("again", b"q" * 4096, ReplicateConfig(preferred_segment=seg_a))
        m.replica_start("me", "again", seg_b)
        assert m.batch_replica_revoke("me", ["again", "nope"]) == [
            OK, MasterErrorCode.OBJECT_NOT_FOUND]
        assert m.batch_replica_end("me", ["again"]) == [MasterErrorCode.OBJECT_NOT_FOUND]
        assert [r.segment for r in m.get_replica_list("again").replicas] == [seg_a]


def _store_with_two_segments() -> tuple[ObjectStore, Replications, list[float]]:
    now = [100.0]
    store = ObjectStore(lease_ttl=5.0, clock=lambda: now[0])
    for name in ("a", "b"):
        store.mount(SegmentDesc(name=name, base=1 << 30 if name == "a" else 1 << 31,
                                size=MIB, client_id=name), [])
    return store, Replications(store), now


def test_never_ended_replication_is_reclaimed_and_lease_respected():
    store, reps, now = _store_with_two_segments()
    store.put_start("w", "obj", 1000, ReplicateConfig(preferred_segment="a"))
    with pytest.raises(MasterError) as e:
        reps.start("r", "obj", "b")
    assert e.value.code == MasterErrorCode.REPLICA_IS_NOT_READY
    store.put_end("w", "obj")
    reps.start("r", "obj", "b")
    with pytest.raises(MasterError) as e:
        reps.start("r", "obj", "b")
    assert e.value.code == MasterErrorCode.OBJECT_PUT_IN_PROGRESS
    with pytest.raises(MasterError) as e:  # the copy's source is leased
        store.remove("obj")
    assert e.value.code == MasterErrorCode.OBJECT_HAS_LEASE
    b = store.segments.get("b")
    assert b is not None and b.used >= 1000
    assert reps.reclaim_stale(30.0, now[0] + 10) == 0
    assert reps.reclaim_stale(30.0, now[0] + 31) == 1
    assert b.used == 0 and len(reps) == 0
    with pytest.raises(MasterError):
        reps.end("r", "obj")
    assert [d.segment for d in store.get_replica_list("obj")] == ["a"]


def test_unmounted_target_fails_end():
    store, reps, _ = _store_with_two_segments()
    store.put_start("w", "obj", 1000, ReplicateConfig(preferred_segment="a"))
    store.put_end("w", "obj")
    reps.start("r", "obj", "b")
    store.unmount("b")
    with pytest.raises(MasterError) as e:
        reps.end("r", "obj")
    assert e.value.code == MasterErrorCode.SEGMENT_NOT_FOUND
    assert [d.segment for d in store.get_replica_list("obj")] == ["a"]
