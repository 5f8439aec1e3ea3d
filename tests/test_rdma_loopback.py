"""RdmaTransport end to end over the in-process software fabric (:mod:`...rdma.loopback`).

No RDMA hardware exists here, so the NIC is the only fake: the transport's descriptor entry,
handshake (through a JSON round trip, as over the engine's RPC), QP transitions, striping,
key checks, completion thread, errors and timeouts are the real code.
"""
from __future__ import annotations

import ctypes
import json
import os
import time
from pathlib import Path

import pytest

from transfer.transports.base import LocalBuffer, Opcode, Slice, TransportError
from transfer.transports.rdma import RdmaTransport
from transfer.transports.rdma.handshake import HandshakeError
from transfer.transports.rdma.loopback import LoopbackFabric
from transfer.transports.rdma.verbs import RdmaUnavailable

SIZE = 1 << 20


def sysfs(root: Path, nics: list[str]) -> Path:
    """One socket, one NIC per root port, all on NUMA node 0."""
    node = root / "sys/devices/system/node/node0"
    node.mkdir(parents=True)
    (node / "cpulist").write_text("0-1\n")
    for i, name in enumerate(nics):
        dev = root / f"sys/devices/pci0000:00/0000:00:0{i + 1}.0/0000:0{i + 1}:00.0"
        dev.mkdir(parents=True)
        (dev / "numa_node").write_text("0\n")
        ib = root / "sys/class/infiniband" / name
        ib.mkdir(parents=True)
        os.symlink(os.path.relpath(dev, ib), ib / "device")
    return root


class Host:
    """A buffer plus the transport that owns it."""

    def __init__(self, transport: RdmaTransport, location: str = "cpu:0") -> None:
        self.transport = transport
        self.mem = (ctypes.c_ubyte * SIZE)()
        self.addr = ctypes.addressof(self.mem)
        self.buffer = LocalBuffer(self.addr, SIZE, location)
        self.entry: dict = {}
        self.buffers: list[dict] = []

    async def start(self) -> None:
        self.entry = json.loads(json.dumps(await self.transport.start()))
        info = await self.transport.register(self.buffer)
        self.buffers = [{"address": self.addr, "length": SIZE, "location": self.buffer.location,
                         "rdma": info}]

    def fill(self, seed: int) -> None:
        data = bytes((i * seed + 7) % 251 for i in range(SIZE))
        ctypes.memmove(self.addr, data, SIZE)

    def bytes(self) -> bytes:
        return ctypes.string_at(self.addr, SIZE)


@pytest.fixture
async def pair(tmp_path: Path):
    fabric = LoopbackFabric()
    hosts: dict[str, Host] = {}

    async def send(peer: str, request: dict) -> dict:
        wire = json.loads(json.dumps(request))  # what crosses the RPC is plain JSON
        return json.loads(json.dumps(hosts[peer].transport.accept_handshake(wire)))

    for name, nics in (("A", ["a0", "a1"]), ("B", ["b0", "b1"])):
        transport = RdmaTransport(name, sysfs_root=sysfs(tmp_path / name, nics), handshake=send,
                                  nic_opener=fabric.open, timeout=2.0, qp_depth=8)
        hosts[name] = Host(transport)
        await hosts[name].start()
    yield fabric, hosts["A"], hosts["B"]
    for host in hosts.values():
        await host.transport.close()


def stripes(a: Host, b: Host, opcode: Opcode, n: int = 16) -> list[Slice]:
    step = SIZE // n
    return [Slice(opcode, a.addr + i * step, b.addr + i * step, step) for i in range(n)]


async def test_descriptor_entry(pair) -> None:
    _, a, b = pair
    assert [nic["name"] for nic in a.entry["nics"]] == ["a0", "a1"]
    assert a.entry["topology"]["cpu:0"] == [["a0", "a1"], []]
    assert set(a.buffers[0]["rdma"]["rkeys"]) == {"a0", "a1"}
    assert a.transport.reachable(b.entry)
    assert not a.transport.reachable({"nics": "garbage"})
    ib_only = {"nics": [dict(b.entry["nics"][0], link_layer="InfiniBand")]}
    assert not a.transport.reachable(ib_only)


async def test_write_then_read_striped_over_all_nics(pair) -> None:
    fabric, a, b = pair
    a.fill(3)
    await a.transport.execute("B", b.entry, b.buffers, stripes(a, b, Opcode.WRITE))
    assert b.bytes() == a.bytes()
    assert fabric.posted["a0"] == 8 and fabric.posted["a1"] == 8
    assert a.transport.connections() == [("B", "a0", "b0"), ("B", "a1", "b1")]
    b.fill(5)
    await a.transport.execute("B", b.entry, b.buffers, stripes(a, b, Opcode.READ))
    assert a.bytes() == b.bytes()
    # No new handshake for the second batch: still the same two QPs.
    assert len(a.transport.connections()) == 2


async def test_retry_path_moves_to_other_nics(pair) -> None:
    fabric, a, b = pair
    a.fill(11)
    one = [Slice(Opcode.WRITE, a.addr, b.addr, 4096)]
    await a.transport.execute("B", b.entry, b.buffers, one, path=0)
    await a.transport.execute("B", b.entry, b.buffers, one, path=1)
    assert fabric.posted == {"a0": 1, "a1": 1}
    assert ("B", "a1", "b1") in a.transport.connections()
    assert b.bytes()[:4096] == a.bytes()[:4096]


async def test_bad_remote_key_reports_status_and_reconnects(pair) -> None:
    _, a, b = pair
    await b.transport.unregister(b.buffer)  # peer freed it; our descriptor copy is stale
    with pytest.raises(TransportError, match="IBV_WC_REM_ACCESS_ERR") as info:
        await a.transport.execute("B", b.entry, b.buffers, stripes(a, b, Opcode.WRITE, 4))
    assert info.value.retryable
    assert a.transport.connections() == []  # errored QPs are destroyed
    b.buffers[0]["rdma"] = await b.transport.register(b.buffer)  # the refreshed descriptor
    a.fill(2)
    await a.transport.execute("B", b.entry, b.buffers, stripes(a, b, Opcode.WRITE, 4))
    assert b.bytes() == a.bytes()


async def test_unregistered_ranges_are_rejected_before_posting(pair) -> None:
    fabric, a, b = pair
    outside = [Slice(Opcode.WRITE, a.addr, b.addr + SIZE - 10, 20)]
    with pytest.raises(TransportError, match="no RDMA key") as info:
        await a.transport.execute("B", b.entry, b.buffers, outside)
    assert not info.value.retryable
    local_outside = [Slice(Opcode.WRITE, a.addr - 4096, b.addr, 16)]
    with pytest.raises(TransportError, match="not registered"):
        await a.transport.execute("B", b.entry, b.buffers, local_outside)
    no_keys = [dict(b.buffers[0], rdma={"rkeys": {}})]
    with pytest.raises(TransportError, match="GPUDirect"):
        await a.transport.execute("B", b.entry, no_keys, [Slice(Opcode.READ, a.addr, b.addr, 8)])
    with pytest.raises(TransportError, match="missing field"):
        await a.transport.execute("B", {"nics": [{}]}, b.buffers, [])
    assert sum(fabric.posted.values()) == 0


async def test_stuck_completions_time_out_and_kill_the_qp(pair) -> None:
    fabric, a, b = pair
    await a.transport.execute("B", b.entry, b.buffers, stripes(a, b, Opcode.WRITE, 2))
    for nic in a.transport._nics.values():
        nic.hold_completions = True
    started = time.monotonic()
    with pytest.raises(TransportError, match="timed out"):
        await a.transport.execute("B", b.entry, b.buffers, stripes(a, b, Opcode.WRITE, 64))
    assert time.monotonic() - started < 5
    assert a.transport.connections() == []
    for nic in a.transport._nics.values():
        nic.release_held()  # late completions for forgotten work requests are ignored
    await a.transport.execute("B", b.entry, b.buffers, stripes(a, b, Opcode.WRITE, 2))


async def test_handshake_failures(pair) -> None:
    _, a, b = pair
    with pytest.raises(HandshakeError, match="no local RDMA NIC"):
        b.transport.accept_handshake({"version": 1, "peer": "A", "qps": [
            {"local_nic": "a0", "remote_nic": "zz", "qp_num": 1, "psn": 1, "lid": 0,
             "gid": "::1", "mtu": 4096}]})
    with pytest.raises(HandshakeError, match="version"):
        b.transport.accept_handshake({"version": 9})

    async def broken(peer: str, request: dict) -> dict:
        raise OSError("connection refused")

    a.transport.handshake = broken
    with pytest.raises(TransportError, match="connection refused"):
        await a.transport.execute("B", b.entry, b.buffers, stripes(a, b, Opcode.WRITE, 2))

    async def liar(peer: str, request: dict) -> dict:
        reply = b.transport.accept_handshake(request)
        reply["qps"] = reply["qps"][:0]
        return reply

    a.transport.handshake = liar
    with pytest.raises(TransportError, match="reply covers"):
        await a.transport.execute("B", b.entry, b.buffers, stripes(a, b, Opcode.WRITE, 2))
    assert a.transport.connections() == []


async def test_cuda_buffer_without_gpudirect_is_staged(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A "cuda:0" buffer (host memory standing in for the GPU, copied by memmove) without
    GPUDirect: no rkeys are published and local transfers bounce through staging chunks."""
    from transfer.cuda import StagingPool, host_allocator

    fabric = LoopbackFabric()
    copies: list[tuple[str, int]] = []

    def d2h(dev: int, host: int, n: int, device: int) -> None:
        copies.append(("d2h", n))
        ctypes.memmove(host, dev, n)

    def h2d(host: int, dev: int, n: int, device: int) -> None:
        copies.append(("h2d", n))
        ctypes.memmove(dev, host, n)

    hosts: dict[str, Host] = {}

    async def send(peer: str, request: dict) -> dict:
        return hosts[peer].transport.accept_handshake(request)

    pool = StagingPool(chunk_size=64 << 10, count=2, allocator=host_allocator)
    a_t = RdmaTransport("A", sysfs_root=sysfs(tmp_path / "A", ["a0"]), handshake=send,
                        nic_opener=fabric.open, gpudirect=False, staging_pool=pool,
                        staging_copy=(d2h, h2d))
    b_t = RdmaTransport("B", sysfs_root=sysfs(tmp_path / "B", ["b0"]), handshake=send,
                        nic_opener=fabric.open)
    hosts["A"], hosts["B"] = Host(a_t, "cuda:0"), Host(b_t)
    try:
        for host in hosts.values():
            await host.start()
        a, b = hosts["A"], hosts["B"]
        assert a.buffers[0]["rdma"] == {"rkeys": {}}
        assert "GPUDirect RDMA unavailable" in caplog.text
        a.fill(9)
        await a_t.execute("B", b.entry, b.buffers, stripes(a, b, Opcode.WRITE, 4))
        assert b.bytes() == a.bytes()
        b.fill(13)
        await a_t.execute("B", b.entry, b.buffers, stripes(a, b, Opcode.READ, 4))
        assert a.bytes() == b.bytes()
        assert copies.count(("d2h", 64 << 10)) == 16 and copies.count(("h2d", 64 << 10)) == 16
        assert pool.in_use == 0 and pool.allocated == 2
        # Peers cannot target it.
        with pytest.raises(TransportError, match="no RDMA key"):
            await b_t.execute("A", a.entry, a.buffers, [Slice(Opcode.READ, b.addr, a.addr, 8)])
    finally:
        await a_t.close()
        await b_t.close()


async def test_start_failures_and_close(tmp_path: Path) -> None:
    fabric = LoopbackFabric()
    empty = RdmaTransport("X", sysfs_root=tmp_path)
    with pytest.raises(RdmaUnavailable, match="no RDMA NIC"):
        await empty.start()
    root = sysfs(tmp_path / "t", ["m0", "m1"])
    with pytest.raises(RdmaUnavailable, match="device_name='m9'"):
        await RdmaTransport("X", sysfs_root=root, device_name="m9").start()
    only = RdmaTransport("X", sysfs_root=root, device_name="m1", nic_opener=fabric.open)
    entry = await only.start()
    assert [n["name"] for n in entry["nics"]] == ["m1"]
    await only.close()
    await only.close()
    with pytest.raises(TransportError, match="not started"):
        await only.execute("Y", entry, [], [])


async def test_without_pyverbs_start_explains(tmp_path: Path, caplog) -> None:
    try:
        import pyverbs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("pyverbs is importable here; this checks the error without it")
    transport = RdmaTransport("X", sysfs_root=sysfs(tmp_path, ["mlx5_0"]))
    with pytest.raises(RdmaUnavailable, match="could be opened"):
        await transport.start()
    assert "pip install pyverbs" in caplog.text
