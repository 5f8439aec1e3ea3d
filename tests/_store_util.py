"""Shared helpers of the store client tests: a real master process, clients on own engines."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

from store.client import StoreClient
from transfer.config import MooncakeConfig
from transfer.testing import free_port, stop_process, wait_for_port

MIB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def master_process(*extra: str, port: int | None = None) -> Iterator[str]:
    """``python -m store.master`` on free ports; yields its RPC address.

    Its log goes to a file, not a pipe nobody reads (a full pipe would stall the master). A
    master that exits before it listens is reported with that log; if it lost one of its
    ports to another process (they are picked free before it binds them), it is started again
    on fresh ones, twice at most. A CI run once lost this fixture's master with no trace."""
    with tempfile.TemporaryFile() as log:
        for attempt in range(3):
            rpc = port or free_port()
            cmd = [sys.executable, "-m", "store.master", "--rpc-port", str(rpc),
                   "--metrics-port", str(free_port()), "--enable-http-metadata-server", "false",
                   "--client-ttl", "2", "--put-start-timeout", "5", *extra]
            log.seek(0)
            log.truncate()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
            try:
                wait_for_port("127.0.0.1", rpc, 20, proc=proc)
                break
            except (ChildProcessError, TimeoutError) as e:
                stop_process(proc)
                log.seek(0)
                text = log.read().decode("utf-8", "replace")
                if port is None and attempt < 2 and "in use" in text:
                    continue
                raise RuntimeError(f"master {e}:\n{text[-3000:]}") from None
        try:
            yield f"127.0.0.1:{rpc}"
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
