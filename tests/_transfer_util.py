"""Helpers for the transfer-engine tests: a real peer process and in-process engines."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from transfer.config import MooncakeConfig
from transfer.engine import Engine
from transfer.testing import stop_process

PEER_SCRIPT = Path(__file__).with_name("transfer_peer.py")


class Peer:
    """A ``tests/transfer_peer.py`` subprocess serving one registered buffer."""

    def __init__(self, *args: str, size: int = 1 << 20, timeout: float = 20.0) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER_SCRIPT), "--size", str(size), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        info = json.loads(self._line(timeout))
        self.name: str = info["name"]
        self.addr: int = info["addr"]
        self.size: int = info["size"]

    def _line(self, timeout: float = 10.0) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError("peer did not answer in time")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer exited with {self.proc.wait(5)}")
        return line.strip()

    def command(self, cmd: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._line()

    def sha(self) -> str:
        return self.command("sha")

    def fill(self, seed: int) -> None:
        assert self.command(f"fill {seed}") == "ok"

    def notes(self) -> list[list[str]]:
        return json.loads(self.command("notes"))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, TimeoutError, RuntimeError):
                self.command("quit")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        stop_process(self.proc, timeout=5)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pattern(size: int, seed: int) -> np.ndarray:
    """The bytes ``Peer.fill(seed)`` writes."""
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def sha(data: Any) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


def config(**overrides: Any) -> MooncakeConfig:
    return MooncakeConfig().replace(**overrides)


@contextlib.asynccontextmanager
async def engines(n: int, **overrides: Any) -> AsyncIterator[list[Engine]]:
    started: list[Engine] = []
    try:
        for _ in range(n):
            e = Engine(config(**overrides))
            await e.start()
            started.append(e)
        yield started
    finally:
        for e in started:
            await e.close()
