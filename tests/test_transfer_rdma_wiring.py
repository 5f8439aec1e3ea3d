"""The engine drives the rdma transport when ``protocol="rdma"``: descriptor entries, rkeys and
the QP handshake over the engine's real RPC. The NIC is the software loopback fabric (no RDMA
hardware here); everything around it is the real engine code path."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from _transfer_util import config, pattern

from transfer.batch import TransferRequest
from transfer.engine import Engine
from transfer.transports.base import Opcode

pytestmark = pytest.mark.timeout(30)
pytest.importorskip("transfer.transports.rdma.loopback")


def _sysfs(root: Path, nic: str) -> Path:
    node = root / "sys/devices/system/node/node0"
    node.mkdir(parents=True)
    (node / "cpulist").write_text("0-1\n")
    dev = root / "sys/devices/pci0000:00/0000:00:01.0/0000:01:00.0"
    dev.mkdir(parents=True)
    (dev / "numa_node").write_text("0\n")
    ib = root / "sys/class/infiniband" / nic
    ib.mkdir(parents=True)
    os.symlink(os.path.relpath(dev, ib), ib / "device")
    return root


async def test_engine_uses_rdma_transport(tmp_path: Path) -> None:
    from transfer.transports.rdma.loopback import LoopbackFabric

    fabric = LoopbackFabric()
    engines = []
    try:
        for name in ("a0", "b0"):
            e = Engine(config(protocol="rdma", **{"transfer.enable_shm": False}),
                       rdma_options={"sysfs_root": _sysfs(tmp_path / name, name),
                                     "nic_opener": fabric.open, "timeout": 5.0})
            await e.start()
            engines.append(e)
        a, b = engines
        assert "rdma" in b.descriptor().transports
        src = pattern(1 << 20, 61)
        dst = np.zeros_like(src)
        sa, db = await a.register(src), await b.register(dst)
        assert "rdma" in b.descriptor().buffers[0].info
        await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, db, src.nbytes)])
        assert np.array_equal(dst, src)
        back = np.zeros_like(src)
        ba = await a.register(back)
        await a.transfer([TransferRequest(Opcode.READ, ba, b.name, db, src.nbytes)])
        assert np.array_equal(back, src)
        assert sum(fabric.posted.values()) > 0
        assert a.stats()["tcp_connects"] == 0
    finally:
        for e in engines:
            await e.close()
