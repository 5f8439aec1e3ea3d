"""Fuzz target: the master's RPC requests (``tests/test_fuzz_master.py``, ``benchmarks/fuzz_all.py``).

Why well-formed frames: the RPC layer's framing and envelope are fuzzed elsewhere
(``tests/test_rpc_fuzz.py``); here every frame is valid and authenticated-as-needed, so the
hostile part reaches the master's own checks: each request type of
:mod:`store.master.messages` with huge, negative and zero sizes, empty, 256+-byte and unicode
keys, batches up to and past ``MAX_BATCH``, mismatched lists, unknown clients and segments,
wrong types. The oracle: a reply, or a clear error (``BAD_REQUEST`` for a body that does not
decode, a :class:`~store.master.errors.MasterErrorCode` otherwise), never ``INTERNAL``, a lost
connection or a slow answer; the master process survives, a good client is served afterwards
and its memory stays bounded.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import psutil
from hypothesis import strategies as st

from _fuzz import CALL_BOUND_S, FuzzHang, FuzzViolation, Harness, hostile_ints, json_values

REPO = Path(__file__).resolve().parent.parent
SEGMENT_BASE = 1 << 40
SEGMENT_SIZE = 64 << 20


@dataclass
class MasterCase:
    method: str
    body: Any


_key = st.one_of(
    st.sampled_from(["", "k", "fuzz/a", "a" * 256, "a" * 257, "é" * 128, "é" * 129, "\x00",
                     "💥" * 64, "💥" * 65, "../x", "k\nk"]),
    st.text(max_size=20), st.text(min_size=250, max_size=300))
_keys = st.one_of(
    st.lists(_key, max_size=20),
    st.builds(lambda n, k: [f"{k}{i}" for i in range(n)], st.sampled_from([0, 1, 256, 65536,
                                                                          65537]),
              st.sampled_from(["f/", "", "é" * 128])),
    json_values)
_client = st.sampled_from(["fuzz-c", "", "nobody", "c" * 300]) | st.text(max_size=12)
_segment_name = st.sampled_from(["fuzz-seg", "", "nowhere", "127.0.0.1:1"]) | st.text(max_size=12)
_int = hostile_ints | st.sampled_from([0, 1, 4096, SEGMENT_SIZE, SEGMENT_SIZE + 1, 1 << 62])


def _optional(shape: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A request dict with every field either well-typed-hostile (mostly), wrong-typed or
    absent."""
    return st.fixed_dictionaries({}, optional={k: st.one_of(v, v, v, json_values)
                                               for k, v in shape.items()})


_config = _optional({
    "replica_num": _int, "preferred_segment": _segment_name,
    "preferred_segments": st.lists(_segment_name, max_size=4), "with_hard_pin": st.booleans(),
    "soft_pin": st.booleans(), "soft_pin_action": st.text(max_size=8), "soft_pin_ttl_ms": _int,
    "group_ids": st.lists(_int, max_size=4), "prefer_alloc_in_same_node": st.booleans()})
_segment = _optional({
    "name": _segment_name, "base": _int, "size": _int, "client_id": _client,
    "host_id": st.text(max_size=8), "tier": st.sampled_from(["memory", "file", "", "gpu"])})
_remount = st.lists(st.tuples(_key, _int, _int).map(list) | json_values, max_size=5)

SHAPES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "mount_segment": _optional({"segment": _segment, "objects": _remount}),
    "unmount_segment": _optional({"client_id": _client, "name": _segment_name}),
    "ping": _optional({"client_id": _client}),
    "put_start": _optional({"client_id": _client, "key": _key, "size": _int, "config": _config}),
    "put_end": _optional({"client_id": _client, "key": _key}),
    "put_revoke": _optional({"client_id": _client, "key": _key}),
    "batch_put_start": _optional({"client_id": _client, "keys": _keys,
                                  "sizes": st.lists(_int, max_size=20), "config": _config}),
    "batch_put_end": _optional({"client_id": _client, "keys": _keys}),
    "batch_put_revoke": _optional({"client_id": _client, "keys": _keys}),
    "get_replica_list": _optional({"key": _key}),
    "batch_get_replica_list": _optional({"keys": _keys}),
    "exists": _optional({"key": _key, "grant_lease": st.booleans()}),
    "batch_exists": _optional({"keys": _keys, "grant_lease": st.booleans()}),
    "remove": _optional({"key": _key, "force": st.booleans()}),
    "batch_remove": _optional({"keys": _keys}),
    "remove_all": _optional({"force": st.booleans()}),
    "stats": _optional({}),
    "replica_start": _optional({"client_id": _client, "key": _key, "segment": _segment_name}),
    "replica_end": _optional({"client_id": _client, "key": _key}),
    "replica_revoke": _optional({"client_id": _client, "key": _key}),
    "batch_replica_start": _optional({"client_id": _client, "keys": _keys,
                                      "segment": _segment_name}),
    "batch_replica_end": _optional({"client_id": _client, "keys": _keys}),
    "batch_replica_revoke": _optional({"client_id": _client, "keys": _keys}),
    "take_demotions": _optional({"client_id": _client}),
    "demote_end": _optional({"client_id": _client, "done": st.lists(_int, max_size=5),
                             "failed": st.lists(_int, max_size=5)}),
}

master_cases = st.one_of(
    *(st.builds(MasterCase, st.just(name), shape) for name, shape in SHAPES.items()),
    st.builds(MasterCase, st.sampled_from(sorted(SHAPES)), json_values))


class MasterHarness(Harness):
    """A ``python -m store.master`` process and a blocking RPC client speaking raw bodies.

    A fuzz client ``fuzz-c`` has a segment ``fuzz-seg`` mounted (and kept alive by pings), so
    puts, replicas and removes reach the allocator and the object table, not only the checks
    in front of them.
    """

    def __init__(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        from transfer.rpc.blocking import BlockingRpcClient

        self.port = port
        self.proc = proc
        self.client = BlockingRpcClient("127.0.0.1", port, connect_timeout=CALL_BOUND_S)
        self._probe = itertools.count()
        self._last_ping = 0.0

    def _call(self, method: str, body: Any) -> Any:
        return self.client.call(method, body, msgspec.Raw, timeout=CALL_BOUND_S)  # type: ignore[arg-type]

    def mount_fuzz_segment(self) -> None:
        seg = {"name": "fuzz-seg", "base": SEGMENT_BASE, "size": SEGMENT_SIZE,
               "client_id": "fuzz-c", "host_id": "h"}
        from transfer.rpc import RpcError

        with contextlib.suppress(RpcError):  # already mounted
            self._call("mount_segment", {"segment": seg})

    def check(self, case: MasterCase) -> None:
        from store.master.errors import MasterErrorCode
        from transfer.rpc import ErrorCode, RpcConnectionError, RpcError, RpcTimeoutError

        if time.monotonic() - self._last_ping > 0.5:
            self._last_ping = time.monotonic()
            self._call("ping", {"client_id": "fuzz-c"})
            self.mount_fuzz_segment()  # again if the fuzzing unmounted it
        try:
            msgspec.msgpack.encode(case.body)
        except OverflowError:
            return  # an int msgpack cannot carry: no client can send it
        t0 = time.monotonic()
        try:
            self._call(case.method, case.body)
        except RpcTimeoutError:
            raise FuzzHang(f"{case.method} took over {CALL_BOUND_S}s: {case.body!r:.300}") \
                from None
        except RpcConnectionError as e:
            raise FuzzViolation(f"{case.method} lost the connection ({e}): {case.body!r:.300}") \
                from None
        except RpcError as e:
            if e.code == ErrorCode.FRAME_TOO_LARGE:
                pass  # refused locally: the request is over the agreed frame size
            elif e.code != ErrorCode.BAD_REQUEST and e.code not in set(MasterErrorCode):
                raise FuzzViolation(f"{case.method} failed with {e}: {case.body!r:.300}") \
                    from None
        if time.monotonic() - t0 > CALL_BOUND_S:
            raise FuzzHang(f"{case.method} took {time.monotonic() - t0:.1f}s")
        if self.proc.poll() is not None:
            raise FuzzViolation(f"the master exited with {self.proc.returncode}")

    def healthy(self) -> None:
        """A fresh client mounts a segment, puts, reads and removes an object, unmounts."""
        from store.master.messages import (
            GetReplicaListReply,
            KeyRequest,
            MountSegmentReply,
            MountSegmentRequest,
            OkReply,
            OwnedKeyRequest,
            PutStartReply,
            PutStartRequest,
            RemoveRequest,
            SegmentDesc,
            UnmountSegmentReply,
            UnmountSegmentRequest,
        )
        from transfer.rpc import RpcError

        n = next(self._probe)
        cid, name, key = f"probe-{n}", f"probe-seg-{n}", f"probe/key-{n}"
        c = self.client
        try:
            c.call("mount_segment", MountSegmentRequest(segment=SegmentDesc(
                name=name, base=SEGMENT_BASE, size=1 << 20, client_id=cid)), MountSegmentReply,
                timeout=CALL_BOUND_S)
            put = c.call("put_start", PutStartRequest(client_id=cid, key=key, size=4096),
                         PutStartReply, timeout=CALL_BOUND_S)
            if len(put.replicas) != 1:
                raise FuzzViolation(f"good put got {put}")
            c.call("put_end", OwnedKeyRequest(cid, key), OkReply, timeout=CALL_BOUND_S)
            got = c.call("get_replica_list", KeyRequest(key), GetReplicaListReply,
                         timeout=CALL_BOUND_S)
            if [r.size for r in got.replicas] != [4096]:
                raise FuzzViolation(f"good get got {got}")
            c.call("remove", RemoveRequest(key, force=True), OkReply, timeout=CALL_BOUND_S)
            c.call("unmount_segment", UnmountSegmentRequest(cid, name), UnmountSegmentReply,
                   timeout=CALL_BOUND_S)
        except RpcError as e:
            raise FuzzViolation(f"good client refused: {e}") from None

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def close(self) -> None:
        self.client.close()


@contextlib.contextmanager
def master_harness() -> Iterator[MasterHarness]:
    """A master in its own process (its crashes and memory are its own)."""
    from transfer.testing import free_port, stop_process, wait_for_port

    port = free_port()
    cmd = [sys.executable, "-m", "store.master", "--rpc-port", str(port),
           "--metrics-port", str(free_port()), "--enable-http-metadata-server", "false",
           "--client-ttl", "3", "--put-start-timeout", "5", "--log-level", "ERROR"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=open(os.devnull, "wb"))
    try:
        wait_for_port("127.0.0.1", port, 20)
        h = MasterHarness(port, proc)
        try:
            h.mount_fuzz_segment()
            yield h
        finally:
            h.close()
    finally:
        stop_process(proc)
