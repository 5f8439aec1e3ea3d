"""Staged puts (store/client/staged.py) against a real master, a real store node and real engines."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest

from _store_util import MIB, NodeProcess, master_process, new_client
from store.client import MasterErrorCode, StoreError
from store.client.staged import StagedPut, staged_error_is_exists

pytestmark = pytest.mark.timeout(60)

LAYERS = 4
PAGE = 64 << 10


@pytest.fixture(scope="module")
def master():
    with master_process() as address:
        yield address


@pytest.fixture(scope="module")
def node(master):
    n = NodeProcess(master)
    yield n
    n.stop()


@pytest.fixture(scope="module")
def writer(master, node):
    """A client-only writer (like a vLLM worker): every byte goes to the node over a transport."""
    c = new_client(master, global_segment_size=0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reader(master, node):
    c = new_client(master, global_segment_size=0)
    yield c
    c.close()


def _pages(client, blocks: int, seed: int) -> tuple[np.ndarray, int]:
    """``LAYERS`` x ``blocks`` pages of random bytes in one registered array (like KV pages)."""
    arr = np.random.default_rng(seed).integers(0, 256, size=(LAYERS, blocks, PAGE), dtype=np.uint8)
    return arr, client.register(arr)


def _expected(arr: np.ndarray, block: int) -> bytes:
    return b"".join(arr[layer, block].tobytes() for layer in range(LAYERS))


def _write_layers(sp: StagedPut, h, keys: list[str], arr: np.ndarray, base: int,
                  layers=range(LAYERS)) -> None:
    """Write ``layers`` of block ``b`` of ``arr`` into object ``keys[b]``, one layer at a time."""
    for layer in layers:
        sp.write_many(h, [(key, layer * PAGE, [(base + arr[layer, b].ctypes.data - arr.ctypes.data, PAGE)])
                          for b, key in enumerate(keys)])


def _stage_layer_by_layer(sp: StagedPut, keys: list[str], arr: np.ndarray, base: int,
                          order=range(LAYERS)):
    h = sp.begin(keys, [LAYERS * PAGE] * len(keys))
    _write_layers(sp, h, keys, arr, base, order)
    return h


def test_layer_by_layer_objects_read_back_whole(writer, reader):
    arr, base = _pages(writer, 6, seed=1)
    keys = [f"staged/a/{i}" for i in range(6)]
    sp = StagedPut(writer)
    h = _stage_layer_by_layer(sp, keys, arr, base, order=[2, 0, 3, 1])  # any order
    assert reader.batch_exists(keys) == [False] * 6  # nothing visible before commit
    assert sp.commit(h) == [None] * 6
    for i, key in enumerate(keys):
        assert reader.get(key) == _expected(arr, i)


def test_single_write_of_a_buffer_object(writer, reader):
    sp = StagedPut(writer)
    head = np.frombuffer(os.urandom(PAGE), dtype=np.uint8).copy()
    tail = np.frombuffer(os.urandom(PAGE // 2), dtype=np.uint8).copy()
    writer.register(head)
    writer.register(tail)
    h = sp.begin(["staged/buf"], [PAGE + PAGE // 2])
    sp.write(h, "staged/buf", PAGE, tail)
    sp.write(h, "staged/buf", 0, head)
    assert sp.commit(h) == [None]
    assert reader.get("staged/buf") == head.tobytes() + tail.tobytes()


def test_incomplete_or_overlapping_objects_are_revoked_not_published(writer, reader):
    arr, base = _pages(writer, 3, seed=2)
    sp = StagedPut(writer)
    keys = ["staged/gap", "staged/overlap", "staged/ok"]
    h = sp.begin(keys, [LAYERS * PAGE] * 3)
    for layer in range(LAYERS):
        off = arr[layer].ctypes.data - arr.ctypes.data
        if layer != 1:  # a missing layer
            sp.write_many(h, [(keys[0], layer * PAGE, [(base + off, PAGE)])])
        sp.write_many(h, [(keys[1], layer * PAGE, [(base + off + PAGE, PAGE)]),
                          (keys[2], layer * PAGE, [(base + off + 2 * PAGE, PAGE)])])
    sp.write_many(h, [(keys[1], PAGE // 2, [(base, PAGE)])])  # overlaps layers 0 and 1
    res = sp.commit(h)
    assert res[2] is None
    assert isinstance(res[0], StoreError) and "never written" in str(res[0])
    assert isinstance(res[1], StoreError) and "twice" in str(res[1])
    assert reader.batch_exists(keys) == [False, False, True]
    # The revoked keys are free again: a normal put of them works.
    writer.put(keys[0], b"again")
    assert reader.get(keys[0]) == b"again"


def test_existing_key_is_reported_not_overwritten(writer, reader):
    writer.put("staged/exists", b"first")
    sp = StagedPut(writer)
    arr, base = _pages(writer, 1, seed=3)
    h = _stage_layer_by_layer(sp, ["staged/exists"], arr, base)
    (err,) = sp.commit(h)
    assert staged_error_is_exists(err)
    assert reader.get("staged/exists") == b"first"


def test_abort_gives_space_back_and_publishes_nothing(writer, reader):
    arr, base = _pages(writer, 2, seed=4)
    sp = StagedPut(writer)
    keys = ["staged/abort/0", "staged/abort/1"]
    h = _stage_layer_by_layer(sp, keys, arr, base)
    sp.abort(h)
    assert reader.batch_exists(keys) == [False, False]
    with pytest.raises(StoreError):
        sp.commit(h)  # a handle ends once
    h2 = _stage_layer_by_layer(sp, keys, arr, base)  # reservations were revoked: reusable
    assert sp.commit(h2) == [None, None]


def test_bad_input_is_refused_before_anything_moves(writer):
    sp = StagedPut(writer)
    with pytest.raises(StoreError) as e:
        sp.begin(["staged/x", "staged/x"], [10, 10])
    assert e.value.code == MasterErrorCode.INVALID_PARAMS
    with pytest.raises(StoreError):
        sp.begin(["staged/neg"], [0])
    with pytest.raises(StoreError) as e:
        sp.begin([""], [10])
    assert e.value.code == MasterErrorCode.INVALID_KEY
    arr, base = _pages(writer, 1, seed=5)
    h = sp.begin(["staged/bad"], [PAGE])
    with pytest.raises(StoreError):
        sp.write_many(h, [("staged/other", 0, [(base, PAGE)])])  # not in the put
    with pytest.raises(StoreError):
        sp.write_many(h, [("staged/bad", 1, [(base, PAGE)])])  # past the end
    unregistered = np.zeros(PAGE, dtype=np.uint8)
    with pytest.raises(StoreError) as e:
        sp.write_many(h, [("staged/bad", 0, [(unregistered.ctypes.data, PAGE)])])
    assert e.value.code == MasterErrorCode.INVALID_PARAMS or "not registered" in str(e.value)
    with pytest.raises(StoreError):
        sp.write(h, "staged/bad", 0, b"read-only bytes are no registered buffer")
    sp.abort(h)
    with pytest.raises(StoreError):
        sp.write_many(h, [("staged/bad", 0, [(base, PAGE)])])  # after abort


def test_writes_after_the_window_are_dropped_and_the_put_revoked(writer, reader):
    arr, base = _pages(writer, 1, seed=6)
    sp = StagedPut(writer, window_s=0.2)
    h = _stage_layer_by_layer(sp, ["staged/late"], arr, base, order=[0])
    time.sleep(0.4)
    _write_layers(sp, h, ["staged/late"], arr, base, range(1, LAYERS))
    (err,) = sp.commit(h)
    assert isinstance(err, StoreError) and "window" in str(err)
    assert reader.batch_exists(["staged/late"]) == [False]


def test_the_masters_put_timeout_bounds_a_window_set_too_long():
    """A window longer than the master allows is cut to half the master's stated timeout: a
    write issued after that is dropped and the put revoked, never published into space the
    master may already have given to another object."""
    with master_process("--put-start-timeout", "1") as address:
        holder = NodeProcess(address)
        c = new_client(address, global_segment_size=0)
        try:
            arr, base = _pages(c, 1, seed=9)
            sp = StagedPut(c, window_s=30)
            h = _stage_layer_by_layer(sp, ["staged/bounded"], arr, base, order=[0])
            time.sleep(0.8)  # past half the master's 1 s, well inside the configured 30 s
            _write_layers(sp, h, ["staged/bounded"], arr, base, range(1, LAYERS))
            (err,) = sp.commit(h)
            assert isinstance(err, StoreError) and "window" in str(err)
            assert c.batch_exists(["staged/bounded"]) == [False]
            # Within the bound the same staged put publishes.
            h = _stage_layer_by_layer(sp, ["staged/bounded2"], arr, base)
            assert sp.commit(h) == [None]
            assert c.get("staged/bounded2") == _expected(arr, 0)
        finally:
            c.close()
            holder.stop()


def test_checksum_trailer_covers_the_staged_object(master, node, reader):
    c = new_client(master, global_segment_size=0, checksum=True)
    try:
        arr, base = _pages(c, 2, seed=7)
        sp = StagedPut(c)
        keys = ["staged/ck/0", "staged/ck/1"]
        assert sp.commit(_stage_layer_by_layer(sp, keys, arr, base)) == [None, None]
        for i, key in enumerate(keys):
            assert c.get(key) == _expected(arr, i)  # a checksumming reader verifies the trailer
    finally:
        c.close()


def test_embedded_segment_is_written_in_place(master):
    """A writer that holds the pool itself: replicas in its own segment are copied directly."""
    c = new_client(master, global_segment_size=16 * MIB)
    try:
        arr, base = _pages(c, 2, seed=8)
        sp = StagedPut(c, config=_preferring(c.segment_name))
        keys = ["staged/local/0", "staged/local/1"]
        assert sp.commit(_stage_layer_by_layer(sp, keys, arr, base)) == [None, None]
        for i, key in enumerate(keys):
            assert c.get(key) == _expected(arr, i)
    finally:
        c.close()


def _preferring(segment: str):
    from store.master import ReplicateConfig

    return ReplicateConfig(preferred_segment=segment)
