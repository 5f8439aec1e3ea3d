"""Fuzz targets shared by ``tests/test_fuzz_*.py`` (CI-sized) and ``benchmarks/fuzz_all.py``.

Why one module: the CI tests and the 100k-case benchmark must attack exactly the same decoders
with exactly the same oracles; only the number of examples differs. A :class:`Target` is a
hypothesis strategy of hostile inputs plus a :class:`Harness` (a live server where the decoder is
reached over the network) whose ``check(case)`` raises :class:`FuzzViolation` when the product
does anything but its documented refusal: an undocumented exception, a 5xx, a hang past the
bound, or a server that stops serving a good client.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psutil
import yaml
from hypothesis import strategies as st

from transfer.transports.tcp import _REQ, _RESP  # the data plane's wire format under test

CALL_BOUND_S = 5.0
"""Every single call against a live server must finish (answer or close) within this."""


class FuzzViolation(AssertionError):
    """The product did something other than refuse cleanly (a crash in fuzzing terms)."""


class FuzzHang(FuzzViolation):
    """A call did not finish within :data:`CALL_BOUND_S`."""


class Harness:
    """What a target runs against; the pure decoders need no server."""

    lanes: int = 1
    """How many cases ``check`` may run at once (each on its own connection) in a bulk run.

    Why: a live target spends most of a case waiting by design (a server given time to answer
    a request it cannot complete, a client timing out on a stalled peer), not working; cases in
    lanes overlap those waits and check exactly the same things. ``check`` must then be
    thread-safe. The CI tests run one case at a time."""

    def check(self, case: Any) -> None:
        raise NotImplementedError

    def healthy(self) -> None:
        """Raise :class:`FuzzViolation` unless a well-behaved client is still served."""

    def rss(self) -> int:
        """Resident memory of the process holding the decoder (0 when not tracked)."""
        return psutil.Process().memory_info().rss


@dataclass(frozen=True)
class Target:
    name: str
    strategy: st.SearchStrategy[Any]
    harness: Callable[[], contextlib.AbstractContextManager[Harness]]


# -- common strategies ---------------------------------------------------------------------

hostile_ints = st.one_of(
    st.integers(-5, 70000), st.sampled_from([-(1 << 63), (1 << 63) - 1, (1 << 64) - 1, 0, -1]),
    st.integers(-(1 << 70), 1 << 70))
json_scalars = (st.none() | st.booleans() | hostile_ints | st.floats(allow_nan=False)
                | st.text(max_size=40))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=5),
    max_leaves=20)


def deep_json(depth: int, kind: str) -> bytes:
    return (b"[" * depth + b"]" * depth) if kind == "list" else \
        (b'{"a":' * depth + b"1" + b"}" * depth)


deep_json_bytes = st.builds(deep_json, st.integers(100, 20000), st.sampled_from(["list", "dict"]))


def fuzz_json_doc(shape: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Bytes that are JSON of ``shape``, random JSON, garbage, non-UTF-8 or very deep JSON."""
    return st.one_of(
        shape.map(lambda v: json.dumps(v).encode()),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=512),
        st.binary(max_size=64).map(lambda b: b'{"x": "' + b"\xff\xfe" + b + b'"}'),
        deep_json_bytes)


def _bounded(fn: Callable[[], Any]) -> Any:
    t0 = time.monotonic()
    out = fn()
    if time.monotonic() - t0 > CALL_BOUND_S:
        raise FuzzHang(f"call took {time.monotonic() - t0:.1f}s")
    return out


# -- pure decoders: segment descriptors, P2P records, config files ---------------------------------


class _Pure(Harness):
    def __init__(self, fn: Callable[[Any], None], allowed: tuple[type[BaseException], ...]) -> None:
        self._fn = fn
        self._allowed = allowed

    def check(self, case: Any) -> None:
        try:
            _bounded(lambda: self._fn(case))
        except self._allowed:
            pass
        except FuzzViolation:
            raise
        except Exception as e:  # anything else is a crash of the decoder
            raise FuzzViolation(f"{type(e).__name__}: {e!r} for {case!r:.300}") from e


def _descriptor_shape() -> st.SearchStrategy[Any]:
    buf = st.fixed_dictionaries({
        "address": hostile_ints, "length": hostile_ints,
        "location": st.sampled_from(["cpu:0", "cuda:1", "file:/tmp/x", "gpu", ""]) | st.text(),
    }, optional={"shm_name": st.none() | st.text(max_size=40) | hostile_ints,
                 "shm_offset": hostile_ints, "info": json_values})
    return st.fixed_dictionaries({
        "name": st.text(max_size=20) | hostile_ints, "engine_id": st.text(max_size=8),
        "rpc_host": st.text(max_size=20), "rpc_port": hostile_ints,
        "transports": st.dictionaries(st.sampled_from(["tcp", "rdma", "shm"]),
                                      st.dictionaries(st.sampled_from(["host", "port"]),
                                                      json_scalars) | json_values),
    }, optional={"buffers": st.lists(buf, max_size=6) | json_values,
                 "protocol_version": hostile_ints})


def _descriptor_harness() -> contextlib.AbstractContextManager[Harness]:
    from transfer.descriptor import PeerSegment, decode_descriptor
    from transfer.errors import AddressError, DescriptorError

    def run(data: tuple[bytes, int, int]) -> None:
        raw, addr, length = data
        seg = PeerSegment(decode_descriptor(raw))
        with contextlib.suppress(AddressError):
            seg.find(addr, length)

    return contextlib.nullcontext(_Pure(run, (DescriptorError,)))


def _record_shape() -> st.SearchStrategy[Any]:
    hexes = st.lists(st.sampled_from(["0" * 64, "a" * 64, "A" * 64, "xyz"]) | st.text(max_size=5)
                     | hostile_ints, max_size=4)
    holder = st.fixed_dictionaries({
        "segment": st.sampled_from(["127.0.0.1:1234", "h[::1]:5", ""]) | st.text(max_size=10)
        | hostile_ints,
        "extents": st.lists(st.lists(hostile_ints, max_size=3) | json_values, max_size=4)},
        optional={"origin": json_scalars})
    return st.fixed_dictionaries({
        "name": st.sampled_from(["a", "a/b", "../x", "a//b", "a/"]) | st.text(max_size=12),
        "size": hostile_ints | st.sampled_from([4096, 8192, 1]),
        "chunk_size": hostile_ints | st.sampled_from([4096, 1 << 20]),
        "checksums": hexes}, optional={"holders": st.lists(holder, max_size=3),
                                       "algorithm": st.sampled_from(["sha256", "md5"]),
                                       "version": hostile_ints})


def _record_harness() -> contextlib.AbstractContextManager[Harness]:
    from store.p2p.chunks import split_ranges
    from store.p2p.records import ObjectRecord, RecordError, decode_object, decode_partial

    good = ObjectRecord(name="obj", size=8192, chunk_size=4096, checksums=["0" * 64] * 2)

    def run(data: tuple[bytes, bytes, int]) -> None:
        raw, partial, offset = data
        with contextlib.suppress(RecordError):
            rec = decode_object(raw)
            # A valid record must be usable: chunk ranges map onto every holder's extents.
            for h in rec.holders[:2]:
                for i in range(min(rec.num_chunks, 3)):
                    off, n = rec.chunk(i)
                    split_ranges(h.extents, rec.holders[0].extents, off, n)
        decode_partial(partial, good)

    return contextlib.nullcontext(_Pure(run, (RecordError,)))


def _config_shape() -> st.SearchStrategy[Any]:
    sections = st.sampled_from(["rpc", "transfer", "master", "metadata", "store", "client"])
    keys = st.sampled_from(["local_hostname", "metadata_server", "auth_secret", "protocol",
                            "max_frame_size", "port", "host", "streams_per_peer", "enable_shm",
                            "client_ttl", "global_segment_size", "x"]) | st.text(max_size=8)
    return st.dictionaries(keys | sections, json_values | st.dictionaries(keys, json_scalars,
                                                                         max_size=4), max_size=6)


@contextlib.contextmanager
def _config_harness() -> Iterator[Harness]:
    from transfer.config import ConfigError, load_config

    # tmpfs when there is one: a case is one file written and read, and a disk's open/truncate
    # cost more than the decoding on a busy machine.
    tmp = tempfile.mkdtemp(prefix="fuzz-config-",
                           dir="/dev/shm" if os.path.isdir("/dev/shm") else None)

    def run(data: tuple[str, bytes]) -> None:
        suffix, raw = data
        path = os.path.join(tmp, "c" + suffix)
        with open(path, "wb") as f:
            f.write(raw)
        load_config(path, env={})

    try:
        yield _Pure(run, (ConfigError,))
    finally:
        for name in os.listdir(tmp):
            os.unlink(os.path.join(tmp, name))
        os.rmdir(tmp)


def _yaml_doc(v: Any) -> bytes:
    return yaml.safe_dump(v).encode()


config_cases = st.tuples(
    st.sampled_from([".json", ".yaml", ".yml", ".toml", ""]),
    st.one_of(_config_shape().map(lambda v: json.dumps(v).encode()), _config_shape().map(_yaml_doc),
              st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()),
              st.sampled_from([b"a: &x [*x]", b"!!python/object:os.system {}", b"a: 1\na: 2",
                               b"{1: 2}", b"[" * 5000, b"a: " + b"[" * 3000, b"\xff\xfe",
                               b"? [a]\n: 1", b"a: !!binary AAAA", b"a: 1e999"])))
descriptor_cases = st.tuples(fuzz_json_doc(_descriptor_shape()), hostile_ints, hostile_ints)
record_cases = st.tuples(
    fuzz_json_doc(_record_shape()),
    fuzz_json_doc(st.fixed_dictionaries({"segment": st.text(max_size=8), "extents": json_values,
                                         "have": st.text(max_size=4)})),
    hostile_ints)


# -- live servers ----------------------------------------------------------------------------


def _http_request(port: int, raw: bytes, patience: float = 0.3) -> int | None:
    """Send raw HTTP, return the status code (None if the server closed without one).

    A complete request is answered at once; one the server still waits on gets our EOF after
    ``patience`` and must then be closed within the bound (aiohttp drops a half-closed
    connection, so EOF is sent only when no answer came).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=CALL_BOUND_S) as s:
        with contextlib.suppress(OSError):
            s.sendall(raw)
        data = b""
        s.settimeout(patience)
        deadline = time.monotonic() + CALL_BOUND_S
        try:
            while b"\r\n" not in data:
                if time.monotonic() > deadline:
                    raise FuzzHang("no status line within the bound")
                try:
                    chunk = s.recv(4096)
                except TimeoutError:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_WR)
                    s.settimeout(max(0.01, deadline - time.monotonic()))
                    continue
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            raise FuzzHang(f"no answer within {CALL_BOUND_S}s to {raw[:200]!r}") from None
        except ConnectionResetError:
            return None
    if not data:
        return None
    parts = data.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise FuzzViolation(f"not an HTTP reply: {data[:100]!r}")
    return int(parts[1])


def _build_http(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]],
                body: bytes) -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Connection: close"]
    lines += [k + b": " + v for k, v in headers]
    if body and not any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in headers):
        lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


_token = st.text(st.characters(codec="ascii", exclude_characters="\r\n"), max_size=30).map(
    str.encode)
_qvalue = st.one_of(st.sampled_from([b"a", b"mooncake/x", b"", b"%ff", b"%00", b"a%2F..%2Fb",
                                     b"1e999", b"nan", b"-1", b"inf", b"0.001", b"5"]), _token)
_query = st.lists(st.tuples(st.sampled_from([b"key", b"prefix", b"ttl", b"x", b""]), _qvalue),
                  max_size=4).map(lambda kv: b"&".join(k + b"=" + v for k, v in kv))
_header = st.tuples(
    st.sampled_from([b"If-Match", b"If-None-Match", b"Authorization", b"Content-Type",
                     b"Content-Length", b"Transfer-Encoding", b"X-Junk"]),
    st.sampled_from([b"*", b'"1"', b'"18446744073709551616"', b'"99999999999999999999"', b'""',
                     b'"', b"W/\"1\"", b"Bearer t0ken", b"Bearer ", b"chunked", b"-1",
                     b"99999999999", b"\xff\xfe", "١٢".encode()]) | _token)


def _metadata_cases() -> st.SearchStrategy[bytes]:
    method = st.sampled_from([b"GET", b"PUT", b"DELETE", b"PATCH", b"POST", b"HEAD", b"OPTIONS",
                              b"TRACE", b"BREW", b"G\x00T"])
    path = st.sampled_from([b"/metadata", b"/metadata/", b"/", b"/x", b"//metadata",
                            b"*", b"/metadata%00"])
    req = st.builds(lambda m, p, q, h, b: _build_http(m, p + (b"?" + q if q else b""), h, b),
                    method, path, _query, st.lists(_header, max_size=4), st.binary(max_size=300))
    return st.one_of(req, st.binary(max_size=400), req.map(lambda r: r[: len(r) // 2]))


metadata_cases = _metadata_cases()


class _MetadataHarness(Harness):
    # A request the server cannot complete costs a case the whole ``patience`` of
    # _http_request; lanes overlap those waits.
    lanes = 16

    def __init__(self, port: int, proc: subprocess.Popen[bytes], token: str | None,
                 log: str) -> None:
        self.port = port
        self.proc = proc
        self.token = token
        self.log = log

    def check(self, case: bytes) -> None:
        status = _bounded(lambda: _http_request(self.port, case))
        if status is not None and status >= 500:
            raise FuzzViolation(f"HTTP {status} for {case[:300]!r}")
        if self.proc.poll() is not None:
            raise FuzzViolation(f"metadata server exited with {self.proc.returncode}: "
                                f"{_tail(self.log)}")

    def healthy(self) -> None:
        auth = [(b"Authorization", b"Bearer " + self.token.encode())] if self.token else []
        put = _build_http(b"PUT", b"/metadata?key=fuzz/probe", auth, b"v")
        get = _build_http(b"GET", b"/metadata?key=fuzz/probe", auth, b"")
        for req in (put, get):
            status = _http_request(self.port, req, patience=CALL_BOUND_S)
            if status != 200:
                raise FuzzViolation(f"good client got {status}")

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss


@contextlib.contextmanager
def metadata_server(token: str | None = None) -> Iterator[_MetadataHarness]:
    """``python -m transfer.metadata`` as its own process (crashes and RSS are its own)."""
    from transfer.testing import free_port, stop_process, wait_for_port

    port = free_port()
    env = dict(os.environ)
    env.pop("MOONCAKE_METADATA_TOKEN", None)
    args = [sys.executable, "-m", "transfer.metadata", "--port", str(port),
            "--log-level", "ERROR"]
    # aiohttp logs every refused request with a traceback (a bulk run: ~1 KB a case), so the
    # server's stderr goes to a file, shown (its tail) only if the server dies.
    with tempfile.NamedTemporaryFile("w", suffix=".token") as tf, \
            tempfile.NamedTemporaryFile("wb", suffix=".log", prefix="fuzz-metadata-") as log:
        if token:
            tf.write(token)
            tf.flush()
            args += ["--secret-file", tf.name]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            wait_for_port("127.0.0.1", port, timeout=20)
            yield _MetadataHarness(port, proc, token, log.name)
        finally:
            stop_process(proc, timeout=5)


def _tail(path: str, n: int = 2000) -> str:
    """The last ``n`` bytes of a (possibly very long) log."""
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - n))
        return f.read().decode(errors="replace")


# -- the TCP data plane ------------------------------------------------------------------------



@dataclass
class TcpCase:
    hello: bytes
    proof: bytes | None
    requests: list[bytes]


class _TcpHarness(Harness):
    """Raw connections to a live engine's data port (an engine in a peer process)."""

    def __init__(self, port: int, addr: int, size: int, secret: bytes | None,
                 pid: int) -> None:
        self.port, self.addr, self.size, self.secret, self.pid = port, addr, size, secret, pid

    def check(self, case: TcpCase) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=CALL_BOUND_S) as s:
            s.settimeout(CALL_BOUND_S)
            try:
                s.sendall(case.hello)
                if case.proof is not None:
                    s.sendall(case.proof)
                for r in case.requests:
                    s.sendall(r)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                return  # the server refused and closed: fine
            t0 = time.monotonic()
            try:
                # With our side closed, the server must answer what it can and close.
                while s.recv(1 << 16):
                    if time.monotonic() - t0 > CALL_BOUND_S + 1:
                        raise FuzzHang("data server keeps talking after our EOF")
            except TimeoutError:
                raise FuzzHang(f"data server held the connection {CALL_BOUND_S}s after EOF "
                               f"(hello={case.hello[:8]!r}, {len(case.requests)} requests)") \
                    from None
            except ConnectionResetError:
                pass
        if not psutil.pid_exists(self.pid):
            raise FuzzViolation("the peer engine died")

    def healthy(self) -> None:
        from transfer.rpc import auth
        from transfer.transports.tcp import PROTOCOL_VERSION

        with socket.create_connection(("127.0.0.1", self.port), timeout=CALL_BOUND_S) as s:
            s.settimeout(CALL_BOUND_S)
            nonce = auth.new_nonce()
            s.sendall(b"MCTD" + PROTOCOL_VERSION.to_bytes(2, "big") + nonce)
            welcome = _recv_n(s, 37)
            if self.secret:
                s.sendall(auth.client_proof(self.secret, nonce, welcome[5:]))
                if _recv_n(s, 33)[0] != 1:
                    raise FuzzViolation("good client refused")
            s.sendall(_REQ.pack(0x4D43, 1, 0, 7, self.addr, 64) + bytes(64))  # WRITE 64
            magic, status, _, tag, n = _RESP.unpack(_recv_n(s, _RESP.size))
            if (status, tag) != (0, 7):
                raise FuzzViolation(f"good WRITE got status {status}")
            s.sendall(_REQ.pack(0x4D43, 0, 0, 8, self.addr, 64))  # READ 64
            magic, status, _, tag, n = _RESP.unpack(_recv_n(s, _RESP.size))
            if (status, tag, n) != (0, 8, 64) or _recv_n(s, 64) != bytes(64):
                raise FuzzViolation(f"good READ got status {status}")

    def rss(self) -> int:
        return psutil.Process(self.pid).memory_info().rss


def _recv_n(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise FuzzViolation(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


@contextlib.contextmanager
def tcp_engine(secret: bytes | None) -> Iterator[_TcpHarness]:
    sys.path.insert(0, os.path.dirname(__file__))
    from _transfer_util import Peer  # tests helper: a real engine in its own process

    args = ["--no-shm"] + (["--secret", secret.decode()] if secret else [])
    with Peer(*args, size=1 << 20) as peer:
        from transfer.descriptor import decode_descriptor

        desc = decode_descriptor(_fetch_descriptor(peer.name, secret))
        port = int(desc.transports["tcp"]["port"])
        yield _TcpHarness(port, peer.addr, peer.size, secret, peer.proc.pid)


def _fetch_descriptor(name: str, secret: bytes | None) -> bytes:
    """The peer's descriptor over its control RPC, as another engine would ask for it."""
    from transfer.control import DescriptorReply, DescriptorRequest, split_name
    from transfer.rpc.blocking import BlockingRpcClient

    host, port = split_name(name)
    client = BlockingRpcClient(host, port, secret=secret)
    try:
        reply = client.call("te.descriptor", DescriptorRequest(name), DescriptorReply, timeout=10)
    finally:
        client.close()
    assert reply.data is not None
    return reply.data


def tcp_cases(addr: int, size: int, secret: bytes | None) -> st.SearchStrategy[TcpCase]:
    from transfer.transports.tcp import MAX_SLICE

    good_hello = b"MCTD\x00\x01" + bytes(32)
    hello = st.one_of(st.just(good_hello), st.binary(max_size=40),
                      st.builds(lambda v: b"MCTD" + v.to_bytes(2, "big") + bytes(32),
                                st.integers(0, 65535)),
                      st.just(good_hello).map(lambda h: h[:20]))
    proof = st.none() | st.binary(min_size=32, max_size=32) | st.binary(max_size=40)
    addrs = st.one_of(st.integers(addr, addr + size), st.integers(0, (1 << 64) - 1),
                      st.sampled_from([0, addr - 1, addr + size - 1, (1 << 64) - 1]))
    lengths = st.one_of(st.integers(0, 4096), st.sampled_from([size, size + 1, MAX_SLICE,
                                                               MAX_SLICE + 1, (1 << 64) - 1]))

    def req(magic: int, op: int, pad: int, tag: int, a: int, n: int, payload: int,
            cut: int | None) -> bytes:
        head = _REQ.pack(magic, op, pad, tag, a, n)
        body = bytes(min(n, payload)) if op == 1 else b""
        data = head + body
        return data if cut is None else data[:cut]

    request = st.builds(req, st.sampled_from([0x4D43, 0x4D43, 0, 0xFFFF]),
                        st.sampled_from([0, 1, 1, 2, 255]), st.integers(0, 255),
                        st.integers(0, (1 << 32) - 1), addrs, lengths,
                        st.integers(0, 8192), st.none() | st.integers(0, 40))
    return st.builds(TcpCase, hello, proof, st.lists(request | st.binary(max_size=64),
                                                     max_size=4))
