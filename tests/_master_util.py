"""Shared helpers of the master tests: an in-process master on free ports, segment factory, the
error code of a refused call."""
from __future__ import annotations

from typing import Any

import pytest

from store.master import MasterServer, SegmentDesc
from transfer.config import MooncakeConfig
from transfer.rpc import RpcError

MIB = 1 << 20


def master_config(**master: Any) -> MooncakeConfig:
    """Config on free ports with short TTLs; ``master`` overrides master-section keys."""
    settings = {"port": 0, "metrics_port": 0, "client_ttl": 5.0, "put_start_timeout": 5.0}
    settings.update(master)
    return MooncakeConfig().replace(master=settings, metadata={"port": 0})


def segment(name: str, size: int = 16 * MIB, client: str = "c1", tier: str = "memory",
            host: str = "h1", base: int = 1 << 40) -> SegmentDesc:
    return SegmentDesc(name=name, base=base, size=size, client_id=client, host_id=host,
                       tier=tier)


async def started(**master: Any) -> MasterServer:
    server = MasterServer(master_config(**master))
    await server.start()
    return server


async def code_of(coro: object) -> int:
    """The error code of an RPC call that must be refused."""
    with pytest.raises(RpcError) as info:
        await coro  # type: ignore[misc]
    return int(info.value.code)
