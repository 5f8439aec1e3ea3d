"""Network namespaces as separate hosts, for tests of real multi-host behaviour on one machine.

Loopback cannot show what a network does to a distributed system: every peer shares one address
family of ``127.0.0.1``, a dead peer answers with an instant RST, and nothing can cut one node off
while its process keeps running. :class:`NetnsLab` builds a small switched LAN from iproute2
parts instead::

    with NetnsLab(3) as lab:                      # needs root; see netns_available()
        a, b, c = lab.hosts
        server = a.popen([sys.executable, "-m", "transfer.metadata", "--host", a.address])
        ...
        b.link_down()                             # b's cable is pulled: its packets vanish

Layout: one namespace holds a bridge (the switch); every host is a namespace of its own with
loopback up and an ``eth0`` veth whose other end is a port of that bridge. The subnet
(``10.250.X.0/24``) exists only inside namespaces the lab creates, so nothing is ever routed
outside them and labs of parallel test runs cannot collide: namespace names carry the owning
pid and a per-process sequence number, and each lab sweeps away labs left by dead processes.

Closing a lab kills every process still inside its namespaces (they were all started by it or
its user) and deletes the namespaces, which destroys their veths and the bridge with them.
"""
from __future__ import annotations

import contextlib
import ipaddress
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from transfer.testing import stop_process

__all__ = ["Host", "NetnsError", "NetnsLab", "lab_namespaces_on_system", "netns_available",
           "sweep_stale_labs"]

#: Namespace names are ``mclab<pid>x<seq>-<role>``; the pid tells the sweep who owns a lab.
_PREFIX = "mclab"
_NAME_RE = re.compile(rf"^{_PREFIX}(\d+)x(\d+)-(\w+)$")
_sequence = itertools.count()
_available: tuple[bool, str] | None = None

# A private /dev/shm per process: namespaces otherwise share the host's, and the transfer
# engine's same-host transports (shm, and the file transport, which finds its peers through a
# probe file there) would move bytes through memory instead of the network under test.
_PRIVATE_SHM = ('mount -t tmpfs -o mode=1777 mooncake-netns-shm /dev/shm && exec "$0" "$@"')


class NetnsError(RuntimeError):
    """An ``ip`` command failed while building or changing the lab."""


def _ip(*args: str, timeout: float = 10.0) -> str:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsError(f"ip {' '.join(args)}: {e}") from e
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def netns_available() -> tuple[bool, str]:
    """Whether this process can build a lab, and if not why (the reason tests skip with).

    Checked once per process by really creating and deleting a namespace: being root is not
    enough inside a container without ``CAP_SYS_ADMIN``.
    """
    global _available
    if _available is not None:
        return _available
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        _available = (False, "network namespaces need root (ip netns add)")
    elif shutil.which("ip") is None:
        _available = (False, "the ip command (iproute2) is not installed")
    else:
        probe = f"{_PREFIX}{os.getpid()}x{next(_sequence)}-probe"
        try:
            _ip("netns", "add", probe)
            _ip("-n", probe, "link", "add", "probe0", "type", "bridge")
            _available = (True, "")
        except NetnsError as e:
            _available = (False, f"cannot create network namespaces: {e}")
        finally:
            with contextlib.suppress(NetnsError):
                _ip("netns", "delete", probe)
    return _available


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    # `ip netns list` prints "name (id: N)" for namespaces with an id assigned.
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def _kill_inside(namespace: str) -> None:
    """SIGKILL whatever still runs in ``namespace`` (only lab namespaces are ever passed)."""
    with contextlib.suppress(NetnsError):
        for pid in _ip("netns", "pids", namespace).split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)


def sweep_stale_labs() -> list[str]:
    """Delete the namespaces of labs whose owning process is gone; returns their names.

    A test killed mid-run (SIGKILL, a crashed interpreter) cannot clean up after itself.
    """
    removed = []
    for name in _namespaces():
        m = _NAME_RE.match(name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        _kill_inside(name)
        with contextlib.suppress(NetnsError):
            _ip("netns", "delete", name)
            removed.append(name)
    return removed


@dataclass
class Host:
    """One host of a lab: a namespace with loopback and ``eth0`` at ``address``."""

    name: str
    address: str
    namespace: str
    _lab: NetnsLab = field(repr=False)
    _port: str = field(repr=False)  # the bridge-side end of this host's veth
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside this host (for asyncio's subprocess functions);
        with the lab's ``private_shm`` the process gets a ``/dev/shm`` of its own."""
        inner = ["sh", "-c", _PRIVATE_SHM, *argv] if self._lab.private_shm else list(argv)
        return ["ip", "netns", "exec", self.namespace, *inner]

    def popen(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              **kwargs: object) -> subprocess.Popen:
        """Start ``argv`` inside this host; the lab stops it when it closes (if still running).

        ``env`` is the complete environment (default: this process's); other keyword
        arguments go to :class:`subprocess.Popen`.
        """
        proc = subprocess.Popen(self.command(argv), env=dict(env) if env is not None else None,
                                **kwargs)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], *, timeout: float = 30.0,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this host to completion and capture its output."""
        return subprocess.run(self.command(argv), capture_output=True, text=True,
                              timeout=timeout, check=check)

    def link_down(self) -> None:
        """Pull this host's cable at the switch: its processes keep running, but every packet
        to or from it is silently lost (no RST, no ICMP), as when a node drops off the net."""
        _ip("-n", self._lab.switch, "link", "set", self._port, "down")

    def link_up(self) -> None:
        """Plug the cable back in."""
        _ip("-n", self._lab.switch, "link", "set", self._port, "up")

    def limit_rate(self, bytes_per_s: float | None) -> None:
        """Cap what this host sends (a token bucket on ``eth0``); ``None`` lifts the cap.

        Veths move gigabytes a second; a cap makes a transfer last long enough to interfere
        with it, and models a slow NIC.
        """
        with contextlib.suppress(NetnsError):
            _ip("netns", "exec", self.namespace, "tc", "qdisc", "del", "dev", "eth0", "root")
        if bytes_per_s is not None:
            if bytes_per_s <= 0:
                raise ValueError("bytes_per_s must be positive")
            burst = max(int(bytes_per_s / 50), 64 * 1024)  # ~20 ms worth of bytes
            _ip("netns", "exec", self.namespace, "tc", "qdisc", "add", "dev", "eth0", "root",
                "tbf", "rate", f"{int(bytes_per_s)}bps", "burst", str(burst), "latency", "100ms")

    def counters(self) -> tuple[int, int]:
        """``(rx_bytes, tx_bytes)`` of this host's ``eth0``: what really crossed the wire."""
        stats = json.loads(_ip("-n", self.namespace, "-j", "-s", "link", "show", "eth0"))
        return int(stats[0]["stats64"]["rx"]["bytes"]), int(stats[0]["stats64"]["tx"]["bytes"])

    def stop_processes(self, timeout: float = 5.0) -> None:
        """SIGTERM (then SIGKILL) the processes :meth:`popen` started here."""
        for proc in self._procs:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                stop_process(proc, timeout)
        self._procs.clear()


class NetnsLab:
    """A switch and ``n`` hosts in network namespaces; use as a context manager.

    ``private_shm`` (default) gives every process started in a host its own ``/dev/shm``, so
    that same-host transports cannot bypass the network between "hosts" that really share this
    machine's memory. ``mtu`` is the hosts' link MTU.
    """

    def __init__(self, n: int, *, private_shm: bool = True, mtu: int = 1500) -> None:
        if not 1 <= n <= 200:
            raise ValueError("a lab has 1 to 200 hosts")
        self.n = n
        self.private_shm = private_shm
        self.mtu = mtu
        seq = next(_sequence)
        self.prefix = f"{_PREFIX}{os.getpid()}x{seq}"
        # Private, never routed beyond the lab's own namespaces; varying X only makes
        # addresses in logs tell labs apart.
        self.subnet = ipaddress.ip_network(f"10.250.{(os.getpid() + seq) % 250}.0/24")
        self.switch = f"{self.prefix}-sw"
        self.hosts: list[Host] = []
        self._created: list[str] = []

    def __enter__(self) -> NetnsLab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> NetnsLab:
        """Build the lab; on any failure, whatever was built is removed and the error raised."""
        ok, why = netns_available()
        if not ok:
            raise NetnsError(why)
        sweep_stale_labs()
        try:
            self._add_namespace(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            addresses = self.subnet.hosts()
            for i in range(self.n):
                ns = f"{self.prefix}-h{i}"
                self._add_namespace(ns)
                address = str(next(addresses))
                port = f"p{i}"
                # Created inside the switch namespace with its peer moved straight into the
                # host's: no interface of the lab ever appears in the root namespace.
                _ip("-n", self.switch, "link", "add", port, "mtu", str(self.mtu), "type", "veth",
                    "peer", "name", "eth0", "mtu", str(self.mtu), "netns", ns)
                _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                self.hosts.append(Host(f"h{i}", address, ns, self, port))
        except BaseException:
            self.close()
            raise
        return self

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._created.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def close(self) -> None:
        """Stop processes, delete every namespace of the lab. Idempotent, never raises."""
        for host in self.hosts:
            host.stop_processes()
        for name in reversed(self._created):
            _kill_inside(name)
            with contextlib.suppress(NetnsError):
                _ip("netns", "delete", name)
        self._created.clear()
        self.hosts.clear()

    def namespaces(self) -> list[str]:
        """Names of this lab's namespaces that currently exist (empty once closed)."""
        return [n for n in _namespaces() if n.startswith(self.prefix + "-")]


def lab_namespaces_on_system() -> list[str]:
    """Every lab namespace on the system, any owner (for leak checks)."""
    return [n for n in _namespaces() if _NAME_RE.match(n)]

