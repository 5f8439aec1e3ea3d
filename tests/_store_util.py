"""Shared helpers of the store client tests: a real master process, clients on own engines."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from store.client import StoreClient
from transfer.config import MooncakeConfig
from transfer.testing import free_port, stop_process, wait_for_port

MIB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def master_process(*extra: str, port: int | None = None) -> Iterator[str]:
    """``python -m store.master`` on free ports; yields its RPC address."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "store.master", "--rpc-port", str(port),
           "--metrics-port", str(free_port()), "--enable-http-metadata-server", "false",
           "--client-ttl", "2", "--put-start-timeout", "5", *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port("127.0.0.1", port, 20)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc)


def client_config(master: str, **overrides: Any) -> MooncakeConfig:
    settings: dict[str, Any] = {"local_hostname": "127.0.0.1", "metadata_server": "P2PHANDSHAKE",
                                "master_server_address": master, "global_segment_size": 32 * MIB,
                                "local_buffer_size": 32 * MIB,
                                "master": {"client_ttl": 2.0}}
    settings.update(overrides)
    return MooncakeConfig().replace(**settings)


def new_client(master: str, *, checksum: bool = False, **overrides: Any) -> StoreClient:
    """A client on its own engine (several per test process)."""
    return StoreClient(client_config(master, **overrides), own_engine=True, checksum=checksum,
                       heartbeat_interval=0.3)


class NodeProcess:
    """A ``python -m store.node`` process; ``segments`` are its segment names once ready."""

    def __init__(self, master: str, *extra: str, ttl: float = 2.0) -> None:
        import select
        import time

        cmd = [sys.executable, "-m", "store.node", "--local-hostname", "127.0.0.1",
               "--metadata-server", "P2PHANDSHAKE", "--master-client-ttl", str(ttl),
               "--global-segment-size", "32MB", "--log-level", "WARNING", *extra]
        if not any(a.startswith("--etcd") for a in extra):
            cmd += ["--master-server-address", master]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith("READY "):
                    self.segments = line.split()[1:]
                    return
                if not line:
                    break
        stop_process(self.proc)
        raise RuntimeError(f"store node did not start (rc {self.proc.poll()})")

    def kill9(self) -> None:
        import signal

        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        stop_process(self.proc)
