"""Start our own store cluster: ``python -m store.master`` plus a standalone ``python -m store.node``.

The counterpart of :class:`~mooncake_connector.testing.mooncake_cluster.MooncakeCluster` for the
store in this repository (``store_impl="store"``, the connector's default), with the same
interface (``config_path``, ``client_config()``, ``kill_master()``, ``kill_holder()``), so
tests and benchmarks can run either store. The node holds the pool and outlives every engine,
like a real deployment; engines are clients that contribute no memory.
"""
from __future__ import annotations

import json
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mooncake_connector.testing._processes import MasterAndHolder
from transfer.testing import free_port, wait_for_port

__all__ = ["StoreCluster"]

_REPO = Path(__file__).resolve().parents[2]


@dataclass
class StoreCluster(MasterAndHolder):
    """A real ``store.master`` and a ``store.node`` holding ``segment_size`` bytes of the pool."""

    segment_size: int = 2 << 30
    workdir: Path | None = None
    master_port: int = 0
    client_ttl: float = 2.0
    put_start_timeout: float = 5.0
    """The master reclaims a put not ended this long after it started; layer-wise saves
    (``save_window_s``) must finish well within it."""
    segments: list[str] = field(default_factory=list, init=False)

    @property
    def master_address(self) -> str:
        return f"127.0.0.1:{self.master_port}"

    @property
    def config_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "store_client.json"

    def client_config(self) -> dict[str, Any]:
        """Mooncake-format JSON for clients that hold no segment (engines, benchmarks)."""
        return {
            "mode": "standalone-store",
            "local_hostname": "127.0.0.1",
            "metadata_server": "P2PHANDSHAKE",
            "master_server_address": self.master_address,
            "protocol": "tcp",
            "device_name": "",
            "global_segment_size": 0,
            "local_buffer_size": 64 << 20,
        }

    def start(self, timeout: float = 30.0) -> "StoreCluster":
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="store-cluster-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.master_port = self.master_port or free_port()
        self.config_path.write_text(json.dumps(self.client_config()))
        try:
            self.start_master(timeout)
            self.start_holder(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _log(self, name: str) -> Any:
        assert self.workdir is not None
        log = open(self.workdir / name, "ab")
        self._logs.append(log)
        return log

    def start_master(self, timeout: float = 30.0) -> None:
        self._master = subprocess.Popen(
            [sys.executable, "-m", "store.master", "--rpc-port", str(self.master_port),
             "--metrics-port", str(free_port()), "--enable-http-metadata-server", "false",
             "--client-ttl", str(self.client_ttl),
             "--put-start-timeout", str(self.put_start_timeout),
             "--log-level", "WARNING"],
            cwd=_REPO, stdout=self._log("master.log"), stderr=subprocess.STDOUT,
            start_new_session=True)
        wait_for_port("127.0.0.1", self.master_port, timeout)

    def start_holder(self, timeout: float = 30.0) -> None:
        """Start the store node and wait (bounded) for its ``READY <segments>`` line."""
        self._holder = subprocess.Popen(
            [sys.executable, "-m", "store.node", "--local-hostname", "127.0.0.1",
             "--metadata-server", "P2PHANDSHAKE", "--master-server-address", self.master_address,
             "--master-client-ttl", str(self.client_ttl),
             "--global-segment-size", str(self.segment_size), "--log-level", "WARNING"],
            cwd=_REPO, stdout=subprocess.PIPE, stderr=self._log("node.log"), text=True,
            start_new_session=True)
        assert self._holder.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self._holder.stdout], [], [], 0.5)
            if not ready:
                continue
            line = self._holder.stdout.readline()
            if line.startswith("READY "):
                self.segments = line.split()[1:]
                return
            if not line:
                break
        assert self.workdir is not None
        raise RuntimeError(f"store node did not start (rc {self._holder.poll()}):\n"
                           f"{(self.workdir / 'node.log').read_text()[-2000:]}")
