"""Start a real Mooncake store cluster: a ``mooncake_master`` plus a process that holds the pool.

Why a separate holder process: in Mooncake's embedded mode the pool lives inside the engine that
mounts it and vanishes with it, so a "cross-process hit" would measure nothing. Here the master
and a segment-mounting holder outlive every engine, like a real deployment, and tests can kill
either one to prove that engines survive a store failure.

``MooncakeCluster`` writes a Mooncake-format JSON config (``mode: standalone-store``, no segment
of its own) that clients - our connector and vLLM's built-in ``MooncakeStoreConnector`` - read
through ``MOONCAKE_CONFIG_PATH`` or the connector's ``store_config_path`` extra key.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mooncake_connector.testing._processes import MasterAndHolder
from transfer.testing import free_port, wait_for_port

__all__ = ["MooncakeCluster", "find_mooncake_master"]


def find_mooncake_master() -> str:
    """Path of the ``mooncake_master`` binary: next to this interpreter first, then on PATH."""
    local = Path(sys.executable).parent / "mooncake_master"
    if local.exists():
        return str(local)
    found = shutil.which("mooncake_master")
    if found is None:
        raise FileNotFoundError("mooncake_master not found (pip install mooncake-transfer-engine-non-cuda)")
    return found


@dataclass
class MooncakeCluster(MasterAndHolder):
    """A real ``mooncake_master`` (with its HTTP metadata server) and a pool-holding process."""

    segment_size: int = 2 << 30
    workdir: Path | None = None
    master_port: int = 0
    metadata_port: int = 0

    @property
    def master_address(self) -> str:
        return f"127.0.0.1:{self.master_port}"

    @property
    def metadata_server(self) -> str:
        return f"http://127.0.0.1:{self.metadata_port}/metadata"

    @property
    def config_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "mooncake_client.json"

    def client_config(self) -> dict[str, Any]:
        """Mooncake JSON for clients that hold no segment (engines, benchmarks)."""
        return {
            "mode": "standalone-store",
            "local_hostname": "127.0.0.1",
            "metadata_server": self.metadata_server,
            "master_server_address": self.master_address,
            "protocol": "tcp",
            "device_name": "",
            "global_segment_size": 0,
            "local_buffer_size": 64 << 20,
        }

    def start(self, timeout: float = 30.0) -> "MooncakeCluster":
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="mooncake-cluster-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.master_port = self.master_port or free_port()
        self.metadata_port = self.metadata_port or free_port()
        self.config_path.write_text(json.dumps(self.client_config()))
        self.start_master(timeout)
        self.start_holder(timeout)
        return self

    def start_master(self, timeout: float = 30.0) -> None:
        assert self.workdir is not None
        log = open(self.workdir / "master.log", "ab")
        self._logs.append(log)
        self._master = subprocess.Popen(
            [find_mooncake_master(), "--enable_http_metadata_server=true",
             f"--http_metadata_server_port={self.metadata_port}",
             "--http_metadata_server_host=127.0.0.1", f"--rpc_port={self.master_port}",
             "--rpc_address=127.0.0.1", f"--metrics_port={free_port()}",
             "--default_kv_lease_ttl=2000"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port("127.0.0.1", self.master_port, timeout)
        wait_for_port("127.0.0.1", self.metadata_port, timeout)

    def start_holder(self, timeout: float = 30.0) -> None:
        assert self.workdir is not None
        log_path = self.workdir / "holder.log"
        log = open(log_path, "ab")
        self._logs.append(log)
        cfg = {**self.client_config(), "global_segment_size": self.segment_size}
        self._holder = subprocess.Popen(
            [sys.executable, "-m", "mooncake_connector.testing._store_holder", json.dumps(cfg)],
            stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        assert self._holder.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline and self._holder.poll() is None:
            line = self._holder.stdout.readline()
            if line.startswith(b"READY"):
                return
        self.stop()
        raise RuntimeError(f"store holder did not start: {line!r}\n{log_path.read_text()[-2000:]}")
