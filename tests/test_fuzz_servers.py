"""Property-based fuzzing of live network servers: the HTTP metadata server (random methods,
paths, query parameters, headers, If-Match values, bodies, truncated requests) and the transfer
engine's TCP data port (random, truncated and oversized handshakes and slice headers, with and
without authentication). Each answer is a 4xx or a clean close within the bound, the server
process survives, a good client is still served afterwards and its memory stays bounded."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from _fuzz import metadata_cases, metadata_server, tcp_cases, tcp_engine

pytestmark = pytest.mark.timeout(90)
CI = settings(max_examples=80, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.function_scoped_fixture])
RSS_BOUND = 64 << 20


@pytest.fixture(scope="module", params=[None, "fuzz-token"], ids=["open", "token"])
def metadata(request):
    with metadata_server(request.param) as h:
        yield h


def test_metadata_server_survives_hostile_http(metadata):
    metadata.healthy()
    before = metadata.rss()

    @CI
    @given(case=metadata_cases)
    def attack(case):
        metadata.check(case)

    attack()
    metadata.healthy()
    assert metadata.rss() - before < RSS_BOUND


@pytest.mark.parametrize("prefix", [b"%00", b"a%1Fb", b"%7F", b"x" * 4096])
def test_metadata_server_refuses_a_bad_prefix_with_400(metadata, prefix):
    """Found by the 100k-case run: a listing prefix with a control character got a 500 (the
    prefix check's ValueError escaped the handler; the key check's did not)."""
    from _fuzz import _build_http, _http_request

    auth = [(b"Authorization", b"Bearer " + metadata.token.encode())] if metadata.token else []
    raw = _build_http(b"GET", b"/metadata?prefix=" + prefix, auth, b"")
    assert _http_request(metadata.port, raw, patience=5.0) == 400
    metadata.healthy()


@pytest.fixture(scope="module", params=[None, b"fuzz-secret"], ids=["open", "auth"])
def engine(request):
    with tcp_engine(request.param) as h:
        yield h


def test_tcp_data_port_survives_hostile_headers(engine):
    engine.healthy()
    before = engine.rss()

    @settings(CI, max_examples=60)
    @given(case=tcp_cases(engine.addr, engine.size, engine.secret))
    def attack(case):
        engine.check(case)

    attack()
    engine.healthy()
    assert engine.rss() - before < RSS_BOUND


def test_data_port_drops_a_peer_that_stalls_inside_a_request_header():
    """A peer that sends part of a request header and goes silent must not hold a server thread
    forever: the rest of a started request has to arrive within io_timeout."""
    import socket as _socket
    import time as _time

    from _fuzz import _fetch_descriptor
    from _transfer_util import Peer

    from transfer.descriptor import decode_descriptor
    from transfer.rpc import auth
    from transfer.transports.tcp import PROTOCOL_VERSION

    with Peer("--no-shm", "--io-timeout", "1.5", size=1 << 16) as peer:
        desc = decode_descriptor(_fetch_descriptor(peer.name, None))
        port = int(desc.transports["tcp"]["port"])
        with _socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"MCTD" + PROTOCOL_VERSION.to_bytes(2, "big") + auth.new_nonce())
            welcome = b""
            while len(welcome) < 37:  # the server's hello (no secret: no proof exchange)
                chunk = s.recv(37 - len(welcome))
                assert chunk, "server closed during the handshake"
                welcome += chunk
            _time.sleep(2.0)  # idle between requests is allowed...
            s.sendall(b"\x4d\x43\x01")  # ...but a started header must be finished in time
            t0 = _time.monotonic()
            assert s.recv(64) == b""  # the server closed the stalled connection
            assert _time.monotonic() - t0 < 6.0
