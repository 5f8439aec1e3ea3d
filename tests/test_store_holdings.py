"""Units of the client: segment holdings (remount lists), checksum trailers, replica order."""
from __future__ import annotations

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from store.client.holdings import NOTIFY_PREFIX, Holdings
from store.client.integrity import check_trailer, make_trailer
from store.client.locations import LocationCache, order_replicas
from store.master import RemountObject, ReplicaDesc


def test_newer_object_replaces_overlapping_older_ones():
    h = Holdings(1000, 1000)
    assert h.add(RemountObject("a", 1000, 100)) and h.add(RemountObject("b", 1100, 100))
    assert h.add(RemountObject("c", 1050, 100))  # reused the space of a and b
    assert [o.key for o in h.objects()] == ["c"]
    assert not h.add(RemountObject("out", 1950, 100))  # beyond the segment
    assert not h.add(RemountObject("neg", 1000, 0))


def test_announcements_are_validated_never_trusted():
    h = Holdings(0, 1 << 20)
    good = NOTIFY_PREFIX + msgspec.msgpack.encode([["k1", 0, 10], ["", 100, 10],
                                                   ["x" * 300, 200, 10], ["k2", 1 << 21, 5]])
    assert h.handle(good) == 1
    assert h.handle(NOTIFY_PREFIX + b"\xc1garbage") == 0
    assert h.handle(NOTIFY_PREFIX + msgspec.msgpack.encode({"not": "a list"})) == 0
    assert [o.key for o in h.objects()] == ["k1"]


@given(st.lists(st.tuples(st.integers(0, 990), st.integers(1, 64)), max_size=50))
def test_holdings_never_overlap(spans):
    h = Holdings(0, 1000)
    for i, (start, size) in enumerate(spans):
        h.add(RemountObject(f"k{i}", start, size))
    objs = sorted(h.objects(), key=lambda o: o.address)
    for a, b in zip(objs, objs[1:]):
        assert a.address + a.size <= b.address


def test_trailer_detects_any_flipped_byte():
    data = bytearray(b"0123456789" * 10)
    trailer = make_trailer(data)
    assert check_trailer(data, trailer) is None
    data[37] ^= 1
    assert "mismatch" in check_trailer(data, trailer)
    assert "no checksum trailer" in check_trailer(data, b"\0" * 8)


def test_nearest_replica_first_and_cache_expiry():
    reps = [ReplicaDesc("10.0.0.2:1", 0, 10, "memory"), ReplicaDesc("127.0.0.1:7", 0, 10, "file"),
            ReplicaDesc("127.0.0.1:8", 0, 10, "memory"), ReplicaDesc("me:9", 0, 10, "memory")]
    ordered = order_replicas(reps, frozenset({"me:9"}), "127.0.0.1")
    assert [r.segment for r in ordered] == ["me:9", "127.0.0.1:8", "127.0.0.1:7", "10.0.0.2:1"]
    cache = LocationCache(max_entries=2)
    cache.put("a", reps, 10_000)
    cache.put("b", reps, 0)  # no lease, not cached
    assert cache.get("a") == reps and cache.get("b") is None
    cache.put("c", reps, 10_000)
    cache.put("d", reps, 10_000)
    assert cache.get("a") is None and len(cache) == 2


def test_announcements_leave_foreign_notifications_for_other_consumers():
    import time

    from _store_util import master_process, new_client
    from store.master import ReplicateConfig

    with master_process() as master:
        holder = new_client(master)
        writer = new_client(master, global_segment_size=0)
        try:
            writer.engine.run(writer.engine.notify(holder.segment_name, b"kv-done:1"))
            writer.put("ann/k", b"x" * 1000, ReplicateConfig(preferred_segment=holder.segment_name))
            writer.engine.run(writer.engine.notify(holder.segment_name, b"kv-done:2"))
            held = holder.core.holdings[holder.segment_name]
            deadline = time.monotonic() + 5
            while "ann/k" not in [o.key for o in held.objects()]:
                assert time.monotonic() < deadline, "announcement not applied"
                time.sleep(0.05)
            # The holder's drain took its announcement and left the rest, in order.
            assert [n.message for n in holder.engine.notifications()] == [b"kv-done:1",
                                                                          b"kv-done:2"]
            # A client-only process never takes notifications at all.
            holder.engine.run(holder.engine.notify(writer.segment_name, b"kv-done:3"))
            time.sleep(0.5)
            assert [n.message for n in writer.engine.notifications()] == [b"kv-done:3"]
        finally:
            writer.close()
            holder.close()
