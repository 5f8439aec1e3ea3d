"""P2P store across real processes (the ``mooncake-p2p`` CLI) on loopback.

One node registers a 256 MiB file, four fetch it at once, a fifth fetches from all of them; a
source is SIGKILLed in the middle of a throttled get and the get still completes.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from store.p2p.throttle import ThrottledMetadataProxy
from transfer.metadata import HttpMetadataServer

pytestmark = pytest.mark.timeout(90)
MiB = 1 << 20


class Node:
    """One ``python -m store.p2p`` process; ``line()`` reads its JSON output."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, url: str, *args: str, lease_ttl: float = 10.0) -> Node:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "store.p2p", "--metadata-server", url,
            "--lease-ttl", str(lease_ttl), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def line(self, timeout: float = 60.0) -> dict:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            err = await self.proc.stderr.read() if self.proc.stderr else b""
            raise AssertionError(f"node exited ({await self.proc.wait()}): {err.decode()}")
        return json.loads(raw)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def _write_random(path: Path, size: int, seed: int = 0) -> str:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * MiB):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture
async def metadata():
    srv = HttpMetadataServer(port=0)
    await srv.start()
    yield srv
    await srv.stop()


async def test_four_concurrent_getters_then_a_fifth_fetches_from_all(
        metadata: HttpMetadataServer, tmp_path: Path) -> None:
    src = tmp_path / "object.bin"
    want = _write_random(src, 256 * MiB)
    nodes: list[Node] = []
    try:
        origin = await Node.start(metadata.url, "register", "model/weights", str(src))
        nodes.append(origin)
        origin_seg = (await origin.line())["segment"]
        getters = [await Node.start(metadata.url, "get", "model/weights", str(tmp_path / f"g{i}"),
                                    "--json", "--serve") for i in range(4)]
        nodes += getters
        results = await asyncio.gather(*(g.line() for g in getters))
        for i, r in enumerate(results):
            assert r["size"] == 256 * MiB
            assert sum(s["bytes"] for s in r["sources"].values()) == 256 * MiB
            assert _sha(tmp_path / f"g{i}") == want
        late = await Node.start(metadata.url, "get", "model/weights", str(tmp_path / "late"),
                                "--json")
        nodes.append(late)
        r = await late.line()
        assert _sha(tmp_path / "late") == want
        served = {seg: s["bytes"] for seg, s in r["sources"].items() if s["bytes"]}
        # Five holders, chosen by load: the late getter reads from earlier getters, not only
        # from the origin.
        assert set(r["sources"]) == {origin_seg} | {g["segment"] for g in results}
        assert len(served) >= 3 and set(served) - {origin_seg}
        assert await asyncio.wait_for(late.proc.wait(), 30) == 0
    finally:
        for n in nodes:
            await n.stop()


async def test_killing_a_source_mid_get_completes_from_the_others(
        metadata: HttpMetadataServer, tmp_path: Path) -> None:
    size = 48 * MiB
    src = tmp_path / "object.bin"
    want = _write_random(src, size, seed=1)
    nodes: list[Node] = []
    # 12 MiB/s upload per peer: three sources take ~1.3 s, so the kill lands mid-get.
    async with ThrottledMetadataProxy(metadata.url, rate=12 * MiB) as proxy:
        try:
            origin = await Node.start(metadata.url, "register", "obj", str(src),
                                      "--chunk-size", str(MiB))
            nodes.append(origin)
            await origin.line()
            replicas = []
            for i in range(2):  # unthrottled setup: they use the metadata server directly
                n = await Node.start(metadata.url, "get", "obj", str(tmp_path / f"r{i}"),
                                     "--json", "--serve", lease_ttl=1.0)
                nodes.append(n)
                replicas.append((n, (await n.line())["segment"]))
            getter = await Node.start(proxy.url, "get", "obj", str(tmp_path / "out"), "--json",
                                      "--no-progress")
            nodes.append(getter)
            # kill once a quarter of the object went through the relays: mid-get for sure
            async with asyncio.timeout(30):
                while sum(proxy.uploads().values()) < size // 4:
                    await asyncio.sleep(0.02)
            victim, victim_seg = replicas[0]
            victim.proc.kill()
            r = await getter.line()
            assert _sha(tmp_path / "out") == want
            dead = r["sources"][victim_seg]
            assert dead["bytes"] > 0, "the kill came too late to be mid-get"
            assert dead["dropped"] and dead["failures"] >= 1
            assert sum(s["bytes"] for s in r["sources"].values()) == size
            # the relays really capped the uploads: no source served faster than its cap
            assert r["throughput_mib_s"] < 3 * 12 * 1.5
            # the dead holder's lease (1 s) runs out and it disappears from the listing
            await asyncio.sleep(2.5)
            lister = await Node.start(metadata.url, "list", "--json")
            listed = await lister.line()
            assert victim_seg not in listed[0]["holders"]
            # the getter exited (no --serve) and delisted itself: origin and the live replica
            assert replicas[1][1] in listed[0]["holders"] and len(listed[0]["holders"]) == 2
        finally:
            for n in nodes:
                await n.stop()
