"""RdmaTransport over a real NIC through pyverbs (skipped where /sys/class/infiniband is empty).

Two transports in one process, both on the machine's NICs: RC QPs between two ports (or two QPs
on the same port) carry real one-sided READ/WRITE. Run on a machine with an RDMA NIC (or rxe:
``rdma link add rxe0 type rxe netdev eth0``) and pyverbs importable in the venv.
"""
from __future__ import annotations

import ctypes
import json

import pytest

from transfer.transports.base import LocalBuffer, Opcode, Slice, TransportError
from transfer.transports.rdma import RdmaTransport
from transfer.transports.rdma.verbs import open_nic
from transfer.transports.rdma.topology import discover_topology

pytestmark = pytest.mark.rdma
SIZE = 8 << 20


def test_open_nic_and_register() -> None:
    name = discover_topology().nic_names[0]
    nic = open_nic(name)
    try:
        assert nic.info.mtu in (256, 512, 1024, 2048, 4096)
        buf = (ctypes.c_ubyte * 4096)()
        keys, handle = nic.register(ctypes.addressof(buf), 4096)
        assert keys.lkey and keys.rkey
        qp = nic.create_qp(16)
        assert 0 < qp.qp_num < 1 << 24
        qp.close()
        nic.deregister(handle)
    finally:
        nic.close()


async def test_write_and_read_over_real_nics() -> None:
    transports: dict[str, RdmaTransport] = {}

    async def send(peer: str, request: dict) -> dict:
        return json.loads(json.dumps(transports[peer].accept_handshake(json.loads(json.dumps(request)))))

    mems, entries, buffers = {}, {}, {}
    for name in ("A", "B"):
        transports[name] = RdmaTransport(name, handshake=send, timeout=10)
        entries[name] = await transports[name].start()
        mems[name] = (ctypes.c_ubyte * SIZE)()
        addr = ctypes.addressof(mems[name])
        info = await transports[name].register(LocalBuffer(addr, SIZE, "cpu:0"))
        buffers[name] = [{"address": addr, "length": SIZE, "location": "cpu:0", "rdma": info}]
    a_addr, b_addr = buffers["A"][0]["address"], buffers["B"][0]["address"]
    try:
        ctypes.memmove(a_addr, bytes(range(256)) * (SIZE // 256), SIZE)
        step = SIZE // 32
        writes = [Slice(Opcode.WRITE, a_addr + i * step, b_addr + i * step, step) for i in range(32)]
        await transports["A"].execute("B", entries["B"], buffers["B"], writes)
        assert ctypes.string_at(b_addr, SIZE) == ctypes.string_at(a_addr, SIZE)
        ctypes.memset(a_addr, 0, SIZE)
        reads = [Slice(Opcode.READ, a_addr + i * step, b_addr + i * step, step) for i in range(32)]
        await transports["A"].execute("B", entries["B"], buffers["B"], reads, path=1)
        assert ctypes.string_at(b_addr, SIZE) == ctypes.string_at(a_addr, SIZE)
        # A wrong rkey must come back as a named completion error, not a hang.
        bad = [dict(buffers["B"][0], rdma={"rkeys": {k: (v + 1) & 0xFFFFFFFF for k, v in
                                                     buffers["B"][0]["rdma"]["rkeys"].items()}})]
        with pytest.raises(TransportError, match="IBV_WC_"):
            await transports["A"].execute("B", entries["B"], bad, writes[:1])
    finally:
        for transport in transports.values():
            await transport.close()
