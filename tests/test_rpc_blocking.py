"""BlockingRpcClient: the same protocol as RpcClient, on the caller's thread, against real servers."""
from __future__ import annotations

import socket
import threading

import pytest

from transfer.rpc import (
    BackgroundLoop,
    BlockingRpcClient,
    ErrorCode,
    RpcAuthError,
    RpcConnectionError,
    RpcError,
    RpcTimeoutError,
)
from transfer.rpc.testing import Echo, Sleep, build_test_server, raw_frame
from transfer.testing import free_port

pytestmark = pytest.mark.timeout(30)

SECRET = b"correct horse battery staple"


@pytest.fixture()
def server_loop():
    with BackgroundLoop(name="blocking-test-server") as loop:
        yield loop


def _serve(loop: BackgroundLoop, **kwargs: object):
    srv = build_test_server(**kwargs)  # type: ignore[arg-type]
    port = srv.start_in(loop)
    return srv, port


def test_round_trip_errors_keep_connection(server_loop):
    srv, port = _serve(server_loop)
    try:
        with BlockingRpcClient("127.0.0.1", port) as client:
            for seq in range(50):
                out = client.call("echo", Echo(seq, b"x" * seq), Echo, timeout=5)
                assert out == Echo(seq, b"x" * seq)
            big = bytes(range(256)) * 1024  # 256 KiB: larger than the receive chunk
            assert client.call("echo_async", Echo(7, big), Echo, timeout=5).payload == big
            with pytest.raises(RpcError) as e:
                client.call("app_error", Echo(3), Echo, timeout=5)
            assert e.value.code == 1003
            with pytest.raises(RpcError) as e:
                client.call("no_such_method", Echo(), Echo, timeout=5)
            assert e.value.code == ErrorCode.UNKNOWN_METHOD
            with pytest.raises(RpcError) as e:
                client.call("echo", Echo(1), Sleep, timeout=5)  # wrong response type
            assert e.value.code == ErrorCode.BAD_RESPONSE
            # Application errors do not cost the connection.
            assert client.call("echo", Echo(99), Echo, timeout=5).seq == 99
            assert client.connections == 1
    finally:
        srv.stop_in()


def test_one_connection_per_thread(server_loop):
    srv, port = _serve(server_loop, secret=SECRET)
    try:
        client = BlockingRpcClient("127.0.0.1", port, secret=SECRET)
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            try:
                for i in range(100):
                    seq = k * 1000 + i
                    assert client.call("echo", Echo(seq), Echo, timeout=5).seq == seq
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert not errors
        assert client.connections == 4
        client.close()
        assert client.connections == 0
        with pytest.raises(RpcConnectionError):
            client.call("echo", Echo(), Echo)
    finally:
        srv.stop_in()


def test_auth_success_and_refusals(server_loop):
    srv, port = _serve(server_loop, secret=SECRET)
    open_srv, open_port = _serve(server_loop)
    try:
        with BlockingRpcClient("127.0.0.1", port, secret=SECRET) as ok:
            assert ok.call("echo", Echo(1), Echo, timeout=5).seq == 1
        with pytest.raises(RpcAuthError):
            BlockingRpcClient("127.0.0.1", port, secret=b"wrong").call("echo", Echo(), Echo)
        with pytest.raises(RpcAuthError):
            BlockingRpcClient("127.0.0.1", port).call("echo", Echo(), Echo)
        # A client with a secret refuses a server that cannot prove it knows it.
        with pytest.raises(RpcAuthError):
            BlockingRpcClient("127.0.0.1", open_port, secret=SECRET).call("echo", Echo(), Echo)
    finally:
        srv.stop_in()
        open_srv.stop_in()


def test_oversize_frames(server_loop):
    srv, port = _serve(server_loop, max_frame_size=64 << 10)
    try:
        client = BlockingRpcClient("127.0.0.1", port, max_frame_size=8192)
        # Over the server's limit: refused locally, nothing sent, connection kept.
        with pytest.raises(RpcError) as e:
            client.call("echo", Echo(0, b"x" * (100 << 10)), Echo, timeout=5)
        assert e.value.code == ErrorCode.FRAME_TOO_LARGE
        assert client.call("echo", Echo(1), Echo, timeout=5).seq == 1
        client.close()
    finally:
        srv.stop_in()


def _read_frame(conn: socket.socket) -> bytes:
    head = conn.recv(4, socket.MSG_WAITALL)
    return conn.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL)


def test_response_over_own_limit_is_refused_at_its_header():
    """A server announcing a 1 GiB frame: refused from the 4-byte header, nothing buffered."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            _read_frame(conn)  # hello
            conn.sendall(raw_frame(3, 0, "", [1, 1 << 30, b"n" * 32, False]))
            _read_frame(conn)  # the request
            conn.sendall((1 << 30).to_bytes(4, "big") + b"\x00" * 64)
            conn.recv(10)  # until the client hangs up

    t = threading.Thread(target=serve)
    t.start()
    try:
        client = BlockingRpcClient("127.0.0.1", port, max_frame_size=8192, connect_timeout=2)
        with pytest.raises(RpcError) as e:
            client.call("echo", Echo(1), Echo, timeout=5)
        assert e.value.code == ErrorCode.FRAME_TOO_LARGE
        assert client.connections == 0  # the stream is out of sync: connection dropped
    finally:
        t.join(5)
        listener.close()


def test_timeout_then_recovers(server_loop):
    srv, port = _serve(server_loop)
    try:
        with BlockingRpcClient("127.0.0.1", port) as client:
            with pytest.raises(RpcTimeoutError):
                client.call("sleep", Sleep(2.0), Sleep, timeout=0.2)
            # The late answer went with the dropped connection; the next call is clean.
            assert client.call("echo", Echo(5), Echo, timeout=5).seq == 5
    finally:
        srv.stop_in()


def test_server_restart_and_unreachable(server_loop):
    port = free_port()
    srv, _ = _serve(server_loop, port=port)
    client = BlockingRpcClient("127.0.0.1", port, connect_timeout=2.0)
    assert client.call("echo", Echo(1), Echo, timeout=5).seq == 1
    srv.stop_in()
    with pytest.raises(RpcConnectionError):
        client.call("echo", Echo(2), Echo, timeout=5)
    with pytest.raises(RpcConnectionError):  # nobody listening: a clear error, no hang
        client.call("echo", Echo(3), Echo, timeout=5)
    srv2, _ = _serve(server_loop, port=port)
    try:
        assert client.call("echo", Echo(4), Echo, timeout=5).seq == 4
    finally:
        client.close()
        srv2.stop_in()


def test_peer_that_is_not_an_rpc_server():
    """Garbage instead of a hello is a clear error within connect_timeout, never a hang."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        conn.sendall(b"\x00\x00\x00\x03abc")
        conn.recv(100)
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        with pytest.raises(RpcConnectionError):
            BlockingRpcClient("127.0.0.1", port, connect_timeout=2.0).call("echo", Echo(), Echo)
    finally:
        t.join(5)
        listener.close()


def test_busy_poll_gets_prompt_and_late_replies_and_leaves_the_socket_blocking(server_loop):
    """A client that polls for its reply (busy_poll) still gets one that comes after the poll
    window, and a call without a deadline finds its socket blocking again afterwards (a
    multi-read frame would otherwise fail with BlockingIOError)."""
    srv, port = _serve(server_loop)
    try:
        with BlockingRpcClient("127.0.0.1", port, busy_poll=0.002) as client:
            for seq in range(20):  # prompt: answered inside the poll window
                assert client.call("echo", Echo(seq), Echo, timeout=5).seq == seq
            late = client.call("sleep", Sleep(0.05), Sleep, timeout=5)  # after the window
            assert late == Sleep(0.05)
            big = bytes(range(256)) * 2048  # 512 KiB: many reads after the polled first one
            assert client.call("echo_async", Echo(8, big), Echo, timeout=None).payload == big
            conn = client._local.conn
            assert conn.sock.gettimeout() is None
            with pytest.raises(RpcTimeoutError):  # deadlines still hold while polling
                client.call("sleep", Sleep(2.0), Sleep, timeout=0.2)
            assert client.call("echo", Echo(9), Echo, timeout=5).seq == 9
    finally:
        srv.stop_in()
