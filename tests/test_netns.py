"""The network-namespace lab (:mod:`transfer.netns`): hosts reach each other over real TCP, a
pulled cable makes connects fail within their timeout, and nothing is left behind."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from transfer.netns import (NetnsError, NetnsLab, lab_namespaces_on_system, netns_available,
                            sweep_stale_labs)

_OK, _WHY = netns_available()
pytestmark = [pytest.mark.netns, pytest.mark.timeout(60),
              pytest.mark.skipif(not _OK, reason=_WHY or "network namespaces available")]

# Answers every connection with b"pong" after reading b"ping"; prints "ready" once listening.
_SERVER = """
import socket, sys
s = socket.create_server((sys.argv[1], 7000))
print("ready", flush=True)
while True:
    c, _ = s.accept()
    with c:
        if c.recv(4) == b"ping":
            c.sendall(b"pong")
"""
# Exit 0 after a ping/pong round trip to argv[1]:7000, 3 after a connect timeout of 1 s.
_CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 7000), timeout=1.0) as c:
        c.sendall(b"ping")
        sys.exit(0 if c.recv(4) == b"pong" else 1)
except (TimeoutError, socket.timeout):
    sys.exit(3)
"""


def _ping(host, address: str) -> tuple[int, float]:
    start = time.monotonic()
    done = host.run([sys.executable, "-c", _CLIENT, address], timeout=20, check=False)
    return done.returncode, time.monotonic() - start


def _start_server(host, address: str) -> subprocess.Popen:
    proc = host.popen([sys.executable, "-c", _SERVER, address], stdout=subprocess.PIPE,
                      text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_hosts_talk_over_tcp_and_a_pulled_link_times_out() -> None:
    with NetnsLab(2) as lab:
        a, b = lab.hosts
        assert a.address != b.address and a.address.startswith("10.250.")
        server = _start_server(a, a.address)
        assert _ping(b, a.address)[0] == 0
        rx, tx = a.counters()
        assert rx > 0 and tx > 0  # the round trip went through a's eth0, not a shortcut
        a.link_down()
        code, took = _ping(b, a.address)
        assert code == 3 and took < 10, (code, took)
        a.link_up()
        deadline = time.monotonic() + 10
        while (code := _ping(b, a.address)[0]) != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert code == 0
        assert server.poll() is None
    assert server.poll() is not None, "closing the lab stops its processes"
    assert lab.namespaces() == []


def test_loopback_is_up_inside_each_host() -> None:
    with NetnsLab(1) as lab:
        (h,) = lab.hosts
        _start_server(h, "127.0.0.1")
        assert _ping(h, "127.0.0.1")[0] == 0


def test_the_lab_subnet_never_reaches_the_root_namespace() -> None:
    with NetnsLab(2) as lab:
        prefix = str(lab.subnet.network_address).rsplit(".", 1)[0] + "."
        root = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
        assert prefix not in root and prefix not in routes
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert lab.prefix not in links


def test_failure_inside_the_lab_still_cleans_up() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with NetnsLab(2) as lab:
            lab.hosts[0].popen(["sleep", "60"])
            raise RuntimeError("boom")
    assert lab.namespaces() == []
    assert not [n for n in lab_namespaces_on_system() if n.startswith(lab.prefix)]


def test_parallel_labs_do_not_collide() -> None:
    with NetnsLab(1) as one, NetnsLab(1) as two:
        assert one.prefix != two.prefix
        assert set(one.namespaces()).isdisjoint(two.namespaces())


def test_stale_labs_of_dead_processes_are_swept() -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    stale = f"mclab{pid_max + 1}x0-h0"  # a pid no process can have: its owner is gone
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in sweep_stale_labs()
        assert stale not in lab_namespaces_on_system()
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True)


def test_bad_requests_get_clear_errors() -> None:
    with pytest.raises(ValueError):
        NetnsLab(0)
    with NetnsLab(1) as lab:
        host = lab.hosts[0]
        with pytest.raises(ValueError):
            host.limit_rate(0)
    with pytest.raises(NetnsError, match="link set"):
        host.link_down()  # its lab is gone
