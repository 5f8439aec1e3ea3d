"""Real-process helpers shared by tests, benchmarks and examples.

Why a package module and not test-only code: benchmarks and examples start the same real etcd
servers the tests do, and a user debugging a deployment can start one the same way.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["free_port", "wait_for_port", "wait_for_http", "EtcdServer", "stop_process",
           "stop_process_group", "tail_file"]


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 30.0, *,
                  proc: subprocess.Popen | None = None) -> None:
    """Block until something accepts TCP connections on ``host:port`` or raise TimeoutError;
    with ``proc`` (the process meant to listen there), raise ``ChildProcessError`` at once if
    it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise ChildProcessError(f"exited (rc {proc.returncode}) before listening on "
                                    f"{host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")
            time.sleep(0.05)


def wait_for_http(url: str, timeout: float, *, proc: subprocess.Popen | None = None,
                  ok: Callable[[bytes], bool] | None = None, interval: float = 0.1,
                  request_timeout: float = 2.0) -> bool:
    """Poll ``url`` until it answers 200 (and ``ok(body)``, when given): ``True``. ``False``
    when ``proc`` exited first or ``timeout`` passed (``proc.poll()`` tells which); callers
    clean up and say why in their own words."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=request_timeout) as r:
                if r.status == 200 and (ok is None or ok(r.read())):
                    return True
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; also kills the process group if it leads one."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=timeout)


def stop_process_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Stop ``proc`` and every process of its group (it must lead one: ``start_new_session``).

    vLLM servers run their engine core and workers as children: stopping only the leader would
    leave them holding memory and ports.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    stop_process(proc, timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def tail_file(path: Path | None, n: int = 40) -> str:
    """The last ``n`` lines of a log file ("" if there is none), to show why a process died."""
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


@dataclass
class EtcdServer:
    """A real single-member etcd on loopback with a throw-away data dir.

    Use as a context manager; ``endpoint`` is ``host:port`` of the client URL.
    """

    host: str = "127.0.0.1"
    client_port: int = 0
    peer_port: int = 0
    binary: str = "etcd"
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _data_dir: str | None = field(default=None, init=False, repr=False)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def start(self, timeout: float = 30.0) -> "EtcdServer":
        exe = shutil.which(self.binary)
        if exe is None:
            raise FileNotFoundError(
                f"{self.binary!r} not found on PATH: install Debian's etcd-server package"
            )
        self.client_port = self.client_port or free_port(self.host)
        self.peer_port = self.peer_port or free_port(self.host)
        self._data_dir = tempfile.mkdtemp(prefix="mooncake-etcd-")
        client = f"http://{self.host}:{self.client_port}"
        peer = f"http://{self.host}:{self.peer_port}"
        cmd = [
            exe,
            "--name", "test",
            "--data-dir", self._data_dir,
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"test={peer}",
            "--log-level", "error",
        ]
        env = dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""))
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True
        )
        if wait_for_http(f"{client}/health", timeout, proc=self._proc, request_timeout=1,
                         ok=lambda body: b'"health":"true"' in body):
            return self
        if self._proc.poll() is not None:
            err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
            raise RuntimeError(f"etcd exited with {self._proc.returncode}: {err[-2000:]}")
        self.stop()
        raise TimeoutError(f"etcd not healthy on {client} after {timeout:.0f}s")

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc)
            if self._proc.stderr:
                self._proc.stderr.close()
            self._proc = None
        if self._data_dir:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = None

    def __enter__(self) -> "EtcdServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
