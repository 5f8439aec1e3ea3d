"""Block index: bounded size, eviction order per policy, global prefix matching."""
from __future__ import annotations

import pytest

from scheduler.policy import BlockIndex, ConductorError, GlobalPool


def test_lru_evicts_least_recent_and_keeps_prefix_roots():
    idx = BlockIndex(4, "lru")
    idx.add([1, 2, 3])
    idx.add([10, 11])  # over capacity by one: the oldest tail block (3) goes, not root 1
    assert len(idx) == 4
    assert 3 not in idx and 1 in idx and 2 in idx


def test_lru_touch_protects_blocks():
    idx = BlockIndex(3, "lru")
    idx.add([1, 2])
    idx.add([5])
    idx.touch([1, 2])
    _, evicted = idx.add([7, 8])
    assert set(evicted) == {5, 2} or set(evicted) == {5, 1} or 5 in evicted
    assert len(idx) == 3


def test_lfu_evicts_least_frequent():
    idx = BlockIndex(2, "lfu")
    idx.add([1])
    idx.add([1])
    idx.add([2])
    _, evicted = idx.add([3])
    assert evicted == [2]
    assert 1 in idx and 3 in idx


def test_length_aware_evicts_deepest_first():
    idx = BlockIndex(3, "length")
    idx.add([1, 2, 3])
    _, evicted = idx.add([9])
    assert evicted == [3]


def test_capacity_zero_holds_nothing_and_bad_args_rejected():
    assert BlockIndex(0).add([1, 2]) == ([], [])
    with pytest.raises(ConductorError):
        BlockIndex(-1)
    with pytest.raises(ConductorError):
        BlockIndex(1, "fifo")  # type: ignore[arg-type]


def test_heap_policies_stay_bounded_under_churn():
    for policy in ("lfu", "length"):
        idx = BlockIndex(50, policy)  # type: ignore[arg-type]
        for i in range(2000):
            idx.add([i % 7, 1000 + i, 2000 + i])
        assert len(idx) == 50
        assert len(idx._heap) <= 8 * 50 + 64  # lazy heap entries are compacted


def test_pool_prefix_lengths_per_holder():
    pool = GlobalPool()
    for h in ("a", "b", "c"):
        pool.add_holder(h)
    pool.add("a", [1, 2, 3, 4])
    pool.add("b", [1, 2])
    pool.add("c", [2, 3, 4])  # no root: prefix 0
    assert pool.prefix_lengths([1, 2, 3, 4, 5]) == {"a": 4, "b": 2, "c": 0}
    assert pool.prefix_lengths([]) == {"a": 0, "b": 0, "c": 0}
    pool.remove("a", [3])
    assert pool.prefix_lengths([1, 2, 3, 4])["a"] == 2


def test_pool_eviction_updates_masks_and_holder_removal():
    pool = GlobalPool()
    pool.add_holder("a", capacity=2)
    pool.add_holder("b")
    pool.add("b", [1, 2, 3])
    evicted = pool.add("a", [1, 2, 3])
    assert evicted == [] or len(pool.index("a")) == 2
    assert len(pool.index("a")) == 2
    assert pool.prefix_lengths([1, 2, 3]) == {"a": 2, "b": 3}
    pool.remove_holder("b")
    assert pool.prefix_lengths([1, 2, 3]) == {"a": 2}
    pool.add_holder("c")  # reuses b's slot without inheriting its blocks
    assert pool.prefix_lengths([1, 2, 3])["c"] == 0
    with pytest.raises(ConductorError):
        pool.add("zzz", [1])
