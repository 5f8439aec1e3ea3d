"""The blocking client and the background event loop that sync code runs RPC on."""
from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

from transfer.rpc import (
    BackgroundLoop,
    ErrorCode,
    RpcClient,
    RpcConnectionError,
    RpcError,
    RpcTimeoutError,
    SyncRpcClient,
    get_background_loop,
)
from transfer.rpc.testing import Echo, RpcServerProcess, Sleep, build_test_server

pytestmark = pytest.mark.timeout(60)

SECRET = b"correct horse battery staple"


# -- sync client and background loop ------------------------------------------------------------


def test_sync_client_from_many_threads_against_start_in_server():
    with BackgroundLoop(name="test-server-loop") as server_loop:
        srv = build_test_server(secret=SECRET)
        port = srv.start_in(server_loop)
        try:
            sync = SyncRpcClient("127.0.0.1", port, secret=SECRET)
            errors: list[BaseException] = []

            def worker(k: int) -> None:
                try:
                    for i in range(200):
                        method = "echo" if i % 2 else "echo_async"
                        assert sync.call(method, Echo(k * 1000 + i), Echo).seq == k * 1000 + i
                except BaseException as e:  # surfaced below
                    errors.append(e)

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert not errors, errors
            with pytest.raises(RpcError) as ei:
                sync.call("fail", Echo(1), Echo)
            assert ei.value.code == ErrorCode.INTERNAL
            sync.close()
            with pytest.raises(RpcConnectionError):
                sync.call("echo", Echo(), Echo)
        finally:
            srv.stop_in()


def test_sync_client_timeout_and_errors():
    proc = RpcServerProcess().start()
    try:
        with SyncRpcClient("127.0.0.1", proc.port) as sync:
            t0 = time.monotonic()
            with pytest.raises(RpcTimeoutError):
                sync.call("sleep", Sleep(2.0), Sleep, timeout=0.2)
            assert time.monotonic() - t0 < 1.5
            assert sync.call("echo", Echo(1), Echo) == Echo(1)
            with pytest.raises(RpcError) as ei:
                sync.call("nope", Echo(), Echo)
            assert ei.value.code == ErrorCode.UNKNOWN_METHOD
            with pytest.raises(TypeError):
                sync.call("echo", object(), Echo)  # type: ignore[arg-type]
            proc.kill()
            with pytest.raises(RpcConnectionError):
                sync.call("echo", Echo(2), Echo)
    finally:
        proc.stop()


def test_sync_call_without_timeout_notices_its_loop_stopping():
    proc = RpcServerProcess().start()
    bg = BackgroundLoop()
    try:
        sync = SyncRpcClient("127.0.0.1", proc.port, loop=bg)
        sync.connect()
        threading.Timer(0.3, bg.stop).start()
        t0 = time.monotonic()
        with pytest.raises(RpcConnectionError):
            sync.call("sleep", Sleep(30.0), Sleep, timeout=None)
        assert time.monotonic() - t0 < 5.0
        with pytest.raises(RpcConnectionError, match="background loop is stopped"):
            sync.call("echo", Echo(), Echo)
    finally:
        bg.stop()
        proc.stop()


def test_async_client_and_server_on_uvloop():
    """The async tests above run on asyncio's loop; production runs on uvloop."""
    with BackgroundLoop() as bg:
        assert "uvloop" in type(bg.loop).__module__

        async def scenario() -> None:
            srv = build_test_server(secret=SECRET)
            await srv.start()
            try:
                async with RpcClient("127.0.0.1", srv.port, secret=SECRET) as c:
                    resps = await asyncio.gather(*(
                        c.call("sleep", Sleep(0.001 * (i % 7), seq=i), Sleep) for i in range(300)))
                    assert [r.seq for r in resps] == list(range(300))
                    with pytest.raises(RpcTimeoutError):
                        await c.call("sleep", Sleep(1.0), Sleep, timeout=0.05)
                    with pytest.raises(RpcError):
                        await c.call("fail", Echo(), Echo)
                    assert await c.call("echo", Echo(9, b"u"), Echo) == Echo(9, b"u")
                    in_flight = asyncio.ensure_future(c.call("sleep", Sleep(30.0), Sleep))
                    await asyncio.sleep(0.05)
                    await asyncio.wait_for(srv.stop(), 5)  # with a client still connected
                    with pytest.raises(RpcConnectionError):
                        await asyncio.wait_for(in_flight, 5)
            finally:
                await srv.stop()

        bg.run(scenario(), timeout=30)


def test_sync_client_refuses_to_deadlock_on_its_own_loop():
    with BackgroundLoop() as bg:
        sync = SyncRpcClient("127.0.0.1", 1, loop=bg)

        async def inside() -> None:
            sync.call("echo", Echo(), Echo)

        with pytest.raises(RuntimeError, match="deadlock"):
            bg.run(inside(), timeout=5)


def test_background_loop_run_result_exception_timeout():
    with BackgroundLoop() as bg:
        async def add(a: int, b: int) -> int:
            await asyncio.sleep(0)
            return a + b

        assert bg.run(add(2, 3), timeout=5) == 5

        async def boom() -> None:
            raise KeyError("boom")

        with pytest.raises(KeyError):
            bg.run(boom(), timeout=5)
        cancelled = threading.Event()

        async def forever() -> None:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        with pytest.raises(TimeoutError):
            bg.run(forever(), timeout=0.1)
        assert cancelled.wait(5)
        done = threading.Event()
        bg.call_soon(done.set)
        assert done.wait(5)

        async def nested() -> None:
            bg.run(add(1, 1))

        with pytest.raises(RuntimeError, match="deadlock"):
            bg.run(nested(), timeout=5)
    assert not bg.is_running
    with pytest.raises(RuntimeError, match="stopped"):
        bg.run(add(1, 2))
    bg.stop()  # idempotent


def test_global_background_loop_is_shared_and_recreated_after_fork():
    bg = get_background_loop()
    assert get_background_loop() is bg and bg.is_running
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must get a new, working loop
        try:
            child = get_background_loop()

            async def answer() -> int:
                return 7

            ok = child is not bg and child.run(answer(), timeout=5) == 7
            with pytest.raises(RuntimeError, match="another process"):
                bg.run(answer())
            os.write(write_fd, b"ok" if ok else b"no")
        except BaseException as e:  # report, never return into pytest in the child
            os.write(write_fd, repr(e).encode()[:200])
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        _, status = os.waitpid(pid, 0)
        assert os.read(read_fd, 256) == b"ok"
        assert status == 0
    finally:
        os.close(read_fd)
