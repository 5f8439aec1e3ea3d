"""P2P store across hosts in network namespaces (:mod:`transfer.netns`): every byte crosses a
real (virtual) wire, and a source whose cable is pulled mid-get - alive but silent, unlike a
killed process on loopback whose socket answers with an RST - is dropped and its chunks
refetched from the other holders."""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from transfer.netns import Host, NetnsLab, netns_available

_OK, _WHY = netns_available()
pytestmark = [pytest.mark.netns, pytest.mark.timeout(90),
              pytest.mark.skipif(not _OK, reason=_WHY or "network namespaces available")]
MiB = 1 << 20
# Namespaces share this machine's /dev/shm: shm off, as the hosts are meant to be separate.
ENV = {**os.environ, "MOONCAKE_TRANSFER_ENABLE_SHM": "false"}


class Proc:
    """A process in a lab host; ``line()`` reads one JSON (or text) line of its stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, host: Host, *argv: str) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            *host.command([sys.executable, *argv]), env=ENV,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def text(self, timeout: float = 40.0) -> str:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            err = await self.proc.stderr.read()
            raise AssertionError(f"process exited ({await self.proc.wait()}): {err.decode()}")
        return raw.decode()

    async def line(self, timeout: float = 40.0) -> dict:
        return json.loads(await self.text(timeout))

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()


async def _metadata_server(host: Host) -> tuple[Proc, str]:
    proc = await Proc.start(host, "-m", "transfer.metadata", "--host", host.address,
                            "--port", "8080", "--log-level", "WARNING")
    text = await proc.text(20)
    assert text.startswith("metadata server listening on "), text
    return proc, text.rsplit(" ", 1)[1].strip()


async def _p2p(host: Host, url: str, *args: str) -> Proc:
    return await Proc.start(host, "-m", "store.p2p", "--metadata-server", url,
                            "--local-hostname", host.address, *args)


def _write_random(path: Path, size: int, seed: int) -> str:
    data = np.random.default_rng(seed).bytes(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _host_of(segment: str) -> str:
    return segment.rsplit(":", 1)[0]


@pytest.fixture
def lab():
    with NetnsLab(6) as lab:
        yield lab
    assert lab.namespaces() == []


async def test_three_hosts_get_at_once_and_a_late_one_fetches_from_them(
        lab: NetnsLab, tmp_path: Path) -> None:
    size = 128 * MiB
    meta, origin_host, *getter_hosts, late_host = lab.hosts
    src = tmp_path / "object.bin"
    want = _write_random(src, size, seed=0)
    procs: list[Proc] = []
    try:
        server, url = await _metadata_server(meta)
        procs.append(server)
        origin = await _p2p(origin_host, url, "register", "model/weights", str(src))
        procs.append(origin)
        assert _host_of((await origin.line())["segment"]) == origin_host.address
        before = sum(h.counters()[1] for h in lab.hosts)
        getters = [await _p2p(h, url, "get", "model/weights", str(tmp_path / h.name), "--json",
                              "--serve") for h in getter_hosts]
        procs += getters
        results = await asyncio.gather(*(g.line() for g in getters))
        for h, r in zip(getter_hosts, results):
            assert _host_of(r["segment"]) == h.address
            assert sum(s["bytes"] for s in r["sources"].values()) == size
            assert _sha(tmp_path / h.name) == want
        late = await _p2p(late_host, url, "get", "model/weights", str(tmp_path / "late"),
                          "--json")
        procs.append(late)
        r = await late.line()
        assert _sha(tmp_path / "late") == want
        served = {_host_of(seg): s["bytes"] for seg, s in r["sources"].items() if s["bytes"]}
        # Every holder was a source, and earlier getters served the late one, not the origin
        # alone.
        assert {_host_of(seg) for seg in r["sources"]} == {h.address for h in lab.hosts[1:5]}
        assert set(served) - {origin_host.address}, served
        assert await asyncio.wait_for(late.proc.wait(), 20) == 0
        # Four full copies crossed the hosts' links: no same-host shortcut moved the bytes.
        sent = sum(h.counters()[1] for h in lab.hosts) - before
        assert sent >= 4 * size, sent / MiB
    finally:
        for p in procs:
            await p.stop()


async def test_a_source_cut_off_mid_get_is_replaced_by_the_others(
        lab: NetnsLab, tmp_path: Path) -> None:
    size = 64 * MiB
    meta, origin_host, r1, r2, getter_host, _ = lab.hosts
    src = tmp_path / "object.bin"
    want = _write_random(src, size, seed=1)
    procs: list[Proc] = []
    try:
        server, url = await _metadata_server(meta)
        procs.append(server)
        origin = await _p2p(origin_host, url, "register", "obj", str(src), "--chunk-size",
                            str(MiB))
        procs.append(origin)
        await origin.line()
        replicas: dict[str, str] = {}
        for h in (r1, r2):  # full speed: these only set up two more holders
            p = await _p2p(h, url, "--lease-ttl", "2", "get", "obj", str(tmp_path / h.name),
                           "--json", "--serve")
            procs.append(p)
            replicas[h.name] = (await p.line())["segment"]
        # 8 MiB/s out of each source: the get lasts seconds, so the cut lands in the middle.
        for h in (origin_host, r1, r2):
            h.limit_rate(8 * MiB)
        sent_before = r1.counters()[1]
        getter = await _p2p(getter_host, url, "-o", "transfer.io_timeout=2",
                            "-o", "rpc.connect_timeout=2", "get", "obj", str(tmp_path / "out"),
                            "--json", "--no-progress")
        procs.append(getter)
        async with asyncio.timeout(20):
            while r1.counters()[1] - sent_before < 4 * MiB:
                await asyncio.sleep(0.05)
        r1.link_down()
        r = await getter.line(40)
        assert _sha(tmp_path / "out") == want
        cut = r["sources"][replicas[r1.name]]
        assert cut["bytes"] > 0, "the cut came too late to be mid-get"
        assert cut["dropped"] and cut["failures"] >= 1, cut
        assert sum(s["bytes"] for s in r["sources"].values()) == size
        others = [s for seg, s in r["sources"].items() if seg != replicas[r1.name]]
        assert all(s["bytes"] > 0 and not s["dropped"] for s in others), others
    finally:
        with contextlib.suppress(Exception):
            r1.link_up()  # let the cut host shut down cleanly instead of waiting on timeouts
        for p in procs:
            await p.stop()
