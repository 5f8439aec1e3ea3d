"""Every listener of the product binds the address it is configured with, and loopback by default.

Issue #10: a component that binds ``0.0.0.0`` when told an address (or by default) is reachable
from networks it was never meant to face. Each product process is started twice - once with its
address flags set to ``127.0.0.2`` (a loopback address other than the default, so a listener
that ignores its configuration shows), once with no address flags as the demo runs it - and its
listening sockets are read from the kernel (psutil): master RPC, master metrics, the master's
HTTP metadata server, the standalone metadata server, a store node's transfer engine (control
RPC and TCP data port), the proxy and a P2P store holder.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psutil
import pytest

from scheduler.proxy.cli import build_parser
from transfer.config import MooncakeConfig
from transfer.testing import free_port, stop_process

pytestmark = pytest.mark.timeout(60)
CONFIGURED = "127.0.0.2"
DEFAULT = "127.0.0.1"


def _listeners(pid: int) -> set[tuple[str, int]]:
    try:
        conns = psutil.Process(pid).net_connections(kind="inet")
    except psutil.NoSuchProcess:
        return set()
    return {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}


@contextmanager
def _process(argv: Sequence[str], expect: int, tmp: Path,
             timeout: float = 30.0) -> Iterator[set[tuple[str, int]]]:
    """Start ``argv``; yield its listening sockets once it has ``expect`` of them (and they
    stayed the same for a moment: a late listener must not be missed)."""
    log = open(tmp / f"{Path(argv[2]).name}-{time.monotonic_ns()}.log", "wb")
    proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        seen: set[tuple[str, int]] = set()
        while True:
            assert proc.poll() is None, f"{argv} exited: {Path(log.name).read_text()[-2000:]}"
            now = _listeners(proc.pid)
            if len(now) >= expect and now == seen:
                break
            assert time.monotonic() < deadline, \
                f"{argv}: {len(now)} of {expect} listeners after {timeout}s: {now}"
            seen = now
            time.sleep(0.3)
        yield now
    finally:
        stop_process(proc, timeout=5)
        log.close()


def _start_all(stack: ExitStack, tmp: Path, host: str | None) -> dict[str, set[tuple[str, int]]]:
    """Every listener process, addressed at ``host`` (``None``: no address flags at all)."""
    def flag(name: str) -> list[str]:
        return [name, host] if host is not None else []

    at = host or DEFAULT
    master_port, metadata_port = free_port(), free_port()
    found = {}
    found["master (rpc, metrics, http metadata)"] = stack.enter_context(_process(
        ["-m", "store.master", *flag("--rpc-host"), "--rpc-port", str(master_port),
         "--metrics-port", "0", "--enable-http-metadata-server", "true",
         *flag("--http-metadata-server-host"), "--http-metadata-server-port", "0",
         "--log-level", "WARNING"], 3, tmp))
    found["store node (transfer engine)"] = stack.enter_context(_process(
        ["-m", "store.node", *flag("--local-hostname"), "--metadata-server", "P2PHANDSHAKE",
         "--master-server-address", f"{at}:{master_port}", "--global-segment-size", "16MB",
         "--protocol", "tcp", "--log-level", "WARNING"], 2, tmp))
    found["metadata server"] = stack.enter_context(_process(
        ["-m", "transfer.metadata", *flag("--host"), "--port", str(metadata_port),
         "--log-level", "WARNING"], 1, tmp))
    found["proxy"] = stack.enter_context(_process(
        ["-m", "scheduler", *flag("--host"), "--port", "0", "--instance", f"http://{at}:9",
         "--log-level", "WARNING"], 1, tmp))
    shared = tmp / f"shared-{at}.bin"
    shared.write_bytes(b"x" * 4096)
    found["p2p holder"] = stack.enter_context(_process(
        ["-m", "store.p2p", "--metadata-server", f"http://{at}:{metadata_port}/metadata",
         *flag("--local-hostname"), "register", f"obj-{at}", str(shared)], 2, tmp))
    return found


@pytest.mark.parametrize("host", [CONFIGURED, None], ids=["configured", "default"])
def test_every_listener_binds_its_configured_address(host: str | None, tmp_path: Path) -> None:
    want = host or DEFAULT
    with ExitStack() as stack:
        found = _start_all(stack, tmp_path, host)
    wrong = {name: sorted(s) for name, s in found.items() if any(ip != want for ip, _ in s)}
    assert not wrong, f"listeners not on {want}: {wrong}"


def test_config_defaults_are_loopback() -> None:
    """The defaults the demo runs with, read from the config schema and the proxy CLI."""
    cfg = MooncakeConfig()
    assert cfg.master.host == DEFAULT
    assert cfg.metadata.host == DEFAULT
    assert cfg.proxy.host == DEFAULT
    assert cfg.local_hostname.split(":")[0] == DEFAULT
    args: argparse.Namespace = build_parser().parse_args(["--instance", "http://127.0.0.1:1"])
    assert args.host == DEFAULT
