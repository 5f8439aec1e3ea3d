"""Every network surface, with the cluster secret set, gives an unauthenticated peer nothing.

One module so the list is reviewable in one place (docs/security.md has the same table):

==========================  ======================================  ==========================
surface                     guarded by                              test here
==========================  ======================================  ==========================
store master RPC            HMAC handshake (``auth_secret``)        test_master_rpc
master tenants              HMAC under the tenant's own secret      tests/test_tenants.py
engine control RPC          HMAC handshake (``auth_secret``)        test_engine_control_plane
engine TCP data port        HMAC handshake (``auth_secret``)        test_engine_data_port
HTTP metadata server        bearer token = ``auth_secret``          test_metadata_http_server
P2P store                   metadata token + data-port HMAC         test_p2p_store
proxy (OpenAI front door)   API key (``Authorization: Bearer``)     test_proxy_api_key
TLS on RPC/data (optional)  certificates from the cluster CA        tests/test_tls.py
no pickle/eval of input     source scan                             tests/test_packaging.py
==========================  ======================================  ==========================
"""
from __future__ import annotations

import asyncio
import os

import aiohttp
import httpx
import numpy as np
import pytest

from scheduler.proxy import Proxy, ProxySettings
from scheduler.proxy.instances import InstanceSpec
from scheduler.testing import MiniEngine
from store.master.messages import PingReply, PingRequest, StatsReply, StatsRequest
from store.master.server import MasterServer
from store.p2p import P2PStore
from transfer.batch import TransferRequest
from transfer.config import MooncakeConfig
from transfer.control import DescriptorReply, DescriptorRequest, NotifyReply, NotifyRequest
from transfer.engine import Engine, buffer_address
from transfer.errors import SegmentNotFoundError
from transfer.memory import MemoryRegistry
from transfer.metadata.base import MetadataAuthError
from transfer.rpc import BlockingRpcClient, RpcAuthError, RpcClient
from transfer.transports.base import Opcode, Slice, TransportError
from transfer.transports.tcp import TcpTransport

pytestmark = pytest.mark.timeout(60)

SECRET = "the-cluster-secret"
WRONG = [b"a-wrong-secret", None]


def master_config(**overrides: object) -> MooncakeConfig:
    return MooncakeConfig().replace(auth_secret=SECRET, master={
        "port": 0, "metrics_port": 0}, metadata={"port": 0}, **overrides)


async def test_master_rpc() -> None:
    async with MasterServer(master_config()) as master:
        host, port = "127.0.0.1", master.rpc.port
        async with RpcClient(host, port, secret=SECRET.encode()) as ok:
            assert isinstance(await ok.call("stats", StatsRequest(), StatsReply), StatsReply)
        served = master.rpc.stats().requests
        for secret in WRONG:
            async with RpcClient(host, port, secret=secret) as c:
                with pytest.raises(RpcAuthError):
                    await c.call("ping", PingRequest("intruder"), PingReply)
            blocking = BlockingRpcClient(host, port, secret=secret)
            with pytest.raises(RpcAuthError):
                await asyncio.to_thread(blocking.call, "stats", StatsRequest(), StatsReply)
            blocking.close()
        assert master.rpc.stats().requests == served  # nothing reached a handler
        assert len(master.clients) == 0


async def test_metadata_http_server() -> None:
    """The master-hosted metadata server takes the cluster secret as its bearer token, and an
    engine configured with the secret uses it (an engine without gets nothing)."""
    async with MasterServer(master_config()) as master:
        assert master.metadata is not None
        url = master.metadata.url
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                async with http.put(f"{url}?key=planted", data=b"x", headers=headers) as r:
                    assert r.status == 401
                async with http.get(f"{url}?key=planted", headers=headers) as r:
                    assert r.status == 401
        engine = Engine(MooncakeConfig().replace(auth_secret=SECRET, metadata_server=url,
                                                 transfer={"enable_shm": False}))
        await engine.start()
        try:
            assert await engine.open_segment(engine.name)  # published and read back
            async with aiohttp.ClientSession() as http:
                async with http.get(url, params={"key": "mooncake/ram/" + engine.name}) as r:
                    assert r.status == 401
            intruder = Engine(MooncakeConfig().replace(metadata_server=url,
                                                       transfer={"enable_shm": False}))
            with pytest.raises(MetadataAuthError):  # cannot even publish its own descriptor
                await intruder.start()
        finally:
            await engine.close()


async def _engines(*secrets: str | None) -> list[Engine]:
    engines = []
    for secret in secrets:
        e = Engine(MooncakeConfig().replace(auth_secret=secret, transfer={"enable_shm": False}))
        await e.start()
        engines.append(e)
    return engines


async def test_engine_control_plane() -> None:
    (b,) = await _engines(SECRET)
    try:
        host, port = b.name.rsplit(":", 1)
        for secret in WRONG:
            async with RpcClient(host, int(port), secret=secret) as c:
                with pytest.raises(RpcAuthError):
                    await c.call("te.descriptor", DescriptorRequest(b.name), DescriptorReply)
                with pytest.raises(RpcAuthError):
                    await c.call("te.notify", NotifyRequest("x", b"forged"), NotifyReply)
        assert b.notifications() == []
        # An engine without the secret cannot fetch b's descriptor, so it cannot address it.
        (a,) = await _engines(None)
        try:
            src = np.ones(4096, np.uint8)
            sa = await a.register(src)
            with pytest.raises(SegmentNotFoundError, match="UNAUTHENTICATED"):
                await a.transfer([TransferRequest(Opcode.WRITE, sa, b.name, 0, 4096)],
                                 timeout=10)
        finally:
            await a.close()
    finally:
        await b.close()


async def test_engine_data_port() -> None:
    (b,) = await _engines(SECRET)
    try:
        dst = np.zeros(4096, np.uint8)
        db = await b.register(dst)
        entry = b._entries["tcp"]
        src = bytearray(b"\x05" * 4096)
        for secret in WRONG:
            t = TcpTransport(MemoryRegistry(), host="127.0.0.1", secret=secret)
            try:
                for op in (Opcode.WRITE, Opcode.READ):
                    with pytest.raises(TransportError, match="authentication"):
                        await t.execute(b.name, entry, [],
                                        [Slice(op, buffer_address(src), db, 4096)])
            finally:
                await t.close()
        assert not dst.any() and src == bytearray(b"\x05" * 4096)
    finally:
        await b.close()


async def test_p2p_store() -> None:
    async with MasterServer(master_config()) as master:
        assert master.metadata is not None
        url = master.metadata.url
        owner = await P2PStore.open(url, engine_options={"auth_secret": SECRET,
                                                         "transfer": {"enable_shm": False}})
        try:
            data = bytearray(os.urandom(1 << 20))
            await owner.register("weights/x", data)
            reader = await P2PStore.open(url, engine_options={"auth_secret": SECRET,
                                                              "transfer": {"enable_shm": False}})
            try:
                await reader.get("weights/x")  # the authenticated path works
            finally:
                await reader.close()
            # No secret: the store cannot even start its engine on the guarded metadata server,
            # and a bare engine cannot list or read the records.
            with pytest.raises(MetadataAuthError):
                await P2PStore.open(url, engine_options={"transfer": {"enable_shm": False}})
            async with aiohttp.ClientSession() as http:
                async with http.get(url, params={"key": "mooncake/p2p/objects/weights/x"}) as r:
                    assert r.status == 401
        finally:
            await owner.close()


async def test_proxy_api_key() -> None:
    engine = await MiniEngine().start()
    proxy = Proxy([InstanceSpec(engine.url, "mixed")],
                  settings=ProxySettings(port=0, api_key="client-key", health_interval=0.2))
    await proxy.start()
    try:
        async with httpx.AsyncClient(base_url=proxy.url, timeout=10) as client:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = await client.post("/v1/completions", headers=headers,
                                      json={"model": "mini", "prompt": "x"})
                assert r.status_code == 401
                assert (await client.get("/v1/models", headers=headers)).status_code == 401
        assert not engine.requests
    finally:
        await proxy.stop()
        await engine.stop()


async def test_proxy_store_lookup_uses_the_cluster_secret() -> None:
    """The proxy's master client (``--master``) authenticates like a store client: the cluster
    secret from the config sources; without it the lookup is refused, not answered."""
    from scheduler.proxy.cli import _store_lookup
    from transfer.config import load_config

    async with MasterServer(master_config()) as master:
        address = f"127.0.0.1:{master.rpc.port}"
        lookup = _store_lookup(address, load_config(env={"MOONCAKE_AUTH_SECRET": SECRET}))
        assert await lookup(["no-such-key"]) == [False]
        anonymous = _store_lookup(address, load_config(env={}))
        with pytest.raises(Exception) as refused:
            await asyncio.wait_for(anonymous(["no-such-key"]), 30)
        assert "auth" in str(refused.value).lower() or isinstance(refused.value, RpcAuthError)
