"""Property tests of the per-segment offset allocator (hypothesis drives random op sequences)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from store.master.allocator import OffsetAllocator, OutOfSpace

CAPACITY = 1 << 16

ops = st.lists(
    st.one_of(st.tuples(st.just("alloc"), st.integers(1, CAPACITY // 4)),
              st.tuples(st.just("free"), st.integers(0, 1000))),
    max_size=200)


def _check_invariants(alloc: OffsetAllocator) -> None:
    spans = sorted([(o, s, "used") for o, s in alloc.allocations().items()]
                   + [(o, s, "free") for o, s in alloc.free_list()])
    cursor = 0
    for offset, size, kind in spans:
        assert offset == cursor, f"gap or overlap at {offset} (expected {cursor})"
        assert size > 0
        cursor = offset + size
    assert cursor == alloc.capacity
    free = alloc.free_list()
    for (o1, s1), (o2, _) in zip(free, free[1:]):
        assert o1 + s1 != o2, "two adjacent free blocks were not coalesced"
    assert alloc.used == sum(alloc.allocations().values())


@settings(max_examples=200, deadline=None)
@given(ops=ops, alignment=st.sampled_from([1, 8, 64, 4096]))
def test_random_ops_keep_layout_exact(ops: list[tuple[str, int]], alignment: int) -> None:
    alloc = OffsetAllocator(CAPACITY, alignment)
    live: list[int] = []
    for op, arg in ops:
        if op == "alloc":
            try:
                offset = alloc.allocate(arg)
            except OutOfSpace:
                # Only when no free block can hold the rounded size.
                assert all(s < alloc.allocation_size(arg) for _, s in alloc.free_list())
                continue
            assert offset % alignment == 0
            assert alloc.allocations()[offset] >= arg
            live.append(offset)
        elif live:
            alloc.free_range(live.pop(arg % len(live)))
        _check_invariants(alloc)
    for offset in live:
        alloc.free_range(offset)
    assert alloc.used == 0
    assert alloc.free_list() == [(0, CAPACITY)]


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=100))
def test_with_used_rebuilds_the_same_layout(sizes: list[int]) -> None:
    alloc = OffsetAllocator(1 << 20)
    placed = {}
    for size in sizes:
        try:
            placed[alloc.allocate(size)] = size
        except OutOfSpace:
            break
    rebuilt = OffsetAllocator.with_used(1 << 20, placed.items())
    assert rebuilt.allocations() == alloc.allocations()
    assert rebuilt.free_list() == alloc.free_list()


def test_errors_are_clear() -> None:
    alloc = OffsetAllocator(4096, 64)
    with pytest.raises(ValueError):
        alloc.allocate(0)
    with pytest.raises(ValueError):
        OffsetAllocator(4096, 48)
    offset = alloc.allocate(4096)
    with pytest.raises(OutOfSpace):
        alloc.allocate(1)
    with pytest.raises(KeyError):
        alloc.free_range(offset + 64)
    alloc.free_range(offset)
    with pytest.raises(KeyError):  # double free
        alloc.free_range(offset)
    with pytest.raises(ValueError):
        OffsetAllocator.with_used(4096, [(0, 128), (64, 64)])  # overlap


def test_request_larger_than_the_segment_is_out_of_space_not_a_crash():
    from store.master.allocator import OffsetAllocator, OutOfSpace

    alloc = OffsetAllocator(1 << 20)
    with pytest.raises(OutOfSpace):
        alloc.allocate(1 << 30)
    assert alloc.allocate(1 << 20) == 0  # still fully usable


@settings(max_examples=100, deadline=None)
@given(pieces=st.lists(st.integers(1, 3000), min_size=1, max_size=40),
       order=st.randoms(use_true_random=False))
def test_carving_pieces_off_a_block_keeps_each_freeable(pieces: list[int], order) -> None:
    """Space reserved ahead is one allocation that objects are cut from, front first; each
    piece, and the rest, must then be freeable on its own, in any order."""
    alloc = OffsetAllocator(CAPACITY, 64)
    block = alloc.allocate(sum(alloc.allocation_size(p) for p in pieces) + 64)
    front, cut = block, []
    for p in pieces:
        rest = alloc.carve(front, p)
        assert rest == front + alloc.allocation_size(p)
        cut.append(front)
        front = rest
        _check_invariants(alloc)
    cut.append(front)  # the rest
    order.shuffle(cut)
    for offset in cut:
        alloc.free_range(offset)
        _check_invariants(alloc)
    assert alloc.used == 0 and alloc.free_list() == [(0, CAPACITY)]


def test_carve_refuses_what_it_cannot_split() -> None:
    alloc = OffsetAllocator(1 << 20, 64)
    at = alloc.allocate(4096)
    with pytest.raises(ValueError):
        alloc.carve(at, 4096)  # nothing would be left
    with pytest.raises(ValueError):
        alloc.carve(at, 0)
    with pytest.raises(KeyError):
        alloc.carve(at + 64, 64)  # not the start of an allocation
