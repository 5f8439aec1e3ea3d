"""A store cluster spread over network-namespace hosts, for multi-host fault tests and benchmarks.

Loopback cannot cut one node off while its process lives, and every peer shares one address.
:class:`StoreLab` builds the deployment the issue describes on a :class:`~transfer.netns.NetnsLab`
instead, every process on a host of its own and reached by its lab address::

    infra    etcd (HA election, master discovery) + HTTP metadata server
    masters  one leader and standbys (``--enable_ha``)
    nodes    ``python -m store.node``, each lending DRAM
    clients  workload workers (``python -m store.testing_netns.worker``)
    relay    (optional) ``python -m transfer.relay`` processes between clients and nodes

Every process has the cluster secret (RPC, TCP data plane, and the metadata server's bearer
token) and the shm transport off (namespaces share this machine's memory); workers use CRC
checksums. The test process itself cannot reach the
lab's subnet, so everything that talks to the cluster runs in a host: a worker
(:mod:`.worker`) is driven with JSON lines on its stdin/stdout (:class:`Worker`). The fault
scenarios themselves, shared by the tests and ``benchmarks/fault_bench.py``, are in
:mod:`.scenarios`.

Routing a node's data path through a relay rewrites the node's descriptor in the metadata
server (its ``tcp`` endpoint becomes the relay's), so every engine that reads it afterwards -
the workers - reaches the node only through the relay; control RPC to the master is unaffected.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfer.netns import Host, NetnsLab
from transfer.relay import parse_hostport
from transfer.testing import tail_file

__all__ = ["SECRET", "LabProcess", "RelayProcess", "StoreLab", "Worker", "lab_env"]

SECRET = "netns-store-lab-secret"
ETCD_PORT, METADATA_PORT, MASTER_PORT, METRICS_PORT = 2379, 8080, 50051, 9003


def lab_env(**extra: str) -> dict[str, str]:
    """Environment of every lab process: auth on, no same-host shortcuts, short timeouts (a cut
    host must cost seconds, not the default tens of seconds)."""
    env = dict(os.environ)
    env.update({"MOONCAKE_AUTH_SECRET": SECRET, "MC_METADATA_HTTP_TOKEN": SECRET,
                "MOONCAKE_TRANSFER_ENABLE_SHM": "false",
                "MOONCAKE_TRANSFER_IO_TIMEOUT": "2", "MOONCAKE_RPC_CONNECT_TIMEOUT": "1",
                "MOONCAKE_RPC_REQUEST_TIMEOUT": "5", "ETCD_UNSUPPORTED_ARCH":
                os.environ.get("ETCD_UNSUPPORTED_ARCH", ""), **extra})
    return env


class LabProcess:
    """A process in a lab host whose stdout is read line by line with a deadline."""

    def __init__(self, host: Host, argv: Sequence[str], env: dict[str, str] | None = None,
                 stdin: bool = False) -> None:
        self.host = host
        # stderr goes to a file, not a pipe nobody drains: a process logging warnings for a
        # while (a cut host's heartbeats) would block on a full pipe and look hung.
        fd, self.log_path = tempfile.mkstemp(prefix=f"mooncake-lab-{host.name}-", suffix=".log")
        with os.fdopen(fd, "w") as log:
            self.proc = host.popen(argv, env=env or lab_env(), stdout=subprocess.PIPE,
                                   stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                   stderr=log, text=True, bufsize=1)
        # A thread turns stdout into a queue of lines: a wait with a deadline, and no line
        # stuck in a file buffer that a select() on the pipe cannot see.
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(OSError, ValueError):
            for text in self.proc.stdout:
                self._lines.put(text)
        self._lines.put("")  # EOF

    def line(self, timeout: float = 30.0) -> str:
        """The next stdout line; raises with the process's stderr if it exits or stalls."""
        try:
            text = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no output from {self.proc.args[-1]!r} in {timeout}s") from None
        if not text:
            self._lines.put("")
            raise RuntimeError(f"process exited ({self.proc.wait()}): {self.log_tail()}")
        return text

    def log_tail(self, n: int = 40) -> str:
        """The last ``n`` lines the process wrote to stderr."""
        return tail_file(Path(self.log_path), n)

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0, keep_log: bool = False) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        if self.proc.stdin is not None:  # stdout is the reader thread's; it ends at EOF
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        if not keep_log:
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)


class Worker(LabProcess):
    """A store client process in a lab host; :meth:`call` sends one command, returns its reply."""

    def __init__(self, host: Host, lab: StoreLab) -> None:
        super().__init__(host, [sys.executable, "-m", "store.testing_netns.worker",
                                "--host", host.address, "--metadata", lab.metadata_url,
                                "--etcd", lab.etcd_endpoint], stdin=True)
        ready = json.loads(self.line(60))
        self.segment: str = ready["segment"]

    def call(self, cmd: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        reply: dict[str, Any] = json.loads(self.line(timeout))
        if "error" in reply:
            raise RuntimeError(f"worker {cmd}: {reply['error']}")
        return reply


class RelayProcess(LabProcess):
    """``python -m transfer.relay`` in a lab host; :meth:`stats` asks it for its counters."""

    def __init__(self, host: Host, target: str, *args: str) -> None:
        super().__init__(host, [sys.executable, "-m", "transfer.relay", "--listen",
                                f"{host.address}:0", "--target", target, *args])
        self.address = self.line(20).rsplit(" ", 1)[1].strip()

    def stats(self) -> dict[str, int]:
        self.proc.send_signal(signal.SIGUSR1)
        return json.loads(self.line(10))  # type: ignore[no-any-return]


@dataclass
class StoreLab:
    """The cluster; use as a context manager. See the module docstring for the layout."""

    nodes: int = 3
    masters: int = 2
    clients: int = 1
    relay: bool = False
    client_ttl: float = 2.0
    leader_lease_ttl: float = 1.0
    segment_size: str = "64MB"
    log_level: str = "WARNING"  # of the nodes, whose logs tell what a fault did to them
    keep_logs: bool = False  # leave every process's stderr file in /tmp (debugging)
    lab: NetnsLab = field(init=False)
    node_procs: list[LabProcess] = field(default_factory=list, init=False)
    node_segments: list[str] = field(default_factory=list, init=False)
    master_procs: list[LabProcess] = field(default_factory=list, init=False)
    relays: list[RelayProcess] = field(default_factory=list, init=False)
    workers: list[Worker] = field(default_factory=list, init=False)
    _infra: list[LabProcess] = field(default_factory=list, init=False)
    _etcd_dir: str = field(default="", init=False)

    def __post_init__(self) -> None:
        self.lab = NetnsLab(1 + self.masters + self.nodes + self.clients + int(self.relay))

    @property
    def infra_host(self) -> Host:
        return self.lab.hosts[0]

    @property
    def master_hosts(self) -> list[Host]:
        return self.lab.hosts[1:1 + self.masters]

    @property
    def node_hosts(self) -> list[Host]:
        return self.lab.hosts[1 + self.masters:1 + self.masters + self.nodes]

    @property
    def client_hosts(self) -> list[Host]:
        start = 1 + self.masters + self.nodes
        return self.lab.hosts[start:start + self.clients]

    @property
    def relay_host(self) -> Host:
        if not self.relay:
            raise RuntimeError("this lab has no relay host")
        return self.lab.hosts[-1]

    @property
    def etcd_endpoint(self) -> str:
        return f"{self.infra_host.address}:{ETCD_PORT}"

    @property
    def metadata_url(self) -> str:
        return f"http://{self.infra_host.address}:{METADATA_PORT}/metadata"

    def __enter__(self) -> StoreLab:
        self.lab.start()
        try:
            self._start_infra()
            for host in self.master_hosts:
                self.master_procs.append(self._start_master(host))
            for host in self.node_hosts:
                self._start_node(host)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for proc in [*self.workers, *self.relays, *self.node_procs, *self.master_procs,
                     *self._infra]:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                proc.stop(5, keep_log=self.keep_logs)
        self.lab.close()
        if self._etcd_dir:
            shutil.rmtree(self._etcd_dir, ignore_errors=True)

    def _wait_port(self, host: Host, address: str, timeout: float = 30.0) -> None:
        h, p = parse_hostport(address)
        host.run([sys.executable, "-c", "import sys; from transfer.testing import wait_for_port;"
                  f"wait_for_port({h!r}, {p}, {timeout})"], timeout=timeout + 10)

    def _start_infra(self) -> None:
        host = self.infra_host
        a = host.address
        client, peer = f"http://{a}:{ETCD_PORT}", f"http://127.0.0.1:{ETCD_PORT + 1}"
        self._etcd_dir = data_dir = tempfile.mkdtemp(prefix="mooncake-lab-etcd-")
        self._infra.append(LabProcess(host, [
            "etcd", "--name", "lab", "--data-dir", data_dir, "--listen-client-urls", client,
            "--advertise-client-urls", client, "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer, "--initial-cluster", f"lab={peer}",
            "--log-level", "error"]))
        self._infra.append(LabProcess(host, [
            sys.executable, "-m", "transfer.metadata", "--host", a, "--port", str(METADATA_PORT),
            "--log-level", "WARNING"]))
        self._wait_port(host, self.etcd_endpoint)
        self._wait_port(host, f"{a}:{METADATA_PORT}")

    def _start_master(self, host: Host) -> LabProcess:
        proc = LabProcess(host, [
            sys.executable, "-m", "store.master", "--enable_ha", "--etcd_endpoints",
            self.etcd_endpoint, "--rpc_host", host.address, "--rpc_port", str(MASTER_PORT),
            "--metrics_port", str(METRICS_PORT), "--enable_http_metadata_server", "false",
            "--leader_lease_ttl", str(self.leader_lease_ttl), "--client_ttl",
            str(self.client_ttl), "--put_start_timeout", "5", "--log-level", "WARNING"])
        self._wait_port(host, f"{host.address}:{MASTER_PORT}")
        return proc

    def _start_node(self, host: Host) -> None:
        proc = LabProcess(host, [
            sys.executable, "-m", "store.node", "--local-hostname", host.address,
            "--metadata-server", self.metadata_url, "--master-enable-ha", "--etcd-endpoints",
            self.etcd_endpoint, "--master-client-ttl", str(self.client_ttl),
            "--global-segment-size", self.segment_size, "--log-level", self.log_level])
        line = proc.line(60)
        if not line.startswith("READY "):
            raise RuntimeError(f"store node on {host.address}: {line!r}")
        self.node_procs.append(proc)
        self.node_segments.append(line.split()[1])

    # -- operations the tests use -------------------------------------------------------------

    def worker(self, i: int = 0) -> Worker:
        """A new workload worker on client host ``i``."""
        worker = Worker(self.client_hosts[i], self)
        self.workers.append(worker)
        return worker

    def restart_master(self, i: int) -> None:
        """Start master ``i`` again (after a kill); it joins as a standby."""
        self.master_procs[i].stop(1)
        self.master_procs[i] = self._start_master(self.master_hosts[i])

    def leader(self, timeout: float = 20.0) -> int:
        """Index of the master process that leads now (asked of etcd from inside the lab)."""
        out = self.infra_host.run([
            sys.executable, "-c", "from store.master import find_master; "
            f"print(find_master({self.etcd_endpoint!r}, timeout={timeout}))"],
            timeout=timeout + 15).stdout.strip()
        addresses = [f"{h.address}:{MASTER_PORT}" for h in self.master_hosts]
        return addresses.index(out)

    def route_via_relays(self, *relay_args: str) -> list[RelayProcess]:
        """Put one relay per node on the relay host and point the nodes' descriptors at them
        (``relay_args`` are ``python -m transfer.relay`` flags). Engines that already cached a
        descriptor keep the direct path: start the workers that should use the relays after."""
        tool = [sys.executable, "-m", "store.testing_netns.worker", "--tcp-endpoint",
                "--metadata", self.metadata_url]
        for segment in self.node_segments:
            target = self._tool(self.relay_host, [*tool, "--segment", segment])
            relay = RelayProcess(self.relay_host, target, *relay_args)
            self.relays.append(relay)
            self._tool(self.relay_host, [*tool, "--segment", segment, "--set", relay.address])
        return self.relays

    def _tool(self, host: Host, argv: Sequence[str]) -> str:
        """Run a one-line-answer command in ``host`` with the lab's environment (its secret
        stays off the command line); returns that line."""
        proc = LabProcess(host, argv)
        try:
            answer = proc.line(30).strip()
            if proc.proc.wait(30) != 0:
                raise RuntimeError(f"{argv[-1]!r} failed: {proc.log_tail()}")
            return answer
        finally:
            proc.stop(5, keep_log=self.keep_logs)
